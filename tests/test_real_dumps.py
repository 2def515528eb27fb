"""Verdicts on dumps as real ports write them: incomplete, in their own layouts and dtypes.

Each test reproduces a symptom seen on dumps of independent ports: a correct dump without q/k/v
or embed.pos must pass (no drift charged as introduced), a padded or permuted stage must be lined
up or refused (never a crash, never a reshape by element count), coverage must be visible, and a
broken golden is never a pass. The dumps are written from a correct NumPy replay through its tap,
then edited the way ports differ.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from backends.numpy_backend import NumpyBackend
from tracer.compare.result import CompareResult
from tracer.compare.run import CompareRequest, run_compare
from tracer.errors import TracerError
from tracer.store import Golden

C_PORT_LACKS = ("attn.q", "attn.k", "attn.v", "embed.pos")
Edit = Callable[[str, np.ndarray], np.ndarray | None]


def write_dump(golden: Path, out: Path, *, leave_out=C_PORT_LACKS, edit: Edit | None = None,
               dtype=np.float32, case: str = "case0") -> Path:
    """A directory of `<stage>.npy` from a correct fp32 NumPy replay, leaving out stages whose name ends
    with one of `leave_out`; `edit(stage, value)` may return another array to save instead."""
    out.mkdir(parents=True, exist_ok=True)
    with Golden.open(golden) as g:
        backend = NumpyBackend("fp32")
        backend.prepare(g.weights(), g.model_config)
        view = g.case(case)

        def tap(stage: str, value: np.ndarray) -> np.ndarray:
            if not stage.endswith(tuple(leave_out)):
                saved = edit(stage, value) if edit else None
                np.save(out / f"{stage}.npy", (value if saved is None else saved).astype(dtype))
            return value

        backend.forward(view.input_ids, tap, attention_mask=view.attention_mask)
    return out


def compare_dump(golden: Path, dump: Path, case: str = "case0", **kw) -> CompareResult:
    return run_compare(CompareRequest(golden, dump, case=case, quiet=True, **kw))


def worst_share(result: CompareResult) -> float:
    """The largest error / tolerance over both checks and every stage."""
    shares = [s.error / s.tolerance for c in result.cases for s in c.stages if s.error is not None]
    shares += [s.local_error / s.local_tolerance for c in result.cases for s in c.stages
               if s.local_error is not None]
    return max(shares)


def masked_scores_never_written(stage: str, value: np.ndarray) -> np.ndarray | None:
    """A C port's score buffer from calloc: the masked entries were never written, so they hold 0."""
    return np.where(np.isneginf(value), 0.0, value) if stage.endswith("attn.scores") else None


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("golden_name", ["tiny_golden", "gpt2_shape_golden"])
def test_correct_dump_without_qkv_and_pos_passes(golden_name, dtype, request, tmp_path):
    golden = request.getfixturevalue(golden_name)
    dump = write_dump(golden, tmp_path / "dump", edit=masked_scores_never_written, dtype=dtype)
    result = compare_dump(golden, dump)
    assert result.passed, [(s.stage, s.status, s.local_source) for c in result.cases for s in c.stages if s.failed]
    assert worst_share(result) <= 0.5
    case = result.cases[0]
    assert case.stage("blocks.0.attn.q").derived and case.stage("embed.pos").derived
    assert case.stage("blocks.0.attn.scores").inputs == {"blocks.0.attn.q": "derived", "blocks.0.attn.k": "derived"}
    assert case.coverage["derived"] and not case.coverage["missing"]


def test_float64_dump_of_fp32_values_is_judged_as_fp32(tiny_golden, tmp_path):
    result = compare_dump(tiny_golden, write_dump(tiny_golden, tmp_path / "d", dtype=np.float64))
    assert "judged as an fp32 port" in result.tolerance


def test_truly_absent_inputs_allow_the_inherited_drift(gpt2_shape_golden, tmp_path):
    """No ln1 and no ctx in the dump: qkv and attn.out are checked with the golden's ln1/ctx standing in,
    and allowed the drift a correct port inherits there (measured by the oracle)."""
    dump = write_dump(gpt2_shape_golden, tmp_path / "d", leave_out=(*C_PORT_LACKS, "ln1", "attn.ctx"))
    result = compare_dump(gpt2_shape_golden, dump)
    assert result.passed
    qkv = result.cases[0].stage("blocks.1.attn.qkv")
    assert qkv.inputs == {"blocks.1.ln1": "golden"} and qkv.local_inherited is not None
    assert "golden blocks.1.ln1" in qkv.local_source


def test_bug_behind_an_absent_input_is_still_found(gpt2_shape_golden, tmp_path):
    """The allowance for inherited drift must not hide a real bug in the stage it protects."""
    def fc_bias_twice(stage, value):
        return value + 0.05 * np.abs(value).max() if stage == "blocks.1.mlp.fc" else None
    dump = write_dump(gpt2_shape_golden, tmp_path / "d", leave_out=(*C_PORT_LACKS, "ln2"), edit=fc_bias_twice)
    result = compare_dump(gpt2_shape_golden, dump)
    assert not result.passed and result.origin["stage"] == "blocks.1.mlp.fc"


def test_padded_vocab_logits_are_trimmed_not_a_crash(gpt2_shape_golden, tmp_path):
    def pad(stage, value):
        return np.pad(value, [(0, 0), (0, 0), (0, 50304 - value.shape[-1])]) if stage == "logits" else None
    result = compare_dump(gpt2_shape_golden, write_dump(gpt2_shape_golden, tmp_path / "d", edit=pad))
    logits = result.cases[0].stage("logits")
    assert result.passed and logits.status == "pass"
    assert "padded to 50304" in logits.note


def test_wrong_size_stage_is_a_shape_mismatch_with_reasoning(tiny_golden, tmp_path):
    def cut(stage, value):
        return value[..., :-3] if stage == "blocks.0.mlp.fc" else None
    result = compare_dump(tiny_golden, write_dump(tiny_golden, tmp_path / "d", edit=cut))
    fc = result.cases[0].stage("blocks.0.mlp.fc")
    assert fc.status == "shape-mismatch" and "no axis permutation" in fc.note
    assert result.exit_code == 1 and result.cases[0].origin == "blocks.0.mlp.fc"
    assert "cannot be lined up" in result.cases[0].origin_reasoning


def test_scores_in_another_layout_are_lined_up_by_their_values(gpt2_shape_golden, tmp_path):
    """[T,T,H] scores (no batch axis, heads last) hold a permutation that only the values can pick:
    query and key axes have the same length."""
    def tth(stage, value):
        return value[0].transpose(1, 2, 0) if stage.endswith(("attn.scores", "attn.probs")) else None
    result = compare_dump(gpt2_shape_golden, write_dump(gpt2_shape_golden, tmp_path / "d", edit=tth))
    assert result.passed
    note = result.cases[0].stage("blocks.0.attn.probs").note
    assert "no batch axis" in note and "axes permuted [0, 3, 1, 2]" in note


def test_scores_in_a_layout_with_a_bug_are_still_lined_up_and_diagnosed(gpt2_shape_golden, tmp_path):
    def tth_unscaled(stage, value):
        if stage == "blocks.0.attn.scores":
            return (value * 8.0)[0].transpose(1, 2, 0)
        return value[0].transpose(1, 2, 0) if stage.endswith(("attn.scores", "attn.probs")) else None
    result = compare_dump(gpt2_shape_golden, write_dump(gpt2_shape_golden, tmp_path / "d", edit=tth_unscaled))
    scores = result.cases[0].stage("blocks.0.attn.scores")
    assert result.cases[0].origin == "blocks.0.attn.scores"
    assert "axes permuted" in scores.note
    assert scores.diagnoses[0].rule == "constant.attn-scale", scores.diagnoses


def test_same_element_count_is_never_reshaped(tiny_golden, tmp_path):
    def flatten_heads(stage, value):  # [B,H,T,T] -> [H, T*T]: same count, not a layout of the tensor
        return value[0].reshape(value.shape[1], -1) if stage == "blocks.0.attn.probs" else None
    result = compare_dump(tiny_golden, write_dump(tiny_golden, tmp_path / "d", edit=flatten_heads))
    assert result.cases[0].stage("blocks.0.attn.probs").status == "shape-mismatch"
    assert not any(d.rule == "generic.overflow" for c in result.cases for s in c.stages for d in s.diagnoses)


def test_a_dump_of_only_logits_says_it_cannot_localize(tiny_golden, tmp_path, run_cli):
    dump = tmp_path / "d"
    dump.mkdir()
    with Golden.open(tiny_golden) as g:
        np.save(dump / "logits.npy", g.case("case0").read("logits"))
    result = compare_dump(tiny_golden, dump)
    cov = result.cases[0].coverage
    assert result.passed and cov["compared"] == 1 and cov["share"] < 0.05
    assert "cannot be localized" in cov["note"]
    code, out, _ = run_cli("compare", tiny_golden, dump, "--case", "case0")
    assert code == 0 and "coverage 1 of 35" in " ".join(out.split()) and "cannot be" in out
    code, out, _ = run_cli("compare", tiny_golden, dump, "--case", "case0", "--require", "all")
    assert code == 1


def test_missing_stage_is_named_and_require_makes_it_fail(tiny_golden, tmp_path, run_cli):
    dump = write_dump(tiny_golden, tmp_path / "d", leave_out=("blocks.1.mlp.act",))
    result = compare_dump(tiny_golden, dump)
    assert result.passed and result.cases[0].coverage["missing"] == ["blocks.1.mlp.act"]
    code, out, _ = run_cli("compare", tiny_golden, dump, "--case", "case0")
    assert code == 0 and "missing: blocks.1.mlp.act" in " ".join(out.split())
    strict = compare_dump(tiny_golden, dump, require="blocks.*.mlp.*")
    assert not strict.passed and strict.cases[0].stage("blocks.1.mlp.act").required
    with pytest.raises(TracerError, match="no stage for --require matches"):
        compare_dump(tiny_golden, dump, require="blocks.*.nope")


def test_misnamed_array_is_listed_in_the_report(tiny_golden, tmp_path, run_cli):
    dump = write_dump(tiny_golden, tmp_path / "d")
    (dump / "blocks.1.mlp.out.npy").rename(dump / "blocks.1.mlp_out.npy")
    code, out, err = run_cli("compare", tiny_golden, dump, "--case", "case0")
    assert "blocks.1.mlp_out" in out and "blocks.1.mlp_out" in err
    assert "missing: blocks.1.mlp.out" in " ".join(out.split())


def golden_with(golden: Path, out: Path, stage: str, edit: Callable[[np.ndarray], None]) -> Path:
    """A copy of `golden` whose case0 `stage` was edited in place (checksum recomputed: a bad recording,
    not a corrupt file)."""
    from tracer.store import content_hash

    out.write_bytes(golden.read_bytes())
    with h5py.File(out, "r+") as f:
        group = f["cases/case0/stages"]
        data, attrs = group[stage][()], dict(group[stage].attrs)
        edit(data)
        del group[stage]
        group.create_dataset(stage, data=data).attrs.update({**attrs, "xxh3": content_hash(data)})
    return out


def test_nonfinite_golden_stage_is_never_a_pass(tiny_golden, tmp_path):
    def nan(data):
        data[0, 1, :5] = np.nan
    broken = golden_with(tiny_golden, tmp_path / "broken.h5", "blocks.0.mlp.act", nan)
    dump = write_dump(tiny_golden, tmp_path / "d")
    result = compare_dump(broken, dump)
    act = result.cases[0].stage("blocks.0.mlp.act")
    assert act.status == "golden-nonfinite" and "golden itself" in act.note
    assert not result.passed and result.exit_code == 1


def test_inspect_flags_a_nonfinite_golden_stage(tiny_golden, tmp_path, run_cli):
    def inf(data):
        data[0, 0, 0] = np.inf
    broken = golden_with(tiny_golden, tmp_path / "broken.h5", "blocks.0.ln2", inf)
    code, out, _ = run_cli("inspect", broken, "--stage", "blocks.0.*")
    flagged = [line for line in out.splitlines() if "NaN/Inf" in line]
    assert code == 0 and len(flagged) == 1 and "1 NaN/Inf" in flagged[0]


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_golden_stored_narrow_still_judges_right(storage, tiny_loaded, tmp_path):
    """A golden stored in fp16/bf16 carries storage rounding: the oracle measures its drift against the
    stored values, so a correct port passes and a real bug is still found."""
    from tracer.record import build_cases, record_golden
    from tracer.store import DatasetOptions

    golden = tmp_path / f"{storage}.h5"
    record_golden(tiny_loaded, build_cases(tiny_loaded, ["Stored narrow"], [], batch=False), str(golden),
                  dtype="fp32", attn="eager", options=DatasetOptions.parse("none", storage))
    assert run_compare(CompareRequest(golden, backend="numpy", mode="chained", quiet=True)).passed
    buggy = run_compare(CompareRequest(golden, backend="numpy", inject="gelu-erf", mode="chained", quiet=True))
    assert buggy.origin["stage"] == "blocks.0.mlp.act"
