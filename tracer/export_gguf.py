"""GGUF export: the golden's weights as llama.cpp's GPT-2 model file, written with the `gguf` package.

Names, layouts and metadata follow llama.cpp's own HF converter for GPT-2, so llama.cpp loads the
file as it loads any converted GPT-2: `token_embd`, `position_embd`, `blk.{i}.attn_norm`,
`blk.{i}.attn_qkv`, `blk.{i}.attn_output`, `blk.{i}.ffn_norm`, `blk.{i}.ffn_up`, `blk.{i}.ffn_down`,
`output_norm`, `output`; the Conv1D weights transposed to [out, in] (GGUF then lists the dims
innermost first: ne = [in, out]); everything float32 (file type ALL_F32), so nothing is rounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tracer.errors import TracerError

# HF GPT-2 module suffix -> (gguf tensor enum name, transpose the weight)
BLOCK_TENSORS = {
    "ln_1": ("ATTN_NORM", False), "attn.c_attn": ("ATTN_QKV", True), "attn.c_proj": ("ATTN_OUT", True),
    "ln_2": ("FFN_NORM", False), "mlp.c_fc": ("FFN_UP", True), "mlp.c_proj": ("FFN_DOWN", True),
}
WEIGHT_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # -> gguf.LlamaFileType
PLACEHOLDER_MERGE = "\u0120 \u0120"  # "Ġ Ġ": two spaces in GPT-2's byte alphabet
GLOBAL_TENSORS = {
    "transformer.wte.weight": "TOKEN_EMBD", "transformer.wpe.weight": "POS_EMBD",
    "transformer.ln_f.weight": "OUTPUT_NORM", "transformer.ln_f.bias": "OUTPUT_NORM", "lm_head.weight": "OUTPUT",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise TracerError("--format gguf needs the gguf package: pip install 'gpt2-tracer[gguf]'") from None
    return gguf


def gguf_name(hf_name: str) -> tuple[str, bool]:
    """llama.cpp's name for an HF GPT-2 parameter, and whether its data is transposed."""
    gguf = _gguf()
    names = gguf.TENSOR_NAMES
    if hf_name in GLOBAL_TENSORS:
        return f"{names[gguf.MODEL_TENSOR[GLOBAL_TENSORS[hf_name]]]}.{hf_name.rsplit('.', 1)[1]}", False
    parts = hf_name.split(".")  # transformer.h.{i}.<module...>.<weight|bias>
    module, kind = ".".join(parts[3:-1]), parts[-1]
    if parts[:2] != ["transformer", "h"] or module not in BLOCK_TENSORS:
        raise TracerError(f"no GGUF name for weight {hf_name} (not a GPT-2 parameter)")
    enum, transpose = BLOCK_TENSORS[module]
    return f"{names[gguf.MODEL_TENSOR[enum]].format(bid=int(parts[2]))}.{kind}", transpose and kind == "weight"


def byte_tokens() -> list[str]:
    """GPT-2's byte-level BPE alphabet: byte b as the printable character GPT-2's vocab.json uses for it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary(tokenizer: str, model_source: str, vocab_size: int) -> tuple[list[str], list[str], str]:
    """Token strings, merges and a note: the byte alphabet for byte-level ids, a local tokenizer's
    vocab.json / merges.txt, or placeholders (the port is fed ids, never text)."""
    if tokenizer == "bytes" and vocab_size <= 256:
        return byte_tokens()[:vocab_size], [], "byte-level ids: token i is byte i"
    src = Path(model_source)
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        for tok, i in vocab.items():
            if i < vocab_size:
                tokens[i] = tok
        merges = [m for m in (src / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if m and not m.startswith("#version")]
        return tokens, merges, f"tokenizer of {src}"
    return [f"[tok{i}]" for i in range(vocab_size)], [], "placeholder tokens (no tokenizer found): feed ids"


def write_gguf(path: Path, weights: dict[str, np.ndarray], config: dict, tokenizer: str,
               model_source: str, weight_type: str = "f32") -> tuple[list[dict], str]:
    """Write `path`; returns (tensor entries for the manifest, tokenizer note). `weight_type` f16 or
    q8_0 stores the 2-D weights so (as llama.cpp's converter does); LayerNorms and biases stay f32."""
    gguf = _gguf()
    if weight_type not in WEIGHT_TYPES:
        raise TracerError(f"GGUF weight type {weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
    qtype = getattr(gguf.GGMLQuantizationType, weight_type.upper())
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    C = int(config["n_embd"])
    writer.add_name("gpt2-tracer export")
    writer.add_context_length(int(config["n_positions"]))
    writer.add_embedding_length(C)
    writer.add_feed_forward_length(int(config.get("n_inner") or 4 * C))
    writer.add_block_count(int(config["n_layer"]))
    writer.add_head_count(int(config["n_head"]))
    writer.add_layer_norm_eps(float(config["layer_norm_epsilon"]))
    writer.add_file_type(getattr(gguf.LlamaFileType, WEIGHT_TYPES[weight_type]))
    tokens, merges, note = vocabulary(tokenizer, model_source, int(config["vocab_size"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    # llama.cpp refuses a gpt2 vocabulary without merges; one merge whose result is no token changes
    # nothing (its tokenizer falls back to single tokens), and ports are fed ids anyway.
    writer.add_token_merges(merges or [PLACEHOLDER_MERGE])
    for key in ("bos_token_id", "eos_token_id"):
        if config.get(key) is not None:
            getattr(writer, f"add_{key}")(int(config[key]))
    entries = []
    for hf_name in sorted(weights):
        name, transpose = gguf_name(hf_name)
        data = np.ascontiguousarray(weights[hf_name].T if transpose else weights[hf_name], dtype=np.float32)
        stored = qtype if data.ndim == 2 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 \
            else gguf.GGMLQuantizationType.F32
        writer.add_tensor(name, gguf.quants.quantize(data, stored), raw_dtype=stored)
        entries.append({"name": name, "from": hf_name, "shape": list(data.shape), "transposed": transpose})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return entries, note
