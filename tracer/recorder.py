"""Recorder: hooks on a Hugging Face GPT-2 that hand every canonical stage to a sink.

Recording must not change what it records. Hooks here only read: module outputs come from
forward hooks, `attn.ctx` / `resid_mid` from pre-hooks on the modules that consume them.
The attention internals (masked scores, probs) come from a side channel: recomputed from the
recorded q and k with the same torch ops eager attention uses. That works the same under
`--attn sdpa`, whose fused kernel exposes no scores at all (a test checks that the side
channel equals eager bitwise). Under eager, recomputing would double the attention's cost, so
a read-only `_AttentionTap` watches eager's own torch calls between c_attn's output and c_proj's
input and keeps two of their results: the scaled q·kᵀ and the probs it multiplies into v. It
returns every result unchanged; whatever it cannot match falls back to the side channel.

Stages reach the sink without copies: q/k/v are head-split views of qkv (the sink makes them
contiguous if it needs to); masking the kept scores happens in place once eager is done with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from tracer.stages import StageSelector, block_stage, hf_aliases, hf_sources

Sink = Callable[[str, torch.Tensor, str], None]  # (stage, value, hf_module)


@dataclass
class CaseInput:
    """One case: a [B,T] batch of ids (right-padded) and its attention mask."""

    name: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    prompts: list[str] | None = None


def allowed_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B,1,T,T] bool: query t may attend key s (s <= t and s is not padding)."""
    T = attention_mask.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__})
_MULS = frozenset({torch.mul, torch.Tensor.mul, torch.Tensor.__mul__})


def _same_values(a: object, b: torch.Tensor) -> bool:
    """`a` holds what `b` holds: the very view, or a copy (the KV cache concatenates k and v)."""
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    same_view = a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
    return same_view or torch.equal(a, b)  # B·H·T·D elements: small next to the T×T it saves


class _AttentionTap(TorchFunctionMode):
    """Watches one eager attention call: keeps `scores` (q·kᵀ times the scale, before the mask)
    and `probs` (what multiplies v). Every call runs and returns exactly as without it."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
        super().__init__()
        self.q, self.kt, self.v, self.scaling = q, k.transpose(-1, -2), v, scaling
        self._product: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.scores_version = -1
        self.probs: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and len(args) == 2:
            if self.scores is None and _same_values(args[0], self.q) and _same_values(args[1], self.kt):
                self._product = out
            elif (self.probs is None and isinstance(args[0], torch.Tensor) and args[0].shape[-1] == self.v.shape[-2]
                  and _same_values(args[1], self.v)):
                self.probs = args[0]
        elif (func in _MULS and len(args) == 2 and self._product is not None and args[0] is self._product
              and isinstance(args[1], float) and args[1] == self.scaling):
            self.scores, self.scores_version, self._product = out, out._version, None
        return out

    def kept_scores(self) -> torch.Tensor | None:
        """The scores eager computed, if it has not changed them in place since."""
        return self.scores if self.scores is not None and self.scores._version == self.scores_version else None


class Recorder:
    """Context manager that attaches the hooks; `run(case)` does one recorded forward."""

    def __init__(self, model: torch.nn.Module, sink: Sink, selector: StageSelector = StageSelector()):
        self.model = model
        self.sink = sink
        self.selector = selector
        self.n_layer = model.config.n_layer
        self.n_head = model.config.n_head
        self.executed: set[str] = set()  # HF module paths that ran, for /modules links
        self._handles: list = []
        self._qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._masked: torch.Tensor | None = None
        self._taps: dict[int, _AttentionTap] = {}

    def __enter__(self) -> Recorder:
        modules = dict(self.model.named_modules())
        sources = hf_sources(self.n_layer)
        for path in hf_aliases(self.n_layer):
            if path in modules:
                self._handles.append(modules[path].register_forward_hook(self._output_hook(path, sources.get(path))))
        for i in range(self.n_layer):
            h = f"transformer.h.{i}"
            self._handles.append(modules[f"{h}.attn.c_attn"].register_forward_hook(self._qkv_hook(i)))
            self._handles.append(modules[f"{h}.attn.c_proj"].register_forward_pre_hook(self._ctx_hook(i)))
            self._handles.append(modules[f"{h}.ln_2"].register_forward_pre_hook(self._resid_mid_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._clear()

    def _clear(self) -> None:
        for i in sorted(self._taps, reverse=True):  # a forward that raised mid-attention
            self._taps.pop(i).__exit__(None, None, None)
        self._qkv.clear()
        self._masked = None

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One forward with hooks attached; returns the logits (identical to a plain forward)."""
        self._masked = ~allowed_keys(attention_mask)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self._clear()

    def links(self) -> dict[str, str]:
        """HF module path -> canonical stage, for every aliased module that actually ran."""
        table = hf_aliases(self.n_layer)
        return {path: table[path] for path in sorted(self.executed)}

    # -- hooks -----------------------------------------------------------------------------
    def _emit(self, stage: str, value: torch.Tensor, hf_module: str = "") -> None:
        if self.selector.matches(stage):
            self.sink(stage, value, hf_module)

    def _output_hook(self, path: str, stage: str | None):
        def hook(module, args, output):
            self.executed.add(path)
            if stage is not None:
                self._emit(stage, output, path)
        return hook

    def _qkv_hook(self, i: int):
        def hook(module, args, qkv):
            B, T, C3 = qkv.shape
            C = C3 // 3
            D = C // self.n_head
            heads = [t.view(B, T, self.n_head, D).transpose(1, 2) for t in qkv.split(C, dim=2)]
            self._qkv[i] = tuple(heads)
            for name, t in zip(("attn.q", "attn.k", "attn.v"), heads):
                self._emit(block_stage(i, name), t)
            wanted = any(self.selector.matches(block_stage(i, s)) for s in ("attn.scores", "attn.probs"))
            if wanted and self.model.config._attn_implementation == "eager":
                self._taps[i] = _AttentionTap(*heads, self._scaling(i))
                self._taps[i].__enter__()  # left in c_proj's pre-hook, right after the attention
        return hook

    def _ctx_hook(self, i: int):
        def hook(module, args):
            tap = self._taps.pop(i, None)
            if tap is not None:
                tap.__exit__(None, None, None)
            q, k, _ = self._qkv.pop(i)
            want_scores, want_probs = (self.selector.matches(block_stage(i, s)) for s in ("attn.scores", "attn.probs"))
            probs = tap.probs if tap is not None else None
            scores = tap.kept_scores() if tap is not None and want_scores else None
            if scores is not None:
                scores.masked_fill_(self._masked, float("-inf"))  # eager has moved on to scores + mask
            elif want_scores or (want_probs and probs is None):
                scores = self._side_scores(i, q, k)
            if want_scores:
                self._emit(block_stage(i, "attn.scores"), scores)
            if want_probs:
                self._emit(block_stage(i, "attn.probs"),
                           probs if probs is not None else torch.nn.functional.softmax(scores, dim=-1))
            self._emit(block_stage(i, "attn.ctx"), args[0])
        return hook

    def _scaling(self, i: int) -> float:
        return self.model.transformer.h[i].attn.scaling

    def _side_scores(self, i: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q·kᵀ scaled as eager attention does, -inf where masked (in place: no second T×T buffer)."""
        return torch.matmul(q, k.transpose(-1, -2)).mul_(self._scaling(i)).masked_fill_(self._masked, float("-inf"))

    def _resid_mid_hook(self, i: int):
        def hook(module, args):
            self._emit(block_stage(i, "resid_mid"), args[0])
        return hook
