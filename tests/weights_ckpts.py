"""Port checkpoints built from a golden's weights, in the layouts real ports use, with or without
the classic loading mistakes: the ground truth the weight-audit tests check the audit against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tracer.store import Golden
from tracer.weights.golden import CONV1D_SUFFIXES

QKV = ("w_query", "w_key", "w_value")


def golden_weights(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """HF name -> weight (lm_head left out: GPT-2 ties it to wte), and the model config."""
    with Golden.open(path) as g:
        w = g.weights()
        config = g.model_config
    w.pop("lm_head.weight", None)
    return w, config


def hf_names(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """As save_pretrained writes a GPT2Model: no `transformer.` prefix, Conv1D layout."""
    return {k.removeprefix("transformer."): np.ascontiguousarray(v) for k, v in w.items()}


def linear_layout(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names with the Conv1D weights transposed to nn.Linear's [out, in] (MAX-style ports)."""
    return {k: np.ascontiguousarray(v.T) if k.endswith(CONV1D_SUFFIXES) else v for k, v in hf_names(w).items()}


def pycandle(w: dict[str, np.ndarray], n_layer: int, qkv_order: tuple[int, int, int] = (0, 1, 2)) -> dict[str, np.ndarray]:
    """The PyCandle/Candle layout: Linear weights, q/k/v split out of c_attn (`qkv_order[k]` = the
    third that the k-th of w_query/w_key/w_value receives), `out_head` for lm_head."""
    out = {"token_emb.weight": w["transformer.wte.weight"], "pos_emb.weight": w["transformer.wpe.weight"],
           "final_layer_norm.weight": w["transformer.ln_f.weight"], "final_layer_norm.bias": w["transformer.ln_f.bias"],
           "out_head.weight": w["transformer.wte.weight"]}
    for i in range(n_layer):
        h, b = f"transformer.h.{i}.", f"transformer_block_{i}."
        C = w[h + "ln_1.weight"].shape[0]
        for k, part in enumerate(QKV):
            third = slice(qkv_order[k] * C, (qkv_order[k] + 1) * C)
            out[f"{b}mha.{part}.weight"] = np.ascontiguousarray(w[h + "attn.c_attn.weight"][:, third].T)
            out[f"{b}mha.{part}.bias"] = w[h + "attn.c_attn.bias"][third]
        for src, dst in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            out[f"{b}{dst}.weight"], out[f"{b}{dst}.bias"] = w[h + src + ".weight"], w[h + src + ".bias"]
        for src, dst in (("attn.c_proj", "mha.out_proj"), ("mlp.c_fc", "ff.ff_top"), ("mlp.c_proj", "ff.ff_bottom")):
            out[f"{b}{dst}.weight"] = np.ascontiguousarray(w[h + src + ".weight"].T)
            out[f"{b}{dst}.bias"] = w[h + src + ".bias"]
    return out


def quantize_int8_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row (a Linear's output channel): codes and scales."""
    scale = np.abs(a).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    return np.round(a / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def int8_port(w: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """An int8-per-channel engine port: every 2-D weight stored as int8 codes [out, in] with
    `<name>.scale` [out] (Linear layout), the rest fp32. Returns the checkpoint and the port's
    dequantized weights in HF layout (what its forward computes with)."""
    ckpt, deq = {}, {}
    for name, a in w.items():
        short = name.removeprefix("transformer.")
        if a.ndim != 2:
            ckpt[short], deq[name] = a, a
            continue
        linear = a.T if name.endswith(CONV1D_SUFFIXES) else a
        codes, scale = quantize_int8_rows(linear)
        ckpt[short], ckpt[short + ".scale"] = codes, scale
        back = codes.astype(np.float32) * scale[:, None]
        deq[name] = np.ascontiguousarray(back.T if name.endswith(CONV1D_SUFFIXES) else back)
    return ckpt, deq


def quantize_4bit_blocks(a: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0-style 4-bit blocks along the last axis, packed two per byte (low nibble first)."""
    rows, cols = a.shape
    blocks = a.reshape(rows, cols // block, block)
    scale = np.abs(blocks).max(axis=-1) / 7.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.round(blocks / scale[..., None]), -8, 7).astype(np.int16) + 8
    codes = codes.reshape(rows, cols).astype(np.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), scale.astype(np.float32)


def save(tensors: dict[str, np.ndarray], path: Path) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def write_llmc(w: dict[str, np.ndarray], config: dict, path: Path, padded_vocab: int) -> Path:
    """llm.c's fp32 checkpoint (version 3): header, then every parameter, stacked and Linear-layout."""
    L, C, V = int(config["n_layer"]), int(config["n_embd"]), int(config["vocab_size"])
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [20240326, 3, int(config["n_positions"]), V, L, int(config["n_head"]), C, padded_vocab]
    wte = np.zeros((padded_vocab, C), np.float32)
    wte[:V] = w["transformer.wte.weight"]
    stack = lambda local, t=False: np.stack([w[f"transformer.h.{i}.{local}"].T if t else  # noqa: E731
                                             w[f"transformer.h.{i}.{local}"] for i in range(L)])
    params = [wte, w["transformer.wpe.weight"], stack("ln_1.weight"), stack("ln_1.bias"),
              stack("attn.c_attn.weight", True), stack("attn.c_attn.bias"), stack("attn.c_proj.weight", True),
              stack("attn.c_proj.bias"), stack("ln_2.weight"), stack("ln_2.bias"), stack("mlp.c_fc.weight", True),
              stack("mlp.c_fc.bias"), stack("mlp.c_proj.weight", True), stack("mlp.c_proj.bias"),
              w["transformer.ln_f.weight"], w["transformer.ln_f.bias"]]
    with open(path, "wb") as fh:
        fh.write(header.tobytes())
        for p in params:
            fh.write(np.ascontiguousarray(p, dtype=np.float32).tobytes())
    return path


GGUF_NAMES = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias", "attn.c_attn.weight": "attn_qkv.weight",
              "attn.c_attn.bias": "attn_qkv.bias", "attn.c_proj.weight": "attn_output.weight",
              "attn.c_proj.bias": "attn_output.bias", "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
              "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias", "mlp.c_proj.weight": "ffn_down.weight",
              "mlp.c_proj.bias": "ffn_down.bias"}


def write_gguf(w: dict[str, np.ndarray], config: dict, path: Path, qtype_name: str) -> Path:
    """GGUF as llama.cpp's converter writes gpt2: Conv1D weights transposed, 2-D tensors in
    `qtype_name` (F32, F16, Q8_0, Q4_0), 1-D in F32, output.weight a copy of token_embd."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(int(config["n_layer"]))
    top = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
           "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    tensors = []
    for name, a in w.items():
        if name in top:
            tensors.append((top[name], a))
        else:
            i, local = name.removeprefix("transformer.h.").split(".", 1)
            tensors.append((f"blk.{i}.{GGUF_NAMES[local]}", a.T if name.endswith(CONV1D_SUFFIXES) else a))
    tensors.append(("output.weight", w["transformer.wte.weight"]))
    for name, a in tensors:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and qtype_name != "F32":
            writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
