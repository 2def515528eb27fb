"""Canonical stage names (SPEC §3): the vocabulary shared by every part of the tool.

A stage is one tensor of the forward pass. Names are architecture-neutral
(`blocks.{i}.attn.probs`, not `h.3.attn`) so other model families can reuse them;
everything GPT-2 specific lives in `HF_SOURCES` / `hf_aliases` below.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from tracer.errors import TracerError

EMBED_STAGES = ("embed.tok", "embed.pos", "embed.sum")
BLOCK_STAGES = (
    "ln1",
    "attn.qkv",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.scores",
    "attn.probs",
    "attn.ctx",
    "attn.out",
    "resid_mid",
    "ln2",
    "mlp.fc",
    "mlp.act",
    "mlp.out",
    "resid_post",
)
FINAL_STAGES = ("final.ln", "logits")

# Stages that are not the output of any HF module (pre-hook or attention side channel).
STARRED = frozenset({"attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.ctx", "resid_mid"})

# Layout of each stage, stored as the dataset's `layout` attribute.
LAYOUTS = {
    "embed.tok": "BTC", "embed.pos": "BTC", "embed.sum": "BTC",
    "ln1": "BTC", "attn.qkv": "BTC", "attn.q": "BHTD", "attn.k": "BHTD", "attn.v": "BHTD",
    "attn.scores": "BHTT", "attn.probs": "BHTT", "attn.ctx": "BTC", "attn.out": "BTC",
    "resid_mid": "BTC", "ln2": "BTC", "mlp.fc": "BTC", "mlp.act": "BTC", "mlp.out": "BTC",
    "resid_post": "BTC", "final.ln": "BTC", "logits": "BTC",
}


def block_stage(i: int, local: str) -> str:
    return f"blocks.{i}.{local}"


def split_stage(name: str) -> tuple[int | None, str]:
    """`blocks.3.attn.q` -> (3, 'attn.q'); `embed.tok` -> (None, 'embed.tok')."""
    if name.startswith("blocks."):
        _, idx, local = name.split(".", 2)
        return int(idx), local
    return None, name


def layout_of(name: str) -> str:
    return LAYOUTS[split_stage(name)[1]]


def canonical_stages(n_layer: int) -> list[str]:
    """All canonical stage names of an `n_layer` model, in execution order."""
    names = list(EMBED_STAGES)
    for i in range(n_layer):
        names += [block_stage(i, s) for s in BLOCK_STAGES]
    return names + list(FINAL_STAGES)


def stage_order(n_layer: int) -> dict[str, int]:
    return {name: k for k, name in enumerate(canonical_stages(n_layer))}


def resid_pre(i: int) -> str:
    """The stage holding block i's input (the residual stream entering it)."""
    return "embed.sum" if i == 0 else block_stage(i - 1, "resid_post")


def stage_inputs(name: str, n_layer: int) -> tuple[str, ...]:
    """The stages a stage is computed from: the data-flow graph used for origin localization."""
    i, local = split_stage(name)
    if i is None:
        return {
            "embed.tok": (),
            "embed.pos": (),
            "embed.sum": ("embed.tok", "embed.pos"),
            "final.ln": (block_stage(n_layer - 1, "resid_post"),),
            "logits": ("final.ln",),
        }[local]
    b = lambda s: block_stage(i, s)  # noqa: E731 - local shorthand
    return {
        "ln1": (resid_pre(i),),
        "attn.qkv": (b("ln1"),),
        "attn.q": (b("attn.qkv"),),
        "attn.k": (b("attn.qkv"),),
        "attn.v": (b("attn.qkv"),),
        "attn.scores": (b("attn.q"), b("attn.k")),
        "attn.probs": (b("attn.scores"),),
        "attn.ctx": (b("attn.probs"), b("attn.v")),
        "attn.out": (b("attn.ctx"),),
        "resid_mid": (resid_pre(i), b("attn.out")),
        "ln2": (b("resid_mid"),),
        "mlp.fc": (b("ln2"),),
        "mlp.act": (b("mlp.fc"),),
        "mlp.out": (b("mlp.act"),),
        "resid_post": (b("resid_mid"), b("mlp.out")),
    }[local]


# HF GPT-2 module path -> the canonical stage holding the same tensor (module output).
# `{i}` is the block index. Modules listed here whose output is the canonical tensor itself
# are recorded under the stage; the rest become links under /modules.
HF_SOURCES = {
    "transformer.wte": "embed.tok",
    "transformer.wpe": "embed.pos",
    "transformer.drop": "embed.sum",
    "transformer.h.{i}.ln_1": "blocks.{i}.ln1",
    "transformer.h.{i}.attn.c_attn": "blocks.{i}.attn.qkv",
    "transformer.h.{i}.attn.c_proj": "blocks.{i}.attn.out",
    "transformer.h.{i}.ln_2": "blocks.{i}.ln2",
    "transformer.h.{i}.mlp.c_fc": "blocks.{i}.mlp.fc",
    "transformer.h.{i}.mlp.act": "blocks.{i}.mlp.act",
    "transformer.h.{i}.mlp.c_proj": "blocks.{i}.mlp.out",
    "transformer.h.{i}": "blocks.{i}.resid_post",
    "transformer.ln_f": "final.ln",
    "lm_head": "logits",
}
# Further executed modules whose output is the same tensor as a canonical stage (eval mode).
HF_ALIASES = {
    "transformer.h.{i}.attn.resid_dropout": "blocks.{i}.attn.out",
    "transformer.h.{i}.attn": "blocks.{i}.attn.out",
    "transformer.h.{i}.mlp.dropout": "blocks.{i}.mlp.out",
    "transformer.h.{i}.mlp": "blocks.{i}.mlp.out",
    "transformer": "final.ln",
}


def _expand(table: dict[str, str], n_layer: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for path, stage in table.items():
        if "{i}" in path:
            for i in range(n_layer):
                out[path.format(i=i)] = stage.format(i=i)
        else:
            out[path] = stage
    return out


def hf_sources(n_layer: int) -> dict[str, str]:
    """HF module path -> canonical stage, for the modules whose output *is* the stage."""
    return _expand(HF_SOURCES, n_layer)


def hf_aliases(n_layer: int) -> dict[str, str]:
    """Every HF module path that maps onto a canonical stage (sources and pass-through modules)."""
    return {**_expand(HF_SOURCES, n_layer), **_expand(HF_ALIASES, n_layer)}


# Labels hand-written debug prints use ("LN1", "Q proj"), mapped to canonical local names.
SEED_LABELS = {
    "input": "embed.sum", "LN1": "ln1", "Q proj": "attn.q", "attention": "attn.probs",
    "concat": "attn.ctx", "O proj": "attn.out", "residual 1": "resid_mid", "LN2": "ln2",
    "FFN1": "mlp.fc", "GELU": "mlp.act", "FFN2": "mlp.out", "residual 2": "resid_post",
}


@dataclass(frozen=True)
class StageSelector:
    """A set of shell-style globs over stage names (`blocks.0.attn.*`); empty selects all."""

    patterns: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def select(self, names: list[str], what: str = "stage") -> list[str]:
        """Filter `names`; a pattern that matches nothing is a usage error, not an empty result."""
        for p in self.patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise TracerError(f"no {what} matches {p!r} (known: {_summarize(names)})")
        return [n for n in names if self.matches(n)]

    @classmethod
    def parse(cls, text: str | None) -> StageSelector:
        if not text:
            return cls()
        return cls(tuple(p.strip() for p in text.split(",") if p.strip()))


def _summarize(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
