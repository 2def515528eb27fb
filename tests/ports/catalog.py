"""Porting bugs applied to the independent ports of this directory (the C port and the NumPy-style
port), kept apart from `backends.inject` on purpose: these bugs are written into code the
comparator has never seen, each at one place, the way a real port gets them.

Each entry says where the error is introduced, as canonical stages (SPEC §3). `stages[0]` is the
stage a dump of every canonical stage shows it at first; the following ones are where it shows
when the port does not dump that stage (the C port keeps no separate q/k/v or position buffer by
default; a k taken from the wrong slice first shows in the scores, a wrong v first in the ctx).
`introduced_at(n_layer, dumped)` picks the first one a dump holds. `{i}` is the bug's block:
`layer="first"` block 0, `"last"` block n_layer-1, `"all"` every block (the error starts in
block 0), `"global"` code outside the blocks or shared by all of them.

Cause classes: `wrong-operand` (a tensor other than the right one is read), `parameter` (a
weight or bias dropped, doubled, transposed or taken from another module), `constant` (a number
of the formula: a coefficient, eps, a scale, a position or mask offset), `precision` (a value
rounded to a narrower float), `layout` (right values, wrong memory order).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

CAUSES = ("wrong-operand", "parameter", "constant", "precision", "layout")
LAYERS = ("first", "last", "all", "global")
PORTS = ("c", "numpy")


@dataclass(frozen=True)
class PortBug:
    name: str
    description: str
    cause: str
    layer: str
    stages: tuple[str, ...]
    ports: tuple[str, ...] = PORTS

    def layer_index(self, n_layer: int) -> int:
        """The block the bug is applied to, as the ports' `bug_layer` takes it (-1: every block)."""
        return {"first": 0, "last": n_layer - 1}.get(self.layer, -1)

    def fill(self, template: str, n_layer: int, layer: int | None = None) -> str:
        """`template` with `{i}` replaced by the bug's block (block 0 for an every-block bug)."""
        block = self.layer_index(n_layer) if layer is None else layer
        return template.format(i=max(block, 0))

    def stage(self, n_layer: int, layer: int | None = None) -> str:
        """Where a dump of every canonical stage shows the error first (`layer` overrides the entry's block)."""
        return self.fill(self.stages[0], n_layer, layer)

    def introduced_at(self, n_layer: int, dumped: Iterable[str], layer: int | None = None) -> str:
        """The first stage of `stages` that the dump holds: where that dump shows the error first."""
        present = set(dumped)
        for template in self.stages:
            stage = self.fill(template, n_layer, layer)
            if stage in present:
                return stage
        raise ValueError(f"{self.name}: none of {self.stages} is in the dump")


CATALOG: tuple[PortBug, ...] = (
    PortBug("gelu-coef", "GELU cubic coefficient typed as 0.04715 instead of 0.044715",
            "constant", "all", ("blocks.{i}.mlp.act",)),
    PortBug("wpe-offset", "positions counted from 1: token t gets wpe row t+1 (the position buffer is not dumped)",
            "constant", "global", ("embed.pos", "embed.sum")),
    PortBug("ctx-head-major", "attention output written head-major ([H,T,D] memory) and fed to c_proj as [T,C]",
            "layout", "last", ("blocks.{i}.attn.ctx",)),
    PortBug("kv-swap", "k and v offsets swapped when slicing the fused qkv buffer (k at 2C, v at C)",
            "wrong-operand", "first", ("blocks.{i}.attn.k", "blocks.{i}.attn.scores")),
    PortBug("v-from-k", "v read from the k slice of qkv (offset C copied from the line above)",
            "wrong-operand", "last", ("blocks.{i}.attn.v", "blocks.{i}.attn.ctx")),
    PortBug("head-split-strided", "heads split with stride H (channel d*H+h) instead of contiguous blocks (h*D+d)",
            "layout", "all", ("blocks.{i}.attn.q", "blocks.{i}.attn.scores")),
    PortBug("attn-scale-d", "attention scores scaled by 1/D instead of 1/sqrt(D)",
            "constant", "all", ("blocks.{i}.attn.scores",)),
    PortBug("mask-off-by-one", "causal mask lets each query see one future key (key <= query + 1)",
            "constant", "all", ("blocks.{i}.attn.scores",)),
    PortBug("fp16-scores", "attention scores stored in a half buffer before the softmax",
            "precision", "all", ("blocks.{i}.attn.scores",)),
    PortBug("qkv-bias-missing", "c_attn bias never added in the last block",
            "parameter", "last", ("blocks.{i}.attn.qkv",)),
    PortBug("bias-twice", "attention c_proj bias added twice in block 0 (in the matmul and again after it)",
            "parameter", "first", ("blocks.{i}.attn.out",)),
    PortBug("cproj-transposed", "attention c_proj weight of the last block used untransposed ([in,out] read as [out,in]; square, so no size check fires)",
            "parameter", "last", ("blocks.{i}.attn.out",)),
    PortBug("ln-eps-1e-3", "LayerNorm eps 1e-3 instead of 1e-5, in every LayerNorm",
            "constant", "all", ("blocks.{i}.ln1",)),
    PortBug("ln1-prev-layer-weights", "the last block's ln_1 reads the previous block's gamma and beta (layer index off by one)",
            "parameter", "last", ("blocks.{i}.ln1",)),
    PortBug("ln2-ln1-weights", "the last block's ln_2 uses that block's ln_1 gamma and beta (copy-paste)",
            "parameter", "last", ("blocks.{i}.ln2",)),
    PortBug("ln2-block-input", "ln_2 of block 0 normalizes the block input instead of the residual after attention",
            "wrong-operand", "first", ("blocks.{i}.ln2",)),
    PortBug("fp16-fc-out", "the last block's c_fc output stored in a half buffer",
            "precision", "last", ("blocks.{i}.mlp.fc",)),
    PortBug("lnf-no-beta", "final LayerNorm without its beta (ln_f.bias never added)",
            "parameter", "global", ("final.ln",)),
    PortBug("logits-from-resid", "logits computed from the residual stream, not the ln_f output (final.ln computed but unused)",
            "wrong-operand", "global", ("logits",)),
)

BY_NAME = {bug.name: bug for bug in CATALOG}


def get(name: str) -> PortBug:
    """The catalog entry named `name` (KeyError with the known names otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown port bug {name!r}; known: {', '.join(BY_NAME)}") from None
