"""Line a candidate stage up with the golden's layout when a port stored it differently.

Ports dump q as [B,T,H,D] or [B,T,C], drop the batch axis at B=1, or keep heads split in
ctx. When the data is the same tensor in another layout, compare it in the canonical one
(and say so); when only the element count matches, reshape and let the values speak.
"""

from __future__ import annotations

import itertools

import numpy as np


def _error(c: np.ndarray, g: np.ndarray) -> float:
    with np.errstate(all="ignore"):
        d = np.where(np.isfinite(g) & np.isfinite(c), c.astype(np.float64) - g, 0.0)
    return float(np.sum(d * d))


def align(candidate: np.ndarray, golden: np.ndarray, layout: str) -> tuple[np.ndarray | None, str | None]:
    """(candidate in the golden's shape, note) or (None, None) when no layout fits."""
    c, g = candidate, golden
    if c.shape == g.shape:
        return c, None
    shown = "×".join(map(str, c.shape))
    if c.ndim == g.ndim - 1 and g.shape[0] == 1 and c.shape == g.shape[1:]:
        return c[None], f"candidate [{shown}] has no batch axis; compared as batch 1"
    options: list[tuple[np.ndarray, str]] = []
    if c.ndim == g.ndim and sorted(c.shape) == sorted(g.shape):
        for perm in itertools.permutations(range(c.ndim)):
            if perm != tuple(range(c.ndim)) and tuple(c.shape[p] for p in perm) == g.shape:
                options.append((c.transpose(perm), f"candidate [{shown}] transposed by axes {list(perm)}"))
    if layout == "BHTD" and c.ndim == 3 and c.size == g.size:  # [B,T,C] -> heads
        B, H, T, D = g.shape
        if c.shape == (B, T, H * D):
            options.append((c.reshape(B, T, H, D).transpose(0, 2, 1, 3), f"candidate [{shown}] split into heads"))
    if layout == "BTC" and c.ndim == 4 and c.size == g.size:  # heads not merged
        B, T, C = g.shape
        if c.shape[0] == B and c.shape[1] == T:
            options.append((c.reshape(B, T, C), f"candidate [{shown}] heads merged"))
        elif c.shape[0] == B and c.shape[2] == T:
            options.append((c.transpose(0, 2, 1, 3).reshape(B, T, C), f"candidate [{shown}] heads merged"))
    if options:
        best = min(options, key=lambda o: _error(o[0], g))
        return best
    if c.size == g.size:
        return c.reshape(g.shape), f"candidate [{shown}] reshaped to the golden's shape"
    return None, None
