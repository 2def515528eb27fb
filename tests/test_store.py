"""The HDF5 store: atomic writes, checksums that name the corrupt stage, format checks, lazy token reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from tracer.errors import TracerError
from tracer.record import build_cases, record_golden
from tracer.store import FORMAT_VERSION, CaseView, Golden, StageFile, StageWriter, Trace
from tracer.atomic import check_output_path

ATTRS = {"model_config": {"n_layer": 1, "n_embd": 4, "n_head": 2}, "weights_sha256": "w0", "dtype": "fp32"}


def write_small(path: Path, *, ids=((1, 2, 3),), attrs=ATTRS, force: bool = False, fail_with: BaseException | None = None,
                wte: np.ndarray = np.arange(8, dtype=np.float32).reshape(2, 4)):
    """A one-case golden written by hand; `fail_with` is raised after the first stage is written."""
    ids = np.array(ids, dtype=np.int64)
    with StageWriter(path, "golden", attrs, force=force) as w:
        w.write_weights({"transformer.wte.weight": wte}, {"lm_head.weight": "transformer.wte.weight"})
        w.begin_case("case0", ids, np.ones_like(ids), ["abc"])
        w.write_stage("case0", "embed.tok", np.ones((*ids.shape, 4), np.float32), order=0, hf_module="transformer.wte")
        if fail_with is not None:
            raise fail_with
        w.write_stage("case0", "embed.sum", np.full((*ids.shape, 4), 2.0, np.float32), order=2)
        w.link_module("case0", "transformer.drop", "embed.sum")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- atomic writes --------------------------------------------------------------------------

def test_clean_write_renames_the_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "g.h5"
    write_small(out)
    assert leftovers(tmp_path) == ["g.h5"]
    with Golden.open(out) as g:
        assert g.attrs["format_version"] == FORMAT_VERSION
        assert g.model_config == ATTRS["model_config"]
        assert g.case("case0").read("transformer.drop").tolist() == [[[2.0] * 4] * 3]
        assert g.weights()["lm_head.weight"].tolist() == g.weights()["transformer.wte.weight"].tolist()


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_midway_leaves_no_file(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "g.h5"
    with pytest.raises(type(error)):
        write_small(out, fail_with=error)
    assert leftovers(tmp_path) == []


def test_os_error_midway_is_a_tracer_error_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "g.h5"
    with pytest.raises(TracerError, match="cannot write .*: disk full$"):
        write_small(out, fail_with=OSError(28, "No space left on device"))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_rewrite_leaves_the_existing_file_untouched(tmp_path: Path, error: BaseException) -> None:
    out = tmp_path / "g.h5"
    write_small(out, ids=((7, 8),))
    before = out.read_bytes()
    with pytest.raises(type(error)):
        write_small(out, ids=((1, 2, 3, 4),), force=True, fail_with=error)
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == ["g.h5"]


def test_existing_file_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "g.h5"
    write_small(out, ids=((7, 8),))
    before = out.read_bytes()
    with pytest.raises(TracerError, match="already exists"):
        write_small(out)
    assert out.read_bytes() == before
    write_small(out, ids=((1, 2, 3, 4),), force=True)
    with Golden.open(out) as g:
        assert g.case("case0").input_ids.tolist() == [[1, 2, 3, 4]]


def test_check_output_path_refuses_bad_places(tmp_path: Path) -> None:
    with pytest.raises(TracerError, match="is a directory"):
        check_output_path(tmp_path, force=True)
    with pytest.raises(TracerError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "g.h5", force=False)
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(TracerError):
        check_output_path(regular / "g.h5", force=False)
    assert check_output_path(tmp_path / "new.h5", force=False) == tmp_path / "new.h5"


# -- checksums ------------------------------------------------------------------------------

def flip_one_byte(path: Path, dataset: str, index: int = 5) -> None:
    """Change one byte of a dataset's data in place, keeping its stored checksum attribute."""
    with h5py.File(path, "r+") as f:
        ds = f[dataset]
        data = ds[()]
        raw = data.reshape(-1).view(np.uint8)
        raw[index] ^= 0x40
        ds[...] = data
        assert "xxh3" in ds.attrs


@pytest.fixture
def golden_copy(tiny_golden: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.h5"
    shutil.copy(tiny_golden, dst)
    return dst


def test_flipped_byte_names_the_stage(golden_copy: Path) -> None:
    flip_one_byte(golden_copy, "cases/case0/stages/blocks.0.attn.probs", index=13)
    with Golden.open(golden_copy) as g:
        case = g.case("case0")
        with pytest.raises(TracerError) as info:
            case.read("blocks.0.attn.probs")
        assert "blocks.0.attn.probs" in str(info.value) and "case0" in str(info.value)
        case.read("blocks.0.attn.scores")  # neighbours are intact
        g.case("case1").read("blocks.0.attn.probs")


def test_flipped_byte_in_inputs_and_weights_is_caught(golden_copy: Path) -> None:
    flip_one_byte(golden_copy, "cases/case1/input_ids", index=0)
    flip_one_byte(golden_copy, "weights/transformer.h.1.mlp.c_fc.bias")
    with Golden.open(golden_copy) as g:
        with pytest.raises(TracerError, match="input_ids"):
            g.case("case1").input_ids
        with pytest.raises(TracerError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
            g.weights()


def test_weights_read_on_demand_are_the_weights_and_verified(golden_copy: Path) -> None:
    """The comparison reads weights as it reaches them, keeping the few most recent: the same values
    as reading all at once, tied names one array, and a damaged weight found when it is read."""
    with Golden.open(golden_copy) as g:
        whole = g.weights()
        lazy = g.weights_on_demand(keep=3)
        assert set(lazy) == set(whole) and len(lazy) == len(whole) and "no.such.weight" not in lazy
        for name in whole:
            assert lazy.shape_of(name) == whole[name].shape
            np.testing.assert_array_equal(lazy[name], whole[name])
        assert len(lazy._recent) == 3  # only the most recent are held
        first = lazy["transformer.wte.weight"]
        assert lazy["transformer.wte.weight"] is first  # kept: not read again
        if "lm_head.weight" in whole:
            assert lazy["lm_head.weight"] is first  # tied: one dataset, one array
            assert whole["lm_head.weight"] is whole["transformer.wte.weight"]
        for name in [n for n in whole if whole[n] is not whole["transformer.wte.weight"]][:4]:
            lazy[name]  # pushes wte out of the three kept
        assert all(a is not first for a in lazy._recent.values())
        lazy._read = None  # a read now would fail
        assert lazy["transformer.wte.weight"] is first  # still held here: the same array, not read again
        with pytest.raises(KeyError):
            lazy["no.such.weight"]
    flip_one_byte(golden_copy, "weights/transformer.h.1.mlp.c_fc.bias")
    with Golden.open(golden_copy) as g:
        lazy = g.weights_on_demand()
        lazy["transformer.h.0.mlp.c_fc.bias"]  # the others read fine
        with pytest.raises(TracerError, match=r"checksum mismatch in weight 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
            lazy["transformer.h.1.mlp.c_fc.bias"]


# -- opening the wrong thing ----------------------------------------------------------------

def test_newer_format_version_is_refused_by_name(golden_copy: Path) -> None:
    with h5py.File(golden_copy, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(TracerError, match="format_version 2"):
        Golden.open(golden_copy)


def test_non_hdf5_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.h5"
    bad.write_text("not an HDF5 file\n")
    with pytest.raises(TracerError, match="not a readable HDF5"):
        StageFile.open(bad)


def test_truncated_file(golden_copy: Path) -> None:
    data = golden_copy.read_bytes()
    golden_copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(TracerError):
        Golden.open(golden_copy).case("case0").read("logits")


def test_foreign_hdf5_file(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(TracerError, match="not a gpt2-tracer file"):
        StageFile.open(foreign)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TracerError, match="no such file"):
        StageFile.open(tmp_path / "missing.h5")
    with pytest.raises(TracerError, match="directory"):
        StageFile.open(tmp_path)


def test_kind_is_checked(tiny_golden: Path) -> None:
    with pytest.raises(TracerError, match="golden file, expected a trace"):
        Trace.open(tiny_golden)


def test_unknown_case_and_stage(tiny_golden: Path) -> None:
    with Golden.open(tiny_golden) as g:
        with pytest.raises(TracerError, match="no case 'case9'"):
            g.case("case9")
        with pytest.raises(TracerError, match="blocks.7.ln1"):
            g.case("case0").read("blocks.7.ln1")


# -- lazy token reads -----------------------------------------------------------------------

def test_read_token_slices_match_the_full_read(tiny_golden: Path, monkeypatch) -> None:
    with Golden.open(tiny_golden) as g:
        case = g.case("batch")
        full = {s: case.read(s) for s in ("blocks.0.ln1", "blocks.1.attn.probs", "blocks.0.attn.k", "embed.pos", "logits")}
        monkeypatch.setattr(CaseView, "_verified", lambda *a: pytest.fail("read_token loaded the whole dataset"))
        T = full["logits"].shape[1]
        for token in (0, 3, T - 1):
            for b in (0, 1):
                np.testing.assert_array_equal(case.read_token("blocks.0.ln1", token, b), full["blocks.0.ln1"][b, token])
                np.testing.assert_array_equal(case.read_token("logits", token, b), full["logits"][b, token])
                np.testing.assert_array_equal(case.read_token("blocks.1.attn.probs", token, b),
                                              full["blocks.1.attn.probs"][b, :, token, :])
                np.testing.assert_array_equal(case.read_token("blocks.0.attn.k", token, b),
                                              full["blocks.0.attn.k"][b, :, token, :])
                np.testing.assert_array_equal(case.read_token("embed.pos", token, b), full["embed.pos"][0, token])
        with pytest.raises(TracerError, match="out of range"):
            case.read_token("logits", T)


# -- golden_id ------------------------------------------------------------------------------

def golden_id_of(path: Path) -> str:
    with Golden.open(path) as g:
        return g.golden_id


def test_golden_id_follows_content(tmp_path: Path, tiny_loaded) -> None:
    def rec(name: str, prompts: list[str]) -> str:
        out = tmp_path / name
        record_golden(tiny_loaded, build_cases(tiny_loaded, prompts, [], False), str(out), dtype="fp32", attn="eager",
                      with_weights=False)
        return golden_id_of(out)

    a = rec("a.h5", ["same prompt"])
    assert len(a) == 16
    assert rec("b.h5", ["same prompt"]) == a
    assert rec("c.h5", ["other prompt"]) != a


def test_golden_id_follows_weights(tmp_path: Path) -> None:
    write_small(tmp_path / "a.h5")
    write_small(tmp_path / "b.h5")
    changed = np.arange(8, dtype=np.float32).reshape(2, 4)
    changed[1, 3] = np.nextafter(changed[1, 3], np.float32(0))  # one rounding unit in one weight
    write_small(tmp_path / "c.h5", wte=changed)
    write_small(tmp_path / "d.h5", ids=((1, 2, 4),))
    ids = [golden_id_of(tmp_path / n) for n in ("a.h5", "b.h5", "c.h5", "d.h5")]
    assert ids[0] == ids[1]
    assert len(set(ids[1:])) == 3


def test_golden_id_names_the_weights_whether_or_not_they_are_stored(tmp_path: Path, tiny_loaded) -> None:
    """--no-weights hashes the weights it leaves out (xxh3, no SHA-256 pass): same content, same id."""
    cases = build_cases(tiny_loaded, ["same prompt"], [], False)
    ids = {}
    for with_weights in (True, False):
        out = tmp_path / f"{with_weights}.h5"
        record_golden(tiny_loaded, cases, str(out), dtype="fp32", attn="eager", with_weights=with_weights)
        with Golden.open(out) as g:
            assert g.has_weights == with_weights
            ids[with_weights] = (g.golden_id, g.attrs["weights_xxh3"])
    assert ids[True] == ids[False]
