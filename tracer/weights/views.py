"""Where a golden parameter sits in a candidate tensor: a `View` of one tensor, `Piece`s of a split.

A view is the candidate tensor seen in the golden parameter's own layout: reshaped (size-1 axes
dropped), one layer taken out of a stacked tensor, transposed, cut along one axis (a third of a
fused qkv, the real rows of a padded vocabulary). A parameter split over several tensors (q, k
and v kept apart) is a tuple of pieces, each covering a range of the parameter along one axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np


@dataclass(frozen=True)
class View:
    tensor: str
    shape: tuple[int, ...]        # the candidate's shape with size-1 axes dropped
    layer: int | None = None      # index along axis 0 of a stacked candidate
    transpose: bool = False
    axis: int | None = None       # golden axis along which the (oriented) candidate is cut
    start: int = 0
    stop: int = 0

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.layer is not None else self.shape

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The viewed values of the candidate's full array (no copy for memory-mapped input)."""
        a = array.reshape(self.shape)
        if self.layer is not None:
            a = a[self.layer]
        if self.transpose:
            a = a.T
        if self.axis is not None:
            a = a[self.start:self.stop] if self.axis == 0 else a[:, self.start:self.stop]
        return a

    def flat_index(self, coords: tuple[np.ndarray, ...]) -> np.ndarray:
        """Flat positions in the candidate of the viewed positions `coords` (one array per axis)."""
        c = list(coords)
        if self.axis is not None:
            c[self.axis] = c[self.axis] + self.start
        if self.transpose:
            c = c[::-1]
        flat = np.ravel_multi_index(tuple(c), self.unit_shape)
        return flat + self.layer * prod(self.unit_shape) if self.layer is not None else flat

    def describe(self) -> str:
        text = self.tensor + (f"[{self.layer}]" if self.layer is not None else "") + (".T" if self.transpose else "")
        if self.axis is not None:
            text += f"[{self.start}:{self.stop}]" if self.axis == 0 else f"[:, {self.start}:{self.stop}]"
        return text

    @property
    def padded_or_fused(self) -> bool:
        return self.axis is not None


@dataclass(frozen=True)
class Piece:
    """The golden parameter's range [start, stop) along `axis` (None: all of it), held by `view`."""

    view: View
    axis: int | None = None
    start: int = 0
    stop: int = 0

    def of(self, golden: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return golden
        return golden[self.start:self.stop] if self.axis == 0 else golden[:, self.start:self.stop]

    def shape(self, golden_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis is None:
            return golden_shape
        s = list(golden_shape)
        s[self.axis] = self.stop - self.start
        return tuple(s)


Source = tuple[Piece, ...]


def describe_source(source: Source) -> str:
    return " + ".join(p.view.describe() for p in source)


def compact_source(source: Source) -> str:
    """`a.{w_query,w_key,w_value}.weight.T` for pieces that differ only in one dotted part."""
    texts = [p.view.describe() for p in source]
    if len(texts) == 1:
        return texts[0]
    split = [t.split(".") for t in texts]
    head = 0
    while all(len(s) > head + 1 and s[head] == split[0][head] for s in split):
        head += 1
    tail = 0
    while all(len(s) > head + tail + 1 and s[-1 - tail] == split[0][-1 - tail] for s in split):
        tail += 1
    middles = [".".join(s[head:len(s) - tail]) for s in split]
    if head == 0 or len(set(middles)) != len(middles):
        return " + ".join(texts)
    suffix = "." + ".".join(split[0][len(split[0]) - tail:]) if tail else ""
    return ".".join(split[0][:head]) + ".{" + ",".join(middles) + "}" + suffix


def source_tensors(source: Source) -> list[str]:
    return list(dict.fromkeys(p.view.tensor for p in source))
