"""`compare --weights`: an int8-per-channel port is judged against its own dequantized weights, so
it passes where it fails against the fp32 golden, and a real bug in it is still localized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backends.numpy_backend import NumpyBackend
from tests.weights_ckpts import golden_weights, hf_names, int8_port, save
from tracer.store import Golden
from tracer.weights.load import port_weights


@pytest.fixture(scope="module")
def int8(tiny_golden, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], dict]:
    """The int8 port's checkpoint, the weights its forward computes with, and the model config."""
    w, config = golden_weights(tiny_golden)
    ckpt, dequantized = int8_port(w)
    return save(ckpt, tmp_path_factory.mktemp("int8") / "int8.safetensors"), dequantized, config


def port_dump(golden: Path, weights: dict[str, np.ndarray], config: dict, out: Path, inject: str | None = None) -> Path:
    """The int8 port's activations on case0 (NumPy forward on its dequantized weights) as a foreign .npz."""
    backend = NumpyBackend(inject=inject)
    backend.prepare(weights, config)
    stages: dict[str, np.ndarray] = {}

    def tap(stage: str, value: np.ndarray) -> np.ndarray:
        stages[stage] = np.array(value)
        return value

    with Golden.open(golden) as g:
        case = g.case("case0")
        backend.forward(case.input_ids, tap, attention_mask=case.attention_mask)
    np.savez(out, **stages)
    return out


def test_int8_port_passes_only_against_its_own_weights(run_cli, tiny_golden, int8, tmp_path):
    ckpt, dequantized, config = int8
    dump = port_dump(tiny_golden, dequantized, config, tmp_path / "port.npz")
    code, _, _ = run_cli("compare", tiny_golden, dump, "--case", "case0", "--quiet", "--json", tmp_path / "a.json")
    assert code == 1
    assert json.loads((tmp_path / "a.json").read_text())["origin"]["stage"] == "embed.tok"
    code, out, err = run_cli("compare", tiny_golden, dump, "--case", "case0", "--weights", ckpt,
                             "--json", tmp_path / "b.json")
    assert code == 0, out + err
    tolerance = json.loads((tmp_path / "b.json").read_text())["tolerance"]
    assert "port weights from int8.safetensors: 29 tensors" in tolerance and "int8 (8 bits) per-channel" in tolerance


def test_bug_in_int8_port_is_localized_with_its_weights(run_cli, tiny_golden, int8, tmp_path):
    ckpt, dequantized, config = int8
    dump = port_dump(tiny_golden, dequantized, config, tmp_path / "bug.npz", inject="mask-off-by-one")
    code, _, _ = run_cli("compare", tiny_golden, dump, "--case", "case0", "--weights", ckpt, "--quiet",
                         "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert code == 1
    assert result["origin"]["stage"] == result["first_divergence"]["stage"] == "blocks.0.attn.scores"


def test_port_weights_are_dequantized_in_golden_layout(tiny_golden, int8):
    ckpt, dequantized, _ = int8
    with Golden.open(tiny_golden) as g:
        weights, note = port_weights(ckpt, g)
    assert set(weights) == set(dequantized) | {"lm_head.weight"}
    for name, value in dequantized.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    assert "max rel diff to golden" in note


def test_mis_loaded_parameters_keep_the_golden_values(tiny_golden, tmp_path):
    """A weight the port holds wrong is the audit's finding: compare keeps the golden's there."""
    w, _ = golden_weights(tiny_golden)
    tensors = hf_names(w)
    del tensors["wpe.weight"]
    tensors["h.1.ln_2.weight"] = np.ones_like(tensors["h.1.ln_2.weight"])
    with Golden.open(tiny_golden) as g:
        weights, note = port_weights(save(tensors, tmp_path / "p.safetensors"), g)
    np.testing.assert_array_equal(weights["transformer.wpe.weight"], w["transformer.wpe.weight"])
    np.testing.assert_array_equal(weights["transformer.h.1.ln_2.weight"], w["transformer.h.1.ln_2.weight"])
    assert "golden values for 2" in note and "transformer.wpe.weight" in note
