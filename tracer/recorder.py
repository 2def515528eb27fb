"""Recorder: hooks on a Hugging Face GPT-2 that hand every canonical stage to a sink.

Recording must not change what it records. Hooks here only read: module outputs come from
forward hooks, `attn.ctx` / `resid_mid` from pre-hooks on the modules that consume them,
and the attention internals (q/k/v, masked scores, probs) are recomputed on a side channel
from the recorded `attn.qkv` with the same torch ops eager attention uses. That works the
same under `--attn sdpa`, whose fused kernel exposes no scores at all; under eager the
side-channel probs equal the returned attention weights (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

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
        self._allowed: torch.Tensor | None = None

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
        self._qkv.clear()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One forward with hooks attached; returns the logits (identical to a plain forward)."""
        self._allowed = allowed_keys(attention_mask)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self._qkv.clear()
            self._allowed = None

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
                self._emit(block_stage(i, name), t.contiguous())
        return hook

    def _ctx_hook(self, i: int):
        def hook(module, args):
            want = [block_stage(i, s) for s in ("attn.scores", "attn.probs")]
            if any(self.selector.matches(s) for s in want):
                q, k, _ = self._qkv[i]
                scaling = self.model.transformer.h[i].attn.scaling
                scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
                scores = scores.masked_fill(~self._allowed, float("-inf"))
                self._emit(want[0], scores)
                self._emit(want[1], torch.nn.functional.softmax(scores, dim=-1))
            self._qkv.pop(i, None)
            self._emit(block_stage(i, "attn.ctx"), args[0])
        return hook

    def _resid_mid_hook(self, i: int):
        def hook(module, args):
            self._emit(block_stage(i, "resid_mid"), args[0])
        return hook
