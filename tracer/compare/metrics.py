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
    return np.isneginf(x) | (x <= MASK_FILL_BELOW)


def row_error(candidate: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """(worst row error, per-row errors [shape[:-1]]): ||c - r||₂ per row / RMS row norm of r."""
    valid = np.broadcast_to(valid, np.broadcast_shapes(np.shape(candidate), np.shape(reference)))
    every = bool(valid.all())
    with np.errstate(invalid="ignore"):
        d = np.subtract(candidate, reference, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if not every:  # one pass each, only where some elements are not compared (padding, masked scores)
        np.copyto(d, 0.0, where=~valid)
        r = np.where(valid, r, 0.0)
    row_sq = np.einsum("...i,...i->...", d, d)
    ref_sq = np.einsum("...i,...i->...", r, r)
    rows = valid.any(-1)
    n_rows = max(int(rows.sum()), 1)
    scale = np.sqrt(ref_sq.sum() / n_rows)
    if not np.isfinite(row_sq).all():
        per_row = np.where(np.isfinite(row_sq), np.sqrt(row_sq), np.inf) / max(scale, 1e-30)
        return float("inf"), np.where(rows, per_row, 0.0)
    if scale == 0.0:
        per_row = np.where(row_sq > 0, np.inf, 0.0)
    else:
        per_row = np.sqrt(row_sq) / scale
    per_row = np.where(rows, per_row, 0.0)
    return float(per_row.max(initial=0.0)), per_row


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


def stage_metrics(golden: np.ndarray, candidate: np.ndarray, valid: np.ndarray, tolerance: float,
                  masked_mismatch: int = 0) -> StageMetrics:
    """Metrics over valid elements. Mismatch % uses the stage's tolerance elementwise:
    |c - g| > tolerance * max(|g|, RMS(g))."""
    g = np.asarray(golden, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    valid = np.broadcast_to(valid, g.shape)
    every = bool(valid.all())
    sel_g, sel_c = (g.ravel(), c.ravel()) if every else (g[valid], c[valid])
    n = sel_g.size
    finite_c = np.isfinite(c)
    bad = None if finite_c.all() else ~finite_c & valid & np.isfinite(g)
    first_nonfinite = [int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape)] \
        if bad is not None and bad.any() else None
    if n == 0:
        return StageMetrics(0, 0, 0, 0, 0, 1, float("inf"), 0, 0, [], 0, 0, first_nonfinite, masked_mismatch)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = sel_c - sel_g
        ad = np.abs(d)
        ad_full = ad.reshape(g.shape) if every else np.where(valid, np.abs(c - g), -1.0)
        if np.isnan(ad).any():
            ad_full = np.where(np.isnan(ad_full), np.inf, ad_full)
        worst = np.unravel_index(int(np.argmax(ad_full)), ad_full.shape)
        rms_g = float(np.sqrt(np.mean(sel_g * sel_g)))
        abs_g = np.abs(sel_g)
        floor = max(1e-6 * float(np.max(abs_g)), 1e-30)
        max_rel = float(np.max(ad / np.maximum(abs_g, floor)))
        sig, noise = float(np.sum(sel_g * sel_g)), float(np.sum(d * d))
        denom = float(np.sqrt(float(sel_c @ sel_c)) * np.sqrt(sig))
        cosine = float(np.dot(sel_c, sel_g) / denom) if denom > 0 else (1.0 if noise == 0 else 0.0)
        mismatch = ad > tolerance * np.maximum(abs_g, rms_g)
        mismatch |= ~np.isfinite(ad)
        return StageMetrics(
            n_compared=int(n),
            max_abs=_finite_or_none(np.max(ad)),
            mean_abs=_finite_or_none(np.mean(ad)),
            max_rel=_finite_or_none(max_rel),
            rmse=_finite_or_none(np.sqrt(noise / n)),
            cosine=cosine if np.isfinite(cosine) else 0.0,
            sqnr_db=float(10 * np.log10(sig / noise)) if noise > 0 and np.isfinite(noise) else (
                float("inf") if noise == 0 else float("-inf")),
            nmse=_finite_or_none(noise / sig) if sig > 0 else (0.0 if noise == 0 else float("inf")),
            mismatch_pct=float(100.0 * mismatch.mean()),
            worst_index=[int(i) for i in worst],
            worst_golden=float(g[worst]),
            worst_candidate=float(c[worst]),
            first_nonfinite=first_nonfinite,
            masked_mismatch=masked_mismatch,
        )
