"""Element-wise verification of a located parameter, and what its storage lets it differ by.

A parameter is *identified* in a candidate region when the relative L2 error is below
`IDENTIFY` (a wrong tensor of the same shape sits at ~1.4, a 4-bit quantized copy at ~0.1). It is
*right* when every value lies within what its storage explains: float32 rounding for fp32/fp64,
half an ulp of fp16 / bf16, one quantization step for quantized values whose step is known
(int8/4-bit with scales, GGUF Q8_0/Q4_0), and for other GGUF types a relative error below
2^-(bits-2). Anything beyond is a value mismatch, reported with its metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tracer.weights.checkpoint import Candidate

IDENTIFY = 0.5
CHUNK = 1 << 22
TILE = 512
# Per-element bound |candidate - golden| <= REL[dtype]·|golden| + ABS[dtype] for float storage.
REL = {"fp64": 2.0 ** -20, "fp32": 2.0 ** -20, "fp16": 2.0 ** -11 * 1.001, "bf16": 2.0 ** -8 * 1.001}
ABS = {"fp64": 1e-30, "fp32": 1e-30, "fp16": 2.0 ** -25, "bf16": 1e-38}
STEP_SLACK = 1.001


@dataclass
class Check:
    """Sums over the compared elements, so the checks of several pieces add up."""

    n: int = 0
    sum_g2: float = 0.0
    sum_c2: float = 0.0
    sum_gc: float = 0.0
    sum_d2: float = 0.0
    max_abs: float = 0.0
    max_steps: float | None = None   # max |diff| / quantization step, where the step is known
    beyond: int = 0                  # elements beyond their storage bound
    nonfinite: int = 0
    rel_bound: float | None = None   # storage without per-element bound: allowed relative L2 error

    def __add__(self, o: Check) -> Check:
        steps = [s for s in (self.max_steps, o.max_steps) if s is not None]
        bounds = [b for b in (self.rel_bound, o.rel_bound) if b is not None]
        return Check(self.n + o.n, self.sum_g2 + o.sum_g2, self.sum_c2 + o.sum_c2, self.sum_gc + o.sum_gc,
                     self.sum_d2 + o.sum_d2, max(self.max_abs, o.max_abs), max(steps) if steps else None,
                     self.beyond + o.beyond, self.nonfinite + o.nonfinite, min(bounds) if bounds else None)

    @property
    def rel_l2(self) -> float:
        if self.nonfinite:
            return math.inf
        if self.sum_g2 == 0:
            return 0.0 if self.sum_d2 == 0 else math.inf
        return math.sqrt(self.sum_d2 / self.sum_g2)

    @property
    def cosine(self) -> float | None:
        denom = math.sqrt(self.sum_g2 * self.sum_c2)
        return self.sum_gc / denom if denom > 0 and not self.nonfinite else None

    @property
    def identified(self) -> bool:
        return self.rel_l2 <= IDENTIFY

    @property
    def within(self) -> bool:
        if self.nonfinite or self.beyond:
            return False
        return self.rel_bound is None or self.rel_l2 <= self.rel_bound

    @property
    def exact(self) -> bool:
        return self.max_abs == 0 and not self.nonfinite

    def metrics(self) -> dict:
        return {"max_abs": self.max_abs if not self.nonfinite else math.inf, "rel_l2": self.rel_l2,
                "cosine": self.cosine, "max_steps": self.max_steps, "beyond_bound": self.beyond,
                "nonfinite": self.nonfinite}


def _blocks(shape: tuple[int, ...], strided: bool) -> list[tuple[slice, ...]]:
    """Row blocks of about CHUNK values; TILE x TILE squares when the candidate is read transposed,
    so both sides of each comparison stay in cache instead of the file being gathered by stride."""
    if len(shape) == 1:
        return [(slice(s, s + CHUNK),) for s in range(0, shape[0], CHUNK)]
    if not strided:
        rows = max(1, CHUNK // max(1, shape[1]))
        return [(slice(r, r + rows), slice(None)) for r in range(0, shape[0], rows)]
    return [(slice(i, i + TILE), slice(j, j + TILE)) for i in range(0, shape[0], TILE) for j in range(0, shape[1], TILE)]


def check(golden: np.ndarray, values: np.ndarray, cand: Candidate, step: np.ndarray | None) -> Check:
    """Compare golden values with the candidate's (same shape), block by block.

    `step` is the viewed quantization step (same shape) when the candidate is quantized and its
    step known. Identical values (the common case) cost one comparison pass; otherwise differences
    are taken in float32 (exact for the near-equal values that matter) and summed per block."""
    out = Check()
    if cand.quant is not None and step is None:
        out.rel_bound = 2.0 ** -(cand.quant.bits - 2)
    blocks = _blocks(golden.shape, values.ndim == 2 and not values.flags.c_contiguous)
    if all(np.array_equal(golden[b], values[b]) for b in blocks):
        flat = np.ravel(golden).astype(np.float32, copy=False)
        gg = float(np.dot(flat, flat))
        return Check(n=golden.size, sum_g2=gg, sum_c2=gg, sum_gc=gg, max_steps=0.0 if step is not None else None,
                     rel_bound=out.rel_bound)
    for b in blocks:
        g = np.ascontiguousarray(golden[b], dtype=np.float32).reshape(-1)
        c = np.ascontiguousarray(values[b], dtype=np.float32).reshape(-1)
        out.n += g.size
        if not np.isfinite(c).all():
            finite = np.isfinite(c)
            out.nonfinite += int(c.size - np.count_nonzero(finite))
            c = np.where(finite, c, np.float32(0))
        d = np.abs(c - g)
        out.sum_g2 += float(np.dot(g, g))
        out.sum_c2 += float(np.dot(c, c))
        out.sum_gc += float(np.dot(g, c))
        out.sum_d2 += float(np.dot(d, d))
        out.max_abs = max(out.max_abs, float(d.max(initial=0.0)))
        if step is not None:
            s = np.ascontiguousarray(step[b], dtype=np.float32).reshape(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(s > 0, d / s, np.where(d > 0, np.inf, 0.0))
            out.max_steps = max(out.max_steps or 0.0, float(ratio.max(initial=0.0)))
            out.beyond += int(np.count_nonzero(d > s * STEP_SLACK + 1e-6 * np.abs(g)))
        elif cand.quant is None:
            bound = np.abs(g)
            bound *= REL.get(cand.dtype, REL["fp32"])
            bound += ABS.get(cand.dtype, ABS["fp32"])
            out.beyond += int(np.count_nonzero(d > bound))
    return out


def sample_error(golden: np.ndarray, values: np.ndarray) -> float:
    """Relative L2 error of sampled values: a cheap estimate before a full check."""
    g = golden.astype(np.float64)
    c = values.astype(np.float64)
    if not np.isfinite(c).all():
        return math.inf
    gg = float(g @ g)
    dd = float((c - g) @ (c - g))
    if gg == 0:
        return 0.0 if dd == 0 else math.inf
    return math.sqrt(dd / gg)


def describe_values(a: np.ndarray) -> str:
    """What an unmatched tensor looks like: constant, an untrained N(0, 0.02) init, or its statistics."""
    a = np.asarray(a, dtype=np.float32)
    if a.size == 0:
        return "empty"
    finite = np.isfinite(a)
    if not finite.all():
        return f"{a.size - int(finite.sum())} non-finite values"
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        what = {0.0: " (never written?)", 1.0: " (an untouched LayerNorm weight?)"}.get(lo, "")
        return f"constant {lo:g}{what}"
    mean, std = float(a.mean(dtype=np.float64)), float(a.std(dtype=np.float64))
    if abs(mean) < 0.1 * std and 0.015 <= std <= 0.025:
        return f"mean {mean:.2g}, std {std:.3g}: looks like an untrained N(0, 0.02) init"
    return f"mean {mean:.3g}, std {std:.3g}"
