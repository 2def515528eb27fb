"""The replay driver: chained vs isolated taps, trace metadata, and every bad input as one clear error."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent / "plugins"))

import sample_backends  # noqa: E402
from goldens import record, stage_arrays  # noqa: E402

from backends.inject import CATALOG  # noqa: E402
from backends.numpy_backend import NumpyBackend  # noqa: E402
from tracer.errors import TracerError  # noqa: E402
from tracer.replay import replay, replay_command  # noqa: E402
from tracer.stages import split_stage  # noqa: E402
from tracer.store import Golden, Trace  # noqa: E402

NOISE = 1e-5  # scale-relative fp32 noise bound, see tests/test_numpy_backend.py
BUG_SIZE = 1e-3  # the bugs used below change their own stage by far more than this


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    return record(tmp_path_factory.mktemp("replay") / "golden.h5", batch=False)


def rel_errors(golden: Path, trace: Path, case: str, group: str) -> dict[str, float]:
    gold, cand = stage_arrays(golden, case), stage_arrays(trace, case, group)
    out = {}
    for stage, g in gold.items():
        finite = np.isfinite(g)
        c = cand[stage]
        if not np.array_equal(np.isfinite(c), finite):  # masked scores differ, or NaN/Inf appeared
            out[stage] = float("inf")
        else:
            out[stage] = float(np.abs(c[finite] - g[finite]).max() / np.abs(g[finite]).max())
    return out


@pytest.mark.parametrize("bug", ["c-proj-untransposed", "mask-off-by-one", "ln-unbiased-var"])
def test_isolated_mode_feeds_golden_inputs(bug, golden, tmp_path):
    out = tmp_path / "trace.h5"
    replay(golden, NumpyBackend(inject=bug), out, mode="both")
    local, origin = CATALOG[bug].stage, CATALOG[bug].origin
    isolated = rel_errors(golden, out, "case0", "isolated")
    for stage, err in isolated.items():
        # ln-unbiased-var lives in every LayerNorm (ln1, ln2, final.ln), the others only in their own stage
        own = split_stage(stage)[1] == local or (bug == "ln-unbiased-var" and stage.endswith(("ln1", "ln2", "final.ln")))
        if own:
            assert err > BUG_SIZE, f"isolated {stage}: the bug's own error must show ({err:.1e})"
        else:
            assert err <= NOISE, f"isolated {stage}: error {err:.1e} leaked from elsewhere"
    chained = rel_errors(golden, out, "case0", "stages")
    stages = list(chained)
    k = stages.index(origin)
    assert all(chained[s] <= NOISE for s in stages[:k]), "chained error before the bug"
    assert chained[origin] > BUG_SIZE
    assert chained["logits"] > BUG_SIZE and chained["blocks.1.resid_post"] > BUG_SIZE  # inherited downstream


def test_trace_metadata_and_inputs(golden, tmp_path):
    out = tmp_path / "trace.h5"
    replay(golden, NumpyBackend("fp64", inject="skip-wpe"), out, mode="isolated")
    with Golden.open(golden) as g, Trace.open(out) as t:
        assert t.golden_id == g.golden_id
        assert t.model_config == g.model_config
        assert t.attrs["model_source"] == g.attrs["model_source"]
        assert (t.attrs["backend"], t.attrs["mode"], t.attrs["dtype"], t.attrs["inject"]) == \
            ("numpy", "isolated", "fp64", "skip-wpe")
        assert {"numpy", "h5py"} <= set(t.attrs["versions"]) and t.attrs["created"]
        assert t.case_names() == g.case_names()
        for name in g.case_names():
            np.testing.assert_array_equal(t.case(name).input_ids, g.case(name).input_ids)
            np.testing.assert_array_equal(t.case(name).attention_mask, g.case(name).attention_mask)
            assert t.case(name).stages("stages") == []
            assert t.case(name).stages("isolated") == g.case(name).stages()
        assert "weights" not in t.h5


def test_chained_and_isolated_of_a_correct_backend_agree(golden, tmp_path):
    out = tmp_path / "trace.h5"
    replay(golden, NumpyBackend(), out, mode="both")
    for group in ("stages", "isolated"):
        errors = rel_errors(golden, out, "case1", group)
        assert max(errors.values()) <= NOISE, group


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("backend, message", [
    (sample_backends.Raising(), r"^backend raising failed in case 'case0': ValueError: kernel exploded$"),
    (sample_backends.WrongShapeLogits(),
     r"backend wrong-shape returned logits of shape \(1, 33, 255\) in case 'case0', expected \(1, 33, 256\)"),
    (sample_backends.UnknownStage(), r"backend unknown-stage tapped unknown stage 'blocks.0.attn.qk'"),
    (sample_backends.DoubleTap(), r"backend double-tap tapped stage 'embed.tok' twice"),
])
def test_backend_faults_are_one_line_errors_and_leave_nothing(backend, message, golden, tmp_path):
    with pytest.raises(TracerError, match=message):
        replay(golden, backend, tmp_path / "trace.h5")
    assert leftovers(tmp_path) == []


def test_golden_without_weights(tmp_path):
    bare = record(tmp_path / "bare.h5", with_weights=False)
    with pytest.raises(TracerError, match=r"has no weights: replay needs them \(record without --no-weights\)"):
        replay(bare, NumpyBackend(), tmp_path / "trace.h5")
    assert leftovers(tmp_path) == ["bare.h5"]


def test_existing_output_needs_force_and_bad_mode(golden, tmp_path):
    out = tmp_path / "trace.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(TracerError, match="already exists"):
        replay(golden, NumpyBackend(), out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(TracerError, match="unknown mode 'teacher'"):
        replay(golden, NumpyBackend(), out, mode="teacher", force=True)
    replay(golden, NumpyBackend(), out, force=True)
    assert Trace.open(out).golden_id


def console_text() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def test_replay_command(golden, tmp_path):
    console, buf = console_text()
    out = tmp_path / "trace.h5"
    replay_command(golden, "numpy", out, mode="chained", precision="fp64", inject="gelu-erf", console=console)
    assert "numpy (fp64, chained, inject gelu-erf)" in buf.getvalue()
    with Trace.open(out) as t:
        assert (t.attrs["dtype"], t.attrs["inject"]) == ("fp64", "gelu-erf")
    with pytest.raises(TracerError, match="unknown bug 'gelu-exact'"):
        replay_command(golden, "numpy", tmp_path / "other.h5", inject="gelu-exact")
    with pytest.raises(TracerError, match="unknown backend 'numpyy'"):
        replay_command(golden, "numpyy", tmp_path / "other.h5")
    with pytest.raises(TracerError, match="-o TRACE.h5"):
        replay_command(golden, "numpy", None)
    assert leftovers(tmp_path) == ["trace.h5"]


def test_inject_list_prints_the_catalog():
    console = Console(file=io.StringIO(), width=400)
    replay_command(None, "numpy", None, inject="list", console=console)
    text = console.file.getvalue()
    for bug in CATALOG.values():
        row = next(line for line in text.splitlines() if f" {bug.name} " in line)
        assert bug.stage in row and bug.description in row and "yes" in row, row
