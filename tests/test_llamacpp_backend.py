"""The llamacpp backend: llama.cpp's own GPT-2 graph as a candidate, its named tensors as stages.

Without llama-cpp-python (CI does not install the extra) only the listing, the refusal and the
layout conversions are tested; with it, the tiny golden replayed through llama.cpp must pass and
every tensor llama.cpp names must be accounted for.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from backends.llamacpp_backend import (EXTRA_HINT, BLOCK_NAMES, LlamaCppBackend, LlamaCppWarning, canonical,
                                       is_known_name, stage_of)
from backends.registry import list_backends
from tracer.stages import BLOCK_STAGES, canonical_stages
from tracer.store import StageFile

HAVE_LLAMA_CPP = LlamaCppBackend.availability()[0]
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed ([llamacpp] extra)")


def _without_llama_cpp(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError


def test_backends_lists_llamacpp_with_why_not(run_cli, monkeypatch):
    _without_llama_cpp(monkeypatch)
    code, out, _ = run_cli("backends")
    assert code == 0
    row = next(line for line in out.splitlines() if "llamacpp" in line)
    assert "no (pip install" in row
    info = {i.name: i for i in list_backends()}["llamacpp"]
    assert not info.available and info.why == EXTRA_HINT


@needs_llama_cpp
def test_backends_says_llamacpp_runs_here():
    info = {i.name: i for i in list_backends()}["llamacpp"]
    assert info.available, info.why


def test_replay_without_llama_cpp_is_one_line(run_cli, monkeypatch, tiny_golden, tmp_path):
    _without_llama_cpp(monkeypatch)
    out = tmp_path / "t.h5"
    code, _, err = run_cli("replay", tiny_golden, "--backend", "llamacpp", "-o", out)
    assert code == 2 and "gpt2-tracer[llamacpp]" in err and "Traceback" not in err
    assert not out.exists()


def test_every_block_stage_but_attn_out_has_a_llamacpp_name():
    mapped = {stage_of(f"{name}-3") for name in BLOCK_NAMES}
    assert mapped == {f"blocks.3.{s}" for s in BLOCK_STAGES if s != "attn.out"}  # attn.out: found by its operands
    assert stage_of("kq-12") == "blocks.12.attn.scores" and stage_of("kq") is None
    assert is_known_name("norm_w-0") and is_known_name("Qcur-0 (view)") and is_known_name("node_28")
    assert not is_known_name("attn_rot-0") and not is_known_name("inp_embd_scaled")


def test_ggml_layouts_become_canonical():
    rng = np.random.default_rng(0)
    H, T, D, n_kv = 4, 5, 3, 8
    q = rng.standard_normal((H, T, D)).astype(np.float32)
    ggml_q = q.transpose(1, 0, 2)[None]  # ne [D, H, T, 1] seen from NumPy: [1, T, H, D]
    assert np.array_equal(canonical("blocks.0.attn.q", ggml_q, T, H, np.float32(1)), q)
    kq = rng.standard_normal((1, H, T, n_kv)).astype(np.float32)  # ne [n_kv, T, H, 1]
    scale = np.float32(0.5)
    scores = canonical("blocks.0.attn.scores", kq, T, H, scale)
    assert scores.shape == (H, T, T) and np.array_equal(scores, kq[0, :, :, :T] * scale)
    probs = canonical("blocks.1.attn.probs", kq, T, H, scale)
    assert np.array_equal(probs, kq[0, :, :, :T])  # the softmax output is not rescaled
    logits = rng.standard_normal((1, 1, T, 7)).astype(np.float32)  # ne [V, T]
    assert np.array_equal(canonical("logits", logits, T, H, scale), logits[0, 0])


# -- with llama-cpp-python --------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamacpp_trace(tiny_golden, tmp_path_factory) -> Path:
    """The tiny golden (case0, case1, a padded batch) replayed through llama.cpp, every stage mapped."""
    if not HAVE_LLAMA_CPP:
        pytest.skip("llama-cpp-python not installed ([llamacpp] extra)")
    from tracer.replay import replay

    out = tmp_path_factory.mktemp("llamacpp") / "llamacpp.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", LlamaCppWarning)  # a stage not provided or a tensor not mapped fails here
        replay(tiny_golden, LlamaCppBackend(), out)
    return out


def test_llamacpp_f32_replay_passes_auto(run_cli, tiny_golden, llamacpp_trace):
    """llama.cpp's CPU GELU is a float16 table lookup; the backend declares it, the trace says so on
    each mlp.act, and auto tolerances judge that stage (and what it propagates) at fp16: a pass."""
    with StageFile.open(llamacpp_trace) as t:
        declared = {s: t.case("case0").dataset(s).attrs.get("precision") for s in t.case("case0").stages()}
    assert {s for s, p in declared.items() if p} == {"blocks.0.mlp.act", "blocks.1.mlp.act"}
    assert set(declared.values()) == {None, "fp16"}
    code, out, err = run_cli("compare", tiny_golden, llamacpp_trace)
    assert code == 0, out + err


def test_llamacpp_gelu_is_found_as_fp16_when_not_declared(run_cli, tiny_golden, llamacpp_trace, tmp_path):
    """Without the declaration the same trace fails exactly there: every stage before mlp.act passes the
    fp32 auto tolerances, and compare pins the difference on it with the fp16 hypothesis confirmed."""
    bare = tmp_path / "undeclared.h5"
    shutil.copy(llamacpp_trace, bare)
    with h5py.File(bare, "r+") as f:
        for case in f["cases"].values():
            for ds in case["stages"].values():
                ds.attrs.pop("precision", None)
    report = tmp_path / "r.json"
    code, out, err = run_cli("compare", tiny_golden, bare, "--json", report)
    assert code == 1, out + err
    result = json.loads(report.read_text())
    assert result["origin"]["stage"] == result["first_divergence"]["stage"] == "blocks.0.mlp.act"
    for case in result["cases"]:
        stages = {s["stage"]: s for s in case["stages"]}
        before = canonical_stages(2)[:canonical_stages(2).index("blocks.0.mlp.act")]
        assert all(stages[s]["status"] == "pass" for s in before), case["case"]
        act = stages["blocks.0.mlp.act"]
        assert any(d["verdict"] == "confirmed" and "fp16" in d["bug"] for d in act["diagnoses"]), act["diagnoses"]


@needs_llama_cpp
def test_llamacpp_names_are_all_mapped(tiny_golden):
    from tracer.store import Golden

    backend = LlamaCppBackend()
    with Golden.open(tiny_golden) as golden:
        backend.prepare(golden.weights(), golden.model_config)
        case = golden.case("batch")
        seen: dict[str, tuple[int, ...]] = {}

        def tap(stage: str, value: np.ndarray) -> np.ndarray:
            seen[stage] = value.shape
            return value

        logits = backend.forward(case.input_ids, tap, case.attention_mask)
        expected = {s: tuple(case.dataset(s).shape) for s in case.stages()}
    assert list(seen) == canonical_stages(backend.n_layer)  # every stage, in execution order
    assert seen == {s: expected[s] for s in seen}
    assert logits.shape == expected["logits"]
    unknown = sorted(n for n in backend.emitted if not is_known_name(n))
    assert not unknown, f"llama.cpp tensors with no mapping: {unknown}"
    problems: list[str] = []
    backend.warn_unmapped(set(seen), problems.append)
    assert not problems


@needs_llama_cpp
def test_llamacpp_refuses_isolated_mode(run_cli, tiny_golden, tmp_path):
    out = tmp_path / "t.h5"
    code, _, err = run_cli("replay", tiny_golden, "--backend", "llamacpp", "--mode", "isolated", "-o", out)
    assert code == 2 and "--mode chained" in err and not out.exists()


def test_gguf_weight_types(tiny_golden, tmp_path):
    gguf = pytest.importorskip("gguf")
    from tracer.export_gguf import write_gguf
    from tracer.store import Golden

    with Golden.open(tiny_golden) as golden:
        weights, config = golden.weights(), golden.model_config
    for weight_type, matrix_type in (("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")):
        path = tmp_path / f"{weight_type}.gguf"
        write_gguf(path, weights, config, "", "", weight_type)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        assert types["blk.0.attn_qkv.weight"] == types["token_embd.weight"] == matrix_type
        assert types["blk.0.attn_qkv.bias"] == types["blk.0.attn_norm.weight"] == "F32"


@needs_llama_cpp
def test_llamacpp_f16_weights_pass_against_their_own_weights(run_cli, tiny_golden, tmp_path):
    """F16 weights (activations f32, rounded to f16 inside ggml's f16 matmul): the trace is fp16, and
    judged against the GGUF's own weights it passes."""
    ckpt, trace = tmp_path / "f16" / "model.gguf", tmp_path / "f16.h5"
    code, _, err = run_cli("export", tiny_golden, "--format", "gguf", "--gguf-type", "f16", "-o", ckpt.parent, "-q")
    assert code == 0, err
    code, _, err = run_cli("replay", tiny_golden, "--backend", "llamacpp", "--precision", "fp16", "-o", trace, "-q")
    assert code == 0, err
    code, out, err = run_cli("compare", tiny_golden, trace, "--weights", ckpt)
    assert code == 0, out + err


@needs_llama_cpp
def test_llamacpp_q8_0_passes_against_its_own_weights(run_cli, tiny_golden, tmp_path):
    """Q8_0 weights: ggml quantizes the activations of every q8_0 matmul too. The backend declares those
    products q8_0, and judged against the GGUF's own (dequantized) weights the replay passes; with the
    golden's float32 weights it fails where the quantized embedding first differs."""
    ckpt, trace = tmp_path / "q8" / "model.gguf", tmp_path / "q8.h5"
    code, _, err = run_cli("export", tiny_golden, "--format", "gguf", "--gguf-type", "q8_0", "-o", ckpt.parent, "-q")
    assert code == 0, err
    code, _, err = run_cli("replay", tiny_golden, "--backend", "llamacpp", "--precision", "q8_0", "-o", trace, "-q")
    assert code == 0, err
    with StageFile.open(trace) as t:
        assert t.case("case0").dataset("blocks.0.attn.qkv").attrs["precision"] == "q8_0"
    code, out, err = run_cli("compare", tiny_golden, trace, "--weights", ckpt)
    assert code == 0, out + err
    code, out, _ = run_cli("compare", tiny_golden, trace, "--json", tmp_path / "r.json")
    assert code == 1 and json.loads((tmp_path / "r.json").read_text())["origin"]["stage"] == "embed.tok"
