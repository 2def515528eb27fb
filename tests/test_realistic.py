"""Independent ports on a realistic model: a 12-layer random gpt2-shape golden at T=96, where a correct
fp32 port drifts by several % in deep attention. The correct C port (incomplete dump, float32 and
float64) and the NumPy-style port must pass well inside every tolerance, and bugs in the first and the
last block must be localized and diagnosed.

Minutes of CPU: deselected by default; run with `python -m pytest -m realistic`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.ports.catalog import get
from tests.ports.real_ports import run_c_port, run_numpy_style_port
from tests.test_port_verdicts import EXPECTED_RULES
from tests.test_real_dumps import worst_share
from tracer.compare.run import CompareRequest, run_compare

pytestmark = pytest.mark.realistic
N_LAYER, T = 12, 96


@pytest.fixture(scope="module")
def golden12(tmp_path_factory) -> Path:
    from transformers import GPT2LMHeadModel

    from tracer.models import LoadedModel, byte_decode, byte_encode
    from tracer.record import build_cases, record_golden
    from tracer.synth import random_config, realistic_init_

    model = GPT2LMHeadModel(random_config("gpt2", n_layer=N_LAYER))
    realistic_init_(model, 0)
    loaded = LoadedModel(model.eval(), "random:gpt2", "bytes", byte_encode, byte_decode)
    rng = random.Random(1)
    out = tmp_path_factory.mktemp("realistic") / "gpt2_12.h5"
    record_golden(loaded, build_cases(loaded, [], [[rng.randrange(50257) for _ in range(T)]], batch=False),
                  str(out), dtype="fp32", attn="eager")
    return out



@pytest.mark.parametrize("f64", [False, True], ids=["float32", "float64"])
def test_correct_c_port_passes_at_depth(golden12, c_port, f64, tmp_path):
    result = run_compare(CompareRequest(golden12, run_c_port(golden12, tmp_path / "d", f64=f64), quiet=True))
    assert result.passed and worst_share(result) <= 0.5


def test_correct_numpy_style_port_passes_at_depth(golden12, tmp_path):
    dump, name_map = run_numpy_style_port(golden12, tmp_path / "d")
    result = run_compare(CompareRequest(golden12, dump, name_map=name_map, quiet=True))
    assert result.passed and worst_share(result) <= 0.5


@pytest.mark.parametrize("name", ["gelu-coef", "ln2-ln1-weights", "fp16-fc-out", "v-from-k"])
def test_port_bug_at_depth_is_localized_and_diagnosed(golden12, c_port, name, tmp_path):
    bug = get(name)
    result = run_compare(CompareRequest(golden12, run_c_port(golden12, tmp_path / "d", bug=name), quiet=True))
    case = result.cases[0]
    dumped = [s.stage for s in case.stages if s.status != "missing" and not s.derived]
    assert case.origin == bug.introduced_at(N_LAYER, dumped), case.origin_reasoning
    assert case.stage(case.origin).diagnoses[0].rule in EXPECTED_RULES[name]
