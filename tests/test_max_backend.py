"""The max backend: a Modular MAX module compiled once, every submodule output a stage.

Without MAX (CI does not install the extra) the listing, the refusal, the spec syntax and both
tables of the shipped `max` map are tested; with it, the reference port must replay the tiny
golden to a passing comparison and a one-line bug in a copy of it must be localized. The compile
takes minutes on a cold cache, so those tests are slow.
"""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from backends.max_backend import EXTRA_HINT, REFERENCE, MaxBackend, MaxWarning, module_weights, stage_names
from backends.registry import backend_class, list_backends
from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.tolerance import Tolerances
from tracer.errors import TracerError
from tracer.stages import canonical_stages
from tracer.store import Golden, StageFile

HAVE_MAX = MaxBackend.availability()[0]
needs_max = pytest.mark.skipif(not HAVE_MAX, reason="Modular MAX 26.7 not installed ([max] extra)")

# What tracing the reference port captures (backends/max_gpt2.py), block 0 and the rest of the model.
BLOCK_MODULES = ("", ".ln_1", ".attn", ".attn.c_attn", ".attn.c_proj", ".ln_2", ".mlp", ".mlp.c_fc", ".mlp.c_proj")
TOP_MODULES = ("transformer", "transformer.wte", "transformer.wpe", "transformer.h", "transformer.ln_f", "lm_head")


def captured_names(n_layer: int) -> list[str]:
    modules = list(TOP_MODULES) + [f"transformer.h.{i}{m}" for i in range(n_layer) for m in BLOCK_MODULES]
    names = [f"{m}.{io}.0" for m in modules for io in ("in", "out")]
    return names + [f"transformer.h.{i}.attn.softmax.{io}.0" for i in range(n_layer) for io in ("in", "out")]


def _without_max(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "max", None)  # importlib.util.find_spec("max") now finds nothing


def test_backends_lists_max_with_why_not(run_cli, monkeypatch, tiny_golden, tmp_path):
    _without_max(monkeypatch)
    code, out, _ = run_cli("backends")
    assert code == 0
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("max "))
    assert "extra [max]" in row and "no (needs the max extra" in row
    info = {i.name: i for i in list_backends()}["max"]
    assert not info.available and info.why == EXTRA_HINT
    out_file = tmp_path / "t.h5"
    code, _, err = run_cli("replay", tiny_golden, "--backend", "max:my_pkg.gpt2:MaxGPT2LMHeadModel", "-o", out_file)
    assert code == 2 and "pip install 'gpt2-tracer[max]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out_file.exists()


def test_another_max_version_is_refused_with_the_pin(monkeypatch):
    monkeypatch.setattr("backends.max_backend._installed_version", lambda: "26.9.1")
    available, why = MaxBackend.availability()
    assert not available and "26.9.1" in why and "max==26.7.*" in why


def test_max_spec_binds_the_module():
    cls = backend_class("max:my_pkg.gpt2:MaxGPT2LMHeadModel")
    assert issubclass(cls, MaxBackend) and cls.module_path == "my_pkg.gpt2:MaxGPT2LMHeadModel"
    assert backend_class("max") is MaxBackend and MaxBackend.module_path == REFERENCE
    with pytest.raises(TracerError, match="needs a module after the colon"):
        backend_class("max:")


@pytest.mark.parametrize("n_layer", [2, 12])
def test_every_stage_but_q_k_v_has_a_captured_name(n_layer):
    stages, unknown = stage_names(captured_names(n_layer), n_layer)
    assert unknown == []
    qkv_split = {f"blocks.{i}.attn.{x}" for i in range(n_layer) for x in "qkv"}
    assert set(stages) == set(canonical_stages(n_layer)) - qkv_split
    assert stages["blocks.0.attn.ctx"] == "transformer.h.0.attn.c_proj.in.0"
    assert stages["blocks.1.attn.scores"] == "transformer.h.1.attn.softmax.in.0"
    assert stages["blocks.0.attn.out"] == "transformer.h.0.attn.c_proj.out.0"  # the module computing it, not attn
    assert stages["embed.sum"] == "transformer.h.0.in.0" and stages["logits"] == "lm_head.out.0"


def test_golden_weights_load_in_max_orientation(tiny_golden):
    with Golden.open(tiny_golden) as g:
        weights, config = g.weights(), g.model_config
    C, V, n_layer = config["n_embd"], config["vocab_size"], config["n_layer"]
    shapes = {"transformer.wte.weight": (V, C), "lm_head.weight": (V, C),
              "transformer.h.1.attn.c_attn.weight": (3 * C, C), "transformer.h.1.attn.c_attn.bias": (3 * C,),
              "transformer.h.0.mlp.c_proj.weight": (C, 4 * C), "transformer.ln_f.bias": (C,)}
    loaded = module_weights({n: SimpleNamespace(shape=s) for n, s in shapes.items()}, weights, n_layer)
    np.testing.assert_array_equal(loaded["transformer.h.1.attn.c_attn.weight"],
                                  weights["transformer.h.1.attn.c_attn.weight"].T)  # Conv1D [in, out] -> [out, in]
    np.testing.assert_array_equal(loaded["transformer.h.0.mlp.c_proj.weight"],
                                  weights["transformer.h.0.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(loaded["transformer.wte.weight"], weights["transformer.wte.weight"])
    with pytest.raises(TracerError, match="has shape"):  # a module built for the wrong width
        module_weights({"transformer.ln_f.bias": SimpleNamespace(shape=(C + 1,))}, weights, n_layer)
    with pytest.raises(TracerError, match="no golden weight"):
        module_weights({"transformer.h.0.attn.q_proj.weight": SimpleNamespace(shape=(C, C))}, weights, n_layer)


# -- with MAX --------------------------------------------------------------------------------------
@needs_max
def test_backends_says_max_runs_here():
    info = {i.name: i for i in list_backends()}["max"]
    assert info.available, info.why


@needs_max
def test_isolated_mode_and_left_padding_are_refused_in_one_line():
    backend = MaxBackend()
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(TracerError, match="--mode chained"):
        backend.forward(ids, SimpleNamespace(teacher_forced=True))
    with pytest.raises(TracerError, match="right-padded"):
        backend.forward(ids, lambda s, v: v, attention_mask=np.array([[0, 1, 1, 1], [1, 1, 1, 1]]))


@needs_max
def test_a_module_that_is_no_max_module_is_refused():
    with pytest.raises(TracerError, match="not a MAX module"):
        backend_class("max:tracer.errors:TracerError")()


def compared(golden, trace):
    with StageFile.open(golden) as g, StageFile.open(trace) as t:
        return compare(g, t, CompareOptions(Tolerances()))


@needs_max
@pytest.mark.slow
def test_reference_port_replays_the_tiny_golden_and_passes(run_cli, tiny_golden, tmp_path):
    out = tmp_path / "max.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaxWarning)  # every captured output named, every stage produced
        code, _, err = run_cli("replay", tiny_golden, "--backend", "max", "-o", out)
    assert code == 0, err
    code, report, err = run_cli("compare", tiny_golden, out)
    assert code == 0, report + err
    result = compared(tiny_golden, out)
    assert result.passed
    with StageFile.open(out) as t:
        assert t.case("case0").has("blocks.1.attn.probs") and t.case("batch").has("embed.sum")


@needs_max
@pytest.mark.slow
def test_a_bug_in_a_max_module_is_localized(tiny_golden, tmp_path):
    from tracer.replay import replay

    from backends.registry import resolve_backend

    out = tmp_path / "bug.h5"
    replay(tiny_golden, resolve_backend("max:tests.ports.max_buggy:LnEpsBug"), out)
    result = compared(tiny_golden, out)
    assert not result.passed
    assert {c.origin for c in result.cases} == {"blocks.0.ln2"}
