"""The Markdown report: short enough for a PR comment or a CI step summary.

A one-line verdict, the divergence (stage, origin, diagnosis with evidence, the tolerance it
would have needed), a table of failing stages with inherited runs folded, and the First-8
table of the origin stage.
"""

from __future__ import annotations

from tracer.compare.result import CaseResult, CompareResult, First8, StageResult
from tracer.reports.common import (
    Run,
    backend_line,
    chained_ratio,
    collapse,
    coverage_line,
    fmt_num,
    fmt_ratio,
    focus_stages,
    group_by_block,
    is_inherited,
    other_origins,
    out_of_tolerance,
    passing_tolerance_line,
    table_label,
    verdict_line,
)


def _cell(text: str) -> str:
    """Table cell text: pipes and newlines would break the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(result: CompareResult) -> str:
    icon = "✅" if result.passed else "❌"
    lines = [f"{icon} **{_cell(verdict_line(result))}**", "",
             f"golden `{result.golden}` · trace `{result.trace}` · backend {backend_line(result)} · "
             f"tolerance {result.tolerance}", ""]
    for case in result.cases:
        if coverage_line(case):
            lines += [f"- case `{case.case}`: {_cell(coverage_line(case))}", ""]
        if case.first_divergence:
            lines += _case(case, multi=len(result.cases) > 1)
    if result.regressions:
        lines += ["### Regressions against the baseline", "", "| case | stage | kind | baseline | now | detail |",
                  "|---|---|---|---:|---:|---|"]
        lines += [f"| {_cell(r.case)} | `{r.stage}` | {r.kind} | {fmt_num(r.baseline)} | {fmt_num(r.current)} | "
                  f"{_cell(r.detail)} |" for r in result.regressions]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _case(case: CaseResult, multi: bool) -> list[str]:
    by_name = {s.stage: s for s in case.stages}
    lines = [f"### Divergence{f' in case `{case.case}`' if multi else ''}", ""]
    lines.append(f"- **first divergence:** `{case.first_divergence}`")
    if case.origin:
        lines.append(f"- **origin:** `{case.origin}` — {case.origin_reasoning or ''}".rstrip(" —"))
    for s in focus_stages(case):
        lines += _stage_facts(s)
    more = other_origins(case)
    if more:
        lines.append("- **also introducing error:** " + ", ".join(f"`{s.stage}`" for s in more))
    lines.append("")
    lines += _failing_table(case)
    origin = by_name.get(case.origin or "")
    if origin is not None and origin.tables:
        lines += [f"First 8 values of `{origin.stage}` (`*` = out of tolerance):", ""]
        for k, t in enumerate(origin.tables):
            lines += [f"_{table_label(k, t)}_", ""] + _first8(t) + [""]
    return lines


def _stage_facts(s: StageResult) -> list[str]:
    out = [f"- `{s.stage}`: error {fmt_num(s.error)} vs tolerance {fmt_num(s.tolerance)}"
           + (f"; introduced {fmt_num(s.local_error)} vs {fmt_num(s.local_tolerance)}" if s.local_error is not None
              else "")]
    if s.where:
        out.append(f"  - where: {s.where}")
    if s.note:
        out.append(f"  - note: {s.note}")
    line = passing_tolerance_line(s)
    if line:
        out.append(f"  - would pass at {line}")
    for d in s.diagnoses:
        out.append(f"  - **diagnosis ({d.verdict}):** {d.bug} (`{d.rule}`) — {d.evidence}")
    if s.failed and not s.diagnoses:
        out.append("  - no diagnosis: no hypothesis reproduces this error")
    return out


def _failing_table(case: CaseResult) -> list[str]:
    bad = [s for s in case.stages if s.failed]
    passing = sum(s.status == "pass" for s in case.stages)
    others = len(case.stages) - len(bad) - passing
    keep = {n for n in (case.first_divergence, case.origin) if n}
    lines = [f"{len(bad)} failing stage{'s' * (len(bad) != 1)}, {passing} passing"
             + (f", {others} missing or not comparable" if others else "") + ":", "",
             "| stage | status | error | tolerance | introduced | its tolerance | error/tol |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for group in group_by_block(case.stages):
        for row in collapse(group.stages, keep):
            if isinstance(row, Run) and row.kind == "inherited":
                w = row.worst
                lines.append(f"| `{row.stages[0].stage}` … `{row.stages[-1].stage}` | {len(row.stages)} fail, "
                             f"inherited | ≤ {fmt_num(w.error)} | | | | ≤ {fmt_ratio(chained_ratio(w))} |")
            elif isinstance(row, StageResult) and row.failed:
                status = row.status + (" (inherited)" if is_inherited(row) else "")
                lines.append(f"| `{row.stage}` | {status} | {fmt_num(row.error)} | {fmt_num(row.tolerance)} | "
                             f"{fmt_num(row.local_error)} | {fmt_num(row.local_tolerance)} | "
                             f"{fmt_ratio(chained_ratio(row))} |")
    return lines + [""]


def _first8(t: First8) -> list[str]:
    marks = out_of_tolerance(t)
    n = len(t.golden)

    def row(label: str, values: list[float], absolute: bool = False) -> str:
        cells = [fmt_num(abs(v) if absolute else v) + ("\\*" if bad and label != "golden" else "")
                 for v, bad in zip(values, marks)]
        return f"| {label} | " + " | ".join(cells) + " |"

    return ["| | " + " | ".join(str(i) for i in range(n)) + " |", "|---|" + "---:|" * n,
            row("golden", t.golden), row("candidate", t.candidate), row("\\|diff\\|", t.diff, absolute=True)]
