"""The error heat map: which window of a stage slice is shown, and how it is drawn.

One character per value (tokens down, channels / head dims / keys across) so every coloured
cell maps to exactly one number, readable over SSH in 80×24: the window is as large as the
widget (about 50 channels by 10 tokens there) and follows the selected cell. Colours come
from a 9-step ramp; for the relative metric the ramp is the report's log-scale error bar
(1e-3× to 1e6× the tolerance, the tolerance a third of the way up), so "above tolerance" is
always warm. Lines are built as rich Segments, one per run of equal cells: a 200×60 screen
holds ~10,000 cells, too many to hand over one styled span each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rich.segment import Segment
from rich.style import Style

from tracer.reports.common import BAR_LOG_HI, BAR_LOG_LO, fmt_num
from tracer.tui.data import StageSlice

# Cool below the tolerance line (first 3 steps in "rel"), warm above it.
RAMP = ("#17324d", "#1f5f8b", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#d62828", "#a4133c", "#ff4dd2")
STYLES = tuple(Style(color=c) for c in RAMP)
SELECTED_STYLES = tuple(Style(color="white", bgcolor=c, bold=True) for c in RAMP)
DIM, BOLD, CURRENT = Style(dim=True), Style(bold=True), Style(reverse=True, bold=True)
LOG_DECADES = 6      # the "log" metric shows the top 6 decades of |diff|
CELL, MASKED, SELECTED = "█", "·", "◆"
_BLANK, _MASK = -1, -2  # cell codes besides ramp levels

Line = list[Segment]


@dataclass(frozen=True)
class Window:
    """The shown rectangle: tokens [t0, t1) by columns [c0, c1) (the stage's column indices)."""

    t0: int
    t1: int
    c0: int
    c1: int

    @property
    def width(self) -> int:
        return self.c1 - self.c0


def label_width(n_tokens: int) -> int:
    return len(str(n_tokens - 1)) + 1


def fit_window(piece: StageSlice, token: int, column: int, c0: int, height: int, width: int) -> Window:
    """The window around the selected cell in a `width`×`height` grid of cells: tokens centred on
    `token`; columns from `c0` (the page the user chose) unless that would hide `column`; all
    inside the columns the slice holds."""
    n_t = piece.shape[0]
    lo, hi = piece.x0, piece.x0 + piece.shape[1]
    rows, cols = max(1, min(height, n_t)), max(1, min(width - label_width(n_t), hi - lo))
    t0 = min(max(token - rows // 2, 0), n_t - rows)
    if not c0 <= column < c0 + cols:
        c0 = column - (column - lo) % cols
    c0 = min(max(c0, lo), hi - cols)
    return Window(t0, t0 + rows, c0, c0 + cols)


def levels(errors: np.ndarray, metric: str, tolerance: float | None, top: float) -> np.ndarray:
    """Ramp index per cell (0..len(RAMP)-1), -1 where nothing is compared (NaN)."""
    n = len(RAMP)
    with np.errstate(all="ignore"):
        if metric == "rel" and tolerance:
            frac = (np.log10(errors / tolerance) - BAR_LOG_LO) / (BAR_LOG_HI - BAR_LOG_LO)
        elif metric == "log":
            frac = (errors - (top - LOG_DECADES)) / LOG_DECADES
        else:  # abs (and rel without a tolerance): linear in the slice's largest error
            frac = errors / top if top > 0 else np.zeros_like(errors)
        frac = np.where(np.isposinf(errors), 1.0, frac)
        frac = np.clip(np.nan_to_num(frac, nan=0.0, neginf=0.0), 0.0, 1.0)
    out = np.minimum((frac * n).astype(int), n - 1)
    return np.where(np.isnan(errors), _BLANK, out)


def heatmap_lines(piece: StageSlice, metric: str, tolerance: float | None, token: int, column: int,
                  window: Window) -> list[Line]:
    """Axis line, one line per token of the window, legend line."""
    rows = slice(window.t0, window.t1)
    cols = slice(window.c0 - piece.x0, window.c1 - piece.x0)
    top = piece.top(metric) if metric != "rel" or not tolerance else 0.0  # rel needs no scan of the slice
    codes = levels(piece.errors(metric, rows, cols), metric, tolerance, top)
    codes = np.where(piece.both_masked[rows, cols], _MASK, codes)
    lw = label_width(piece.shape[0])
    lines: list[Line] = [[Segment(_axis(window, lw), DIM)]]
    for r, t in enumerate(range(window.t0, window.t1)):
        line = [Segment(f"{t:>{lw - 1}} ", CURRENT if t == token else DIM)]
        row = codes[r]
        if t == token and window.c0 <= column < window.c1:
            k = column - window.c0
            line += _runs(row[:k])
            level = int(row[k])
            line.append(Segment(SELECTED, SELECTED_STYLES[level] if level >= 0 else BOLD))
            line += _runs(row[k + 1:])
        else:
            line += _runs(row)
        lines.append(line)
    lines.append(legend(metric, tolerance, top, piece.layout == "BHTT"))
    return lines


def _runs(codes: np.ndarray) -> Line:
    """One segment per run of equal cell codes."""
    if codes.size == 0:
        return []
    starts = np.concatenate(([0], np.flatnonzero(np.diff(codes)) + 1))
    ends = np.concatenate((starts[1:], [codes.size]))
    out = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        code = int(codes[start])
        n = end - start
        if code == _BLANK:
            out.append(Segment(" " * n))
        elif code == _MASK:
            out.append(Segment(MASKED * n, DIM))
        else:
            out.append(Segment(CELL * n, STYLES[code]))
    return out


def _axis(window: Window, lw: int) -> str:
    """Column indices every 8 columns, aligned over their cells."""
    line = [" "] * (lw + window.width)
    for c in range(window.c0, window.c1):
        if c % 8 == 0:
            label = str(c)
            pos = lw + c - window.c0
            if pos + len(label) <= len(line) and all(ch == " " for ch in line[pos:pos + len(label)]):
                line[pos:pos + len(label)] = label
    return "".join(line).rstrip()


def legend(metric: str, tolerance: float | None, top: float, masks: bool) -> Line:
    """The ramp with what its ends mean."""
    if metric == "rel" and tolerance:
        low, high = f"1e{BAR_LOG_LO:g}×tol", f"1e{BAR_LOG_HI:g}×"
        ramp = [Segment(CELL, s) for s in STYLES[:3]] + [Segment("│", BOLD)] + [Segment(CELL, s) for s in STYLES[3:]]
    else:
        low = "0" if metric == "abs" else fmt_num(10 ** (top - LOG_DECADES)) if math.isfinite(top) else "—"
        high = fmt_num(top if metric == "abs" else 10 ** top) if math.isfinite(top) else "—"
        ramp = [Segment(CELL, s) for s in STYLES]
    line = [Segment(f"{low} ", DIM), *ramp, Segment(f" {high}", DIM)]
    if masks:
        line.append(Segment(f"  {MASKED} masked", DIM))
    return line
