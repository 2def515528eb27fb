"""Quantized tensors stored as integer codes plus a float scale tensor, and their dequantization.

Ports to inference engines keep int8 per channel or 4-bit blocks. In safetensors / npz / .npy
they are an integer tensor `X` and a float tensor named `X.scale` (also `X.scales`, `X_scale`,
`X_scales`, or the same suffixes on X without a trailing `.weight`; see docs/WEIGHTS.md):

* `int8` codes: value = code · scale (symmetric). Codes that all lie in [-8, 7] count as 4-bit.
* `uint8` codes: two 4-bit codes per byte along the last axis, low nibble first,
  value = (nibble − 8) · scale (the Q4_0 convention), so the logical last axis is twice as long.

The scale's size says how values share it: 1 — per tensor; one per row (shape [rows] or
[rows, 1]) — per channel (a Linear's output channel); rows × n — blocks of last/n values along the
last axis; one per column ([1, cols] or [cols] when rows ≠ cols) — per column. The quantization
step per element is the scale itself, so the audit can check each value lies within one step of
the golden's.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from tracer.weights.checkpoint import FLOAT_DTYPES, Candidate, Quant, RawEntry, bf16_to_f32, float_candidate

SCALE_SUFFIXES = (".scale", ".scales", "_scale", "_scales", ".weight_scale", "_weight_scale")
WEIGHT_SUFFIXES = (".weight", "_weight", ".qweight")
CODE_DTYPES = ("int8", "uint8")


def scale_names(codes: str) -> list[str]:
    """The names a scale tensor for codes tensor `codes` may have, in order of preference."""
    stems = [codes] + [codes[: -len(s)] for s in WEIGHT_SUFFIXES if codes.endswith(s)]
    return [stem + sfx for stem in stems for sfx in SCALE_SUFFIXES]


@dataclass(frozen=True)
class Grouping:
    """Which scale each value uses: `tensor` (one), `rows` (blocks of `block` along the last axis,
    block = the whole row for per channel) or `columns` (one per last-axis index)."""

    kind: str
    block: int
    last: int

    def index(self, flat: np.ndarray) -> np.ndarray:
        """Scale index of each flat value position."""
        if self.kind == "tensor":
            return np.zeros_like(flat)
        if self.kind == "columns":
            return flat % self.last
        return flat // self.block

    def describe(self, ndim: int) -> str:
        if self.kind == "tensor":
            return "per-tensor"
        if self.kind == "columns":
            return "per-column"
        return "per-channel" if self.block == self.last and ndim >= 2 else f"blocks of {self.block}"


def grouping(shape: tuple[int, ...], scale_size: int) -> Grouping | None:
    """How `scale_size` scales cover a tensor of logical `shape` (None: they do not)."""
    last = shape[-1]
    rows = prod(shape[:-1])
    if scale_size == 1:
        return Grouping("tensor", prod(shape), last)
    if scale_size % rows == 0 and last % (scale_size // rows) == 0:
        return Grouping("rows", last // (scale_size // rows), last)
    if len(shape) >= 2 and scale_size == last:
        return Grouping("columns", 1, last)
    return None


def _floats(entry: RawEntry) -> np.ndarray:
    raw = entry.get()
    return bf16_to_f32(raw) if entry.dtype == "bf16" else np.asarray(raw, dtype=np.float32)


def quantized_candidate(codes: RawEntry, scale: RawEntry) -> Candidate | None:
    """Codes + scale as one dequantizing candidate, or None when the scale does not fit the codes."""
    packed = codes.dtype == "uint8"
    shape = codes.shape[:-1] + (codes.shape[-1] * 2,) if packed else codes.shape
    if not shape or prod(shape) == 0:
        return None
    group = grouping(shape, prod(scale.shape))
    if group is None:
        return None
    quant = Quant("4-bit packed" if packed else "int8", 4 if packed else 8,
                  None if group.kind == "tensor" else group.block, group.describe(len(shape)))

    def codes_at(flat: np.ndarray) -> np.ndarray:
        raw = codes.get().reshape(-1)
        if not packed:
            return raw[flat].astype(np.float32)
        byte = raw[flat // 2]
        return ((byte >> (4 * (flat % 2)).astype(np.uint8)) & 0x0F).astype(np.float32) - 8.0

    def all_codes() -> np.ndarray:
        raw = np.asarray(codes.get())
        if not packed:
            if raw.size and raw.min() >= -8 and raw.max() <= 7:  # 4-bit values kept one per byte
                quant.scheme, quant.bits = "int4", 4
            return raw.astype(np.float32)
        out = np.empty(shape, dtype=np.int8)
        out[..., 0::2] = raw & 0x0F
        out[..., 1::2] = raw >> 4
        return out.astype(np.float32) - 8.0

    def expand(s: np.ndarray) -> np.ndarray:
        """One scale per value, full shape."""
        if group.kind == "columns":
            return np.ascontiguousarray(np.broadcast_to(s, shape))
        return np.repeat(s, group.block if group.kind == "rows" else prod(shape)).reshape(shape)

    def values() -> np.ndarray:
        return all_codes() * expand(_floats(scale).reshape(-1))

    def step() -> np.ndarray:
        return np.abs(expand(_floats(scale).reshape(-1)))

    def sample(flat: np.ndarray) -> np.ndarray:
        return codes_at(flat) * _floats(scale).reshape(-1)[group.index(flat)]

    return Candidate(codes.name, tuple(shape), codes.dtype, values, sample, quant, step,
                     stored_as=(codes.name, scale.name))


def build_candidates(entries: dict[str, RawEntry]) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Float entries become candidates as they are, integer codes with their scale become one
    dequantizing candidate; everything else is skipped with the reason."""
    candidates: dict[str, Candidate] = {}
    skipped: dict[str, str] = {}
    used_scales: set[str] = set()
    for name, entry in entries.items():
        if entry.dtype not in CODE_DTYPES:
            continue
        scale = next((entries[s] for s in scale_names(name) if s in entries and entries[s].dtype in FLOAT_DTYPES), None)
        made = quantized_candidate(entry, scale) if scale is not None else None
        if made is None:
            why = "no scale tensor" if scale is None else f"scale {scale.name} {list(scale.shape)} does not fit it"
            skipped[name] = f"{entry.dtype} codes with {why} (expected {name}.scale, see docs/WEIGHTS.md)"
            continue
        candidates[name] = made
        used_scales.add(scale.name)
    for name, entry in entries.items():
        if name in candidates or name in skipped or name in used_scales:
            continue
        if entry.dtype in FLOAT_DTYPES and entry.shape and prod(entry.shape) > 0:
            candidates[name] = float_candidate(name, entry.get, entry.shape, entry.dtype)
        else:
            skipped[name] = f"{entry.dtype} {list(entry.shape)}: not a weight"
    return candidates, skipped
