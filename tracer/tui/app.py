"""`tracer diff`: an interactive terminal view of one comparison, to look around a divergence.

Left: every stage of the case in execution order, grouped by block, with its status and a
log-scale error bar. Right: the selected stage's numbers and diagnoses, the First-8 table at
the selected token, and a heat map of per-cell error (tokens × channels, or query × key of
one head). Moving around never reruns anything: the comparison result is computed once and
stage values are read lazily, one slice at a time (see `tracer.tui.data`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group
from rich.segment import Segment
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.geometry import Size
from textual.screen import ModalScreen
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from tracer.compare.result import CaseResult, CompareResult, First8, StageResult
from tracer.reports.common import (STATUS_GLYPH, STATUS_STYLE, block_label, chained_ratio, fmt_num, local_name,
                                   out_of_tolerance, passing_tolerance_line, print_line)
from tracer.reports.terminal import error_bar
from tracer.stages import layout_of
from tracer.tui.data import METRIC_LABELS, METRICS, StageData, StageSlice
from tracer.tui.heatmap import BOLD, DIM, Line, Window, fit_window, heatmap_lines

LIST_WIDTH = 24
BAR = 6
NAME = 11
COMPACT_HEIGHT = 30  # below this many lines, 4 lines of facts instead of 6


KEYS = (  # (keys, what they do): the help screen and docs/TUI.md show the same table
    ("↑ ↓  j k", "previous / next stage"),
    ("n  p", "next / previous failing stage"),
    ("o", "jump to the origin (the stage that introduces the error)"),
    ("f", "jump to the first divergence"),
    ("/", "search stages by name (Enter keeps, Esc goes back)"),
    ("← →  h l", "previous / next token (query row)"),
    (",  .", "previous / next channel (key, head dim)"),
    ("[  ]", "previous / next window of channels"),
    ("+  -", "next / previous head (attention stages)"),
    ("b", "next batch row"),
    ("m", "switch metric: relative error, abs error, log10 abs error"),
    ("w", "jump to the worst cell in view (this batch row and head)"),
    ("y", "keep the debug-print lines of this row (printed on exit)"),
    ("?", "this help"),
    ("q", "quit"),
)


@dataclass
class Cursor:
    """Where the user is looking, kept across stages so neighbours can be compared at one spot
    (channels and keys are kept apart: a layout's column survives a visit to another layout)."""

    token: int = 0
    batch: int = 0
    head: int = 0
    metric: str = METRICS[0]
    columns: dict[str, tuple[int, int]] = field(default_factory=dict)  # layout -> (column, window start)

    def column(self, layout: str) -> tuple[int, int]:
        return self.columns.get(layout, (0, 0))

    def set_column(self, layout: str, column: int, start: int) -> None:
        self.columns[layout] = (column, start)


class HeatMap(Widget):
    """Draws the current slice's error window to fit whatever size it is given (line API: the
    lines are built once per change and handed out as strips, not re-laid-out as text)."""

    DEFAULT_CSS = "HeatMap { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.piece: StageSlice | None = None
        self.args: tuple = ()
        self.window: Window | None = None
        self._lines: list[Line] | None = None
        self._built_for: Size | None = None

    def show(self, piece: StageSlice, metric: str, tolerance: float | None, token: int, column: int,
             start: int) -> None:
        self.piece, self.args = piece, (metric, tolerance, token, column, start)
        self.window = self._fit()
        self._lines = None
        self.refresh()

    def _fit(self) -> Window | None:
        if self.piece is None or self.piece.candidate is None:
            return None
        _, _, token, column, start = self.args
        width, height = self.size.width or 80, self.size.height or 13
        return fit_window(self.piece, token, column, start, max(height - 3, 1), width)

    def lines(self) -> list[Line]:
        """Title, axis, one line per token, legend: what is on screen."""
        if self._lines is None or self._built_for != self.size:
            self.window = self._fit()
            self._lines, self._built_for = self._build(), self.size
        return self._lines

    def _build(self) -> list[Line]:
        piece, w = self.piece, self.window
        if piece is None:
            return []
        if w is None:
            return [[Segment(f"no heat map: {piece.note}", DIM)]]
        metric, tolerance, token, column, _ = self.args
        rows = "query" if piece.layout == "BHTT" else "token"
        head = f" · head {piece.head}/{piece.n_heads}" if piece.head is not None else ""
        title = (f"{rows} {w.t0}–{w.t1 - 1}/{piece.shape[0]} × {piece.column_name} {w.c0}–{w.c1 - 1}/"
                 f"{piece.n_columns}{head} · {METRIC_LABELS[metric]}")
        return [[Segment(title, BOLD)], *heatmap_lines(piece, metric, tolerance, token, column, w)]

    def render_line(self, y: int) -> Strip:
        lines, base = self.lines(), self.rich_style  # the pane's colours under the cells'
        strip = Strip(Segment.apply_style(lines[y], base)) if y < len(lines) else Strip.blank(0)
        return strip.crop_extend(0, self.size.width, base)


class HelpScreen(ModalScreen[None]):
    """The key map; any key closes it."""

    DEFAULT_CSS = "HelpScreen { align: center middle; } HelpScreen > Static { width: auto; max-width: 90%; " \
                  "border: round $accent; background: $surface; padding: 0 1; }"

    def compose(self) -> ComposeResult:
        text = Text()
        for keys, what in KEYS:
            text.append(f"{keys:<10}", style="bold")
            text.append(f"{what}\n")
        text.append("any key closes this", style="dim")
        yield Static(text)

    def on_key(self, event) -> None:
        event.stop()
        self.dismiss()


class DiffApp(App[None]):
    """The interactive diff of one case. `yanked` holds the debug-print lines kept with `y`."""

    TITLE = "tracer diff"
    ENABLE_COMMAND_PALETTE = False
    # Fixed pane heights: a height that followed the content would re-layout the screen on every move.
    CSS = """
    Screen { layout: vertical; }
    #title { height: 1; background: $panel; color: $text; padding: 0 1; }
    #main { height: 1fr; }
    #stages { width: %d; height: 1fr; border: none; padding: 0; background: $surface;
              scrollbar-size-vertical: 1; }
    #stages:focus { border: none; }
    #detail { width: 1fr; height: 1fr; padding: 0 0 0 1; }
    #info { height: 6; }
    #first8 { height: 4; margin: 0 0 1 0; }
    .compact #info { height: 4; }
    .compact #first8 { margin: 0; }
    #cell { height: 1; background: $panel; padding: 0 1; }
    #search { dock: bottom; display: none; }
    """ % LIST_WIDTH
    BINDINGS = [
        Binding("n", "next_failure", "next"),
        Binding("p", "prev_failure", "prev"),
        Binding("o", "origin", "origin"),
        Binding("f", "first", "first"),
        Binding("slash", "search", "search"),
        Binding("m", "metric", "metric"),
        Binding("y", "yank", "yank"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
        Binding("j", "move(1)", show=False),
        Binding("k", "move(-1)", show=False),
        Binding("left,h", "token(-1)", show=False),
        Binding("right,l", "token(1)", show=False),
        Binding("comma", "column(-1)", show=False),
        Binding("full_stop", "column(1)", show=False),
        Binding("left_square_bracket", "page(-1)", show=False),
        Binding("right_square_bracket", "page(1)", show=False),
        Binding("plus,equals_sign", "head(1)", show=False),
        Binding("minus", "head(-1)", show=False),
        Binding("b", "batch", show=False),
        Binding("w", "worst", show=False),
        Binding("escape", "cancel_search", show=False),
    ]

    def __init__(self, result: CompareResult, data: StageData, case: CaseResult):
        super().__init__()
        self.result, self.data, self.case = result, data, case
        self.stages = sorted(case.stages, key=lambda s: s.order)
        self.by_name = {s.stage: s for s in self.stages}
        self.cursor = _start_cursor(case)
        self.stage = _start_stage(case, self.stages)
        self.piece: StageSlice | None = None
        self.yanked: list[str] = []
        self._before_search: str | None = None

    # -- layout ----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(self._title(), id="title")
        with Horizontal(id="main"):
            yield OptionList(*self._options(), id="stages")
            with Vertical(id="detail"):
                yield Static(id="info")
                yield Static(id="first8")
                yield HeatMap(id="heatmap")
        yield Static(id="cell")
        yield Input(placeholder="stage name (substring), Enter keeps, Esc goes back", id="search")
        yield Footer()

    def _title(self) -> Text:
        golden, trace = Path(self.result.golden).name, Path(self.result.trace).name  # no temp dirs on screen
        return Text.assemble(("tracer diff ", "bold"), f"{golden} vs {trace} · case {self.case.case}",
                             no_wrap=True, overflow="ellipsis")

    def _options(self) -> list[Option]:
        options, label = [], None
        for s in self.stages:
            if block_label(s.stage) != label:
                label = block_label(s.stage)
                options.append(Option(Text(label, style="bold cyan"), disabled=True))
            options.append(Option(_stage_line(s, s.stage in (self.case.origin, self.case.first_divergence)),
                                  id=s.stage))
        return options

    def on_mount(self) -> None:
        # The comparison result and the widgets live as long as the app: keep them out of the cyclic
        # collector's full passes, which otherwise stall a key press now and then by ~50 ms.
        gc.freeze()
        self._layout_class()
        stages = self.query_one("#stages", OptionList)
        stages.focus()
        self.select(self.stage)

    def on_resize(self) -> None:
        self._layout_class()

    def _layout_class(self) -> None:
        self.screen.set_class(self.size.height < COMPACT_HEIGHT, "compact")

    # -- stage selection -------------------------------------------------------------------
    def select(self, stage: str) -> None:
        """Put the list cursor on `stage` (which then shows it)."""
        stages = self.query_one("#stages", OptionList)
        index = stages.get_option_index(stage)
        if stages.highlighted == index:
            self.show_stage(stage)
        else:
            stages.highlighted = index
        stages.scroll_to_highlight()

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id:
            self.show_stage(event.option.id)

    def show_stage(self, stage: str) -> None:
        self.stage = stage
        self.refresh_detail()

    def refresh_detail(self) -> None:
        """Read what the cursor needs (the LRU makes that free when nothing moved) and redraw."""
        s, c, layout = self.by_name[self.stage], self.cursor, layout_of(self.stage)
        column, start = c.column(layout)
        first = self.data.get(self.stage, c.batch, c.head)  # first block: the First-8 columns
        column = min(column, first.n_columns - 1)
        piece = self.piece = self.data.get(self.stage, c.batch, c.head, column)
        c.token = min(c.token, piece.shape[0] - 1)
        width = max(self.size.width - LIST_WIDTH - 1, 24)  # the detail pane, less its left padding
        self.query_one("#info", Static).update(_info(s, piece))
        table = first.first8(c.token, s.tolerance)
        self.query_one("#first8", Static).update(_first8(table, width) if table else Text(""))
        heatmap = self.query_one("#heatmap", HeatMap)
        heatmap.show(piece, c.metric, s.tolerance, c.token, column, start)
        if heatmap.window is not None:
            c.set_column(piece.layout, column, heatmap.window.c0)
        self.query_one("#cell", Static).update(_cell_line(piece, c.token, column))

    # -- actions: stages -------------------------------------------------------------------
    def action_move(self, step: int) -> None:
        stages = self.query_one("#stages", OptionList)
        stages.action_cursor_down() if step > 0 else stages.action_cursor_up()

    def _jump_failure(self, step: int) -> None:
        names = [s.stage for s in self.stages]
        k = names.index(self.stage) + step
        while 0 <= k < len(names):
            if self.by_name[names[k]].failed:
                self.select(names[k])
                return
            k += step
        self.notify(f"no {'later' if step > 0 else 'earlier'} failing stage", timeout=2)

    def action_next_failure(self) -> None:
        self._jump_failure(1)

    def action_prev_failure(self) -> None:
        self._jump_failure(-1)

    def action_origin(self) -> None:
        self._jump_to(self.case.origin, "origin")

    def action_first(self) -> None:
        self._jump_to(self.case.first_divergence, "first divergence")

    def _jump_to(self, stage: str | None, what: str) -> None:
        if stage:
            self.select(stage)
        else:
            self.notify(f"no {what}: every stage passes", timeout=2)

    def action_search(self) -> None:
        search = self.query_one("#search", Input)
        self._before_search = self.stage
        search.value = ""
        search.display = True
        search.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        text = event.value.strip().lower()
        match = next((s.stage for s in self.stages if text and text in s.stage.lower()), None)
        if match:
            self.select(match)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._close_search()

    def action_cancel_search(self) -> None:
        if self.query_one("#search", Input).display:
            if self._before_search:
                self.select(self._before_search)
            self._close_search()

    def _close_search(self) -> None:
        self.query_one("#search", Input).display = False
        self._before_search = None
        self.query_one("#stages", OptionList).focus()

    # -- actions: inside the stage ---------------------------------------------------------
    def action_token(self, step: int) -> None:
        self.cursor.token = min(max(self.cursor.token + step, 0), self.piece.shape[0] - 1)
        self.refresh_detail()

    def action_column(self, step: int) -> None:
        layout = self.piece.layout
        column, start = self.cursor.column(layout)
        self.cursor.set_column(layout, min(max(column + step, 0), self.piece.n_columns - 1), start)
        self.refresh_detail()

    def action_page(self, step: int) -> None:
        layout, window = self.piece.layout, self.query_one("#heatmap", HeatMap).window
        if window is None:
            return
        n = self.piece.n_columns
        start = min(max(window.c0 + step * window.width, 0), max(n - window.width, 0))
        column, _ = self.cursor.column(layout)
        self.cursor.set_column(layout, min(max(column + (start - window.c0), 0), n - 1), start)
        self.refresh_detail()

    def action_head(self, step: int) -> None:
        if self.piece.n_heads is None:
            self.notify("heads: only attention stages (q, k, v, scores, probs) have them", timeout=2)
            return
        self.cursor.head = (self.piece.head + step) % self.piece.n_heads
        self.refresh_detail()

    def action_batch(self) -> None:
        self.cursor.batch = (self.piece.batch + 1) % self.piece.n_batch
        self.refresh_detail()

    def action_metric(self) -> None:
        c = self.cursor
        c.metric = METRICS[(METRICS.index(c.metric) + 1) % len(METRICS)]
        self.refresh_detail()

    def action_worst(self) -> None:
        if self.piece.candidate is None:
            return
        token, column = self.piece.worst_cell(self.cursor.metric)
        self.cursor.token = token
        self.cursor.set_column(self.piece.layout, column, self.cursor.column(self.piece.layout)[1])
        self.refresh_detail()

    def action_yank(self) -> None:
        c = self.cursor
        table = self.data.get(self.stage, c.batch, c.head).first8(c.token, self.by_name[self.stage].tolerance)
        if table is None:
            self.notify("nothing to keep: the trace has no values for this stage", timeout=2)
            return
        self.yanked += [print_line(self.stage, table, table.golden), print_line(self.stage, table, table.candidate)]
        self.notify(f"kept golden + candidate lines ({len(self.yanked)} in all, printed on exit)", timeout=2)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


# -- what the panes show ---------------------------------------------------------------------------

def _start_stage(case: CaseResult, stages: list[StageResult]) -> str:
    """The origin, else the first divergence, else the first stage."""
    return case.origin or case.first_divergence or stages[0].stage


def _start_cursor(case: CaseResult) -> Cursor:
    """On the origin's worst row (the comparator's second First-8 table: batch, head, token), else row 0."""
    start = case.origin or case.first_divergence
    tables = case.stage(start).tables if start else []
    if len(tables) < 2:
        return Cursor()
    worst = tables[1]
    return Cursor(token=worst.token, batch=worst.batch, head=worst.head or 0)


def _stage_line(s: StageResult, key: bool) -> Text:
    name = local_name(s.stage)
    name = name if len(name) <= NAME else name[:NAME - 1] + "…"
    text = Text(f" {name:<{NAME}} ", style="bold" if key else "")
    text.append(STATUS_GLYPH[s.status] + " ", style=STATUS_STYLE[s.status])
    text.append_text(error_bar(chained_ratio(s), BAR))
    return text


def _info(s: StageResult, piece: StageSlice) -> Group:
    lines = [Text.assemble((s.stage, "bold"), "  ", (f"{STATUS_GLYPH[s.status]} {s.status}",
                                                       STATUS_STYLE[s.status]))]
    nums = Text()
    nums.append(f"error {fmt_num(s.error)}", style="red" if s.fails_chained else "")
    nums.append(f" / tol {fmt_num(s.tolerance)}")
    if s.local_error is not None:
        nums.append(f" · intro {fmt_num(s.local_error)}", style="bold red" if s.fails_local else "")
        nums.append(f" / {fmt_num(s.local_tolerance)}")
    if s.metrics is not None:
        nums.append(f" · max|Δ| {fmt_num(s.metrics.max_abs)} · cos {s.metrics.cosine:.6f}", style="dim")
    lines.append(nums)
    for d in s.diagnoses[:2]:
        style = "bold green" if d.verdict == "confirmed" else "yellow"
        lines.append(Text.assemble((d.verdict, style), f" {d.bug} [{d.rule}]"))
    facts = [("where", s.where), ("note", s.note), ("passes at", passing_tolerance_line(s) if s.failed else None)]
    if piece.note and piece.note != s.note:
        facts.append(("view", piece.note))
    for label, value in facts:
        if value:
            lines.append(Text.assemble((f"{label} ", "bold"), (value, "dim")))
    for line in lines:
        line.no_wrap, line.overflow = True, "ellipsis"
    return Group(*lines)


def _first8(t: First8, width: int) -> Group:
    """golden / candidate / |diff| of the first 8 values, squeezed into `width` columns."""
    label = 6
    cell = max(min((width - label) // 8, 8), 4)
    marks = out_of_tolerance(t)
    where = f"first 8 · token {t.token}" + (f" · batch {t.batch}" if t.batch else "") + (
        f" · head {t.head}" if t.head is not None else "")
    rows = [Text(where, style="bold", no_wrap=True, overflow="ellipsis")]
    for name, values in (("gold.", t.golden), ("cand.", t.candidate), ("|Δ|", [abs(d) for d in t.diff])):
        row = Text(f"{name:<{label}}", style="bold", no_wrap=True, overflow="crop")
        for v, bad in zip(values, marks):
            star = "*" if bad and name == "|Δ|" else ""
            style = {"gold.": "", "cand.": "red" if bad else "", "|Δ|": "bold red" if bad else "dim"}[name]
            row.append(f"{squeeze_num(v, cell - 1 - len(star)) + star:>{cell}}", style=style)
        rows.append(row)
    return Group(*rows)


def squeeze_num(x: float, width: int) -> str:
    """`fmt_num`, with fewer digits when it does not fit in `width` characters."""
    text = fmt_num(x)
    for digits in (2, 1):
        if len(text) <= width:
            break
        text = f"{x:.{digits}g}"
        if "e" in text:
            mantissa, exp = text.split("e")
            text = f"{mantissa}e{int(exp)}"
    return text


def _cell_line(piece: StageSlice, token: int, column: int) -> Text:
    """Golden and candidate of the selected cell, side by side."""
    g, c = piece.cell(token, column)
    where = f"{'query' if piece.layout == 'BHTT' else 'token'} {token} · {piece.column_name} {column}"
    if piece.head is not None:
        where += f" · head {piece.head}"
    if piece.n_batch > 1:
        where += f" · batch {piece.batch}"
    text = Text.assemble((where, "bold"), "  golden ", (f"{g:.7g}", "cyan"))
    if c is not None:
        text.append("  cand. ")
        text.append(f"{c:.7g}", style="magenta")
        diff = 0.0 if g == c else c - g  # -inf on both sides: equal, not nan
        text.append(f"  Δ {diff:.3g}", style="red" if diff else "dim")
    text.no_wrap, text.overflow = True, "ellipsis"
    return text
