"""`tracer import-manifest`: PyCandle GoldenRecorder output as a golden or as a trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ports.pycandle_recorder import record
from tracer.compare.run import CompareRequest, run_compare
from tracer.models import load_model, tiny_dir
from tracer.store import Golden

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "goldens" / "tiny.h5"
WEIGHTS = tiny_dir() / "model.safetensors"


@pytest.fixture(scope="module")
def case0_ids() -> torch.Tensor:
    with Golden.open(GOLDEN) as g:
        return torch.from_numpy(g.case("case0").input_ids)


@pytest.fixture(scope="module")
def recording(tmp_path_factory, case0_ids) -> Path:
    """The tiny model on case0's ids, recorded as PyCandle records it."""
    return record(load_model("tiny").model, case0_ids, tmp_path_factory.mktemp("pycandle"), "gpt2_hf")


def test_recording_becomes_a_golden(run_cli, recording, tmp_path):
    out = tmp_path / "golden.h5"
    code, stdout, err = run_cli("import-manifest", recording, "--weights", WEIGHTS, "-o", out)
    assert code == 0, err
    assert "as a golden" in stdout
    with Golden.open(out) as new, Golden.open(GOLDEN) as ref:
        assert new.attrs["weights_xxh3"] == ref.attrs["weights_xxh3"]  # the same weights, content-hashed
        for key in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "layer_norm_epsilon"):
            assert new.model_config[key] == ref.model_config[key]
        a, b = new.case("case0"), ref.case("case0")
        assert a.stages() == b.stages()  # all 35, q/k/v/scores derived from qkv
        for stage in a.stages():  # the same tensors, up to the rounding of another torch/transformers version
            np.testing.assert_allclose(a.read(stage), b.read(stage), rtol=1e-4, atol=1e-5, err_msg=stage)
        assert a.dataset("blocks.1.attn.scores").attrs["derived_from"] == "blocks.1.attn.q, blocks.1.attn.k"
        assert a.resolve("transformer.h.0.mlp") == "blocks.0.mlp.out"
    result = run_compare(CompareRequest(out, backend="numpy", quiet=True))
    assert result.exit_code == 0 and not any(s.status != "pass" for s in result.cases[0].stages)


def test_recording_becomes_a_trace_that_localizes_a_bug(run_cli, recording, case0_ids, tmp_path):
    out = tmp_path / "trace.h5"
    code, _, err = run_cli("import-manifest", recording, "--golden", GOLDEN, "--case", "case0", "-o", out)
    assert code == 0, err
    assert run_compare(CompareRequest(GOLDEN, out, quiet=True)).exit_code == 0
    model = load_model("tiny").model
    model.transformer.h[0].mlp.act = torch.nn.GELU()  # exact erf GELU: a classic porting bug
    buggy = record(model, case0_ids, tmp_path / "bug", "gpt2_bug")
    code, _, err = run_cli("import-manifest", buggy, "--golden", GOLDEN, "--case", "case0", "-o", tmp_path / "b.h5")
    assert code == 0, err
    result = run_compare(CompareRequest(GOLDEN, tmp_path / "b.h5", quiet=True))
    assert result.exit_code == 1 and result.cases[0].origin == "blocks.0.mlp.act"


def test_repeated_calls_keep_the_first_forward(run_cli, case0_ids, tmp_path):
    manifest = record(load_model("tiny").model, case0_ids, tmp_path, "twice", calls=2)
    assert "transformer.h.0.ln_1.1" in json.loads(manifest.read_text())
    code, _, err = run_cli("import-manifest", manifest, "-o", tmp_path / "g.h5")
    assert code == 0 and "repeated module calls left out" in err
    with Golden.open(tmp_path / "g.h5") as g:
        assert not g.has_weights and len(g.case("case0").stages()) == 35


def test_bad_inputs_exit_2(run_cli, recording, tmp_path):
    not_json = tmp_path / "x_manifest.json"
    not_json.write_text("{oops")
    other = tmp_path / "y_manifest.json"
    other.write_text(json.dumps({"layer": {"name": "layer", "module_type": "Linear", "config": {}}}))
    (tmp_path / "y_trace.safetensors").write_bytes((recording.with_name("gpt2_hf_trace.safetensors")).read_bytes())
    cases = [((not_json,), "not valid JSON"),
             ((tmp_path / "none_manifest.json",), "no such manifest"),
             ((other, "--tensors", tmp_path / "missing.safetensors"), "no recorded tensors"),
             ((other,), "cannot tell the model's"),
             ((recording, "--weights", not_json), "not a readable safetensors"),
             ((recording, "--golden", GOLDEN, "--weights", WEIGHTS), "--weights goes with a golden")]
    for args, words in cases:
        code, _, err = run_cli("import-manifest", *args, "-o", tmp_path / "out.h5")
        assert code == 2 and words in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "out.h5").exists()
