"""A correct GPT-2 port written with torch functional ops (its own rounding, not HF's code path)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from backends.protocol import Backend


class TorchPort(Backend):
    name = "torch-port"

    def prepare(self, weights, config):
        self.w = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in weights.items()}
        self.cfg = config

    def to_numpy(self, value):
        return value.detach().numpy()

    def from_numpy(self, array, like):
        return torch.from_numpy(np.ascontiguousarray(array)).to(like.dtype)

    @torch.no_grad()
    def forward(self, input_ids, tap, attention_mask=None):
        w, H, eps = self.w, self.cfg["n_head"], self.cfg["layer_norm_epsilon"]
        ids = torch.from_numpy(input_ids)
        B, T = ids.shape
        keep = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else torch.from_numpy(attention_mask).bool()
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
        x = tap("embed.tok", F.embedding(ids, w["transformer.wte.weight"]))
        pos = tap("embed.pos", w["transformer.wpe.weight"][:T][None])
        x = tap("embed.sum", x + pos)
        for i in range(self.cfg["n_layer"]):
            p = f"transformer.h.{i}."
            h = tap(f"blocks.{i}.ln1", F.layer_norm(x, x.shape[-1:], w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps))
            qkv = tap(f"blocks.{i}.attn.qkv", torch.addmm(w[p + "attn.c_attn.bias"], h.reshape(B * T, -1),
                                                           w[p + "attn.c_attn.weight"]).reshape(B, T, -1))
            C = qkv.shape[-1] // 3
            q, k, v = (t.reshape(B, T, H, C // H).permute(0, 2, 1, 3) for t in qkv.split(C, dim=-1))
            q = tap(f"blocks.{i}.attn.q", q.contiguous())
            k = tap(f"blocks.{i}.attn.k", k.contiguous())
            v = tap(f"blocks.{i}.attn.v", v.contiguous())
            s = torch.baddbmm(torch.zeros(B * H, T, T), q.reshape(B * H, T, -1), k.reshape(B * H, T, -1).transpose(1, 2),
                              beta=0.0, alpha=1.0 / math.sqrt(C // H)).reshape(B, H, T, T)
            s = tap(f"blocks.{i}.attn.scores", s.masked_fill(~allowed, float("-inf")))
            a = tap(f"blocks.{i}.attn.probs", torch.softmax(s, dim=-1))
            ctx = tap(f"blocks.{i}.attn.ctx", (a @ v).permute(0, 2, 1, 3).reshape(B, T, C))
            o = tap(f"blocks.{i}.attn.out", F.linear(ctx, w[p + "attn.c_proj.weight"].T, w[p + "attn.c_proj.bias"]))
            x = tap(f"blocks.{i}.resid_mid", x + o)
            h = tap(f"blocks.{i}.ln2", F.layer_norm(x, x.shape[-1:], w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps))
            f = tap(f"blocks.{i}.mlp.fc", F.linear(h, w[p + "mlp.c_fc.weight"].T, w[p + "mlp.c_fc.bias"]))
            g = tap(f"blocks.{i}.mlp.act", F.gelu(f, approximate="tanh"))
            m = tap(f"blocks.{i}.mlp.out", F.linear(g, w[p + "mlp.c_proj.weight"].T, w[p + "mlp.c_proj.bias"]))
            x = tap(f"blocks.{i}.resid_post", x + m)
        x = tap("final.ln", F.layer_norm(x, x.shape[-1:], w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps))
        return tap("logits", x @ w["transformer.wte.weight"].T)
