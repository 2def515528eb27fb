"""The audit as a rich terminal report and as JSON (schema in docs/WEIGHTS.md).

Problems are listed one by one with their fix; parameters that are fine are grouped by kind
(`transformer.h.{i}.attn.c_attn.weight` ×48) unless `--verbose`, so a gpt2-xl audit stays readable.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tracer.reports.common import fmt_num
from tracer.weights.audit import AuditResult, Finding
from tracer.weights.golden import layer_of, layer_template
from tracer.weights.views import compact_source, describe_source, source_tensors

SCHEMA_VERSION = 1
STATUS_STYLE = {"ok": "green", "misplaced": "yellow", "mismatch": "red", "missing": "red"}
_LAYER = re.compile(r"\.h\.\d+\.")


def storage_of(f: Finding, result: AuditResult) -> str | None:
    if f.source is None:
        return None
    return ", ".join(dict.fromkeys(result.storage[t] for t in source_tensors(f.source)))


def error_text(f: Finding) -> str:
    """`exact`, or the relative error (and the worst error in quantization steps, when known)."""
    c = f.check
    if c is None:
        return "—"
    if c.exact:
        return "exact"
    text = f"rel {fmt_num(c.rel_l2)}"
    return text + (f", ≤{c.max_steps:.2f} step" if c.max_steps is not None and math.isfinite(c.max_steps) else "")


def finding_dict(f: Finding, result: AuditResult) -> dict:
    quants = [result.quant[t] for t in source_tensors(f.source) if t in result.quant] if f.source else []
    return {
        "name": f.param, "shape": list(f.shape), "status": f.status, "ok": f.ok, "forms": f.forms,
        "found_by": f.found_by, "source": describe_source(f.source) if f.source else None,
        "tensors": source_tensors(f.source) if f.source else [], "storage": storage_of(f, result),
        "quant": quants[0] if quants else None, "metrics": _finite(f.check.metrics()) if f.check else None,
        "problem": f.problem, "fix": f.fix,
    }


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def to_dict(result: AuditResult) -> dict:
    counts: dict[str, int] = {}
    for f in result.findings:
        counts[f.status] = counts.get(f.status, 0) + 1
    return {
        "schema_version": SCHEMA_VERSION, "kind": "weights-audit", "golden": result.golden,
        "checkpoint": result.checkpoint, "format": result.format, "names": result.names, "passed": result.passed,
        "seconds": round(result.seconds, 3), "checkpoint_bytes": result.checkpoint_bytes,
        "summary": {"parameters": len(result.findings), **counts,
                    "unused": len(result.leftovers), "suspicious_unused": sum(1 for x in result.leftovers if x.problem)},
        "parameters": [finding_dict(f, result) for f in result.findings],
        "unused": [{"name": x.tensor, "shape": list(x.shape), "storage": x.storage, "values": x.note,
                    "problem": x.problem} for x in result.leftovers],
        "skipped": result.skipped,
    }


def _short(param: str) -> str:
    return param[len("transformer."):] if param.startswith("transformer.") else param


def _group_key(f: Finding, result: AuditResult) -> tuple:
    layer = layer_of(f.param)
    name = _LAYER.sub(".h.{i}.", f.param) if layer is not None else f.param
    return name, tuple(f.forms), storage_of(f, result)


def _source_text(members: list[Finding]) -> str:
    """The members' source with the block number as {i} (the first member's when that is ambiguous)."""
    f = members[0]
    text = compact_source(f.source) if f.source else "—"
    layer = layer_of(f.param)
    if len(members) == 1 or layer is None:
        return text
    general = [layer_template(compact_source(m.source), layer_of(m.param)) for m in members]
    return general[0] if general[0] is not None and len(set(general)) == 1 else f"{text}, …"


def render(result: AuditResult, console: Console, verbose: bool = False) -> None:
    verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
    console.print(f"{verdict}  weights of [bold]{escape(result.checkpoint)}[/] ({result.format}, "
                  f"{result.checkpoint_bytes / 1e6:.1f} MB) against {escape(result.golden)}")
    console.print(f"names: {escape(result.names)}", style="dim", highlight=False)
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("parameter", "status", "found as", "in", "storage", "error"):
        table.add_column(col, overflow="fold")
    groups: OrderedDict[tuple, list[Finding]] = OrderedDict()
    for f in result.findings:
        key = (f.param,) if verbose or not f.ok else _group_key(f, result)
        groups.setdefault(key, []).append(f)
    for members in groups.values():
        f = members[0]
        name = _short(f.param) if len(members) == 1 else f"{_short(_group_key(f, result)[0])} ×{len(members)}"
        worst = max(members, key=lambda m: m.check.rel_l2 if m.check else 0.0)
        style = STATUS_STYLE[f.status]
        table.add_row(escape(name), f"[{style}]{f.status}[/]", ", ".join(f.forms) or "—", escape(_source_text(members)),
                      escape(storage_of(f, result) or "—"), error_text(worst))
    console.print(table)
    problems = [f for f in result.findings if not f.ok]
    for f in problems:
        console.print(f"[{STATUS_STYLE[f.status]}]✗[/] [bold]{escape(f.param)}[/]: {escape(f.problem or f.status)}",
                      highlight=False)
        if f.fix:
            console.print(f"    fix: {escape(f.fix)}", style="cyan", highlight=False)
    if result.leftovers:
        console.print("[bold]tensors that hold no parameter[/]")
        for x in result.leftovers:
            mark = "[red]✗[/]" if x.problem else "[dim]·[/]"
            text = f"{escape(x.tensor)} {list(x.shape)} {escape(x.storage)}: {escape(x.note)}"
            console.print(f"{mark} {text}" + (f" — {escape(x.problem)}" if x.problem else ""), highlight=False)
    counts = OrderedDict((s, sum(1 for f in result.findings if f.status == s)) for s in STATUS_STYLE)
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    suspicious = sum(1 for x in result.leftovers if x.problem)
    console.print(f"{len(result.findings)} parameters: {parts}; {len(result.leftovers)} unused tensor(s)"
                  + (f" ({suspicious} suspicious)" if suspicious else "") + f"; {result.seconds:.1f} s",
                  highlight=False)


def write_json(result: AuditResult, path: Path, force: bool = False) -> None:
    import json

    from tracer.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(to_dict(result), indent=2) + "\n", force)
