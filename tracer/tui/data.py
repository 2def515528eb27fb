"""Lazy per-stage data for the interactive diff: one stage slice at a time, never a whole file.

A gpt2-xl trace holds gigabytes; the viewer only ever needs what is on screen. A *slice* is
one stage at one batch row, and for per-head stages (q/k/v, scores, probs) one head: a
[T, X] matrix of tokens (query rows) by channels, head dims or keys, read with h5py slicing.
Stages wider than COLUMN_BLOCK (the logits: 50257 columns, 200 MB at T=1024) are read one
block of columns at a time, the block holding the selected column. A small LRU keeps the
last few slices so stepping back and forth between neighbouring stages does not reread them.
Cell errors are computed per slice and metric, on demand:

- rel: |cand − golden| / max(|golden|, RMS(golden)), the elementwise quantity the First-8
  tables compare with the stage's tolerance (no blow-up where the golden is near zero);
- abs: |cand − golden|;
- log: log10 |cand − golden| (exact cells are -inf).

RMS, colour scales and the worst cell are the slice's (for the logits: the block's). Masked
attention scores (-inf on both sides) count as equal; masked on one side only is an infinite
error, so a wrong mask lights up exactly where it is wrong.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from tracer.compare.align import align
from tracer.compare.metrics import is_masked, valid_mask
from tracer.compare.result import First8
from tracer.stages import layout_of
from tracer.store import CaseView, StageFile

METRICS = ("rel", "abs", "log")  # the order `m` cycles through; rel (against the tolerance) first
METRIC_LABELS = {"rel": "rel. error", "abs": "abs. error", "log": "log10 abs. error"}
SLICE_CACHE = 4      # slices kept: the current stage and its neighbours
COLUMN_BLOCK = 2048  # wider stages are read this many columns at a time


@dataclass
class StageSlice:
    """Golden and candidate values of one stage at one batch row (and head), columns [x0, x0 + X)."""

    stage: str
    layout: str           # BTC, BHTD or BHTT
    batch: int
    head: int | None      # None for [B,T,C] stages
    n_batch: int
    n_heads: int | None
    x0: int               # first column held
    n_columns: int        # the stage's full width
    golden: np.ndarray    # [T, X]
    candidate: np.ndarray | None   # None: missing in the trace or no layout lines it up
    valid: np.ndarray     # compared cells: rows of real (non-padding) tokens
    note: str | None = None
    _errors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # metric -> whole slice
    _tops: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.golden.shape  # type: ignore[return-value]

    @property
    def column_name(self) -> str:
        return {"BTC": "channel", "BHTD": "dim", "BHTT": "key"}[self.layout]

    @cached_property
    def both_masked(self) -> np.ndarray:
        """Cells masked on both sides (-inf scores): equal by definition, nothing to colour."""
        if self.candidate is None or self.layout != "BHTT":
            return np.zeros(self.shape, dtype=bool)
        return is_masked(self.golden) & is_masked(self.candidate)

    @cached_property
    def rms(self) -> float:
        """RMS of the golden over compared, finite cells: the scale relative errors use (and the
        First-8 out-of-tolerance marks). One float32 dot product: a few ms on a [1024, 6400] slice."""
        keep = self.valid & np.isfinite(self.golden)
        n = int(np.count_nonzero(keep))
        g = np.where(keep, self.golden, 0).astype(np.float32, copy=False).ravel()
        return float(np.sqrt(np.dot(g, g) / n)) if n else 0.0

    def errors(self, metric: str, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Per-cell error in `metric` (see METRICS) of cells [rows, cols] (columns of the slice);
        NaN where nothing is compared. Only a window is computed unless the whole slice is."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}")
        if metric in self._errors:
            return self._errors[metric][rows, cols]
        if self.candidate is None:
            return np.full(self.golden[rows, cols].shape, np.nan)
        return self._compute(metric, rows, cols)

    def _compute(self, metric: str, rows: slice, cols: slice) -> np.ndarray:
        g, c = self.golden[rows, cols], self.candidate[rows, cols]
        with np.errstate(all="ignore"):
            d = np.abs(c.astype(np.float64) - g)
            d = np.where(self.both_masked[rows, cols], 0.0, d)
            d = np.where(np.isnan(d) & ~np.isnan(g), np.inf, d)  # non-finite candidate
            if metric == "rel":
                scale = np.where(np.isfinite(g), np.maximum(np.abs(g), self.rms), self.rms)
                d = d / np.maximum(scale, 1e-30)
            elif metric == "log":
                d = np.log10(d)  # 0 -> -inf: exact cells
        return np.where(self.valid[rows, cols], d, np.nan)

    def _whole(self, metric: str) -> np.ndarray:
        """Errors of every cell, kept: colour scales and the worst cell need them all."""
        if metric not in self._errors:
            self._errors[metric] = self.errors(metric)
        return self._errors[metric]

    def top(self, metric: str) -> float:
        """The largest finite error: the scale abs and log colours are relative to."""
        if metric not in self._tops:
            e = self._whole(metric)
            finite = e[np.isfinite(e)]
            self._tops[metric] = float(finite.max()) if finite.size else 0.0
        return self._tops[metric]

    def cell(self, token: int, column: int) -> tuple[float, float | None]:
        """(golden, candidate) at one cell (`column` in the stage's indices)."""
        x = column - self.x0
        g = float(self.golden[token, x])
        return g, None if self.candidate is None else float(self.candidate[token, x])

    def worst_cell(self, metric: str = "abs") -> tuple[int, int]:
        """(token, column) of the largest error in the slice (first non-finite one wins)."""
        e = self._whole(metric)
        e = np.where(np.isnan(e), -np.inf, e)
        t, x = np.unravel_index(int(np.argmax(e)), e.shape)
        return int(t), int(x) + self.x0

    def first8(self, token: int, tolerance: float | None) -> First8 | None:
        """The First-8 table of one token (query row) by the comparator's rule (`first8_tables`):
        a value is out of tolerance when |diff| > tolerance · max(|golden|, RMS), cells masked on
        both sides are equal. RMS is the slice's: first8_tables would scan the whole array again
        in float64, ~100 ms on a [1024, 3072] slice, too slow for every cursor move."""
        if self.candidate is None or self.x0 != 0:
            return None
        g = self.golden[token, :8].astype(np.float64)
        c = self.candidate[token, :8].astype(np.float64)
        with np.errstate(all="ignore"):
            both = np.isneginf(g) & np.isneginf(c)
            d = np.where(both, 0.0, c - g)
            scale = np.where(np.isfinite(g), np.maximum(np.abs(g), self.rms), self.rms)
            out = ~(np.abs(d) <= (tolerance or 0.0) * scale) & ~both
        return First8(token=token, batch=self.batch, head=self.head, golden=g.tolist(), candidate=c.tolist(),
                      diff=d.tolist(), out_of_tolerance=out.tolist())


class StageData:
    """Reads stage slices of one case from an open golden and trace, with a small LRU."""

    def __init__(self, golden: StageFile, trace: StageFile, case: str, cache: int = SLICE_CACHE):
        self.g: CaseView = golden.case(case)
        self.t: CaseView | None = trace.case(case) if trace.has_case(case) else None
        self.case = case
        self.mask = self.g.attention_mask
        isolated = bool(self.t and self.t.stages("isolated"))
        # As the comparator: chained values, or teacher-forced ones when that is all the trace has.
        self.group = "stages" if self.t is None or self.t.stages("stages") or not isolated else "isolated"
        self._cache: OrderedDict[tuple, StageSlice] = OrderedDict()
        self._size = cache
        self.reads = 0  # slices read from disk (tests check the cache and laziness with it)

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    def get(self, stage: str, batch: int = 0, head: int = 0, column: int = 0) -> StageSlice:
        """The slice of `stage` at `batch` and `head` (clamped; `head` is ignored for [B,T,C] stages)
        holding `column`."""
        ds = self.g.dataset(stage)
        layout = layout_of(stage)
        b = min(max(batch, 0), self.batch_size - 1)
        h = min(max(head, 0), ds.shape[1] - 1) if layout != "BTC" else None
        width = ds.shape[-1]
        x0 = 0 if width <= COLUMN_BLOCK else min(max(column, 0), width - 1) // COLUMN_BLOCK * COLUMN_BLOCK
        key = (stage, b, h, x0)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        piece = self._read(stage, layout, b, h, x0)
        self._cache[key] = piece
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return piece

    def _read(self, stage: str, layout: str, b: int, h: int | None, x0: int) -> StageSlice:
        self.reads += 1
        gds = self.g.dataset(stage)
        width = gds.shape[-1]
        x1 = min(x0 + COLUMN_BLOCK, width) if width > COLUMN_BLOCK else width
        bb = min(b, gds.shape[0] - 1)  # embed.pos is stored once for the batch
        index = ((bb,) if h is None else (bb, h)) + ((slice(None), slice(x0, x1)) if width > COLUMN_BLOCK else ())
        golden = gds[index]
        candidate, note = self._candidate(stage, layout, gds, index)
        valid = self._valid(layout, gds.shape, b, golden.shape)
        if candidate is not None and self.t is not None and self.t.is_partial(stage):
            valid = valid & self.t.present(stage)[index]
            note = "partial trace: only the printed values are compared"
        return StageSlice(stage, layout, b, h, self.batch_size, gds.shape[1] if h is not None else None, x0, width,
                          golden, candidate, valid, note)

    def _candidate(self, stage: str, layout: str, gds, index: tuple) -> tuple[np.ndarray | None, str | None]:
        if self.t is None or not self.t.has(stage, self.group):
            return None, "missing in the trace"
        cds = self.t.dataset(stage, self.group)
        if cds.dtype.kind not in "fc":
            return None, f"candidate dtype {cds.dtype}: not floating point"
        if cds.shape == gds.shape:
            return cds[index], None
        # Stored in another layout: the whole stage is needed to line it up (foreign dumps only).
        aligned = align(cds[()], gds[()], layout)
        if aligned.array is None:
            return None, aligned.note
        return aligned.array[index], aligned.note

    def _valid(self, layout: str, shape: tuple[int, ...], b: int, piece: tuple[int, ...]) -> np.ndarray:
        """Compared cells: rows of real tokens. For scores every key of such a row counts, so a
        key masked on one side only shows as an infinite error (the comparator counts those apart)."""
        shared = shape[0] == 1 and self.batch_size > 1  # embed.pos: one row for the whole batch
        row = self.mask.any(0, keepdims=True) if shared else self.mask[b:b + 1]
        sub_shape = (1, *piece) if layout == "BTC" else (1, 1, *piece)
        valid = valid_mask(layout, sub_shape, row, None)
        return np.ascontiguousarray(valid[0] if layout == "BTC" else valid[0, 0])
