"""A correct but numerically naive fp32 port, like a first C loop port: sequential (non-BLAS)
accumulation in every matmul, one-pass E[x²]−E[x]² variance, tanh GELU through exp.

Its rounding error is several times NumPy/BLAS's: the tolerances must still pass it.
"""

from __future__ import annotations

import math

import numpy as np

from backends.protocol import Backend


def matmul_naive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sequential fp32 accumulation over k (what a triple loop does), vectorised over rows/cols."""
    out = np.zeros(a.shape[:-1] + b.shape[-1:], dtype=np.float32)
    for k in range(a.shape[-1]):
        out += a[..., k : k + 1] * b[..., k : k + 1, :] if b.ndim > 2 else a[..., k : k + 1] * b[k]
    return out


def layer_norm_one_pass(x, g, b, eps):
    n = np.float32(x.shape[-1])
    mean = x.sum(-1, keepdims=True, dtype=np.float32) / n
    var = (x * x).sum(-1, keepdims=True, dtype=np.float32) / n - mean * mean
    return (x - mean) / np.sqrt(var + np.float32(eps)) * g + b


class NaivePort(Backend):
    name = "naive-port"

    def prepare(self, weights, config):
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        self.cfg = config

    def forward(self, input_ids, tap, attention_mask=None):
        w, H, eps = self.w, self.cfg["n_head"], self.cfg["layer_norm_epsilon"]
        B, T = input_ids.shape
        keep = np.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        allowed = np.tril(np.ones((T, T), bool))[None, None] & keep[:, None, None, :]
        x = tap("embed.tok", w["transformer.wte.weight"][input_ids])
        pos = tap("embed.pos", w["transformer.wpe.weight"][:T][None])
        x = tap("embed.sum", x + pos)
        for i in range(self.cfg["n_layer"]):
            p = f"transformer.h.{i}."
            lin = lambda v, name: matmul_naive(v, w[p + name + ".weight"]) + w[p + name + ".bias"]  # noqa: E731
            h = tap(f"blocks.{i}.ln1", layer_norm_one_pass(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps))
            qkv = tap(f"blocks.{i}.attn.qkv", lin(h, "attn.c_attn"))
            C = qkv.shape[-1] // 3
            heads = [qkv[..., j * C:(j + 1) * C].reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for j in range(3)]
            q = tap(f"blocks.{i}.attn.q", np.ascontiguousarray(heads[0]))
            k = tap(f"blocks.{i}.attn.k", np.ascontiguousarray(heads[1]))
            v = tap(f"blocks.{i}.attn.v", np.ascontiguousarray(heads[2]))
            s = matmul_naive(q, np.swapaxes(k, -1, -2)) * np.float32(1 / math.sqrt(C // H))
            s = tap(f"blocks.{i}.attn.scores", np.where(allowed, s, np.float32(-np.inf)))
            e = np.exp(s - s.max(-1, keepdims=True))
            a = tap(f"blocks.{i}.attn.probs", e / e.sum(-1, keepdims=True))
            ctx = tap(f"blocks.{i}.attn.ctx", matmul_naive(a, v).transpose(0, 2, 1, 3).reshape(B, T, C))
            x = tap(f"blocks.{i}.resid_mid", x + tap(f"blocks.{i}.attn.out", lin(ctx, "attn.c_proj")))
            h = tap(f"blocks.{i}.ln2", layer_norm_one_pass(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps))
            f = tap(f"blocks.{i}.mlp.fc", lin(h, "mlp.c_fc"))
            u = np.float32(math.sqrt(2 / math.pi)) * (f + np.float32(0.044715) * f * f * f)
            g = tap(f"blocks.{i}.mlp.act", f * (np.float32(1) - np.float32(1) / (np.exp(np.float32(2) * u) + 1)))
            x = tap(f"blocks.{i}.resid_post", x + tap(f"blocks.{i}.mlp.out", lin(g, "mlp.c_proj")))
        x = tap("final.ln", layer_norm_one_pass(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps))
        return tap("logits", matmul_naive(x, np.ascontiguousarray(w["transformer.wte.weight"].T)))
