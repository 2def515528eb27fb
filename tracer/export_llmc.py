"""llm.c's file formats: the GPT-2 checkpoint (`gpt2_124M.bin`) and the token files of its data loader.

Checkpoint (version 3, float32), all little-endian:

    int32 header[256]: [0] 20240326 magic, [1] 3 version (fp32), [2] maxT (n_positions), [3] V (vocab),
                       [4] L (layers), [5] NH (heads), [6] C (width), [7] Vp (vocab padded to a multiple
                       of 128: 50257 -> 50304), the rest 0
    float32 params, back to back, in this order (weights as nn.Linear's [out, in], i.e. HF's Conv1D
    weights transposed):
        wte [Vp, C] (rows V..Vp-1 zero), wpe [maxT, C], ln1w [L, C], ln1b [L, C], qkvw [L, 3C, C],
        qkvb [L, 3C], attprojw [L, C, C], attprojb [L, C], ln2w [L, C], ln2b [L, C], fcw [L, 4C, C],
        fcb [L, 4C], fcprojw [L, C, 4C], fcprojb [L, C], lnfw [C], lnfb [C]

Token file: int32 header[256] = [20240520 magic, version (1: uint16 tokens, 2: uint32), n tokens, 0...],
then the tokens. This is what llm.c's train_gpt2.c reads and what its train_gpt2.py writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracer.errors import TracerError

MAGIC = 20240326
VERSION_FP32 = 3
TOKENS_MAGIC = 20240520
HEADER_INTS = 256


def padded_vocab(vocab: int) -> int:
    """llm.c pads the vocabulary to a multiple of 128 so its matmuls tile evenly."""
    return (vocab + 127) // 128 * 128


def llmc_tensors(weights: dict[str, np.ndarray], config: dict) -> list[tuple[str, np.ndarray]]:
    """(llm.c name, float32 array) in checkpoint order; layer tensors stacked along a leading L axis."""
    L, V = int(config["n_layer"]), int(config["vocab_size"])

    def w(name: str) -> np.ndarray:
        if name not in weights:
            raise TracerError(f"the golden has no weight {name}; llm.c's checkpoint needs every GPT-2 parameter")
        return np.asarray(weights[name], dtype=np.float32)

    def layers(suffix: str, linear: bool = False) -> np.ndarray:
        return np.stack([w(f"transformer.h.{i}.{suffix}").T if linear else w(f"transformer.h.{i}.{suffix}")
                         for i in range(L)])

    wte = w("transformer.wte.weight")
    wte_padded = np.zeros((padded_vocab(V), wte.shape[1]), dtype=np.float32)
    wte_padded[:V] = wte
    return [
        ("wte", wte_padded), ("wpe", w("transformer.wpe.weight")),
        ("ln1w", layers("ln_1.weight")), ("ln1b", layers("ln_1.bias")),
        ("qkvw", layers("attn.c_attn.weight", True)), ("qkvb", layers("attn.c_attn.bias")),
        ("attprojw", layers("attn.c_proj.weight", True)), ("attprojb", layers("attn.c_proj.bias")),
        ("ln2w", layers("ln_2.weight")), ("ln2b", layers("ln_2.bias")),
        ("fcw", layers("mlp.c_fc.weight", True)), ("fcb", layers("mlp.c_fc.bias")),
        ("fcprojw", layers("mlp.c_proj.weight", True)), ("fcprojb", layers("mlp.c_proj.bias")),
        ("lnfw", w("transformer.ln_f.weight")), ("lnfb", w("transformer.ln_f.bias")),
    ]


def checkpoint_header(config: dict) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    V = int(config["vocab_size"])
    header[:8] = [MAGIC, VERSION_FP32, config["n_positions"], V, config["n_layer"], config["n_head"],
                  config["n_embd"], padded_vocab(V)]
    return header


def write_checkpoint(path: Path, weights: dict[str, np.ndarray], config: dict) -> list[dict]:
    """Write the checkpoint; returns each tensor's name, shape and byte offset for the manifest."""
    entries, offset = [], HEADER_INTS * 4
    with open(path, "wb") as fh:
        fh.write(checkpoint_header(config).tobytes())
        for name, array in llmc_tensors(weights, config):
            fh.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
            entries.append({"name": name, "shape": list(array.shape), "offset": offset})
            offset += array.size * 4
    return entries


def write_tokens(path: Path, ids: np.ndarray) -> None:
    """The ids, flattened row-major, in llm.c's token-file format."""
    flat = np.asarray(ids).reshape(-1)
    version, dtype = (1, "<u2") if flat.max(initial=0) < 1 << 16 else (2, "<u4")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [TOKENS_MAGIC, version, flat.size]
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        fh.write(flat.astype(dtype).tobytes())
