"""The candidate's stages as the comparator sees them: what the trace holds, lined up with the
golden's layout, plus what can be derived from it.

Real dumps are incomplete: a C port has the fused qkv buffer but no q/k/v, the embedding sum but
no position embedding, scores but perhaps no probs. Every stage that is a fixed function of stages
the candidate did dump is derived from *the candidate's own values* — so the stages that read it
are checked on what the candidate really computed, not on golden values it never saw (which would
charge them with the drift inherited over every earlier layer). Derived stages are marked, and
their derivation's own rounding is part of their noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tracer.compare.align import Alignment, align
from tracer.compare.reference import Reference, allowed_mask, softmax, split_heads
from tracer.stages import layout_of, resid_pre, split_stage
from tracer.store import CaseView

Read = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class Derivation:
    """`stage` = fn(values of `sources`); `exact` when fn only rearranges (no rounding added)."""

    sources: tuple[str, ...]
    fn: Callable[[Read], np.ndarray]
    how: str
    exact: bool


def derivations(stage: str, ref: Reference, ids: np.ndarray, mask: np.ndarray,
                has_weights: bool) -> list[Derivation]:
    """Ways to obtain `stage` from other stages of the candidate, most direct first."""
    i, local = split_stage(stage)
    b = lambda s: f"blocks.{i}.{s}"  # noqa: E731
    out: list[Derivation] = []
    if local in ("attn.q", "attn.k", "attn.v"):
        which = "qkv".index(local[-1])
        out.append(Derivation((b("attn.qkv"),), lambda r: split_heads(r(b("attn.qkv")), ref.spec.n_head, which),
                              f"{local[-1]} part of attn.qkv, split into heads", True))
    elif local == "embed.pos":
        out.append(Derivation(("embed.sum", "embed.tok"),
                              lambda r: r("embed.sum").astype(np.float64) - r("embed.tok"),
                              "embed.sum − embed.tok", False))
        if has_weights:
            out.append(Derivation(("embed.sum",), lambda r: (r("embed.sum").astype(np.float64)
                                                             - ref.param("transformer.wte.weight", np.float64)[ids]),
                                  "embed.sum − wte[ids] (the golden's wte)", False))
    elif local == "embed.tok":
        out.append(Derivation(("embed.sum", "embed.pos"),
                              lambda r: r("embed.sum").astype(np.float64) - r("embed.pos"),
                              "embed.sum − embed.pos", False))
    elif local == "attn.probs":
        out.append(Derivation((b("attn.scores"),), lambda r: softmax(np.where(
            allowed_mask(mask), r(b("attn.scores")).astype(np.float64), -np.inf)), "softmax of attn.scores", False))
    elif local == "resid_mid":
        src = resid_pre(i)
        out.append(Derivation((src, b("attn.out")), lambda r: r(src).astype(np.float64) + r(b("attn.out")),
                              f"{src} + attn.out", False))
    return out


@dataclass
class CandidateValue:
    array: np.ndarray | None
    note: str | None = None          # layout conversion, or why it does not fit
    derived: str | None = None       # how it was derived, when it was
    floating: bool = True            # False: not floating-point data (not comparable at all)


class CandidateStages:
    """Read access to the candidate's stages of one case, aligned and completed by derivation."""

    def __init__(self, trace: CaseView, group: str, golden: CaseView, golden_value: Read, ref: Reference,
                 ids: np.ndarray, mask: np.ndarray, has_weights: bool):
        self.t, self.group, self.golden_value, self.ref = trace, group, golden_value, ref
        self.golden_shape = golden.full_shape
        self.ids, self.mask, self.has_weights = ids, mask, has_weights
        self.cache: dict[str, CandidateValue] = {}
        self._available: dict[str, bool] = {}

    def dumped(self, stage: str) -> bool:
        """The trace holds the stage itself (complete, not a partial log)."""
        return self.t.has(stage, self.group)

    def derivation(self, stage: str, _seen: frozenset[str] = frozenset()) -> Derivation | None:
        """How `stage` can be derived from what the candidate has (None when it cannot)."""
        if stage in _seen:
            return None
        for d in derivations(stage, self.ref, self.ids, self.mask, self.has_weights):
            if all(self.available(s, _seen | {stage}) for s in d.sources):
                return d
        return None

    def available(self, stage: str, _seen: frozenset[str] = frozenset()) -> bool:
        """The candidate has a usable value of `stage`: dumped in a layout that fits, or derivable."""
        if _seen:  # inside a derivation's cycle guard the answer holds for that search only
            return self._usable(stage, _seen)
        if stage not in self._available:
            self._available[stage] = self._usable(stage, _seen)
        return self._available[stage]

    def _usable(self, stage: str, _seen: frozenset[str]) -> bool:
        if self.dumped(stage):
            if self.t.is_partial(stage):
                return False
            ds = self.t.dataset(stage, self.group)
            if ds.dtype.kind == "f" and ds.shape == self.golden_shape(stage):
                return True
            return self.read(stage).array is not None  # another layout: only the values can tell
        return self.derivation(stage, _seen) is not None

    def read(self, stage: str) -> CandidateValue:
        """The candidate's value of `stage` in the golden's layout (float), dumped or derived; cached
        until the comparator evicts it."""
        if stage not in self.cache:
            self.cache[stage] = self._read(stage)
        return self.cache[stage]

    def _read(self, stage: str) -> CandidateValue:
        if self.dumped(stage):
            raw = self.t.read(stage, self.group)
            if raw.dtype.kind not in "fc":
                return CandidateValue(None, f"dtype {raw.dtype}: not floating point", floating=False)
            aligned: Alignment = align(raw, self.golden_value(stage), layout_of(stage))
            return CandidateValue(aligned.array, aligned.note)
        d = self.derivation(stage)
        if d is None:
            raise KeyError(stage)
        return CandidateValue(self.derive(stage, d, self._input), None, d.how)

    def derive(self, stage: str, d: Derivation, read: Read) -> np.ndarray:
        """Apply derivation `d` to the stages `read` returns, in the golden's shape."""
        value = d.fn(read)
        golden_rows = self.golden_value(stage).shape[0]
        if value.shape[0] != golden_rows and golden_rows == 1:  # embed.pos is stored once for the batch
            row = int(np.argmax(self.mask.sum(1)))
            value = value[row:row + 1]
        return value

    def _input(self, name: str) -> np.ndarray:
        value = self.read(name).array
        if value is None:
            raise KeyError(name)
        return value
