"""A tiny-shape model with trained-like statistics, recorded into goldens for the backend tests.

Why not only the shared `tiny_golden`: the fault-injection tests measure how far each bug moves
its stage above fp32 noise, and the subtle bugs (erf GELU, LayerNorm eps) only stand out on
realistic activations. `tracer.synth`'s calibrated init guarantees those whatever model is
installed as `tiny`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from transformers import GPT2LMHeadModel

from tracer.models import LoadedModel, byte_decode, byte_encode
from tracer.record import build_cases, record_golden
from tracer.store import StageFile
from tracer.synth import random_config, realistic_init_

PROMPTS = ["The engineer printed every tensor", "Hi!"]  # 33 and 3 tokens: the batch case pads


@lru_cache(maxsize=None)
def realistic_tiny() -> LoadedModel:
    """2 layers, n_embd 64, 4 heads, vocab 256, realistic random init (seed 0)."""
    config = random_config("gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=256,
                           bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    realistic_init_(model, seed=0)
    return LoadedModel(model.eval(), "random:tiny-shape", "bytes", byte_encode, byte_decode)


def record(path: Path, batch: bool = True, with_weights: bool = True, prompts: list[str] = PROMPTS) -> Path:
    """A golden of `realistic_tiny`: one right-padded `batch` case, or one case per prompt."""
    loaded = realistic_tiny()
    cases = build_cases(loaded, prompts, [], batch=batch)
    record_golden(loaded, cases, str(path), dtype="fp32", attn="eager", with_weights=with_weights, force=True)
    return path


def stage_arrays(path: Path, case: str, group: str = "stages") -> dict[str, np.ndarray]:
    """Every stage of one case of a golden or trace, checksum verified, in execution order."""
    with StageFile.open(path) as f:
        view = f.case(case)
        return {s: view.read(s, group) for s in view.stages(group)}
