"""Cheap fingerprints: sum-of-squares profiles along each axis, and a segment index over them.

Why profiles: a matrix's row profile (sum of squares of each row) and column profile survive
transposition (they swap), slicing (a slice along an axis keeps that axis's profile segment),
concatenation (the parts' profiles are segments of the whole's), padding (zero rows add
nothing to the other profile, and the real rows keep theirs) and quantization (they move by the
quantization noise only). So the candidates of each golden parameter are found by comparing a few
thousand numbers per tensor, and only the best few are sampled and then verified in full.
Each candidate is read once to build its profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracer.weights.checkpoint import Candidate

CHUNK = 1 << 22  # elements per block while summing squares: bounded temporaries for any tensor


def profiles(a: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sum of squares along every other axis, per axis of a 1-D or 2-D array (float64)."""
    if a.ndim == 1:
        return (np.square(np.asarray(a, dtype=np.float64)),)
    rows = np.empty(a.shape[0])
    cols = np.zeros(a.shape[1])
    step = max(1, CHUNK // max(1, a.shape[1]))
    for s in range(0, a.shape[0], step):  # float32 sums per block: a fingerprint, not a measurement
        block = np.asarray(a[s:s + step], dtype=np.float32)
        rows[s:s + step] = np.einsum("ij,ij->i", block, block)
        cols += np.einsum("ij,ij->j", block, block)
    return rows, cols


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1) or (1,)


@dataclass
class Unit:
    """A 1-D or 2-D array a golden parameter may be (part of): a candidate, or one layer of a
    stacked candidate (first axis = n_layer)."""

    tensor: str
    shape: tuple[int, ...]       # the candidate's squeezed shape
    layer: int | None
    profiles: tuple[np.ndarray, ...]

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.layer is not None else self.shape


def units_of(cand: Candidate, values: np.ndarray, n_layer: int) -> list[Unit]:
    shape = squeezed(cand.shape)
    a = values.reshape(shape)
    out = []
    if len(shape) <= 2:
        out.append(Unit(cand.name, shape, None, profiles(a)))
    if n_layer > 1 and len(shape) in (2, 3) and shape[0] == n_layer:
        out += [Unit(cand.name, shape, i, profiles(a[i])) for i in range(n_layer)]
    return out


@dataclass(frozen=True)
class Hit:
    unit: Unit
    axis: int          # axis of the unit whose profile segment matched
    offset: int
    length: int
    distance: float    # relative L2 distance of the profiles


class SegmentIndex:
    """All profile segments of all units, grouped by (length, extent of the unit's other axis; 0
    for 1-D units): whole axes, plus cuts of each axis into pieces of every golden extent (at
    multiples of it, or only at 0 when it does not divide)."""

    def __init__(self, units: list[Unit], golden_extents: set[int]):
        rows: dict[tuple[int, int], list[tuple[int, int, int, np.ndarray]]] = {}
        self.units = units
        for ui, u in enumerate(units):
            for a, prof in enumerate(u.profiles):
                extent = prof.size
                other = u.unit_shape[1 - a] if len(u.unit_shape) == 2 else 0
                cuts = {(0, extent)}
                for g in golden_extents:
                    if g < extent:
                        cuts |= {(o, g) for o in (range(0, extent - g + 1, g) if extent % g == 0 else (0,))}
                for o, g in cuts:
                    rows.setdefault((g, other), []).append((ui, a, o, prof[o:o + g]))
        self._groups = {}
        for key, entries in rows.items():
            matrix = np.stack([e[3] for e in entries])
            meta = np.array([e[:3] for e in entries], dtype=np.int64)
            self._groups[key] = (matrix, np.einsum("ij,ij->i", matrix, matrix), meta)

    def query(self, profile: np.ndarray, other: int, max_distance: float, limit: int = 32) -> list[Hit]:
        """The `limit` closest segments of `profile`'s length whose unit's other axis is `other`
        (0: 1-D units), closest first."""
        group = self._groups.get((profile.size, other))
        if group is None:
            return []
        matrix, sq, meta = group
        pp = float(profile @ profile)
        d2 = np.maximum(sq - 2.0 * (matrix @ profile) + pp, 0.0)
        dist = np.sqrt(d2) / max(np.sqrt(pp), 1e-30)
        ok = np.nonzero(dist <= max_distance)[0]
        ok = ok[np.argsort(dist[ok], kind="stable")]
        cut = min(limit, ok.size)
        while cut < ok.size and dist[ok[cut]] == dist[ok[cut - 1]]:  # identical tensors stay together
            cut += 1
        ok = ok[:cut]
        return [Hit(self.units[meta[k, 0]], int(meta[k, 1]), int(meta[k, 2]), profile.size, float(dist[k])) for k in ok]
