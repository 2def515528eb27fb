"""`tracer inspect`: what is in a golden or trace file, stage by stage."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.stages import StageSelector
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
        # NaN or +Inf anywhere, or -Inf outside the masked scores: a broken recording, never a masked entry
        "broken": int(np.isnan(data).sum() + np.isposinf(data).sum()
                      + (0 if stage.endswith("attn.scores") else np.isneginf(data).sum())) if data.dtype.kind == "f" else 0,
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


def _fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}g}"


def render_inspection(info: dict[str, Any], console: Console) -> None:
    """Metadata, then per case one line of statistics per stage with its first 8 values on a line
    of their own, laid out to fit the console (80 columns included) rather than cut by it."""
    meta = Table.grid(padding=(0, 2))
    meta.add_column(no_wrap=True)
    meta.add_column(overflow="fold")  # hashes have no spaces to wrap at: fold them, never cut them
    for key, value in info["metadata"].items():
        meta.add_row(f"[bold]{escape(key)}[/]", escape(str(value)))
    meta.add_row("[bold]weights[/]", f"{info['weights']} arrays" if info["weights"] else "not stored")
    console.print(Panel(meta, title=escape(f"{info['file']} · format v{info['format_version']}"), expand=False))
    for case in info["cases"]:
        prompts = f" prompts={case['prompts']}" if case["prompts"] else ""
        dtypes = sorted({s["dtype"] for s in case["stages"]})
        dtype = f" · {dtypes[0]}" if len(dtypes) == 1 else ""  # one dtype for all: said here, not in a column
        ids = "×".join(map(str, case["input_ids_shape"]))
        console.print(Text.assemble((case["case"], "bold cyan"), f" input_ids {ids}{prompts} · {len(case['stages'])} "
                                    f"stages{dtype} · {case['modules']} HF module links"))
        if case["stages"]:
            _stage_lines(case["stages"], console)


def _stage_lines(stages: list[dict[str, Any]], console: Console) -> None:
    width = console.width
    shapes = ["×".join(map(str, s["shape"])) for s in stages]
    dtypes = sorted({s["dtype"] for s in stages})
    show_dtype = len(dtypes) > 1
    w_stage = max(5, *(len(s["stage"]) for s in stages))
    w_shape = max(5, *map(len, shapes))
    w_dtype = max(len(d) for d in dtypes) + 2 if show_dtype else 0
    digits = 4
    while digits > 2 and w_stage + w_shape + 2 + w_dtype + 4 * (digits + 7) > width:
        digits -= 1  # fewer significant digits before anything is cut
    w_num = digits + 7  # sign, point, e-XX and a space

    def row(stage: str, shape: str, dtype: str, numbers: list[str]) -> str:
        cells = stage.ljust(w_stage) + "  " + shape.ljust(w_shape) + (dtype.ljust(w_dtype) if show_dtype else "")
        return cells + "".join(n.rjust(w_num) for n in numbers)

    head = row("stage", "shape", "dtype", ["min", "max", "mean", "std"])
    console.print(Text(head, style="bold"), no_wrap=True, crop=False)
    for s, shape in zip(stages, shapes):
        stats = [_fmt(s[k], digits) for k in ("min", "max", "mean", "std")]
        console.print(row(s["stage"], shape, s["dtype"], stats), highlight=False, markup=False)
        if s["broken"]:
            console.print(Text(f"  ! {s['broken']} NaN/Inf values: this stage cannot be compared against",
                               style="bold red"), no_wrap=True, crop=False)
        label = f"  first 8 @ token {s['token']}:"
        values = [f"{v:.4g}" for v in s["first8"]]
        bad = [f"({s['nonfinite']} non-finite)"] if s["nonfinite"] else []
        for line in _wrap(label, values + bad, width):
            console.print(Text(line, style="dim"), no_wrap=True, crop=False)


def _wrap(label: str, words: list[str], width: int) -> list[str]:
    """`label w0 w1 ...` in lines of at most `width`, continuation lines indented under the first value."""
    lines, line = [], label
    indent = " " * (len(label) + 1)
    for w in words:
        if len(line) + 1 + len(w) > width and line.strip() != label.strip() and line != indent:
            lines.append(line)
            line = indent + w
        else:
            line = f"{line} {w}" if line != indent else line + w
    lines.append(line)
    return lines
