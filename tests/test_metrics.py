"""The chained check's metrics (SPEC §6) against their definitions, written out element by element.

`ChainedPass` makes them in one pass over blocks of rows and reads a block again only when it may
hold a mismatch: whatever the blocks, the padding, the masked scores or a NaN, every metric must be
the one the definition gives."""

from __future__ import annotations

import numpy as np
import pytest

import tracer.compare.metrics as metrics
from tracer.compare.metrics import ChainedPass, valid_mask
from tracer.compare.reference import allowed_mask


def by_definition(c: np.ndarray, g: np.ndarray, valid: np.ndarray, tolerance: float) -> dict:
    """Every metric over the compared elements, straight from SPEC §6, in float64."""
    v = np.broadcast_to(valid, g.shape)
    gs, cs = g[v].astype(np.float64), c[v].astype(np.float64)
    d = cs - gs
    finite = np.isfinite(d)
    rms = np.sqrt(np.sum(gs * gs) / gs.size)
    floor = max(1e-6 * np.abs(gs).max(), 1e-30)
    flat = np.flatnonzero(v.ravel())
    key = np.where(np.isnan(d), np.inf, np.abs(d))
    bad = ~np.isfinite(cs)
    return {
        "n_compared": gs.size,
        "max_abs": np.abs(d).max() if finite.all() else None,
        "mean_abs": np.abs(d).mean() if finite.all() else None,
        "max_rel": (np.abs(d) / np.maximum(np.abs(gs), floor)).max() if finite.all() else None,
        "cosine": np.dot(cs, gs) / np.sqrt(np.dot(cs, cs) * np.dot(gs, gs)) if finite.all() else None,
        "mismatch": int(np.count_nonzero(~(np.abs(d) <= tolerance * np.maximum(np.abs(gs), rms)))),
        "worst_index": list(np.unravel_index(flat[int(np.argmax(key))], g.shape)),
        "first_nonfinite": list(np.unravel_index(flat[int(np.argmax(bad))], g.shape)) if bad.any() else None,
    }


def _case(kind: str, rng: np.random.Generator):
    """(candidate, golden, valid) of a token-wise stage with a padded row, or of masked scores."""
    B, T = 2, 40
    tokens = np.ones((B, T), dtype=bool)
    tokens[1, 31:] = False
    if kind == "scores":
        g = rng.standard_normal((B, 3, T, T)).astype(np.float32)
        allowed = allowed_mask(tokens.astype(np.int64))
        g = np.where(allowed, g, -np.inf).astype(np.float32)
        valid = valid_mask("BHTT", g.shape, tokens, allowed)
    else:
        g = (rng.standard_normal((B, T, 24)) * 3).astype(np.float32)
        g[0, 5, 7] = 0.0  # a zero golden value: the relative error's floor
        valid = valid_mask("BTC", g.shape, tokens, None)
    c = (g + rng.standard_normal(g.shape) * 1e-5).astype(np.float32)
    for at in OUTLIERS[kind]:  # a few compared elements far off
        c[at] = g[at] + 0.05
    return c, g, valid


OUTLIERS = {"tokens": [(0, 3, 5), (1, 12, 0), (1, 30, 23)], "scores": [(0, 1, 9, 2), (1, 2, 30, 30), (1, 0, 17, 0)]}


@pytest.mark.parametrize("kind", ["tokens", "scores"])
@pytest.mark.parametrize("row_block", [1 << 20, 128])
@pytest.mark.parametrize("tolerance", [1e-6, 1e-3, 1.0])
def test_chained_pass_metrics_follow_their_definitions(kind, row_block, tolerance, monkeypatch):
    monkeypatch.setattr(metrics, "ROW_BLOCK", row_block)
    rng = np.random.default_rng(7)
    c, g, valid = _case(kind, rng)
    if kind == "scores":
        c[1, :, -1] = 1e3  # a padding query's row (not compared) far off: it must not count anywhere
    else:
        c[1, -1] = 1e3
    expected = by_definition(c, g, valid, tolerance)
    with np.errstate(all="ignore"):
        got = ChainedPass(c, g, valid).metrics(tolerance)
    assert got.n_compared == expected["n_compared"]
    for name in ("max_abs", "mean_abs", "max_rel", "cosine"):
        assert getattr(got, name) == pytest.approx(expected[name], rel=1e-5), name
    assert round(got.mismatch_pct * got.n_compared / 100) == expected["mismatch"]
    assert got.worst_index == expected["worst_index"]
    assert got.first_nonfinite is None
    if tolerance == 1e-3:  # the outliers beyond their threshold, most blocks within the smallest one
        assert expected["mismatch"] == len(OUTLIERS[kind])
    if tolerance == 1e-6:  # most elements beyond: every block is read again
        assert expected["mismatch"] > expected["n_compared"] / 2


@pytest.mark.parametrize("row_block", [1 << 20, 128])
def test_chained_pass_finds_the_first_nonfinite_value_and_counts_it_a_mismatch(row_block, monkeypatch):
    monkeypatch.setattr(metrics, "ROW_BLOCK", row_block)
    c, g, valid = _case("tokens", np.random.default_rng(3))
    c[0, 10, 4], c[0, 30, 1] = np.inf, np.nan  # the first non-finite value is the inf
    expected = by_definition(c, g, valid, float("inf"))
    with np.errstate(all="ignore"):
        chained = ChainedPass(c, g, valid)
        got = chained.metrics(float("inf"))
    assert chained.error == float("inf")
    assert got.first_nonfinite == [0, 10, 4] == expected["first_nonfinite"]
    assert got.worst_index == [0, 10, 4] == expected["worst_index"]  # a NaN ties with inf: the first
    assert round(got.mismatch_pct * got.n_compared / 100) == expected["mismatch"] == 1  # NaN; inf ≤ inf


def test_chained_pass_takes_the_golden_extremes_it_is_given():
    """With every element compared the comparator passes max |golden| from its NaN scan: the same metrics."""
    rng = np.random.default_rng(5)
    g = rng.standard_normal((1, 16, 8)).astype(np.float32)
    c = (g + 1e-3).astype(np.float32)
    valid = valid_mask("BTC", g.shape, np.ones((1, 16), dtype=bool), None)
    scanned = ChainedPass(c, g, valid).metrics(1e-3)
    given = ChainedPass(c, g, valid, golden_abs_max=float(np.abs(g).max())).metrics(1e-3)
    assert scanned == given
