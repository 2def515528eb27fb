"""The comparator on real traces: correct independent ports pass, every catalog bug is found at
its stage and, where a rule exists, diagnosed; bad input is exit 2."""

from __future__ import annotations

import warnings

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from backends.inject import CATALOG
from backends.numpy_backend import NumpyBackend
from tests.ports.naive_port import NaivePort
from tests.ports.torch_port import TorchPort
from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.result import CompareResult
from tracer.compare.tolerance import Tolerances
from tracer.errors import TracerError
from tracer.record import build_cases, record_golden
from tracer.replay import replay
from tracer.store import StageFile

# The diagnosis rule a catalog bug should be recognised by (None: no rule claims it).
EXPECTED_RULE = {
    "embed-scale": "generic.scale",
    "position-offset": "constant.pos-offset",
    "skip-wpe": "sum.term-dropped",
    "ln-unbiased-var": "ln.unbiased-variance",
    "ln-eps": "ln.eps-outside-sqrt",
    "qkv-interleaved": "qkv.interleaved",
    "no-attn-scale": "constant.attn-scale",
    "attn-scale-by-d": "constant.attn-scale",
    "qk-swapped": "scores.qk-swapped",
    "mask-off-by-one": "mask.off-by-one",
    "no-causal-mask": "mask.missing",
    "softmax-no-max-subtraction": "softmax.no-max-subtraction",
    "heads-merged-wrong": "heads.merge-layout",
    "c-proj-untransposed": "param.weight.transposed",
    "residual-from-normalized": "operand",
    "drop-fc-bias": "param.bias.dropped",
    "gelu-erf": "gelu.erf",
    "mlp-residual-dropped": "sum.term-dropped",
    "skip-ln-f": "step.skipped",
}


def run(golden: Path, backend, tmp_path: Path, mode: str = "chained", tolerance: str | None = None) -> CompareResult:
    trace = tmp_path / f"{backend.name}-{backend.inject or 'clean'}-{mode}.h5"
    replay(golden, backend, trace, mode=mode, force=True)
    with StageFile.open(golden) as g, StageFile.open(trace) as t, warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a user would see it printed: NaN from a hypothesis is expected
        return compare(g, t, CompareOptions(Tolerances.parse(tolerance)))


def test_catalog_has_an_expectation_for_every_bug():
    assert set(EXPECTED_RULE) == set(CATALOG)


@pytest.mark.parametrize("port", [lambda: NumpyBackend("fp32"), lambda: NumpyBackend("fp64"), TorchPort, NaivePort],
                         ids=["numpy-fp32", "numpy-fp64", "torch-port", "naive-port"])
@pytest.mark.parametrize("golden_name", ["tiny_golden", "gpt2_shape_golden"])
def test_correct_independent_ports_pass(port, golden_name, request, tmp_path):
    result = run(request.getfixturevalue(golden_name), port(), tmp_path)
    failing = [(c.case, s.stage, s.error, s.tolerance, s.local_error, s.local_tolerance)
               for c in result.cases for s in c.stages if s.failed]
    assert result.passed, failing
    assert result.exit_code == 0
    assert all(s.local_error is not None for c in result.cases for s in c.stages), "every stage re-evaluated"


def test_plain_allclose_would_flag_the_correct_naive_port(gpt2_shape_golden, tmp_path):
    """The bar of SPEC §2: a fixed allclose(1e-5, 1e-5) rejects a correct port that auto passes."""
    trace = tmp_path / "naive.h5"
    replay(gpt2_shape_golden, NaivePort(), trace, force=True)
    with StageFile.open(gpt2_shape_golden) as g, StageFile.open(trace) as t:
        case, tcase = g.case("case0"), t.case("case0")
        flagged = []
        for stage in case.stages():
            a, b = case.read(stage), tcase.read(stage)
            finite = np.isfinite(a)
            if not np.allclose(b[finite], a[finite], rtol=1e-5, atol=1e-5):
                flagged.append(stage)
    assert flagged, "plain allclose passes everything: the test model is too easy to mean anything"


def test_sdpa_golden_against_eager_golden_passes(tiny_loader, tmp_path):
    goldens = {}
    for attn in ("eager", "sdpa"):
        loaded = tiny_loader(attn=attn)
        goldens[attn] = tmp_path / f"{attn}.h5"
        record_golden(loaded, build_cases(loaded, ["Hello, world", "attention"], [], batch=True),
                      str(goldens[attn]), dtype="fp32", attn=attn)
    with StageFile.open(goldens["eager"]) as g, StageFile.open(goldens["sdpa"]) as t:
        result = compare(g, t, CompareOptions(Tolerances()))
    assert result.passed, [s.stage for c in result.cases for s in c.stages if s.failed]


@pytest.mark.parametrize("bug", sorted(CATALOG))
@pytest.mark.parametrize("golden_name,mode", [("tiny_golden", "both"), ("gpt2_shape_golden", "chained")])
def test_catalog_bug_found_at_its_stage_and_diagnosed(bug, golden_name, mode, request, tmp_path):
    result = run(request.getfixturevalue(golden_name), NumpyBackend("fp32", inject=bug), tmp_path, mode)
    assert result.exit_code == 1
    expected_origin = CATALOG[bug].origin
    case = next(c for c in result.cases if c.first_divergence)
    assert case.origin == expected_origin, case.origin_reasoning
    assert result.origin == {"case": case.case, "stage": expected_origin}
    origin = case.stage(expected_origin)
    assert origin.fails_local
    rules = [d.rule for d in origin.diagnoses]
    if bug == "softmax-no-max-subtraction" and origin.metrics.first_nonfinite is None:
        pytest.skip("no score is large enough to overflow fp16 on this input")
    assert EXPECTED_RULE[bug] in rules, (rules, [d.evidence for d in origin.diagnoses])


def test_diagnosis_evidence_shows_error_before_and_after(tiny_golden, tmp_path):
    result = run(tiny_golden, NumpyBackend("fp32", inject="no-attn-scale"), tmp_path)
    d = result.cases[0].stage("blocks.0.attn.scores").diagnoses[0]
    assert d.verdict == "confirmed" and d.rule == "constant.attn-scale"
    assert d.after < 1e-4 < d.before
    assert "→" in d.evidence


def test_stages_after_the_origin_are_reported_as_inherited(tiny_golden, tmp_path):
    result = run(tiny_golden, NumpyBackend("fp32", inject="gelu-erf"), tmp_path)
    case = result.cases[0]
    later = case.stage("blocks.0.mlp.out")
    assert not later.fails_local, "mlp.out only inherits the GELU error"
    assert later.amplification is not None and later.amplification > 10


def test_tolerance_override_file(tiny_golden, tmp_path):
    bug = run(tiny_golden, NumpyBackend("fp32", inject="gelu-erf"), tmp_path)
    assert not bug.passed
    toml = tmp_path / "tol.toml"
    toml.write_text('[stages."blocks.*.mlp.act"]\nlocal = 1.0\n[stages."*"]\nchained = 10.0\n')
    loose = run(tiny_golden, NumpyBackend("fp32", inject="gelu-erf"), tmp_path, tolerance=str(toml))
    assert loose.passed
    bad = tmp_path / "bad.toml"
    bad.write_text("[stages\n")
    with pytest.raises(TracerError, match="invalid TOML"):
        Tolerances.parse(str(bad))
    with pytest.raises(TracerError, match="unknown tolerance"):
        Tolerances.parse("fp33")


def test_trace_from_another_golden_is_refused(tiny_golden, tiny_loaded, tmp_path):
    other = tmp_path / "other.h5"
    record_golden(tiny_loaded, build_cases(tiny_loaded, ["different prompt"], [], batch=False), str(other),
                  dtype="fp32", attn="eager")
    trace = tmp_path / "t.h5"
    replay(other, NumpyBackend("fp32"), trace)
    with StageFile.open(tiny_golden) as g, StageFile.open(trace) as t:
        with pytest.raises(TracerError, match="another golden"):
            compare(g, t, CompareOptions(Tolerances()))


def test_json_roundtrip_keeps_the_verdict(tiny_golden, tmp_path):
    result = run(tiny_golden, NumpyBackend("fp32", inject="skip-ln-f"), tmp_path)
    path = tmp_path / "r.json"
    result.to_json(path)
    back = CompareResult.load(path)
    assert back.to_dict() == result.to_dict()
    assert back.origin == {"case": "case0", "stage": "final.ln"}


class HalfGeluBackend(NumpyBackend):
    """An fp32 engine whose GELU reads a float16 table (fp16 in, fp16 out), like ggml's CPU GELU."""

    name = "numpy-half-gelu"

    def __init__(self, precision: str = "fp32", inject: str | None = None, declare: bool = True):
        super().__init__(precision, inject)
        gelu = self.ops.gelu
        half = lambda x: x.astype(np.float16).astype(x.dtype)  # noqa: E731
        self.ops = replace(self.ops, gelu=lambda x: half(gelu(half(x))))
        self.stage_precisions = {"blocks.*.mlp.act": "fp16"} if declare else {}


def test_a_stage_precision_the_backend_declares_is_judged_at_that_precision(tiny_golden, tmp_path):
    undeclared = run(tiny_golden, HalfGeluBackend(declare=False), tmp_path)
    assert not undeclared.passed and undeclared.cases[0].origin == "blocks.0.mlp.act"
    assert undeclared.cases[0].stage("blocks.0.mlp.act").diagnoses[0].rule.startswith("precision."), \
        undeclared.cases[0].stage("blocks.0.mlp.act").diagnoses
    declared = run(tiny_golden, HalfGeluBackend(), tmp_path)
    assert declared.passed, [(s.stage, s.status) for c in declared.cases for s in c.stages if s.failed]
    fc = declared.cases[0].stage("blocks.0.mlp.fc")
    assert fc.local_tolerance < declared.cases[0].stage("blocks.0.mlp.act").local_tolerance / 100  # fp32 elsewhere
    bug = run(tiny_golden, HalfGeluBackend(inject="mask-off-by-one"), tmp_path)
    assert bug.cases[0].origin == "blocks.0.attn.scores"


def test_checks_in_blocks_give_the_whole_stage_results(tiny_golden, tmp_path, monkeypatch):
    """Blocks of tokens (and of the vocabulary for the logits) bound the comparison's memory; they
    must not change a number: forced on every stage of the tiny model, errors and tolerances match."""
    import tracer.compare.metrics as metrics

    whole = run(tiny_golden, NumpyBackend("fp32", inject="drop-fc-bias"), tmp_path)
    monkeypatch.setattr(metrics, "ROW_BLOCK", 64)
    blocks = run(tiny_golden, NumpyBackend("fp32", inject="drop-fc-bias"), tmp_path)
    assert blocks.cases[0].origin == whole.cases[0].origin == "blocks.0.mlp.fc"
    assert blocks.cases[0].stage("blocks.0.mlp.fc").diagnoses[0].rule == "param.bias.dropped"
    # Element-wise stages of one input see the same jitter, drawn in the same order: the same noise. A
    # product's float32 noise twin rounds differently on one row (a GEMV) than on many (a GEMM): there
    # only the verdicts must agree (with real block sizes, of many rows, benchmarks.equivalence finds
    # every tolerance within 1%).
    single_input = ("ln1", "ln2", "final.ln", "mlp.act")
    for a, b in zip(whole.cases[0].stages, blocks.cases[0].stages):
        assert a.status == b.status, a.stage
        assert a.error == pytest.approx(b.error, rel=1e-6, abs=1e-12), a.stage
        assert a.metrics.mismatch_pct == pytest.approx(b.metrics.mismatch_pct), a.stage
        assert a.metrics.cosine == pytest.approx(b.metrics.cosine, abs=1e-12), a.stage
        if a.stage.endswith(single_input):
            assert a.local_error == pytest.approx(b.local_error, rel=1e-6, abs=1e-12), a.stage
            assert a.local_tolerance == pytest.approx(b.local_tolerance, rel=1e-6), a.stage


def test_attention_checked_in_blocks_of_queries_gives_the_whole_stage_errors(tiny_golden, tmp_path, monkeypatch):
    """Scores and probs are checked a block of query rows at a time against the keys before the
    block's end, ctx against those keys where the candidate's probs are zero beyond. A mask one key
    ahead puts weight past every block's end: the blocked errors must still be the whole-stage ones."""
    import tracer.compare.metrics as metrics

    for inject in (None, "mask-off-by-one"):
        whole = run(tiny_golden, NumpyBackend("fp32", inject=inject), tmp_path)
        monkeypatch.setattr(metrics, "ROW_BLOCK", 64)
        blocks = run(tiny_golden, NumpyBackend("fp32", inject=inject), tmp_path)
        monkeypatch.undo()
        assert blocks.passed == whole.passed and blocks.cases[0].origin == whole.cases[0].origin
        for case_w, case_b in zip(whole.cases, blocks.cases):
            for a, b in zip(case_w.stages, case_b.stages):
                if a.stage.endswith(("attn.scores", "attn.probs", "attn.ctx")):
                    assert a.status == b.status, (case_w.case, a.stage)
                    assert a.local_error == pytest.approx(b.local_error, rel=1e-6, abs=1e-12), (case_w.case, a.stage)
                    if not a.stage.endswith("attn.probs"):  # probs: float32 sums over rows of other lengths
                        assert a.local_tolerance == pytest.approx(b.local_tolerance, rel=1e-6), (case_w.case, a.stage)
    assert whole.cases[0].stage("blocks.0.attn.scores").local_error == float("inf")  # the mask bug, seen blocked too


def test_a_block_quantized_product_is_judged_as_one(tiny_golden, tmp_path, monkeypatch):
    """ggml's q8_0 matmuls quantize weights and activations to blocks of 32: declared, every product is
    judged against a twin that quantizes the same way and passes; undeclared, the first product fails
    and diagnosis names the quantization."""
    import backends.numpy_backend as numpy_backend
    from tracer.compare.tolerance import quantize_blocks

    def q8_linear(x, w, b):
        y = (quantize_blocks(x, "q8_0") @ quantize_blocks(w, "q8_0", axis=0)).astype(np.float32)
        return y + b if b is not None else y

    monkeypatch.setattr(numpy_backend, "linear", q8_linear)
    products = {s: "q8_0" for s in ("blocks.*.attn.qkv", "blocks.*.attn.out", "blocks.*.mlp.fc", "blocks.*.mlp.out",
                                     "logits")}
    declared = NumpyBackend()
    declared.stage_precisions = products
    result = run(tiny_golden, declared, tmp_path)
    assert result.passed, [(s.stage, s.status) for c in result.cases for s in c.stages if s.failed]
    undeclared = run(tiny_golden, NumpyBackend(), tmp_path)
    assert undeclared.cases[0].origin == "blocks.0.attn.qkv"
    rules = [d.rule for d in undeclared.cases[0].stage("blocks.0.attn.qkv").diagnoses]
    assert rules[0] == "precision.inputs-q8_0", rules
