"""GPT-2 as a Modular MAX module, in the layout of Modular's MAX GPT-2 tutorial.

The reference port the `max` backend runs (`--backend max:backends.max_gpt2:MaxGPT2LMHeadModel`) and
the shape a user's own MAX port is expected to have: submodules named as in Hugging Face's GPT-2
(`transformer.wte`, `transformer.h.{i}.attn.c_attn`, `transformer.h.{i}.mlp.c_proj`, `lm_head`...),
every projection a MAX `Linear` ([out, in] weights, so HF's Conv1D weights load transposed), the
attention written out (split, heads, q·kᵀ/√D, causal mask, softmax, merge) inside
`GPT2MultiHeadAttention.forward`. The constructor takes any object with HF's config attributes
(`n_embd`, `n_head`, `n_layer`, `n_positions`, `vocab_size`, `layer_norm_epsilon`, `n_inner`).

Importing this module needs MAX (`pip install 'gpt2-tracer[max]'`).
"""

from __future__ import annotations

import math
from typing import Any

from max.dtype import DType
from max.experimental import functional as F
from max.experimental.nn import Embedding, LayerNorm, Linear, Module, Sequential
from max.experimental.tensor import Tensor


def causal_mask(q: Tensor) -> Tensor:
    """[T, T]: 0 where the key is at or before the query, -inf after it."""
    T = q.shape[-2]
    mask = F.broadcast_to(Tensor(float("-inf"), dtype=q.dtype, device=q.device), shape=(T, T))
    return F.band_part(mask, num_lower=None, num_upper=0, exclude=True)


class GPT2MLP(Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner, bias=True)
        self.c_proj = Linear(inner, config.n_embd, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2MultiHeadAttention(Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.n_embd, self.n_head = config.n_embd, config.n_head
        self.head_dim = self.n_embd // self.n_head
        self.c_attn = Linear(self.n_embd, 3 * self.n_embd, bias=True)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=True)

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, C] -> [B, H, T, D]."""
        return x.reshape([*x.shape[:-1], self.n_head, self.head_dim]).transpose(-3, -2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (self._heads(t) for t in F.split(self.c_attn(x), [self.n_embd] * 3, axis=2))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + causal_mask(q)
        ctx = F.softmax(scores) @ v
        ctx = ctx.transpose(-3, -2)
        return self.c_proj(ctx.reshape([*ctx.shape[:-2], self.n_embd]))


class GPT2Block(Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2MultiHeadAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class MaxGPT2Model(Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.wte = Embedding(config.vocab_size, dim=config.n_embd)
        self.wpe = Embedding(config.n_positions, dim=config.n_embd)
        self.h = Sequential(*(GPT2Block(config) for _ in range(config.n_layer)))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = Tensor.arange(input_ids.shape[-1], dtype=DType.int64, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        return self.ln_f(self.h(x))


class MaxGPT2LMHeadModel(Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.transformer = MaxGPT2Model(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.transformer(input_ids))
