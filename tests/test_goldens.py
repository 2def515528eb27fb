"""The checked-in goldens: drift check against a fresh recording, and the CI gate baseline."""

from __future__ import annotations

import json

import pytest

from scripts.make_goldens import BASELINE, GOLDEN, make_golden
from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.run import CompareRequest, run_compare
from tracer.compare.tolerance import Tolerances
from tracer.store import Golden, StageFile

pytestmark = pytest.mark.skipif(not GOLDEN.exists(), reason="goldens/tiny.h5 not generated")


def test_checked_in_golden_is_small_and_complete():
    assert GOLDEN.stat().st_size < 5_000_000
    with Golden.open(GOLDEN) as g:
        assert g.case_names() == ["case0", "case1", "case2", "batch"]
        assert g.has_weights
        for case in g.cases():
            assert len(case.stages()) == 3 + 15 * g.n_layer + 2


def test_rerecording_matches_the_checked_in_golden(tmp_path):
    """Drift check: a torch/transformers that changes the numbers beyond rounding fails here."""
    fresh = tmp_path / "fresh.h5"
    make_golden(fresh)
    with StageFile.open(GOLDEN) as old, StageFile.open(fresh) as new:
        result = compare(old, new, CompareOptions(Tolerances()))
        drifted = [f"{c.case}:{s.stage} ({s.error:.2g} > {s.tolerance:.2g})" for c in result.cases for s in c.stages
                   if s.failed]
        versions = (old.attrs.get("versions"), new.attrs.get("versions"))
    assert not drifted, f"golden drift {drifted[:5]} between versions {versions}"


def test_numpy_backend_passes_the_gate():
    result = run_compare(CompareRequest(GOLDEN, backend="numpy", baseline=BASELINE, quiet=True))
    assert result.passed and not result.regressions and result.exit_code == 0


def test_gate_reports_a_regression_for_a_bug(tmp_path):
    result = run_compare(CompareRequest(GOLDEN, backend="numpy", inject="gelu-erf", baseline=BASELINE, quiet=True))
    assert result.exit_code == 1
    kinds = {(r.stage, r.kind) for r in result.regressions}
    assert ("blocks.0.mlp.act", "new-failure") in kinds


def test_gate_error_growth_counts_only_above_the_noise_share():
    from tracer.gate import baseline_of, regressions

    result = run_compare(CompareRequest(GOLDEN, backend="numpy", quiet=True))
    base = baseline_of(result)
    stage = result.cases[0].stage("blocks.1.attn.probs")
    base["cases"]["case0"]["blocks.1.attn.probs"]["error"] = stage.error / 1000
    # grew 1000x, but still far below 10% of its tolerance: rounding that moved, not a regression
    assert stage.error < 0.1 * stage.tolerance
    assert not regressions(result, base)
    stage.tolerance = stage.error * 2  # the same growth now takes half the tolerance: a regression
    found = regressions(result, base)
    assert [(r.stage, r.kind) for r in found] == [("blocks.1.attn.probs", "error-grew")]


def test_update_baseline_round_trip(tmp_path):
    path = tmp_path / "new.baseline.json"
    run_compare(CompareRequest(GOLDEN, backend="numpy", baseline=path, update_baseline=True, quiet=True))
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and "case0" in data["cases"]
    again = run_compare(CompareRequest(GOLDEN, backend="numpy", baseline=path, quiet=True))
    assert again.passed
