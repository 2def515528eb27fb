"""Foreign dumps (.npz, .safetensors, .npy directories) converted into native traces (SPEC §4)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tracer.errors import TracerError
from tracer.foreign import convert_layout, import_foreign, is_foreign, load_name_map, open_trace_any
from tracer.models import LoadedModel
from tracer.record import build_cases, record_golden
from tracer.stages import canonical_stages, stage_order
from tracer.store import Golden, Trace

PROMPT = "Foreign dumps!"  # T = 14: differs from H = 4 and D = 16, so a missed transpose shows as a shape


def record_tiny_golden(loaded: LoadedModel, out: Path, prompts: list[str], batch: bool = False) -> Path:
    """A golden of the tiny model (fp32, eager) with one case per prompt (or one batch case)."""
    record_golden(loaded, build_cases(loaded, prompts, [], batch=batch), str(out), dtype="fp32", attn="eager")
    return out


def golden_stages(path: Path, case: str = "case0") -> dict[str, np.ndarray]:
    with Golden.open(path) as g:
        view = g.case(case)
        return {s: view.read(s) for s in view.stages()}


def transformerlens_dump(stages: dict[str, np.ndarray], n_layer: int) -> dict[str, np.ndarray]:
    """The golden's tensors under TransformerLens hook names and TransformerLens layouts."""
    bthd = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - [B,H,T,D] -> [B,T,H,D]
    dump = {"hook_embed": stages["embed.tok"], "hook_pos_embed": stages["embed.pos"],
            "ln_final.hook_scale": np.ones((1, 1, 1), np.float32),
            "ln_final.hook_normalized": stages["final.ln"], "logits": stages["logits"]}
    for i in range(n_layer):
        s = {k.split(".", 2)[2]: v for k, v in stages.items() if k.startswith(f"blocks.{i}.")}
        B, H, T, D = s["attn.q"].shape
        dump |= {
            f"blocks.{i}.hook_resid_pre": stages["embed.sum"] if i == 0 else stages[f"blocks.{i - 1}.resid_post"],
            f"blocks.{i}.ln1.hook_scale": np.ones((B, T, 1), np.float32),
            f"blocks.{i}.ln1.hook_normalized": s["ln1"],
            f"blocks.{i}.attn.hook_q": bthd(s["attn.q"]),
            f"blocks.{i}.attn.hook_k": bthd(s["attn.k"]),
            f"blocks.{i}.attn.hook_v": bthd(s["attn.v"]),
            f"blocks.{i}.attn.hook_attn_scores": s["attn.scores"],
            f"blocks.{i}.attn.hook_pattern": s["attn.probs"],
            f"blocks.{i}.attn.hook_z": s["attn.ctx"].reshape(B, T, H, D),
            f"blocks.{i}.hook_attn_out": s["attn.out"],
            f"blocks.{i}.hook_resid_mid": s["resid_mid"],
            f"blocks.{i}.ln2.hook_normalized": s["ln2"],
            f"blocks.{i}.mlp.hook_pre": s["mlp.fc"],
            f"blocks.{i}.mlp.hook_post": s["mlp.act"],
            f"blocks.{i}.hook_mlp_out": s["mlp.out"],
            f"blocks.{i}.hook_resid_post": s["resid_post"],
        }
    return dump


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_loaded) -> Path:
    return record_tiny_golden(tiny_loaded, tmp_path_factory.mktemp("foreign") / "one.h5", [PROMPT])


@pytest.fixture(scope="module")
def stages(golden) -> dict[str, np.ndarray]:
    return golden_stages(golden)


def import_to(tmp_path: Path, golden_path: Path, dump: Path, **kw) -> tuple[dict[str, np.ndarray], dict, list[str]]:
    """Import `dump`, then read the trace back: (stages, root attrs, warnings)."""
    warned: list[str] = []
    out = tmp_path / "trace.h5"
    with Golden.open(golden_path) as g:
        import_foreign(dump, g, out, warn=warned.append, **kw)
    with Trace.open(out) as t:
        (case,) = t.case_names()
        view = t.case(case)
        for s in view.stages():
            assert view.dataset(s).attrs["order"] == stage_order(t.n_layer)[s]
        return {s: view.read(s) for s in view.stages()}, {**t.attrs, "case": case, "ids": view.input_ids}, warned


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], names) -> None:
    for name in names:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        assert np.array_equal(got[name], want[name]), name  # -inf of masked scores compares equal


def test_transformerlens_npz_becomes_the_golden(tmp_path, golden, stages) -> None:
    n_layer = 2
    np.savez(tmp_path / "tl.npz", **transformerlens_dump(stages, n_layer))
    got, attrs, warned = import_to(tmp_path, golden, tmp_path / "tl.npz", name_map="transformerlens")
    expected = [s for s in canonical_stages(n_layer) if not s.endswith("attn.qkv")]  # TL has no fused qkv
    assert list(got) == expected
    assert_same(got, stages, expected)
    assert warned == []
    with Golden.open(golden) as g:
        assert attrs["golden_id"] == g.golden_id and attrs["model_config"] == g.model_config
        assert np.array_equal(attrs["ids"], g.case("case0").input_ids)
    assert (attrs["kind"], attrs["backend"], attrs["mode"], attrs["dtype"]) == ("trace", "foreign:tl.npz",
                                                                                "chained", "fp32")


def test_safetensors_and_npy_directory_with_canonical_names(tmp_path, golden, stages) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in stages.items()}, str(tmp_path / "port.safetensors"))
    got, attrs, _ = import_to(tmp_path, golden, tmp_path / "port.safetensors")
    assert_same(got, stages, stages)
    assert attrs["backend"] == "foreign:port.safetensors"

    npy = tmp_path / "npy"
    npy.mkdir()
    for name in ("embed.sum", "blocks.1.attn.probs", "logits"):
        np.save(npy / f"{name}.npy", stages[name])
    (tmp_path / "trace.h5").unlink()
    got, _, _ = import_to(tmp_path, golden, npy)
    assert list(got) == ["embed.sum", "blocks.1.attn.probs", "logits"]
    assert_same(got, stages, got)


def test_squeezed_batch_axis_is_added_back_and_other_shapes_are_kept(tmp_path, golden, stages) -> None:
    dump = {name: stages[name][0] for name in ("embed.pos", "blocks.0.ln1", "blocks.0.attn.scores", "logits")}
    dump["blocks.0.mlp.fc"] = stages["blocks.0.mlp.fc"][0].T  # [4C,T]: nothing to infer, kept as given
    np.savez(tmp_path / "b1.npz", **dump)
    got, _, _ = import_to(tmp_path, golden, tmp_path / "b1.npz")
    assert_same(got, stages, ["embed.pos", "blocks.0.ln1", "blocks.0.attn.scores", "logits"])
    assert got["blocks.0.mlp.fc"].shape == stages["blocks.0.mlp.fc"][0].T.shape


def test_masked_scores_integers_and_nan_are_stored_as_given(tmp_path, golden, stages) -> None:
    scores = np.where(np.isneginf(stages["blocks.0.attn.scores"]), np.float32(-1e9), stages["blocks.0.attn.scores"])
    act = stages["blocks.0.mlp.act"].copy()
    act[0, 3, 5] = np.nan
    ids = np.arange(12, dtype=np.int32).reshape(1, 12)
    np.savez(tmp_path / "odd.npz", **{"blocks.0.attn.scores": scores, "blocks.0.mlp.act": act, "embed.tok": ids})
    got, _, _ = import_to(tmp_path, golden, tmp_path / "odd.npz")
    assert np.array_equal(got["blocks.0.attn.scores"], scores)
    assert np.isnan(got["blocks.0.mlp.act"][0, 3, 5]) and np.array_equal(got["blocks.0.mlp.act"], act, equal_nan=True)
    assert got["embed.tok"].dtype == np.int32 and np.array_equal(got["embed.tok"], ids)


def test_layouts_split_width_into_heads_and_merge_heads(tmp_path, golden, stages) -> None:
    q = stages["blocks.1.attn.q"]
    B, H, T, D = q.shape
    (tmp_path / "m.toml").write_text(
        '[names]\n'
        '"q{i}" = { stage = "blocks.{i}.attn.q", layout = "tc" }\n'  # [T,C] per token, batch squeezed
        '"z.{i}" = { stage = "blocks.{i}.attn.ctx", layout = "HTD" }\n'
        '"k.{i}" = { stage = "blocks.{i}.attn.k", layout = "THD" }\n')
    np.savez(tmp_path / "l.npz", q1=q[0].transpose(1, 0, 2).reshape(T, H * D),
             **{"z.0": stages["blocks.0.attn.ctx"][0].reshape(T, H, D).transpose(1, 0, 2),
                "k.0": stages["blocks.0.attn.k"][0].transpose(1, 0, 2)})
    got, _, _ = import_to(tmp_path, golden, tmp_path / "l.npz", name_map=tmp_path / "m.toml")
    assert_same(got, stages, ["blocks.0.attn.k", "blocks.0.attn.ctx", "blocks.1.attn.q"])


def test_convert_layout_refuses_axes_that_do_not_match() -> None:
    with pytest.raises(ValueError):
        convert_layout(np.zeros((2, 3, 4)), "BTC", "BHTD", n_head=3)  # 4 channels do not split into 3 heads
    with pytest.raises(ValueError):
        convert_layout(np.zeros((2, 3)), "BTHD", "BTC", n_head=2)


def test_pycandle_names_map_through_the_hf_alias_table(tmp_path, golden, stages) -> None:
    dump = {"model_input.0": np.zeros((1, 14), np.float32),
            "transformer.wte.out.0": stages["embed.tok"],
            "transformer.drop.out.0": stages["embed.sum"],
            "transformer.h.0.ln_1.in.0": stages["embed.sum"],
            "transformer.h.0.attn.out.0": stages["blocks.0.attn.out"],  # same tensor as c_proj's output
            "transformer.h.0.attn.c_proj.out.0": stages["blocks.0.attn.out"],
            "transformer.h.0.attn.c_proj.in.0": stages["blocks.0.attn.ctx"],
            "transformer.h.0.attn.out.1": stages["blocks.0.attn.probs"],
            "h.1.ln_2.in.0": stages["blocks.1.resid_mid"],  # candle / GPT2Model paths: no "transformer."
            "h.1.mlp.c_fc": stages["blocks.1.mlp.fc"],
            "ln_f.out.0": stages["final.ln"],
            "lm_head.out.0": stages["logits"]}
    save_file({k: np.ascontiguousarray(v) for k, v in dump.items()}, str(tmp_path / "m_trace.safetensors"))
    got, _, warned = import_to(tmp_path, golden, tmp_path / "m_trace.safetensors", name_map="pycandle")
    assert list(got) == ["embed.tok", "embed.sum", "blocks.0.attn.probs", "blocks.0.attn.ctx", "blocks.0.attn.out",
                         "blocks.1.resid_mid", "blocks.1.mlp.fc", "final.ln", "logits"]
    assert_same(got, stages, got)
    assert warned == []


def test_multi_case_golden_needs_the_case(tmp_path, tiny_golden) -> None:
    case1 = golden_stages(tiny_golden, "case1")
    np.savez(tmp_path / "c.npz", **{"embed.sum": case1["embed.sum"], "logits": case1["logits"]})
    with Golden.open(tiny_golden) as g, pytest.raises(TracerError, match="--case"):
        import_foreign(tmp_path / "c.npz", g, tmp_path / "trace.h5")
    with Golden.open(tiny_golden) as g, pytest.raises(TracerError, match="no case 'case7'"):
        import_foreign(tmp_path / "c.npz", g, tmp_path / "trace.h5", case="case7")
    assert not (tmp_path / "trace.h5").exists()
    got, attrs, _ = import_to(tmp_path, tiny_golden, tmp_path / "c.npz", case="case1")
    assert attrs["case"] == "case1"
    assert_same(got, case1, ["embed.sum", "logits"])
    with Golden.open(tiny_golden) as g:
        assert np.array_equal(attrs["ids"], g.case("case1").input_ids)


def test_no_canonical_name_is_an_error_that_shows_the_names(tmp_path, golden, stages) -> None:
    np.savez(tmp_path / "x.npz", **{"layer0/ln": stages["blocks.0.ln1"], "layer0/q": stages["blocks.0.attn.q"]})
    with Golden.open(golden) as g, pytest.raises(TracerError, match=r"layer0/ln.*--name-map"):
        import_foreign(tmp_path / "x.npz", g, tmp_path / "trace.h5")
    assert not (tmp_path / "trace.h5").exists()


def test_unknown_names_are_warned_once_and_left_out(tmp_path, golden, stages) -> None:
    np.savez(tmp_path / "u.npz", **{"logits": stages["logits"], "my.thing": stages["logits"],
                                    "blocks.5.ln1": stages["blocks.0.ln1"]})  # block 5 of a 2-layer model
    got, _, warned = import_to(tmp_path, golden, tmp_path / "u.npz")
    assert list(got) == ["logits"]
    assert len(warned) == 1 and "my.thing" in warned[0] and "blocks.5.ln1" in warned[0]


@pytest.mark.parametrize("content", [b"this is not a zip archive", "truncated"])
def test_corrupt_npz_is_one_line_error_and_leaves_nothing(tmp_path, golden, stages, content) -> None:
    bad = tmp_path / "x.npz"
    if content == "truncated":
        np.savez(bad, logits=stages["logits"])
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_bytes(content)
    with Golden.open(golden) as g, pytest.raises(TracerError, match=r"x\.npz is not a valid \.npz file") as exc:
        import_foreign(bad, g, tmp_path / "trace.h5")
    assert "\n" not in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["x.npz"]


def test_corrupt_member_leaves_no_output(tmp_path, golden, stages) -> None:
    good = tmp_path / "g.npz"
    np.savez(good, **{"embed.sum": stages["embed.sum"], "logits": stages["logits"]})
    raw = bytearray(good.read_bytes())
    at = raw.index(b"logits.npy") + 200  # inside the second member's data: its CRC no longer matches
    raw[at:at + 8] = b"\xff" * 8
    good.write_bytes(bytes(raw))
    with Golden.open(golden) as g, pytest.raises(TracerError, match="cannot read array 'logits'"):
        import_foreign(good, g, tmp_path / "trace.h5")
    assert sorted(os.listdir(tmp_path)) == ["g.npz"]


def test_bfloat16_safetensors_is_a_one_line_error(tmp_path, golden) -> None:
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch({"logits": torch.zeros(1, 14, 256, dtype=torch.bfloat16)}, str(tmp_path / "bf.safetensors"))
    with Golden.open(golden) as g, pytest.raises(TracerError, match="'logits'.*save such tensors as float32"):
        import_foreign(tmp_path / "bf.safetensors", g, tmp_path / "trace.h5")
    assert sorted(os.listdir(tmp_path)) == ["bf.safetensors"]


@pytest.mark.parametrize("entry, message", [
    ('"a" = "blocks.{i}.attn.qq"', "not a canonical stage"),
    ('"a{i}" = { stage = "blocks.{i}.attn.q", layout = "BTXD" }', "distinct letters"),
    ('"a{i}" = { stage = "blocks.{i}.attn.q", layout = "BTC2" }', "distinct letters"),
    ('"a{i}" = { stage = "blocks.{i}.ln1", layout = "BTHS" }', "does not hold the axes"),
    ('"a" = "blocks.{i}.ln1"', "no {i}"),
    ('"a" = 3', "expected a stage name"),
])
def test_name_map_mistakes_are_reported(tmp_path, entry, message) -> None:
    (tmp_path / "m.toml").write_text(f"[names]\n{entry}\n")
    with pytest.raises(TracerError, match=message):
        load_name_map(tmp_path / "m.toml")


def test_shipped_maps_load_and_missing_map_lists_them(tmp_path) -> None:
    for name in ("transformerlens", "pycandle"):
        assert load_name_map(name).patterns
    with pytest.raises(TracerError, match="shipped maps: .*transformerlens"):
        load_name_map(tmp_path / "nope.toml")


def test_open_trace_any_converts_to_a_temporary_trace(tmp_path, golden, stages) -> None:
    np.savez(tmp_path / "d.npz", **{"logits": stages["logits"][0]})
    with Golden.open(golden) as g:
        trace, cleanup = open_trace_any(tmp_path / "d.npz", g)
        temp = trace.path
        assert np.array_equal(trace.case("case0").read("logits"), stages["logits"])
        cleanup()
        assert not temp.exists() and not temp.parent.exists()
        native = tmp_path / "native.h5"
        import_foreign(tmp_path / "d.npz", g, native)
        trace, cleanup = open_trace_any(native, g)
        assert trace.path == native and trace.kind == "trace"
        cleanup()
        assert native.exists()


def test_is_foreign(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    assert not is_foreign(tmp_path / "d")
    np.save(tmp_path / "d" / "logits.npy", np.zeros(2))
    assert is_foreign(tmp_path / "d") and is_foreign("x.NPZ") and is_foreign("x.safetensors")
    assert not is_foreign("trace.h5")
