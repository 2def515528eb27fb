"""The CuPy backend: says why it cannot run where it cannot, and on CUDA agrees with the golden.

Without cupy or a CUDA device only the first group runs (availability, registry listing,
argument checks); the GPU group replays goldens through the backend's own kernels and
checks the comparator's verdicts: clean replays pass with the default tolerances, every
injected bug is localized at its own stage, fp16 passes under the fp16 preset.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent / "plugins"))

from goldens import realistic_tiny, record, stage_arrays  # noqa: E402

from backends.cupy_backend import KNOBS, CupyBackend, Knobs, block_threads, knobs_for  # noqa: E402
from backends.inject import CATALOG  # noqa: E402
from backends.registry import backends_command  # noqa: E402
from tracer.compare.comparator import CompareOptions, compare  # noqa: E402
from tracer.compare.result import CompareResult  # noqa: E402
from tracer.compare.tolerance import Tolerances  # noqa: E402
from tracer.errors import TracerError  # noqa: E402
from tracer.models import LoadedModel  # noqa: E402
from tracer.record import build_cases, record_golden  # noqa: E402
from tracer.replay import replay  # noqa: E402
from tracer.store import Golden, StageFile  # noqa: E402

AVAILABLE, WHY = CupyBackend.availability()
needs_cuda = pytest.mark.skipif(not AVAILABLE, reason=f"cupy backend cannot run here: {WHY}")


# -- everywhere ------------------------------------------------------------------------------
def test_module_imports_and_says_why_without_cupy():
    """With `import cupy` failing, the module still imports and availability names the reason."""
    code = ("import sys; sys.modules['cupy'] = None\n"
            "from backends.cupy_backend import CupyBackend\n"
            "print(CupyBackend.availability())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(False, 'cupy not installed')"


def test_availability_without_a_device(monkeypatch):
    def no_device() -> int:
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert CupyBackend.availability() == (False, "no CUDA device")
    fake.cuda.runtime.getDeviceCount = lambda: 0
    assert CupyBackend.availability() == (False, "no CUDA device")
    fake.cuda.runtime.getDeviceCount = lambda: 1
    assert CupyBackend.availability() == (True, "")


def test_tracer_backends_lists_cupy_with_its_reason():
    console = Console(record=True, width=300)
    backends_command(console)
    rows = [line for line in console.export_text().splitlines() if "cupy" in line]
    assert len(rows) == 1
    assert ("yes" if AVAILABLE else f"no ({WHY})") in rows[0]


def test_every_knob_setting_is_a_catalog_bug_and_changes_something():
    assert set(KNOBS) <= set(CATALOG)
    assert CupyBackend.supported_injections == frozenset(KNOBS)
    assert knobs_for(None) == Knobs()
    settings = [knobs_for(bug) for bug in KNOBS]
    assert Knobs() not in settings
    assert len(set(settings)) == len(settings)  # no two bugs are the same kernel parameters


def test_bad_precision_and_injection_are_input_errors():
    with pytest.raises(TracerError, match=r"unknown precision .* \(fp32, fp16\)"):
        CupyBackend("fp64")
    with pytest.raises(TracerError, match="unknown bug"):
        CupyBackend(inject="no-such-bug")
    backend = CupyBackend("fp16", "gelu-erf")  # constructing needs no GPU
    assert (backend.precision, backend.dtype, backend.knobs.gelu) == ("fp16", np.float16, "erf")


@pytest.mark.parametrize("width, threads", [(1, 32), (33, 64), (64, 64), (100, 128), (768, 256), (1024, 256)])
def test_row_blocks_are_powers_of_two(width, threads):
    assert block_threads(width) == threads


# -- on CUDA -----------------------------------------------------------------------------------
def compare_files(golden: Path, trace: Path, tolerance: str | None = None) -> CompareResult:
    with Golden.open(golden) as g, StageFile.open(trace) as t:
        return compare(g, t, CompareOptions(Tolerances.parse(tolerance)))


def assert_passes(result: CompareResult) -> None:
    failed = [(c.case, s.stage, s.error, s.tolerance) for c in result.cases for s in c.stages if s.failed]
    missing = [s.stage for c in result.cases for s in c.stages if s.status == "missing"]
    assert not failed and not missing, f"failed: {failed[:3]}; missing: {missing[:3]}"


@pytest.fixture(scope="module")
def realistic_golden(tmp_path_factory) -> Path:
    """Right-padded batch of two prompts (33 and 3 tokens) with trained-like statistics."""
    return record(tmp_path_factory.mktemp("cupy_realistic") / "golden.h5")


@pytest.fixture(scope="module")
def fp16_golden(tmp_path_factory) -> Path:
    """The realistic tiny model in float16 on CUDA, recorded by HF (same prompts, padded batch)."""
    import torch

    from goldens import PROMPTS

    base = realistic_tiny()
    model = copy.deepcopy(base.model).to(device="cuda", dtype=torch.float16).eval()
    loaded = LoadedModel(model, base.source, base.tokenizer_kind, base._encode, base._decode)
    out = tmp_path_factory.mktemp("cupy_fp16") / "golden.h5"
    record_golden(loaded, build_cases(loaded, PROMPTS, [], batch=True), str(out), dtype="fp16", attn="eager")
    return out


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("which", ["tiny_golden", "realistic_golden"])
def test_clean_replay_passes_default_tolerances(which, request, tmp_path):
    golden = request.getfixturevalue(which)
    trace = tmp_path / "trace.h5"
    replay(golden, CupyBackend(), trace, mode="both")
    assert_passes(compare_files(golden, trace))


@pytest.mark.gpu
@needs_cuda
def test_masking_on_a_padded_batch(realistic_golden, tmp_path):
    trace = tmp_path / "trace.h5"
    replay(realistic_golden, CupyBackend(), trace)
    stages, gold = stage_arrays(trace, "batch"), stage_arrays(realistic_golden, "batch")
    scores, probs = stages["blocks.0.attn.scores"], stages["blocks.0.attn.probs"]
    assert np.array_equal(np.isneginf(scores), np.isneginf(gold["blocks.0.attn.scores"]))
    assert np.all(probs[1, :, :, 3:] == 0) and np.all(np.triu(probs[0], k=1) == 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    for stage, g in gold.items():  # same scale-relative bound as the NumPy backend's test
        finite = np.isfinite(g)
        err = np.abs(stages[stage][finite].astype(np.float64) - g[finite]).max() / np.abs(g[finite]).max()
        assert err <= 1e-5, f"{stage}: scale-relative error {err:.2e}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bug", sorted(KNOBS))
def test_injected_bug_is_localized_at_its_stage(bug, realistic_golden, tmp_path):
    trace = tmp_path / "trace.h5"
    replay(realistic_golden, CupyBackend(inject=bug), trace, mode="both")
    result = compare_files(realistic_golden, trace)
    assert result.exit_code == 1
    assert result.origin is not None and result.origin["stage"] == CATALOG[bug].origin, result.origin


@pytest.mark.gpu
@needs_cuda
def test_fp16_replay_passes_the_fp16_preset(fp16_golden, tmp_path):
    trace = tmp_path / "trace.h5"
    replay(fp16_golden, CupyBackend("fp16"), trace, mode="both")
    assert stage_arrays(trace, "batch")["blocks.0.attn.probs"].dtype == np.float16
    assert_passes(compare_files(fp16_golden, trace, "fp16"))


@pytest.mark.gpu
@needs_cuda
def test_fp16_bug_still_found_under_the_fp16_preset(fp16_golden, tmp_path):
    trace = tmp_path / "trace.h5"
    replay(fp16_golden, CupyBackend("fp16", "no-attn-scale"), trace, mode="both")
    result = compare_files(fp16_golden, trace, "fp16")
    assert result.origin is not None and result.origin["stage"] == "blocks.0.attn.scores"
