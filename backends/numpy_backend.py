"""NumPy reference backend: GPT-2's forward written from the architecture, NumPy only.

Why: an implementation independent of torch, short enough to audit line by line, gives the
comparator a correct candidate to calibrate against (fp32: how far a correct port drifts;
fp64: the noise-floor oracle) and a template for new backends. `forward` below is the whole
model, top to bottom, with `x = tap(stage, x)` after each canonical stage (SPEC §3).

Fault injection swaps exactly one of the stage functions in `Ops` for a buggy twin
(`VARIANTS`, keyed by the names of `backends.inject.CATALOG`), so the forward stays one
readable path and each bug is a few lines next to the correct version it perturbs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from backends.protocol import Backend, Tap
from tracer.errors import TracerError

PRECISIONS = {"fp32": np.float32, "fp64": np.float64}


# -- weights --------------------------------------------------------------------------------
@dataclass
class BlockWeights:
    """One transformer block, Conv1D layout: y = x @ w + b (w is [in, out])."""

    ln1_g: np.ndarray
    ln1_b: np.ndarray
    qkv_w: np.ndarray
    qkv_b: np.ndarray
    proj_w: np.ndarray
    proj_b: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray
    fc_w: np.ndarray
    fc_b: np.ndarray
    mlp_proj_w: np.ndarray
    mlp_proj_b: np.ndarray


@dataclass
class Weights:
    wte: np.ndarray
    wpe: np.ndarray
    blocks: Sequence[BlockWeights]
    lnf_g: np.ndarray
    lnf_b: np.ndarray
    lm_head: np.ndarray  # [V, C]; GPT-2 ties it to wte


class BlocksOnDemand(Sequence):
    """Each block's weights picked when the forward reaches it, from weights read on demand: only the
    block in use is held (the comparison's oracle replays gpt2-xl without its 6 GB of weights)."""

    def __init__(self, block: Callable[[int], BlockWeights], n_layer: int):
        self._block, self._n = block, n_layer

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._block(i % self._n)


def load_weights(weights: Mapping[str, np.ndarray], n_layer: int, dtype: type) -> Weights:
    """Pick GPT-2's parameters out of HF-named weights, as contiguous arrays of `dtype`. A dict gives
    every block up front; any other mapping (a golden's weights read on demand) `BlocksOnDemand`."""

    def get(name: str) -> np.ndarray:
        if name not in weights:
            raise TracerError(f"numpy backend: the golden's weights have no {name!r}")
        return np.ascontiguousarray(weights[name], dtype=dtype)

    def block(i: int) -> BlockWeights:
        p = f"transformer.h.{i}."
        return BlockWeights(*(get(p + n) for n in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias")))

    wte = get("transformer.wte.weight")
    lm_head = get("lm_head.weight") if "lm_head.weight" in weights else wte
    blocks = [block(i) for i in range(n_layer)] if isinstance(weights, dict) else BlocksOnDemand(block, n_layer)
    return Weights(wte, get("transformer.wpe.weight"), blocks,
                   get("transformer.ln_f.weight"), get("transformer.ln_f.bias"), lm_head)


# -- stage functions ------------------------------------------------------------------------
def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Conv1D: x @ w + b as one matrix product over all tokens."""
    y = x.reshape(-1, x.shape[-1]) @ w
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1])


def embed_tok(wte: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return wte[ids]


def embed_pos(wpe: np.ndarray, T: int) -> np.ndarray:
    return wpe[None, :T]


def allowed_keys(mask: np.ndarray) -> np.ndarray:
    """[B,1,T,T]: query t may attend key s when s <= t and s is a real token."""
    T = mask.shape[-1]
    return np.tri(T, dtype=bool)[None, None] & mask[:, None, None, :]


def _affine(xhat: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    xhat *= g
    xhat += b
    return xhat


def layernorm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    xc = x - x.mean(-1, keepdims=True)
    xc *= 1.0 / np.sqrt(np.mean(xc * xc, -1, keepdims=True) + eps)
    return _affine(xc, g, b)


def split_heads(qkv: np.ndarray, n_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B,T,3C] -> q, k, v as [B,H,T,D]."""
    B, T, C3 = qkv.shape
    heads = qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)
    return tuple(np.ascontiguousarray(t) for t in heads)


def _masked(scores: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    np.copyto(scores, -np.inf, where=blocked)
    return scores


def attention_scores(q: np.ndarray, k: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    s = q @ np.ascontiguousarray(k.swapaxes(-1, -2))  # a strided operand makes NumPy skip BLAS
    s *= q.shape[-1] ** -0.5
    return _masked(s, blocked)


def softmax(s: np.ndarray) -> np.ndarray:
    e = s - s.max(-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(-1, keepdims=True)
    return e


def merge_heads(ctx: np.ndarray) -> np.ndarray:
    """[B,H,T,D] -> [B,T,H*D]."""
    B, H, T, D = ctx.shape
    return ctx.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attn_proj(ctx: np.ndarray, blk: BlockWeights) -> np.ndarray:
    return linear(ctx, blk.proj_w, blk.proj_b)


def resid_mid(x: np.ndarray, h: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Block input + attention output (`h`, the ln1 output, is only read by a bug)."""
    return x + a


def mlp_fc(h: np.ndarray, blk: BlockWeights) -> np.ndarray:
    return linear(h, blk.fc_w, blk.fc_b)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), in place on one temporary."""
    y = x * x
    y *= x
    y *= 0.044715
    y += x
    y *= math.sqrt(2.0 / math.pi)
    np.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5
    return y


def resid_post(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    return x + m


@dataclass(frozen=True)
class Ops:
    """The forward's replaceable stage functions; a fault injection swaps exactly one."""

    embed_tok: Callable = embed_tok
    embed_pos: Callable = embed_pos
    embed_sum: Callable = np.add
    allowed_keys: Callable = allowed_keys
    layernorm: Callable = layernorm
    split_heads: Callable = split_heads
    scores: Callable = attention_scores
    softmax: Callable = softmax
    merge_heads: Callable = merge_heads
    attn_proj: Callable = attn_proj
    resid_mid: Callable = resid_mid
    mlp_fc: Callable = mlp_fc
    gelu: Callable = gelu_tanh
    resid_post: Callable = resid_post
    final_ln: Callable | None = None  # None: the same LayerNorm as the blocks


# -- the bugs of backends.inject.CATALOG, each next to nothing but itself -------------------
def _embed_tok_scaled(wte: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return wte[ids] * math.sqrt(wte.shape[1])


def _embed_pos_from_1(wpe: np.ndarray, T: int) -> np.ndarray:
    return np.take(wpe, np.arange(1, T + 1), axis=0, mode="wrap")[None]


def _embed_sum_no_pos(tok: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return tok


def _layernorm_unbiased(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    xc = x - x.mean(-1, keepdims=True)
    xc *= 1.0 / np.sqrt(np.sum(xc * xc, -1, keepdims=True) / (x.shape[-1] - 1) + eps)
    return _affine(xc, g, b)


def _layernorm_eps_outside(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    xc = x - x.mean(-1, keepdims=True)
    xc /= np.sqrt(np.mean(xc * xc, -1, keepdims=True)) + eps
    return _affine(xc, g, b)


def _split_heads_interleaved(qkv: np.ndarray, n_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    B, T, C3 = qkv.shape
    heads = qkv.reshape(B, T, n_head, 3, C3 // (3 * n_head)).transpose(3, 0, 2, 1, 4)
    return tuple(np.ascontiguousarray(t) for t in heads)


def _scores_unscaled(q: np.ndarray, k: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    return _masked(q @ k.swapaxes(-1, -2), blocked)


def _scores_by_d(q: np.ndarray, k: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    s = q @ np.ascontiguousarray(k.swapaxes(-1, -2))  # a strided operand makes NumPy skip BLAS
    s /= q.shape[-1]
    return _masked(s, blocked)


def _scores_qk_swapped(q: np.ndarray, k: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    return attention_scores(k, q, blocked)


def _allowed_one_ahead(mask: np.ndarray) -> np.ndarray:
    T = mask.shape[-1]
    return np.tri(T, k=1, dtype=bool)[None, None] & mask[:, None, None, :]


def _allowed_no_causal(mask: np.ndarray) -> np.ndarray:
    T = mask.shape[-1]
    return np.ones((T, T), dtype=bool)[None, None] & mask[:, None, None, :]


def _softmax_fp16_no_max(s: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(s.astype(np.float16))
        return (e / e.sum(-1, keepdims=True)).astype(s.dtype)


def _merge_heads_d_major(ctx: np.ndarray) -> np.ndarray:
    B, H, T, D = ctx.shape
    return ctx.transpose(0, 2, 3, 1).reshape(B, T, D * H)


def _attn_proj_untransposed(ctx: np.ndarray, blk: BlockWeights) -> np.ndarray:
    return linear(ctx, blk.proj_w.T, blk.proj_b)


def _resid_mid_from_ln1(x: np.ndarray, h: np.ndarray, a: np.ndarray) -> np.ndarray:
    return h + a


def _mlp_fc_no_bias(h: np.ndarray, blk: BlockWeights) -> np.ndarray:
    return linear(h, blk.fc_w, None)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)


def _resid_post_no_skip(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    return m


def _no_layernorm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    return x


VARIANTS: dict[str, dict[str, Callable]] = {
    "embed-scale": {"embed_tok": _embed_tok_scaled},
    "position-offset": {"embed_pos": _embed_pos_from_1},
    "skip-wpe": {"embed_sum": _embed_sum_no_pos},
    "ln-unbiased-var": {"layernorm": _layernorm_unbiased},
    "ln-eps": {"layernorm": _layernorm_eps_outside},
    "qkv-interleaved": {"split_heads": _split_heads_interleaved},
    "no-attn-scale": {"scores": _scores_unscaled},
    "attn-scale-by-d": {"scores": _scores_by_d},
    "qk-swapped": {"scores": _scores_qk_swapped},
    "mask-off-by-one": {"allowed_keys": _allowed_one_ahead},
    "no-causal-mask": {"allowed_keys": _allowed_no_causal},
    "softmax-no-max-subtraction": {"softmax": _softmax_fp16_no_max},
    "heads-merged-wrong": {"merge_heads": _merge_heads_d_major},
    "c-proj-untransposed": {"attn_proj": _attn_proj_untransposed},
    "residual-from-normalized": {"resid_mid": _resid_mid_from_ln1},
    "drop-fc-bias": {"mlp_fc": _mlp_fc_no_bias},
    "gelu-erf": {"gelu": _gelu_erf},
    "mlp-residual-dropped": {"resid_post": _resid_post_no_skip},
    "skip-ln-f": {"final_ln": _no_layernorm},
}


def ops_for(inject: str | None) -> Ops:
    """The stage functions of a correct forward, with `inject`'s one function swapped in."""
    ops = replace(Ops(), **VARIANTS.get(inject or "", {}))
    return ops if ops.final_ln is not None else replace(ops, final_ln=ops.layernorm)


# -- the backend ----------------------------------------------------------------------------
class NumpyBackend(Backend):
    """GPT-2 in NumPy: `fp32` (a correct independent port) or `fp64` (the noise-floor oracle)."""

    name = "numpy"
    precisions = tuple(PRECISIONS)
    supported_injections = frozenset(VARIANTS)

    def __init__(self, precision: str = "fp32", inject: str | None = None):
        super().__init__(precision, inject)
        self.dtype = PRECISIONS[precision]
        self.ops = ops_for(inject)

    def prepare(self, weights: dict[str, np.ndarray], config: dict) -> None:
        self.check_gpt2_config(config)
        self.n_head = int(config["n_head"])
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.w = load_weights(weights, int(config["n_layer"]), self.dtype)

    def forward(self, input_ids: np.ndarray, tap: Tap, attention_mask: np.ndarray | None = None) -> np.ndarray:
        op, w, eps, H = self.ops, self.w, self.eps, self.n_head
        B, T = input_ids.shape
        mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        blocked = ~op.allowed_keys(mask)  # [B,1,T,T]: masked score entries

        tok = tap("embed.tok", op.embed_tok(w.wte, input_ids))
        pos = tap("embed.pos", op.embed_pos(w.wpe, T))
        x = tap("embed.sum", op.embed_sum(tok, pos))
        for i, blk in enumerate(w.blocks):
            s = f"blocks.{i}."
            h = tap(s + "ln1", op.layernorm(x, blk.ln1_g, blk.ln1_b, eps))
            qkv = tap(s + "attn.qkv", linear(h, blk.qkv_w, blk.qkv_b))
            q, k, v = op.split_heads(qkv, H)
            q = tap(s + "attn.q", q)
            k = tap(s + "attn.k", k)
            v = tap(s + "attn.v", v)
            scores = tap(s + "attn.scores", op.scores(q, k, blocked))
            probs = tap(s + "attn.probs", op.softmax(scores))
            ctx = tap(s + "attn.ctx", op.merge_heads(probs @ v))
            a = tap(s + "attn.out", op.attn_proj(ctx, blk))
            x = tap(s + "resid_mid", op.resid_mid(x, h, a))
            h = tap(s + "ln2", op.layernorm(x, blk.ln2_g, blk.ln2_b, eps))
            f = tap(s + "mlp.fc", op.mlp_fc(h, blk))
            f = tap(s + "mlp.act", op.gelu(f))
            m = tap(s + "mlp.out", linear(f, blk.mlp_proj_w, blk.mlp_proj_b))
            x = tap(s + "resid_post", op.resid_post(x, m))
        x = tap("final.ln", op.final_ln(x, w.lnf_g, w.lnf_b, eps))
        return tap("logits", linear(x, w.lm_head.T, None))
