"""GGUF checkpoints through the `gguf` package (pure Python, no llama.cpp build).

F32/F16/BF16 tensors are memory-mapped views; quantized ones (Q8_0, Q4_0 and every other type
the package dequantizes) are dequantized on demand, whole or block by block for sampled values.
For Q8_0 and Q4_0 the per-block scale `d` is the quantization step, so each value can be checked
to lie within one step of the golden's. Shapes are given in NumPy order (GGUF lists them reversed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracer.errors import TracerError
from tracer.weights.checkpoint import Candidate, Checkpoint, Quant, float_candidate

STEP_KNOWN = ("Q8_0", "Q4_0")  # block = fp16 scale d + codes; value = d · code (Q4_0: code − 8)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise TracerError("reading .gguf needs the gguf package: pip install 'gpt2-tracer[gguf]'") from None
    return gguf


def read_gguf(path: Path) -> Checkpoint:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # any parse failure of a third-party format is bad input
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TracerError(f"{path.name} is not a valid GGUF file ({reason})") from None
    T = gguf.GGMLQuantizationType
    floats = {T.F32: "fp32", T.F16: "fp16", T.F64: "fp64"}
    candidates, skipped = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        qtype = T(t.tensor_type)
        if qtype in floats:
            candidates[t.name] = float_candidate(t.name, lambda t=t: t.data, shape, floats[qtype])
        elif qtype == T.BF16:
            candidates[t.name] = float_candidate(t.name, lambda t=t: t.data.view(np.uint16), shape, "bf16")
        elif qtype.name.startswith("I"):
            skipped[t.name] = f"{qtype.name} {list(shape)}: not a weight"
        else:
            candidates[t.name] = _quantized(gguf, t, qtype, shape)
    return Checkpoint(path, "gguf", candidates, skipped, path.stat().st_size)


def _quantized(gguf, tensor, qtype, shape: tuple[int, ...]) -> Candidate:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    quant = Quant(qtype.name, round(type_size * 8 / block, 3), block, f"blocks of {block}")

    def blocks() -> np.ndarray:
        return tensor.data.reshape(-1, type_size)

    def values() -> np.ndarray:
        return gguf.quants.dequantize(tensor.data, qtype).reshape(shape)

    def sample(flat: np.ndarray) -> np.ndarray:
        deq = gguf.quants.dequantize(np.ascontiguousarray(blocks()[flat // block]), qtype)
        return deq[np.arange(flat.size), flat % block]

    def step() -> np.ndarray | None:
        if qtype.name not in STEP_KNOWN:
            return None
        d = np.ascontiguousarray(blocks()[:, :2]).view(np.float16).astype(np.float32).reshape(-1)
        return np.repeat(np.abs(d), block).reshape(shape)

    return Candidate(tensor.name, shape, qtype.name, values, sample, quant, step, stored_as=(tensor.name,))
