"""Locate one golden parameter in the checkpoint: profile shortlist, sampled values, full check.

Order of work per parameter: the segment index proposes regions whose profile matches one of the
parameter's (whole, transposed, cut out of a fused / stacked / padded tensor); 64 sampled values
rank them; the best are verified element by element until one is identified. If none holds the
whole parameter, it is tried as 2, 3 or 4 equal pieces along each axis (q, k, v kept apart), each
piece located the same way. Ties between equally good regions (tied or identical tensors) go to
the region no other parameter has taken, then to the one the name map names, then to a tensor whose
name carries the parameter's layer number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from tracer.weights.checkpoint import Checkpoint
from tracer.weights.fingerprint import Hit, SegmentIndex, Unit, profiles, squeezed, units_of
from tracer.weights.views import Piece, Source, View
from tracer.weights.verify import IDENTIFY, Check, check, sample_error

SHORTLIST = 0.35      # profile distance up to which a region is sampled (4-bit noise moves profiles ~5 %)
N_SAMPLES = 64
MAX_FULL_CHECKS = 6
SAMPLE_BATCH = 16
SPLITS = (3, 2, 4)


@dataclass
class Found:
    source: Source
    check: Check


@dataclass
class Matcher:
    """Profiles of every candidate (each read once), then `locate` per golden parameter."""

    ckpt: Checkpoint
    n_layer: int
    golden_extents: set[int]
    progress: Callable[[Iterable], Iterable] | None = None
    claims: dict[str, list[str]] = field(default_factory=dict)   # tensor -> golden params found in it

    def __post_init__(self) -> None:
        units: list[Unit] = []
        names = list(self.ckpt.candidates)
        for name in (self.progress(names) if self.progress else names):
            cand = self.ckpt.candidates[name]
            units += units_of(cand, cand.values(), self.n_layer)
        self.index = SegmentIndex(units, self.golden_extents)
        self._cache: tuple[str, np.ndarray, np.ndarray | None] | None = None

    # -- candidate values (the last one kept: split pieces and stacked layers reuse it) ------
    def values(self, tensor: str) -> tuple[np.ndarray, np.ndarray | None]:
        if self._cache is None or self._cache[0] != tensor:
            cand = self.ckpt.candidates[tensor]
            self._cache = (tensor, cand.values(), cand.step())
        return self._cache[1], self._cache[2]

    def check_piece(self, golden: np.ndarray, piece: Piece) -> Check:
        values, step = self.values(piece.view.tensor)
        cand = self.ckpt.candidates[piece.view.tensor]
        return check(piece.of(golden), piece.view.apply(values), cand,
                     piece.view.apply(step) if step is not None else None)

    def check_source(self, golden: np.ndarray, source: Source) -> Check:
        total = Check()
        for piece in source:
            total = total + self.check_piece(golden, piece)
        return total

    # -- locating ------------------------------------------------------------------------------
    def locate(self, param: str, golden: np.ndarray, named: Source | None = None) -> Found | None:
        g = golden.reshape(squeezed(golden.shape)) if golden.ndim > 2 else golden
        profs = profiles(g)
        whole = [(h.distance, (Piece(self._view(h, j)),)) for j in range(g.ndim)
                 for h in self.index.query(profs[j], self._other(g, j), SHORTLIST)]
        uncut = [h for h in whole if h[1][0].view.axis is None]
        cut = [h for h in whole if h[1][0].view.axis is not None]
        # A cut out of a longer tensor (padding, fusion) is tried last: for a constant parameter (zero
        # biases of an untrained model) any longer constant tensor would do, while the split is right.
        return self._best(param, g, uncut, named) or self._split(param, g, profs, named) or \
            self._best(param, g, cut, None)

    def _other(self, g: np.ndarray, axis: int) -> int:
        return g.shape[1 - axis] if g.ndim == 2 else 0

    def _view(self, hit: Hit, axis: int) -> View:
        """The view of `hit`'s unit that puts its matched axis on golden axis `axis`."""
        u = hit.unit
        cut = hit.length != u.unit_shape[hit.axis]
        return View(u.tensor, u.shape, u.layer, transpose=len(u.unit_shape) == 2 and hit.axis != axis,
                    axis=axis if cut else None, start=hit.offset if cut else 0,
                    stop=hit.offset + hit.length if cut else 0)

    def _best(self, param: str, g: np.ndarray, hyps: list[tuple[float, Source]], named: Source | None,
              piece_of: Piece | None = None, taken: frozenset[str] = frozenset()) -> Found | None:
        """The first hypothesis (ranked by sampled error, then tie-breaks) that a full check identifies.

        Hypotheses are sampled closest profile first, in batches (equal distances kept together,
        so identical tensors are ranked against each other); the next batch only when none of a
        batch is identified."""
        hyps = sorted(hyps, key=lambda h: h[0])
        if named is not None and piece_of is None:
            hyps = [(-1.0, named)] + hyps
        target = piece_of.of(g) if piece_of is not None else g
        coords = _sample_coords(target.shape)
        g_samples = target[coords]
        seen: set[Source] = set()
        checks, start = 0, 0
        while start < len(hyps) and checks < MAX_FULL_CHECKS:
            stop = min(start + SAMPLE_BATCH, len(hyps))
            while stop < len(hyps) and hyps[stop][0] == hyps[stop - 1][0]:
                stop += 1
            ranked = []
            for distance, source in hyps[start:stop]:
                if source not in seen:
                    seen.add(source)
                    err = self._sample_error(source, coords, g_samples, piece_of)
                    if err <= IDENTIFY:
                        ranked.append((self._rank(param, source, err, distance, named, taken), source))
            start = stop
            for _, source in sorted(ranked, key=lambda r: r[0])[:MAX_FULL_CHECKS - checks]:
                checks += 1
                if piece_of is not None:
                    c = self.check_piece(g, Piece(source[0].view, piece_of.axis, piece_of.start, piece_of.stop))
                else:
                    c = self.check_source(g, source)
                if c.identified:
                    return Found(source, c)
        return None

    def _sample_error(self, source: Source, coords: tuple[np.ndarray, ...], g_samples: np.ndarray,
                      piece_of: Piece | None) -> float:
        if piece_of is not None or len(source) == 1:
            view = source[0].view
            return sample_error(g_samples, self.ckpt.candidates[view.tensor].sample(view.flat_index(coords)))
        return 0.0  # a named split source: verified in full

    def _rank(self, param: str, source: Source, err: float, distance: float, named: Source | None,
              taken: frozenset[str]) -> tuple:
        """Sort key: sampled error, then a tensor no parameter (nor another piece of this one) has
        taken, an uncut view, the named source, the parameter's layer number, the profile distance."""
        tensors = {p.view.tensor for p in source}
        claimed = any(self.claims.get(t) or t in taken for t in tensors)
        cut = any(p.view.axis is not None for p in source)
        is_named = named is not None and source == named
        return (round(err, 4), claimed, cut, not is_named, not _same_layer(param, source), distance)

    def _split(self, param: str, g: np.ndarray, profs: tuple[np.ndarray, ...], named: Source | None) -> Found | None:
        """The parameter as n equal pieces along one axis, each held by its own region."""
        for axis in range(g.ndim):
            for n in SPLITS:
                size = g.shape[axis] // n
                if g.shape[axis] % n or size == 0:
                    continue
                pieces, total = [], Check()
                for k in range(n):
                    whole = Piece(View("", ()), axis, k * size, (k + 1) * size)
                    hits = self.index.query(profs[axis][k * size:(k + 1) * size], self._other(g, axis), SHORTLIST)
                    hyps = [(h.distance, (Piece(self._view(h, axis)),)) for h in hits]
                    hyps = _named_piece(named, whole) + hyps
                    found = self._best(param, g, hyps, None, piece_of=whole,
                                       taken=frozenset(p.view.tensor for p in pieces))
                    if found is None:
                        break
                    pieces.append(Piece(found.source[0].view, axis, whole.start, whole.stop))
                    total = total + found.check
                if len(pieces) == n:
                    return Found(tuple(pieces), total)
        return None

    def claim(self, param: str, source: Source) -> None:
        for piece in source:
            self.claims.setdefault(piece.view.tensor, []).append(param)


def _named_piece(named: Source | None, whole: Piece) -> list[tuple[float, Source]]:
    """The named source's piece at the same place, as a first hypothesis for that piece."""
    if named is None:
        return []
    return [(0.0, (Piece(p.view),)) for p in named if (p.axis, p.start, p.stop) == (whole.axis, whole.start, whole.stop)]


def _sample_coords(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Fixed pseudo-random positions (the same for every run), at most N_SAMPLES of them."""
    size = int(np.prod(shape))
    rng = np.random.default_rng(size)
    flat = rng.choice(size, size=min(N_SAMPLES, size), replace=False) if size > N_SAMPLES else np.arange(size)
    return np.unravel_index(flat, shape)


_DIGITS = re.compile(r"\d+")


def _same_layer(param: str, source: Source) -> bool:
    """The source's tensor names (or stacked index) carry the parameter's layer number."""
    from tracer.weights.golden import layer_of

    layer = layer_of(param)
    if layer is None:
        return True
    return all(p.view.layer == layer or str(layer) in _DIGITS.findall(p.view.tensor) for p in source)
