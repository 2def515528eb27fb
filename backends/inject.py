"""Fault-injection catalog: classic GPT-2 porting bugs, shared by every backend.

Why a catalog: demos and tests need bugs whose location is known, so the comparator's
localization and diagnosis can be checked against ground truth. Each bug is applied in
every block (a port gets a formula wrong everywhere), so it first shows at its `origin`:
`blocks.0.<stage>` for block stages, the stage itself for embeddings and the final LayerNorm.
Backends implement the bugs they can (`Backend.supported_injections`); the names and the
stage each one lives in are defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracer.errors import TracerError
from tracer.stages import BLOCK_STAGES, block_stage


@dataclass(frozen=True)
class Bug:
    """One porting bug: where it lives (a canonical local stage) and what the port got wrong."""

    name: str
    stage: str
    description: str

    @property
    def origin(self) -> str:
        """The first canonical stage the bug changes (block bugs start in block 0)."""
        return block_stage(0, self.stage) if self.stage in BLOCK_STAGES else self.stage


_BUGS = (
    Bug("embed-scale", "embed.tok", "token embeddings multiplied by sqrt(C), a T5/Gemma habit GPT-2 does not have"),
    Bug("position-offset", "embed.pos", "positions start at 1 instead of 0 (wrapping at n_positions)"),
    Bug("skip-wpe", "embed.sum", "position embeddings looked up but never added: x = wte[ids]"),
    Bug("ln-unbiased-var", "ln1", "every LayerNorm uses the unbiased variance (ddof=1) instead of the biased one"),
    Bug("ln-eps", "ln1", "every LayerNorm adds eps outside the square root: (x-mean)/(sqrt(var)+eps)"),
    Bug("qkv-interleaved", "attn.q", "fused qkv read per head as [H,3,D] instead of [3,H,D]"),
    Bug("no-attn-scale", "attn.scores", "scores not scaled by 1/sqrt(D)"),
    Bug("attn-scale-by-d", "attn.scores", "scores scaled by 1/D instead of 1/sqrt(D)"),
    Bug("qk-swapped", "attn.scores", "scores computed as k·qᵀ instead of q·kᵀ"),
    Bug("mask-off-by-one", "attn.scores", "causal mask off by one: each query also sees the next token"),
    Bug("no-causal-mask", "attn.scores", "causal mask missing: every query sees every real token"),
    Bug("softmax-no-max-subtraction", "attn.probs",
        "softmax without subtracting the row max, exp evaluated in float16 as a half-precision port does: "
        "a score above ~11 overflows to inf: NaN there, zeros in the rest of its row"),
    Bug("heads-merged-wrong", "attn.ctx", "heads merged per token in [D,H] order instead of [H,D]"),
    Bug("c-proj-untransposed", "attn.out", "attention c_proj Conv1D weight used as W.T (nn.Linear habit)"),
    Bug("residual-from-normalized", "resid_mid", "first residual adds attn.out to the ln1 output instead of the block input"),
    Bug("drop-fc-bias", "mlp.fc", "MLP c_fc bias dropped"),
    Bug("gelu-erf", "mlp.act", "exact erf GELU instead of GPT-2's tanh approximation (gelu_new)"),
    Bug("mlp-residual-dropped", "resid_post", "second residual forgotten: the block outputs mlp.out alone"),
    Bug("skip-ln-f", "final.ln", "final LayerNorm ln_f skipped"),
)
CATALOG: dict[str, Bug] = {bug.name: bug for bug in _BUGS}


def describe_catalog() -> list[tuple[str, str, str]]:
    """(name, stage, description) of every bug, in execution order of the stage it lives in."""
    return [(b.name, b.stage, b.description) for b in _BUGS]


def validate_injection(name: str | None, backend_cls: type) -> None:
    """Raise TracerError unless `name` is empty or a catalog bug `backend_cls` implements."""
    if not name:
        return
    backend = getattr(backend_cls, "name", backend_cls.__name__)
    if name not in CATALOG:
        raise TracerError(f"unknown bug {name!r} for --inject (catalog: {', '.join(CATALOG)})")
    supported = getattr(backend_cls, "supported_injections", frozenset())
    if name not in supported:
        known = ", ".join(b for b in CATALOG if b in supported) or "none"
        raise TracerError(f"backend {backend} does not implement bug {name!r} (it implements: {known})")
