"""Error metrics of one stage (SPEC §6), over the elements that are comparable.

Comparable elements: rows of real (non-padding) query tokens; for attention scores only
the unmasked keys (masked entries are compared as "masked or not", never by value).
The verdict metric is the *row error*: the worst row's ||candidate - reference||₂ divided
by the stage's RMS row norm. One number per stage that does not dilute a bug confined to a
few tokens or heads, and that is comparable across stages of any scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MASK_FILL_BELOW = -1e3  # a score at or below this (or -inf) counts as masked: -inf, finfo.min, -1e4, -1e9


def token_axis(layout: str) -> int:
    return layout.index("T")


def valid_mask(layout: str, shape: tuple[int, ...], attention_mask: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Boolean mask (broadcastable to `shape`) of the comparable elements."""
    tokens = attention_mask.astype(bool)
    if shape[0] == 1 and tokens.shape[0] > 1:  # embed.pos is stored once for the batch
        tokens = tokens.any(0, keepdims=True)
    if layout == "BTC":
        valid = tokens[:, :, None]
    else:  # BHTD / BHTT: token axis 2
        valid = tokens[:, None, :, None]
    if allowed is not None:
        valid = valid & allowed
    return np.broadcast_to(valid, shape)


def is_masked(x: np.ndarray) -> np.ndarray:
    return x <= MASK_FILL_BELOW  # -inf included; NaN is not masked


ROW_BLOCK = 1 << 20  # elements per block: every temporary of a metric is at most this big (4 MB in float32)


def _work_dtype(*arrays: np.ndarray) -> np.dtype:
    """float32 when every operand is at most float32, else float64. The difference of two close
    float32 numbers is exact in float32 (Sterbenz), and the sums below are accurate to ~1e-6 of
    themselves, so float32 work loses nothing the verdicts read while moving half the bytes."""
    return np.result_type(*arrays, np.float32)


def _sum_sq(x: np.ndarray, y: np.ndarray | None = None, rows: bool = False):
    """Σ x·y, as float64, without a float64 copy of the operands. A whole-array sum accumulates in
    float64. Per-row sums (`rows`) accumulate in the operands' precision: a row is at most a few
    thousand values, so float32 keeps them to ~1e-6 of themselves, at a quarter of the cost; a row
    that overflows float32 is summed again in float64."""
    y = x if y is None else y
    if not rows:
        return np.einsum("i,i", x, y, dtype=np.float64)
    out = np.einsum("...i,...i->...", x, y)
    if out.dtype != np.float64 and not np.isfinite(out).all():
        out = np.einsum("...i,...i->...", x, y, dtype=np.float64)
    return out.astype(np.float64, copy=False)


def _dot(x: np.ndarray, y: np.ndarray, chunk: int = 4096) -> float:
    """Σ x·y of two 1-D arrays: chunks summed as `_sum_sq` rows, added in float64."""
    n = x.size - x.size % chunk
    head = float(_sum_sq(x[:n].reshape(-1, chunk), y[:n].reshape(-1, chunk), rows=True).sum()) if n else 0.0
    return head + float(_sum_sq(x[n:], y[n:]))


def as_rows(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`array` broadcast to `shape` and viewed as [rows, last axis] (a copy only where it was broadcast)."""
    return np.broadcast_to(np.asarray(array), shape).reshape(-1, shape[-1] if shape else 1)


def row_blocks(n_rows: int, row_len: int):
    """Slices of consecutive rows, each at most ROW_BLOCK elements (one row at least)."""
    step = max(1, ROW_BLOCK // max(row_len, 1))
    return [slice(a, a + step) for a in range(0, n_rows, step)]


def compared_difference(candidate: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, bool]:
    """candidate − reference in the work precision, 0 where an element is not compared (padding, masked
    scores, rows a --tokens golden did not keep); and whether any element is not."""
    with np.errstate(invalid="ignore"):
        d = np.subtract(candidate, reference, dtype=_work_dtype(candidate, reference))
    partial = not valid.all()
    if partial:
        np.copyto(d, 0.0, where=~valid)
    return d, partial


class RowSums:
    """Per-row sums of squares of (candidate − reference) and of the reference, accumulated over
    consecutive blocks of rows ([rows, last axis] each); `error` turns them into `row_error`'s
    result. Lets a stage's check run block by block without ever holding the whole difference."""

    def __init__(self) -> None:
        self.diff_sq: list[np.ndarray] = []
        self.ref_sq: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []

    def add(self, candidate: np.ndarray, reference: np.ndarray, valid: np.ndarray, same_rows: bool = False,
            ref_sq: np.ndarray | None = None) -> np.ndarray:
        """The next block of rows; with `same_rows`, more columns of the block added last. Returns the
        block's reference row sums: another candidate against the same reference passes them as
        `ref_sq` instead of summing them again."""
        d, partial = compared_difference(candidate, reference, valid)
        if ref_sq is None:
            ref_sq = _sum_sq(np.where(valid, reference, 0.0) if partial else reference, rows=True)
        self.add_sums(_sum_sq(d, rows=True), ref_sq, valid.any(-1), same_rows)
        return ref_sq

    def add_sums(self, diff_sq: np.ndarray, ref_sq: np.ndarray, rows: np.ndarray, same_rows: bool = False) -> None:
        """The next block's row sums, made by the caller (`rows`: the rows with compared elements)."""
        if same_rows:
            self.diff_sq[-1] = self.diff_sq[-1] + diff_sq
            self.ref_sq[-1] = self.ref_sq[-1] + ref_sq
            self.rows[-1] = self.rows[-1] | rows
        else:
            self.diff_sq.append(diff_sq)
            self.ref_sq.append(ref_sq)
            self.rows.append(rows)

    def add_zero_reference(self, candidate: np.ndarray, valid: np.ndarray) -> None:
        """More columns of the block added last where the reference is exactly zero (probs beyond the
        keys a causal block sees): only the candidate's own squares count there."""
        if candidate.size:
            self.diff_sq[-1] = self.diff_sq[-1] + _sum_sq(np.where(valid, candidate, 0.0), rows=True)
            self.rows[-1] = self.rows[-1] | valid.any(-1)

    def error(self, shape: tuple[int, ...]) -> tuple[float, np.ndarray]:
        """(worst row error, per-row errors reshaped to `shape`)."""
        row_sq, ref_sq, rows = (np.concatenate(x) for x in (self.diff_sq, self.ref_sq, self.rows))
        n_rows = max(int(rows.sum()), 1)
        scale = np.sqrt(ref_sq.sum() / n_rows)
        if not np.isfinite(row_sq).all():
            per_row = np.where(np.isfinite(row_sq), np.sqrt(row_sq), np.inf) / max(scale, 1e-30)
            return float("inf"), np.where(rows, per_row, 0.0).reshape(shape)
        if scale == 0.0:
            per_row = np.where(row_sq > 0, np.inf, 0.0)
        else:
            per_row = np.sqrt(row_sq) / scale
        per_row = np.where(rows, per_row, 0.0)
        return float(per_row.max(initial=0.0)), per_row.reshape(shape)


def _row_sums(reference: np.ndarray, valid: np.ndarray, *candidates: np.ndarray) -> tuple[tuple, list[RowSums]]:
    shape = np.broadcast_shapes(np.shape(reference), *(np.shape(c) for c in candidates))
    r, v = as_rows(reference, shape), as_rows(valid, shape)
    rows = [as_rows(c, shape) for c in candidates]
    sums = [RowSums() for _ in candidates]
    for s in row_blocks(*r.shape):
        ref_sq = None
        for c, acc in zip(rows, sums):
            ref_sq = acc.add(c[s], r[s], v[s], ref_sq=ref_sq)
    return shape[:-1], sums


def row_errors(reference: np.ndarray, valid: np.ndarray, *candidates: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """`row_error` of each candidate against one reference, whose row norms are summed once."""
    shape, sums = _row_sums(reference, valid, *candidates)
    return [acc.error(shape) for acc in sums]


def row_error(candidate: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """(worst row error, per-row errors [shape[:-1]]): ||c - r||₂ per row / RMS row norm of r.

    Computed in blocks of rows, so the temporaries stay small whatever the stage's size."""
    return row_errors(reference, valid, candidate)[0]


@dataclass
class StageMetrics:
    """Every metric of SPEC §6 for one stage (candidate vs golden, comparable elements)."""

    n_compared: int
    max_abs: float
    mean_abs: float
    max_rel: float
    rmse: float
    cosine: float
    sqnr_db: float
    nmse: float
    mismatch_pct: float
    worst_index: list[int]
    worst_golden: float
    worst_candidate: float
    first_nonfinite: list[int] | None
    masked_mismatch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _finite_or_none(x: float) -> float:
    return float(x) if np.isfinite(x) else (float("inf") if x > 0 else float("-inf"))



def _abs_max(g: np.ndarray, v: np.ndarray, blocks: list[slice]) -> float:
    """max |g| over the compared elements ([rows, last axis] views), 0 when there are none."""
    top = 0.0
    for s in blocks:
        vb, gb = v[s], g[s]
        if not gb.size:
            continue
        if vb.all():
            hi, lo = gb.max(), gb.min()
        elif vb.any():
            hi, lo = np.max(gb, where=vb, initial=-np.inf), np.min(gb, where=vb, initial=np.inf)
        else:
            continue
        top = max(top, float(hi), -float(lo))
    return top


class ChainedPass:
    """Candidate vs golden (the chained check) in one pass over blocks of rows: the row error and
    every metric of `StageMetrics` but the mismatch share, whose threshold needs the stage's
    tolerance, which the introduced-error check sets later. `metrics(tolerance)` finishes: a block
    whose largest difference is within the smallest threshold has no mismatch, so only blocks that
    may have one are read again (none, for a stage well within tolerance).

    `golden_abs_max`: max |golden| over the compared elements when the caller knows it (every element
    compared and the golden's extremes already taken), else found in an extra pass."""

    def __init__(self, candidate: np.ndarray, golden: np.ndarray, valid: np.ndarray,
                 golden_abs_max: float | None = None):
        self.golden, self.candidate, self.valid, self.shape = golden, candidate, valid, np.shape(golden)
        self.work = work = _work_dtype(golden, candidate)
        # rows of a broadcast `valid` are a copy (51 MB for gpt2's logits at T=1024): made again only
        # when a block is read again for the mismatch share, not held through the introduced-error check
        g, c, v = as_rows(golden, self.shape), as_rows(candidate, self.shape), as_rows(valid, self.shape)
        self.blocks = row_blocks(*g.shape)
        if golden_abs_max is None:
            golden_abs_max = _abs_max(g, v, self.blocks)
        floor = max(1e-6 * golden_abs_max, 1e-30)
        sums = RowSums()
        self.n, self.block_max, self.first_bad = 0, [], None
        self.max_abs = self.max_rel = np.float64(0.0)
        self.sum_abs = self.golden_dot_diff = 0.0
        worst, self.worst_at = -np.inf, 0
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for s in self.blocks:
                vb = v[s]
                d, partial = compared_difference(c[s], g[s], vb)
                every = not partial
                gz = np.where(vb, g[s], 0.0) if partial else g[s]  # zero where d is
                sums.add_sums(_sum_sq(d, rows=True), _sum_sq(gz, rows=True), vb.any(-1))
                count = d.size if every else int(np.count_nonzero(vb))
                self.block_max.append(0.0)
                if not count:
                    continue
                self.n += count
                self.golden_dot_diff += _dot(gz.ravel(), d.ravel())
                ad = np.abs(d, out=d)
                k = int(np.argmax(ad))  # the largest difference, or the first NaN
                top = ad.flat[k]        # = ad.max(), NaN included
                finite = bool(np.isfinite(top))
                key = ad
                if not finite:  # a NaN difference is the worst
                    key = np.where(np.isnan(ad), np.inf, ad)
                    k = int(np.argmax(key))
                    if self.first_bad is None:
                        bad = ~np.isfinite(c[s]) & vb & np.isfinite(g[s])
                        if bad.any():
                            self.first_bad = s.start * g.shape[1] + int(np.argmax(bad))
                if key.flat[k] == 0 and not every:  # no difference at all: the first compared element
                    k = int(np.argmax(vb))
                self.block_max[-1] = key.flat[k]
                if key.flat[k] > worst:
                    worst, self.worst_at = key.flat[k], s.start * g.shape[1] + k
                self.max_abs = np.maximum(self.max_abs, top)
                self.sum_abs += float(np.add.reduce(ad, axis=None))
                scale = np.abs(gz, dtype=work)
                np.maximum(scale, floor, out=scale)
                self.max_rel = np.maximum(self.max_rel, np.max(np.divide(ad, scale, out=scale)))
        self.error, self.per_row = sums.error(self.shape[:-1])
        self.golden_sq = float(np.concatenate(sums.ref_sq).sum())
        self.diff_sq = float(np.concatenate(sums.diff_sq).sum())

    def _mismatches(self, tolerance: float, rms_g: float) -> int:
        """Compared elements with |c − g| > tolerance · max(|g|, RMS(g)), in the work precision. The
        smallest threshold (|g| ≤ RMS) bounds every block's, the tolerance being ≥ 0 (rounding keeps the
        order): blocks within it are not read again. A NaN tolerance or difference reads every block."""
        with np.errstate(invalid="ignore", over="ignore"):  # inf · 0 is NaN: no block skipped
            smallest = self._thresholds(np.zeros(1, dtype=self.work), tolerance, rms_g)[0]  # rounded alike
        again = [s for s, top in zip(self.blocks, self.block_max) if not (np.isfinite(top) and top <= smallest)]
        if not again:
            return 0
        g, c, v = (as_rows(a, self.shape) for a in (self.golden, self.candidate, self.valid))
        mismatch = 0
        with np.errstate(invalid="ignore", over="ignore"):
            for s in again:
                vb = v[s]
                gb, cb = np.asarray(g[s], dtype=self.work), np.asarray(c[s], dtype=self.work)
                sel_g, sel_c = (gb.ravel(), cb.ravel()) if vb.all() else (gb[vb], cb[vb])
                ad = np.abs(np.subtract(sel_c, sel_g))
                mismatch += ad.size - np.count_nonzero(ad <= self._thresholds(sel_g, tolerance, rms_g))  # NaN, Inf count
        return mismatch

    @staticmethod
    def _thresholds(golden: np.ndarray, tolerance: float, rms_g: float) -> np.ndarray:
        threshold = np.abs(golden)
        np.maximum(threshold, rms_g, out=threshold)
        threshold *= tolerance
        return threshold

    def metrics(self, tolerance: float, masked_mismatch: int = 0) -> StageMetrics:
        """Every metric over the compared elements; mismatch % uses the stage's tolerance elementwise."""
        n, sig, noise = self.n, self.golden_sq, self.diff_sq
        first_nonfinite = None if self.first_bad is None else \
            [int(i) for i in np.unravel_index(self.first_bad, self.shape)]
        if n == 0:
            return StageMetrics(0, 0, 0, 0, 0, 1, float("inf"), 0, 0, [], 0, 0, first_nonfinite, masked_mismatch)
        rms_g = float(np.sqrt(sig / n))
        gd = self.golden_dot_diff
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            # c = g + d: c·g = Σg² + Σg·d and |c|² = Σg² + 2Σg·d + Σd², from sums already made
            denom = float(np.sqrt(max(sig + 2 * gd + noise, 0.0)) * np.sqrt(sig))
            cosine = float((sig + gd) / denom) if denom > 0 else (1.0 if noise == 0 else 0.0)
            where = np.unravel_index(self.worst_at, self.shape)
            return StageMetrics(
                n_compared=int(n),
                max_abs=_finite_or_none(self.max_abs),
                mean_abs=_finite_or_none(self.sum_abs / n),
                max_rel=_finite_or_none(self.max_rel),
                rmse=_finite_or_none(np.sqrt(noise / n)),
                cosine=cosine if np.isfinite(cosine) else 0.0,
                sqnr_db=float(10 * np.log10(sig / noise)) if noise > 0 and np.isfinite(noise) else (
                    float("inf") if noise == 0 else float("-inf")),
                nmse=_finite_or_none(noise / sig) if sig > 0 else (0.0 if noise == 0 else float("inf")),
                mismatch_pct=float(100.0 * self._mismatches(tolerance, rms_g) / n),
                worst_index=[int(i) for i in where],
                worst_golden=float(self.golden[where]),
                worst_candidate=float(self.candidate[where]),
                first_nonfinite=first_nonfinite,
                masked_mismatch=masked_mismatch,
            )
