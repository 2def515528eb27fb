"""`tracer inspect`: what is in a golden or trace file, stage by stage."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.tree import Tree

from tracer.stages import StageSelector, split_stage
from tracer.store import CaseView, StageFile

META_KEYS = ("kind", "model_source", "dtype", "device", "attn_implementation", "tf32", "created", "producer",
             "golden_id", "backend", "mode", "weights_xxh3", "weights_sha256", "storage_dtype", "compression",
             "versions")


def stage_summary(case: CaseView, stage: str, token: int, group: str = "stages") -> dict[str, Any]:
    """Shape, dtype, finite min/max/mean/std and the first 8 values at `token` (batch row 0)."""
    ds = case.dataset(stage, group)
    data = case.read(stage, group)
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data.ravel()
    first8 = case.read_token(stage, token, group=group).reshape(-1)[:8] if data.ndim >= 2 else data.ravel()[:8]
    stats = finite.astype(np.float64)
    return {
        "stage": stage,
        "shape": list(ds.shape),
        "dtype": ds.attrs.get("storage_dtype") or str(ds.dtype),  # a narrowed stage: what it is stored as
        "hf_module": ds.attrs.get("hf_module", ""),
        "min": float(stats.min()) if stats.size else None,
        "max": float(stats.max()) if stats.size else None,
        "mean": float(stats.mean()) if stats.size else None,
        "std": float(stats.std()) if stats.size else None,
        "nonfinite": int(data.size - finite.size),
        "token": token,
        "first8": [float(v) for v in first8],
    }


def inspect_file(f: StageFile, selector: StageSelector, token: int) -> dict[str, Any]:
    """Everything `inspect` shows, as plain data (also the `--json` output)."""
    cases = []
    matched = False
    for case in f.cases():
        names = [n for n in case.stages() if selector.matches(n)]
        matched |= bool(names)
        cases.append({
            "case": case.name,
            "input_ids_shape": list(case.input_ids.shape),
            "prompts": case.prompts,
            "stages": [stage_summary(case, n, token) for n in names],
            "modules": len(case.modules()),
        })
    if selector.patterns and not matched:
        selector.select([n for c in f.cases() for n in c.stages()])  # raises with the known names
    meta = {k: f.attrs[k] for k in META_KEYS if k in f.attrs}
    return {"schema_version": 1, "file": str(f.path), "format_version": f.attrs.get("format_version"),
            "metadata": meta, "weights": len(f.h5["weights"]) if f.has_weights else 0, "cases": cases}


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def render_inspection(info: dict[str, Any], console: Console) -> None:
    meta = Table.grid(padding=(0, 2))
    for key, value in info["metadata"].items():
        meta.add_row(f"[bold]{key}[/]", str(value))
    meta.add_row("[bold]weights[/]", f"{info['weights']} arrays" if info["weights"] else "not stored")
    console.print(Panel(meta, title=f"{info['file']} · format v{info['format_version']}", expand=False))
    tree = Tree(f"[bold]{len(info['cases'])} case(s)[/]")
    for case in info["cases"]:
        prompts = f" prompts={case['prompts']}" if case["prompts"] else ""
        node = tree.add(f"[bold cyan]{case['case']}[/] input_ids {case['input_ids_shape']}{prompts} · "
                        f"{len(case['stages'])} stages · {case['modules']} HF module links")
        table = Table(box=None, pad_edge=False, show_edge=False)
        token = case["stages"][0]["token"] if case["stages"] else 0
        table.add_column("stage", no_wrap=True, min_width=20)
        table.add_column("shape", no_wrap=True, min_width=9)
        table.add_column("dtype", no_wrap=True)
        for col in ("min", "max", "mean", "std"):
            table.add_column(col, no_wrap=True, justify="right")
        table.add_column(f"first 8 @ token {token}", overflow="fold", min_width=16)
        block = None
        for s in case["stages"]:
            b = split_stage(s["stage"])[0]
            if b != block and block is not None:
                table.add_section()
            block = b
            bad = f" [red]{s['nonfinite']} non-finite[/]" if s["nonfinite"] else ""
            table.add_row(s["stage"], "×".join(map(str, s["shape"])), s["dtype"], _fmt(s["min"]), _fmt(s["max"]),
                          _fmt(s["mean"]), _fmt(s["std"]) + bad, " ".join(f"{v:.4g}" for v in s["first8"]))
        node.add(Group(table))
    console.print(tree)
