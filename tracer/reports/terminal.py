"""The terminal report (rich): what `tracer compare` prints, readable in 80 columns.

Per case a stage table grouped by block, with a log-scale error bar per stage so the eye finds
where error appears and where it is only carried along; then the divergence panel (origin and
why, where inside the stage, diagnoses with evidence, the tolerance under which it would have
passed, First-8 tables). A passing run is a short green summary.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tracer.compare.result import CaseResult, CompareResult, First8, StageResult
from tracer.reports.common import (DERIVED_MARK, STATUS_GLYPH, STATUS_STYLE, TOL_FRACTION, Run, backend_line,
                                   bar_fraction, chained_ratio, collapse, coverage_line, failing, fmt_num, fmt_ratio,
                                   focus_stages, group_by_block, inputs_line, other_origins, out_of_tolerance,
                                   passing_tolerance_line, print_line, shown_name, table_label, verdict_line)
from tracer.stages import StageSelector

BAR_WIDTH = 10
STAGE_WIDTH = 16
EIGHTHS = " ▏▎▍▌▋▊▉█"


def render_terminal(result: CompareResult, console: Console, *, stage_glob: str | None = None,
                    token: int | None = None, log_format: bool = False, verbose: bool = False) -> None:
    """Print the report. `stage_glob` filters table rows, `token` labels the asked First-8 table,
    `log_format` adds debug-print lines, `verbose` shows every stage and every case in full."""
    selector = StageSelector.parse(stage_glob)
    if selector.patterns:  # a glob matching nothing is a usage error (TracerError), as in compare
        selector.select(list(dict.fromkeys(s.stage for c in result.cases for s in c.stages)))
    console.print(_header(result))
    for case in result.cases:
        bad = failing(case)
        if not bad and not verbose:
            continue
        rows = [s for s in case.stages if selector.matches(s.stage)]
        console.print(_stage_table(case, rows, verbose))
        if bad:
            console.print(_divergence_panel(case, token))
            if log_format:
                _print_seed_lines(case, console)
    if result.regressions:
        console.print(_regressions(result))
    _print_verdict(result, console)


def _header(result: CompareResult) -> Panel:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    g, t = result.golden_meta, result.trace_meta
    grid.add_row("golden", f"{result.golden}  [dim]{g.get('model_source', '')}[/]")
    grid.add_row("trace", result.trace)
    grid.add_row("backend", backend_line(result))
    grid.add_row("dtype", f"golden {g.get('dtype', '—')}, trace {t.get('dtype', '—')}")
    grid.add_row("tolerance", result.tolerance)
    if t.get("foreign_unmatched"):
        grid.add_row("unmatched", Text(f"arrays of the dump matching no stage (left out): {t['foreign_unmatched']}",
                                       style="yellow"))
    if result.baseline:
        grid.add_row("baseline", result.baseline)
    return Panel(grid, title="tracer compare", title_align="left", expand=False)


def _print_verdict(result: CompareResult, console: Console) -> None:
    line = verdict_line(result)
    style = "bold green" if result.passed else "bold red"
    console.print(Text(line, style=style))
    for case in result.cases:
        line = coverage_line(case)
        if line:
            console.print(Text(f"  {case.case}: {line}", style="green" if result.passed else "yellow"))


# -- stage table ---------------------------------------------------------------------------------

def error_bar(r: float | None, width: int = BAR_WIDTH) -> Text:
    """log10(error / tolerance) as a bar: green up to the tolerance mark, red beyond it."""
    frac = bar_fraction(r)
    tol_cell = round(TOL_FRACTION * width)
    if frac is None:
        return Text("")
    eighths = round(frac * width * 8)
    full, part = divmod(eighths, 8)
    cells = "█" * full + (EIGHTHS[part] if part else "")
    text = Text()
    text.append(cells[:tol_cell], style="green")
    text.append(cells[tol_cell:], style="red")
    if len(cells) < tol_cell:  # show where the tolerance is
        text.append(" " * (tol_cell - len(cells)) + "│", style="dim")
    return text


def _glyph(status: str, suffix: str = "") -> Text:
    return Text(STATUS_GLYPH[status] + suffix, style=STATUS_STYLE[status])


def _stage_table(case: CaseResult, rows: list[StageResult], verbose: bool) -> Table:
    keep = {n for n in (case.first_divergence, case.origin) if n}
    legend = "  ".join(f"{g} {k}" for k, g in STATUS_GLYPH.items()) + f"  {DERIVED_MARK} derived"
    table = Table(title=f"case {case.case}", title_justify="left", title_style="bold", box=None, pad_edge=False,
                  show_edge=False, header_style="bold", padding=(0, 1), caption=legend, caption_justify="left",
                  caption_style="dim")
    table.add_column("stage", no_wrap=True, max_width=STAGE_WIDTH)
    table.add_column("", no_wrap=True)
    for name in ("error", "tol", "intro", "i.tol", "ampl"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("err/tol (log)", no_wrap=True, min_width=BAR_WIDTH + 1)
    for group in group_by_block(rows):
        table.add_row(Text(group.label, style="bold cyan"))
        for row in collapse(group.stages, keep, verbose):
            if isinstance(row, Run):
                _add_run(table, row)
            else:
                _add_stage(table, row, keep)
    return table


def _add_stage(table: Table, s: StageResult, keep: set[str]) -> None:
    name = Text(" " + shown_name(s), style="bold" if s.stage in keep else "")
    local = Text(fmt_num(s.local_error), style="bold red" if s.fails_local else "")
    error = Text(fmt_num(s.error), style="red" if s.fails_chained else "")
    ampl = fmt_ratio(s.amplification) if s.amplification is not None else "—"
    table.add_row(name, _glyph(s.status), error, fmt_num(s.tolerance), local, fmt_num(s.local_tolerance), ampl,
                  error_bar(chained_ratio(s)))


def _add_run(table: Table, run: Run) -> None:
    """One line for a run: its span, how many, and its worst stage's numbers (dim)."""
    worst = run.worst
    glyph = _glyph("pass" if run.kind == "pass" else "fail", f"{len(run.stages)}")
    note = "" if run.kind == "pass" else "inh."
    table.add_row(Text(" " + run.span(STAGE_WIDTH - 1), style="dim"), glyph, Text(fmt_num(worst.error), style="dim"),
                  Text(fmt_num(worst.tolerance), style="dim"), Text(note, style="dim"), "", "",
                  error_bar(chained_ratio(worst)))


# -- divergence --------------------------------------------------------------------------------

def _divergence_panel(case: CaseResult, token: int | None) -> Panel:
    parts: list = []
    if case.first_divergence:
        parts.append(Text.assemble(("first divergence ", "bold"), (case.first_divergence, "bold red")))
    if case.origin:
        parts.append(Text.assemble(("origin           ", "bold"), (case.origin, "bold red")))
    if case.origin_reasoning:
        parts.append(Text(case.origin_reasoning, style="dim"))
    for s in focus_stages(case):
        parts.append(Text(""))
        parts.extend(_stage_detail(s, token))
    more = other_origins(case)
    if more:
        names = ", ".join(s.stage for s in more[:6]) + (f" and {len(more) - 6} more" if len(more) > 6 else "")
        parts.append(Text(f"\nalso introducing error: {names}", style="yellow"))
    return Panel(Group(*parts), title=f"divergence · case {case.case}", title_align="left", border_style="red")


def _stage_detail(s: StageResult, token: int | None) -> list:
    facts = Table.grid(padding=(0, 1))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    if s.where:
        facts.add_row("where", s.where)
    if s.derived:
        facts.add_row("derived", f"not in the dump: {s.derived}")
    if s.note:
        facts.add_row("note", s.note)
    if inputs_line(s):
        facts.add_row("inputs", inputs_line(s))
    line = passing_tolerance_line(s)
    if line:
        facts.add_row("would pass at", line)
    for d in s.diagnoses:
        style = "bold green" if d.verdict == "confirmed" else "yellow"
        facts.add_row("diagnosis", Text.assemble((d.verdict, style), f" {d.bug} [{d.rule}]"))
        facts.add_row("", Text(d.evidence, style="dim"))
    if s.failed and not s.diagnoses:
        facts.add_row("diagnosis", Text("no hypothesis reproduces this error", style="dim"))
    out: list = [Text.assemble((s.stage, "bold"), "  ", _glyph(s.status, f" {s.status}")), facts]
    for k, t in enumerate(s.tables):
        out.append(Text(table_label(k, t, token), style="bold"))
        out.append(first8_table(t))
    return out


def first8_table(t: First8) -> Table:
    """golden / candidate / |diff| rows; out-of-tolerance cells red with a `*`."""
    table = Table(box=None, pad_edge=False, show_header=True, header_style="dim", padding=(0, 0, 0, 1))
    table.add_column("", style="bold", no_wrap=True)
    for k in range(len(t.golden)):
        table.add_column(str(k), justify="right", no_wrap=True)
    marks = out_of_tolerance(t)
    table.add_row("golden", *map(fmt_num, t.golden))
    table.add_row("cand.", *[Text(fmt_num(v), style="red" if bad else "") for v, bad in zip(t.candidate, marks)])
    table.add_row("|diff|", *[Text(fmt_num(abs(v)) + ("*" if bad else ""), style="bold red" if bad else "dim")
                              for v, bad in zip(t.diff, marks)])
    return table


def _print_seed_lines(case: CaseResult, console: Console) -> None:
    """Debug-print lines, golden then candidate, for each First-8 table of the divergence stages."""
    stages = focus_stages(case)
    for side in ("golden", "candidate"):
        console.print(Text(f"# debug-print lines · {side} · case {case.case}", style="dim"))
        for s in stages:
            for t in s.tables:
                console.print(print_line(s.stage, t, t.golden if side == "golden" else t.candidate),
                              markup=False, highlight=False, emoji=False, soft_wrap=True)


def _regressions(result: CompareResult) -> Table:
    table = Table(title="regressions against the baseline", title_justify="left", title_style="bold red",
                  box=None, pad_edge=False, padding=(0, 1))
    for col in ("case", "stage", "kind", "baseline", "now"):
        table.add_column(col, no_wrap=col != "stage")
    for r in result.regressions:
        table.add_row(r.case, r.stage, Text(r.kind, style="red"), fmt_num(r.baseline), fmt_num(r.current))
    return table
