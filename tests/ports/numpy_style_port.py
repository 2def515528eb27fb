"""A GPT-2 forward in NumPy written the way a small standalone port is (picoGPT style): one
sequence, no batch axis ([T,C] everywhere), heads as Python lists of [T,D] arrays, its own
parameter tree and its own dump names. `numpy_style.toml` next to this file maps those names
to canonical stages.

Dumps (one `.npz`): `tok_emb`, `pos_emb`, `x_embed`, and per block `layer{i}_x_in` (block input),
`layer{i}_attn_in`, `layer{i}_c_attn`, `layer{i}_q/_k/_v` ([T,H,D], heads stacked on axis 1),
`layer{i}_att_logits` and `layer{i}_att_weights` ([H,T,T]; masked logits are about -1e10, the
additive mask), `layer{i}_att_merged`, `layer{i}_att_proj`, `layer{i}_x_mid`, `layer{i}_mlp_in`,
`layer{i}_fc`, `layer{i}_gelu`, `layer{i}_mlp_proj`, `layer{i}_x_out`, then `ln_f_out` and
`logits_out`.

Bugs of `tests/ports/catalog.py` are switched on with `bug=NAME, bug_layer=L` (-1: every block).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

MASK_FILL = -1e10
BUGS = frozenset({
    "gelu-coef", "wpe-offset", "ctx-head-major", "kv-swap", "v-from-k", "head-split-strided",
    "attn-scale-d", "mask-off-by-one", "fp16-scores", "qkv-bias-missing", "bias-twice",
    "cproj-transposed", "ln-eps-1e-3", "ln1-prev-layer-weights", "ln2-ln1-weights",
    "ln2-block-input", "fp16-fc-out", "lnf-no-beta", "logits-from-resid",
})

Dump = Callable[[str, np.ndarray], None]


class Bug:
    """Which bug is on, and in which block."""

    def __init__(self, name: str | None = None, layer: int = -1):
        if name is not None and name not in BUGS:
            raise ValueError(f"unknown bug {name!r}")
        self.name, self.layer = name, layer

    def on(self, name: str, layer: int | None = None) -> bool:
        return self.name == name and (layer is None or self.layer < 0 or layer == self.layer)


def load_params(hf: dict[str, np.ndarray], n_layer: int, dtype=np.float32) -> dict:
    """HF GPT-2 names -> the nested tree this port works on (Conv1D weights stay [in,out])."""
    cast = lambda name: np.asarray(hf[name], dtype=dtype)  # noqa: E731
    lin = lambda p: {"w": cast(p + ".weight"), "b": cast(p + ".bias")}  # noqa: E731
    norm = lambda p: {"g": cast(p + ".weight"), "b": cast(p + ".bias")}  # noqa: E731
    blocks = []
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        blocks.append({
            "ln_1": norm(p + ".ln_1"), "ln_2": norm(p + ".ln_2"),
            "attn": {"c_attn": lin(p + ".attn.c_attn"), "c_proj": lin(p + ".attn.c_proj")},
            "mlp": {"c_fc": lin(p + ".mlp.c_fc"), "c_proj": lin(p + ".mlp.c_proj")},
        })
    return {"wte": cast("transformer.wte.weight"), "wpe": cast("transformer.wpe.weight"),
            "blocks": blocks, "ln_f": norm("transformer.ln_f")}


def to_half(x):
    return x.astype(np.float16).astype(x.dtype)


def gelu(x, coef=0.044715):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + coef * x**3)))


def softmax(x):
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(variance + eps) + b


def linear(x, w, b):
    return x @ w + b


def attention(q, k, v, mask, bug: Bug, i: int):
    d = q.shape[-1]
    scale = d if bug.on("attn-scale-d", i) else math.sqrt(d)
    logits = q @ k.T / scale
    if bug.on("fp16-scores", i):
        logits = to_half(logits)
    logits = logits + mask
    weights = softmax(logits)
    return weights @ v, logits, weights


def split_heads(x, n_head, strided):
    if strided:
        return [x[:, h::n_head] for h in range(n_head)]
    return np.split(x, n_head, axis=-1)


def mha(x, c_attn, c_proj, n_head, dump: Dump, bug: Bug, i: int):
    n_seq = x.shape[0]
    qkv_b = 0 if bug.on("qkv-bias-missing", i) else c_attn["b"]
    x = linear(x, c_attn["w"], qkv_b)
    dump(f"layer{i}_c_attn", x)

    q, k, v = np.split(x, 3, axis=-1)
    if bug.on("kv-swap", i):
        k, v = v, k
    if bug.on("v-from-k", i):
        v = k
    strided = bug.on("head-split-strided", i)
    q_heads, k_heads, v_heads = (split_heads(t, n_head, strided) for t in (q, k, v))
    for name, heads in (("q", q_heads), ("k", k_heads), ("v", v_heads)):
        dump(f"layer{i}_{name}", np.stack(heads, axis=1))

    causal = np.tri(n_seq, k=1 if bug.on("mask-off-by-one", i) else 0, dtype=x.dtype)
    causal_mask = (1 - causal) * np.asarray(MASK_FILL, dtype=x.dtype)
    results = [attention(qh, kh, vh, causal_mask, bug, i) for qh, kh, vh in zip(q_heads, k_heads, v_heads)]
    out_heads = [r[0] for r in results]
    dump(f"layer{i}_att_logits", np.stack([r[1] for r in results]))
    dump(f"layer{i}_att_weights", np.stack([r[2] for r in results]))

    if bug.on("ctx-head-major", i):
        merged = np.stack(out_heads).reshape(n_seq, -1)
    else:
        merged = np.hstack(out_heads)
    dump(f"layer{i}_att_merged", merged)

    w = c_proj["w"].T if bug.on("cproj-transposed", i) else c_proj["w"]
    out = linear(merged, w, c_proj["b"])
    if bug.on("bias-twice", i):
        out = out + c_proj["b"]
    return out


def ffn(x, c_fc, c_proj, dump: Dump, bug: Bug, i: int):
    h = linear(x, c_fc["w"], c_fc["b"])
    if bug.on("fp16-fc-out", i):
        h = to_half(h)
    dump(f"layer{i}_fc", h)
    a = gelu(h, 0.04715 if bug.on("gelu-coef", i) else 0.044715)
    dump(f"layer{i}_gelu", a)
    return linear(a, c_proj["w"], c_proj["b"])


def transformer_block(x, block, ln_1, n_head, eps, dump: Dump, bug: Bug, i: int):
    dump(f"layer{i}_x_in", x)
    h = layer_norm(x, ln_1["g"], ln_1["b"], eps)
    dump(f"layer{i}_attn_in", h)
    a = mha(h, **block["attn"], n_head=n_head, dump=dump, bug=bug, i=i)
    dump(f"layer{i}_att_proj", a)
    x_mid = x + a
    dump(f"layer{i}_x_mid", x_mid)

    ln_2 = block["ln_1"] if bug.on("ln2-ln1-weights", i) else block["ln_2"]
    h = layer_norm(x if bug.on("ln2-block-input", i) else x_mid, ln_2["g"], ln_2["b"], eps)
    dump(f"layer{i}_mlp_in", h)
    m = ffn(h, **block["mlp"], dump=dump, bug=bug, i=i)
    dump(f"layer{i}_mlp_proj", m)
    x = x_mid + m
    dump(f"layer{i}_x_out", x)
    return x


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head, eps, dump: Dump, bug: Bug):
    eps = 1e-3 if bug.on("ln-eps-1e-3") else eps
    positions = np.arange(len(inputs)) + (1 if bug.on("wpe-offset") else 0)
    tok, pos = wte[inputs], wpe[positions]
    dump("tok_emb", tok)
    dump("pos_emb", pos)
    x = tok + pos
    dump("x_embed", x)
    for i, block in enumerate(blocks):
        ln_1 = blocks[i - 1]["ln_1"] if i > 0 and bug.on("ln1-prev-layer-weights", i) else block["ln_1"]
        x = transformer_block(x, block, ln_1, n_head, eps, dump, bug, i)
    final = layer_norm(x, ln_f["g"], 0 if bug.on("lnf-no-beta") else ln_f["b"], eps)
    dump("ln_f_out", final)
    logits = (x if bug.on("logits-from-resid") else final) @ wte.T
    dump("logits_out", logits)
    return logits


def run(weights: dict[str, np.ndarray], config: dict, input_ids, out_path: str | os.PathLike, *,
        dtype=np.float32, bug: str | None = None, bug_layer: int = -1) -> Path:
    """Run the port on one sequence of ids and write every dump to `out_path` (`.npz`)."""
    params = load_params(weights, config["n_layer"], dtype)
    dumps: dict[str, np.ndarray] = {}
    dump = lambda name, value: dumps.__setitem__(name, np.array(value))  # noqa: E731
    logits = gpt2(np.asarray(input_ids), **params, n_head=config["n_head"], eps=config["layer_norm_epsilon"],
                  dump=dump, bug=Bug(bug, bug_layer))
    if logits.dtype != dtype:
        raise TypeError(f"port ran in {logits.dtype}, not {np.dtype(dtype)}")
    out = Path(out_path)
    partial = out.with_name(out.name + ".partial.npz")
    np.savez(partial, **dumps)
    os.replace(partial, out)
    return out
