"""The comparator on independent ports (tests/ports): a C port with plain loops that dumps what such
ports have (no q/k/v, no embed.pos, masked scores never written), and a NumPy port in another author's
style read through its own name map. Correct ports pass well inside every tolerance; each bug of the
ports' own catalog (tests/ports/catalog.py, not `--inject`) is localized to the first stage its dump
shows it at and diagnosed with its cause, on the incomplete C dump and on the complete NumPy dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ports.catalog import CATALOG
from tests.ports.real_ports import run_c_port, run_numpy_style_port
from tests.test_real_dumps import worst_share
from tracer.compare.result import CompareResult
from tracer.compare.run import CompareRequest, run_compare

GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "tiny.h5"

# The diagnosis rules that name each bug's cause. A bug in a stage the dump lacks (the C port's q/k/v)
# shows at the first stage that reads it, as the wrong operand there or as the upstream stage's variant.
EXPECTED_RULES = {
    "gelu-coef": {"constant.gelu-cubic"},
    "wpe-offset": {"constant.pos-offset"},
    "ctx-head-major": {"heads.merge-layout"},
    "kv-swap": {"qkv.split-order", "operand", "upstream.qkv.split-order"},
    "v-from-k": {"qkv.split-order", "operand", "upstream.qkv.split-order"},
    "head-split-strided": {"heads.split-layout", "upstream.heads.split-layout"},
    "attn-scale-d": {"constant.attn-scale"},
    "mask-off-by-one": {"mask.off-by-one"},
    "fp16-scores": {"generic.low-precision", "precision.all-fp16"},
    "qkv-bias-missing": {"param.bias.dropped"},
    "bias-twice": {"param.bias.doubled"},
    "cproj-transposed": {"param.weight.transposed"},
    "ln-eps-1e-3": {"constant.ln-eps"},
    "ln1-prev-layer-weights": {"param.other-module"},
    "ln2-ln1-weights": {"param.other-module"},
    "ln2-block-input": {"operand"},
    "fp16-fc-out": {"generic.low-precision", "precision.all-fp16"},
    "lnf-no-beta": {"param.bias.dropped"},
    "logits-from-resid": {"operand"},
}
# Fitted constants are reported with the value the port used.
FITTED = {"gelu-coef": "0.04715", "wpe-offset": "+1", "attn-scale-d": "1/D", "ln-eps-1e-3": "0.001"}



def run_port(port: str, out: Path, **kw) -> CompareResult:
    if port == "c":
        dump, name_map = run_c_port(GOLDEN, out, case="case0", **kw), None
    else:
        dump, name_map = run_numpy_style_port(GOLDEN, out, case="case0", **kw)
    return run_compare(CompareRequest(GOLDEN, dump, case="case0", name_map=name_map, quiet=True))


def test_expectations_cover_the_catalog():
    assert set(EXPECTED_RULES) == {b.name for b in CATALOG}


@pytest.mark.parametrize("options", [{}, {"f64": True}, {"with_qkv": True, "with_pos": True},
                                     {"pad_vocab": 320, "scores_tth": True, "no_batch": True}],
                         ids=["default", "float64", "with-qkv-pos", "padded-tth-nobatch"])
def test_correct_c_port_passes(c_port, options, tmp_path):
    result = run_port("c", tmp_path / "d", **options)
    assert result.passed, [(s.stage, s.status, s.note) for c in result.cases for s in c.stages if s.failed]
    assert worst_share(result) <= 0.5
    if not options:
        assert {"blocks.0.attn.q", "embed.pos"} <= set(result.cases[0].coverage["derived"])


@pytest.mark.parametrize("f64", [False, True], ids=["fp32", "float64"])
def test_correct_numpy_style_port_passes(f64, tmp_path):
    result = run_port("numpy", tmp_path / "d", f64=f64)
    assert result.passed and worst_share(result) <= 0.5
    assert result.cases[0].coverage["compared"] == result.cases[0].coverage["stages"]


@pytest.mark.parametrize("port", ["c", "numpy"])
@pytest.mark.parametrize("bug", CATALOG, ids=lambda b: b.name)
def test_port_bug_is_localized_and_diagnosed(bug, port, request, tmp_path):
    if port == "c":
        request.getfixturevalue("c_port")
    result = run_port(port, tmp_path / "d", bug=bug.name)
    case = result.cases[0]
    dumped = [s.stage for s in case.stages if s.status != "missing" and not s.derived]
    compared = [s.stage for s in case.stages if s.status != "missing"]
    assert result.exit_code == 1
    # the first dumped stage that shows the bug, or a stage derived from the dump before it that shows it
    # (the position embedding derived as embed.sum − embed.tok), never a stage after it
    assert case.origin in {bug.introduced_at(2, dumped), bug.introduced_at(2, compared)}, case.origin_reasoning
    diagnoses = case.stage(case.origin).diagnoses
    assert diagnoses and diagnoses[0].rule in EXPECTED_RULES[bug.name], [(d.rule, d.bug) for d in diagnoses]
    assert len({d.verdict for d in diagnoses}) == 1, "a likely hypothesis rides along a confirmed one"
    if bug.name in FITTED:
        assert FITTED[bug.name] in diagnoses[0].bug
