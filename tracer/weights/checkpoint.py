"""A port's checkpoint as the audit sees it: named tensors with a logical float shape.

Why one abstraction: the file may be safetensors, npz, .npy files, llm.c's flat binary or GGUF,
its tensors float of any width or quantized with scales. The audit only needs, per tensor, its
logical shape, how it is stored (which bounds the error it may show), its values at a few flat
positions (fingerprint checks) and, when verifying, all of them as float32. Readers build the
`Candidate`s; nothing is read before it is asked for, and memory-mappable formats are never
copied whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np


@dataclass
class Quant:
    """How a quantized tensor is stored: `bits` per value, one scale per `block` values along the
    last axis (`block` = the whole row: per channel) or per tensor (`block` None)."""

    scheme: str              # "int8", "int4", "4-bit packed", or a GGUF type name such as "Q4_0"
    bits: float
    block: int | None
    grouping: str            # "per-tensor", "per-channel", "per-column", "blocks of N"

    def describe(self) -> str:
        return f"{self.scheme} ({self.bits:g} bits) {self.grouping}"

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "bits": self.bits, "block": self.block, "grouping": self.grouping}


@dataclass
class Candidate:
    """One tensor of the checkpoint, as float values of its logical shape.

    `values()` returns all values as float32 (a memory-mapped view when stored as float32),
    `sample(flat)` the values at flat positions without reading the rest, `step()` the
    quantization step per element (full shape) for quantized tensors whose step is known."""

    name: str
    shape: tuple[int, ...]
    dtype: str                         # as stored: fp32, fp16, bf16, fp64, int8, uint8, or a GGUF type
    values: Callable[[], np.ndarray]
    sample: Callable[[np.ndarray], np.ndarray]
    quant: Quant | None = None
    step: Callable[[], np.ndarray | None] = lambda: None
    stored_as: tuple[str, ...] = ()    # file entries it is built from (codes and scales)

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def storage(self) -> str:
        """How the values are stored, in words: `fp16`, `int8 per-channel`, `Q4_0 blocks of 32`."""
        return self.quant.describe() if self.quant else self.dtype


@dataclass
class Checkpoint:
    """The candidates of one file; `skipped` names entries that hold no weight values (and why)."""

    path: Path
    format: str
    candidates: dict[str, Candidate]
    skipped: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    _close: Callable[[], None] = lambda: None

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- float tensors -----------------------------------------------------------------------------
def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 bit patterns -> float32 (NumPy has no bfloat16)."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float_candidate(name: str, get: Callable[[], np.ndarray], shape: tuple[int, ...], dtype: str) -> Candidate:
    """A float tensor: `get()` returns the stored array (uint16 bit patterns for bf16)."""

    def convert(raw: np.ndarray) -> np.ndarray:
        if dtype == "bf16":
            return bf16_to_f32(raw)
        return raw if raw.dtype == np.float32 else raw.astype(np.float32)

    def values() -> np.ndarray:
        return convert(get()).reshape(shape)

    flat_view: list[np.ndarray] = []  # the stored array, flat, made once: sampling is called often

    def sample(flat: np.ndarray) -> np.ndarray:
        if not flat_view:
            flat_view.append(np.asarray(get()).reshape(-1))
        return convert(flat_view[0][flat])

    return Candidate(name, tuple(int(d) for d in shape), dtype, values, sample, stored_as=(name,))


@dataclass
class RawEntry:
    """One stored array before interpretation: `dtype` is fp64/fp32/fp16/bf16/int8/uint8/... and
    `get()` returns it (memory-mapped where the format allows; bf16 as uint16 bit patterns)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    get: Callable[[], np.ndarray]


FLOAT_DTYPES = ("fp64", "fp32", "fp16", "bf16")
NUMPY_NAMES = {np.dtype(np.float64): "fp64", np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}


def dtype_name(dtype: np.dtype) -> str:
    """fp32 for float32 and so on; integer and other dtypes keep NumPy's name (int8, uint8, ...)."""
    return NUMPY_NAMES.get(np.dtype(dtype), np.dtype(dtype).name)
