"""Line a candidate stage up with the golden's layout when a port stored it differently.

Ports dump q as [B,T,H,D] or [B,T,C], drop the batch axis at B=1, keep heads split in ctx,
save scores as [T,T,H], or pad the vocabulary of logits to a multiple of 64. A candidate is
accepted in another layout only when that layout is an axis permutation or a head split/merge of
the same tensor *and the values confirm it*: every plausible layout is tried, and one is kept
only when it is clearly closer to the golden than every other one. Nothing is ever reshaped by
element count alone; what fits no layout is a shape mismatch, reported with the closest try.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# The kept layout must be this much closer to the golden than the runner-up (row-error ratio),
# unless it is the only one: a wrong permutation of real activations is never this close.
CONFIRM_RATIO = 0.5


@dataclass
class Alignment:
    """The candidate in the golden's shape (None when no layout fits) and what was done to it."""

    array: np.ndarray | None
    note: str | None = None


def _distance(c: np.ndarray, g: np.ndarray) -> float:
    """1 − |cosine| over the golden's unmasked elements (a candidate masked there counts as 0).

    Scale-free, so a layout is still recognised when the values also carry a scale bug."""
    with np.errstate(all="ignore"):
        ok = np.isfinite(g) & (g > -1e3)   # compared where the golden is not masked ...
        a = np.where(ok & np.isfinite(c) & (c > -1e3), c, 0.0).astype(np.float64).ravel()  # ... masked c counts as 0
        b = np.where(ok, g, 0.0).astype(np.float64).ravel()
        den = float(np.linalg.norm(a) * np.linalg.norm(b))
        return 1.0 - abs(float(a @ b)) / den if den > 0 else 1.0


def _squeeze_batch(c: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, str | None]:
    if c.ndim == g.ndim - 1 and g.shape[0] == 1:
        return c[None], "no batch axis (compared as batch 1)"
    return c, None


def _trim_padding(c: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A last axis longer than the golden's, all else equal: vocabulary (or width) padding."""
    if c.ndim == g.ndim and c.shape[:-1] == g.shape[:-1] and c.shape[-1] > g.shape[-1]:
        return c[..., : g.shape[-1]], f"last axis padded to {c.shape[-1]}; the first {g.shape[-1]} compared"
    return c, None


def _layouts(c: np.ndarray, g: np.ndarray, layout: str) -> list[tuple[np.ndarray, str]]:
    """Every axis permutation or head split/merge of `c` that has the golden's shape."""
    options: list[tuple[np.ndarray, str]] = []
    if c.ndim == g.ndim and sorted(c.shape) == sorted(g.shape):
        for perm in itertools.permutations(range(c.ndim)):
            if tuple(c.shape[p] for p in perm) == g.shape:
                options.append((c.transpose(perm), f"axes permuted {list(perm)}"))
    if layout == "BHTD" and c.ndim == 3 and c.size == g.size:  # [B,T,C] -> heads
        B, H, T, D = g.shape
        if c.shape == (B, T, H * D):
            options.append((c.reshape(B, T, H, D).transpose(0, 2, 1, 3), "split into heads [T, H, D]"))
            options.append((c.reshape(B, T, D, H).transpose(0, 3, 1, 2), "split into heads [T, D, H]"))
    if layout == "BTC" and c.ndim == 4 and c.size == g.size:  # heads not merged
        B, T, C = g.shape
        for perm in itertools.permutations((1, 2, 3)):
            a = c.transpose((0,) + perm)
            if a.shape[:2] == (B, T):
                options.append((a.reshape(B, T, C), f"heads merged from axes {[0, *perm]}"))
    return options


def align(candidate: np.ndarray, golden: np.ndarray, layout: str) -> Alignment:
    """The candidate in the golden's shape, or `Alignment(None, why)` when no layout fits."""
    c, g = candidate, golden
    if c.shape == g.shape:
        return Alignment(c)
    shown = "×".join(map(str, c.shape))
    notes = []
    for step in (_squeeze_batch, _trim_padding):
        c, note = step(c, g)
        if note:
            notes.append(note)
    if c.shape == g.shape:
        return Alignment(c, f"candidate [{shown}]: " + "; ".join(notes))
    options = _layouts(c, g, layout)
    if not options:
        return Alignment(None, f"candidate shape [{shown}] vs golden {list(g.shape)}: no axis permutation, head "
                               "split/merge or padding of it has the golden's shape")
    scored = sorted(((_distance(a, g), a, label) for a, label in options), key=lambda o: o[0])
    best = scored[0]
    # Options that are the same array (axes of size 1 permuted) are one layout, not rivals.
    rivals = [o for o in scored[1:] if not np.array_equal(o[1], best[1], equal_nan=True)]
    if rivals and not best[0] < CONFIRM_RATIO * rivals[0][0]:
        return Alignment(None, f"candidate shape [{shown}] vs golden {list(g.shape)}: the values confirm no layout "
                               f"(closest: {best[2]}, 1−cos {best[0]:.3g}; next: {rivals[0][2]}, "
                               f"1−cos {rivals[0][0]:.3g})")
    notes.append(best[2])
    return Alignment(best[1], f"candidate [{shown}]: " + "; ".join(notes))
