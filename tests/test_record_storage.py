"""Small goldens that do not lie: lossless compression, narrower storage dtypes, and the layout behind them."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tracer.errors import TracerError
from tracer.record import build_cases, record_golden
from tracer.store import DatasetOptions, Golden, StageWriter, chunk_shape

from conftest import TINY_BATCH_PROMPTS, TINY_PROMPTS


def record_tiny(loaded, out: Path, **options: str) -> Path:
    cases = build_cases(loaded, list(TINY_PROMPTS), [], batch=False)
    cases += build_cases(loaded, list(TINY_BATCH_PROMPTS), [], batch=True)
    record_golden(loaded, cases, str(out), dtype="fp32", attn="eager", options=DatasetOptions.parse(**options))
    return out


def all_stages(path: Path) -> dict[tuple[str, str], np.ndarray]:
    with Golden.open(path) as g:
        return {(c.name, s): c.read(s) for c in g.cases() for s in c.stages()}


@pytest.mark.parametrize("compression", ["lzf", "gzip:1"])
def test_compressed_golden_holds_the_same_values(tiny_loaded, tmp_path: Path, compression: str) -> None:
    cases = build_cases(tiny_loaded, ["Hello, world"], [list(range(128))], batch=False)  # T=128: big enough to chunk
    plain_path, packed_path = tmp_path / "plain.h5", tmp_path / "packed.h5"
    record_golden(tiny_loaded, cases, str(plain_path), dtype="fp32", attn="eager")
    record_golden(tiny_loaded, cases, str(packed_path), dtype="fp32", attn="eager",
                  options=DatasetOptions.parse(compression))
    plain, packed = all_stages(plain_path), all_stages(packed_path)
    assert plain.keys() == packed.keys()
    for key, value in plain.items():
        np.testing.assert_array_equal(packed[key], value, err_msg=str(key))
    with Golden.open(plain_path) as a, Golden.open(packed_path) as b:
        assert a.golden_id == b.golden_id  # the same content, however it is stored
        assert b.attrs["compression"] == compression and b.storage_dtype == "fp32"
        assert b.storage_rounding == (0.0, 0.0)
        ds = b.case("case1").dataset("blocks.1.attn.probs")
        assert ds.compression == compression.split(":")[0] and ds.shuffle
        assert ds.chunks == chunk_shape(ds.shape, 4, "BHTT") == (1, 4, 128, 128)
        assert b.case("case0").dataset("blocks.1.attn.probs").chunks is None  # 19 tokens: too small to chunk
        for stage in ("blocks.1.attn.scores", "blocks.1.attn.probs"):  # masked half: -inf or exact zeros
            stored = b.case("case1").dataset(stage)
            assert stored.id.get_storage_size() < 0.6 * stored.nbytes, stage
        for name, w in a.weights().items():
            np.testing.assert_array_equal(b.weights()[name], w)
        for stage in ("blocks.0.attn.scores", "logits", "embed.pos", "blocks.1.attn.k"):
            for t in (0, 77, 127):
                np.testing.assert_array_equal(b.case("case1").read_token(stage, t), a.case("case1").read_token(stage, t))
    assert packed_path.stat().st_size < plain_path.stat().st_size


def test_chunks_hold_whole_token_rows_of_about_a_mebibyte() -> None:
    assert chunk_shape((1, 12, 1024, 1024), 4, "BHTT") == (1, 12, 21, 1024)
    assert chunk_shape((2, 1024, 768), 4, "BTC") == (1, 341, 768)
    assert chunk_shape((1, 8, 50257), 4, "BTC") == (1, 5, 50257)
    assert chunk_shape((50257, 768), 4, None) == (341, 768)
    assert chunk_shape((2304,), 4, None) == (2304,)
    assert chunk_shape((1, 25, 4, 1 << 20), 4, "BHTT") == (1, 25, 1, 1 << 20)  # a row over budget: one row


@pytest.mark.parametrize("storage, rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_narrow_storage_is_declared_and_within_its_rounding(tiny_golden: Path, tiny_loaded, tmp_path: Path,
                                                            storage: str, rel: float) -> None:
    out = record_tiny(tiny_loaded, tmp_path / f"{storage}.h5", storage_dtype=storage)
    exact, stored = all_stages(tiny_golden), all_stages(out)
    with Golden.open(out) as g:
        assert g.storage_dtype == storage and g.attrs["dtype"] == "fp32"
        r, a = g.storage_rounding
        assert r == rel and 0 < a < 1e-7
        ds = g.case("case0").dataset("blocks.0.mlp.fc")
        assert ds.attrs["storage_dtype"] == storage and ds.dtype.itemsize == 2
        for name, w in g.weights().items():  # the oracle's weights stay exact
            assert w.dtype == np.float32, name
        assert g.case("case0").read_token("logits", 1).dtype == np.float32
    changed = 0
    for key, want in exact.items():
        got = stored[key]
        assert got.dtype == np.float32, key
        finite = np.isfinite(want)
        np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=str(key))  # -inf stays -inf
        err = np.abs(got[finite].astype(np.float64) - want[finite])
        assert np.all(err <= r * np.abs(want[finite]) + a), key
        changed += int(np.any(err > 0))
    assert changed > len(exact) // 2, "narrowing changed nothing: it was not applied"


def test_fp16_overflow_refuses_the_stage_and_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "g.h5"
    with pytest.raises(TracerError, match=r"logits of case 'case0' has values beyond the fp16 range.*bf16"):
        with StageWriter(out, "golden", {"model_config": {"n_layer": 1}}) as w:
            w.options = DatasetOptions.parse(storage_dtype="fp16")
            w.begin_case("case0", np.zeros((1, 2), np.int64), np.ones((1, 2), np.int8))
            w.write_stage("case0", "logits", np.array([[[1.0, 7e4], [0.0, 1.0]]], np.float32), order=0)
    assert list(tmp_path.iterdir()) == []


def test_bf16_rounds_to_nearest_even_and_keeps_nan() -> None:
    from tracer.store import from_bf16_bits, to_bf16_bits

    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -np.inf, np.nan, 3e38], np.float32)
    back = from_bf16_bits(to_bf16_bits(x))
    assert back[0] == 1.0 and back[1] == 1.0            # tie: to even
    assert back[2] == 1 + 4 * 2**-8                     # tie: to even (up)
    assert back[3] == 1 + 2 * 2**-8                     # above the tie: up
    assert back[4] == -np.inf and np.isnan(back[5]) and np.isfinite(back[6])


@pytest.mark.parametrize("args, message", [
    (["--compression", "zstd"], "unknown compression 'zstd'"),
    (["--compression", "gzip:0"], "unknown compression 'gzip:0'"),
    (["--storage-dtype", "fp8"], "unknown storage dtype 'fp8'"),
])
def test_bad_storage_options_are_one_line(run_cli, tmp_path: Path, args: list[str], message: str) -> None:
    code, out, err = run_cli("record", "--model", "tiny", "-p", "hi", "-o", tmp_path / "g.h5", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_records_compressed_bf16(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "g.h5"
    code, _, err = run_cli("record", "--model", "tiny", "--ids", ",".join(map(str, range(128))), "-o", out,
                           "--compression", "gzip", "--storage-dtype", "bf16", "-q")
    assert code == 0, err
    with h5py.File(out) as f:
        ds = f["cases/case0/stages/blocks.0.attn.probs"]
        assert ds.compression == "gzip" and ds.compression_opts == 4 and ds.dtype == np.uint16
    with Golden.open(out) as g:
        assert g.storage_dtype == "bf16" and g.attrs["compression"] == "gzip"


def test_token_subset_keeps_the_chosen_rows_and_whole_keys(tiny_golden: Path, tiny_loaded, tmp_path: Path) -> None:
    out = record_tiny(tiny_loaded, tmp_path / "sub.h5", tokens="0,2,-1")
    with Golden.open(tiny_golden) as full, Golden.open(out) as sub:
        assert sub.attrs["tokens"] == "0,2,-1" and sub.golden_id == full.golden_id
        for name in full.case_names():
            a, b = full.case(name), sub.case(name)
            T = a.input_ids.shape[1]
            kept = [0, 2, T - 1]
            np.testing.assert_array_equal(b.input_ids, a.input_ids)  # inputs stay whole: replay needs them
            for stage in a.stages():
                t_axis = a.dataset(stage).attrs["layout"].index("T")
                whole = stage.endswith(("attn.k", "attn.v"))
                assert (b.positions(stage) is None) == whole, stage
                expect = a.read(stage) if whole else np.take(a.read(stage), kept, axis=t_axis)
                np.testing.assert_array_equal(b.read(stage), expect, err_msg=f"{name} {stage}")
                if not whole:
                    assert b.positions(stage).tolist() == kept
            np.testing.assert_array_equal(b.read_token("blocks.1.attn.probs", T - 1), a.read_token("blocks.1.attn.probs", T - 1))
            with pytest.raises(TracerError, match="token 1 of logits was not recorded"):
                b.read_token("logits", 1)


@pytest.mark.parametrize("spec, T, expect", [("0,5,-1", 8, [0, 5, 7]), ("0:3,-2:", 8, [0, 1, 2, 6, 7]),
                                             ("::4", 9, [0, 4, 8]), ("2:100", 4, [2, 3])])
def test_token_specs(spec: str, T: int, expect: list[int]) -> None:
    from tracer.store import token_positions

    assert token_positions(spec, T).tolist() == expect


@pytest.mark.parametrize("spec, message", [("9", "token 9 is outside a case of 8 tokens"), ("a", "'a' is not an index"),
                                           ("5:2", "keeps no token")])
def test_bad_token_specs(spec: str, message: str) -> None:
    from tracer.store import token_positions

    with pytest.raises(TracerError, match=message):
        token_positions(spec, 8)


# -- comparing against a --tokens golden --------------------------------------------------------
def _compare(golden: Path, trace, **request):
    from tracer.compare.run import CompareRequest, run_compare

    return run_compare(CompareRequest(golden, trace, quiet=True, **request))


def test_cli_tokens_golden_passes_a_correct_replay_and_finds_a_bug_at_the_kept_rows(run_cli, tmp_path: Path) -> None:
    golden = tmp_path / "sub.h5"
    code, _, err = run_cli("record", "--model", "tiny", "-p", "The engineer printed every tensor by hand",
                           "--tokens", "0:3,-2:", "-o", golden, "-q")
    assert code == 0, err
    code, out, err = run_cli("compare", golden, "--backend", "numpy", "--json", tmp_path / "ok.json")
    assert code == 0, out + err  # chained by default: teacher forcing would need every row
    assert "only those rows are compared" in json.loads((tmp_path / "ok.json").read_text())["tolerance"]
    code, out, _ = run_cli("compare", golden, "--backend", "numpy", "--inject", "mask-off-by-one", "--json",
                           tmp_path / "r.json")
    assert code == 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["origin"]["stage"] == "blocks.0.attn.scores"
    stage = next(s for s in result["cases"][0]["stages"] if s["stage"] == "blocks.0.attn.scores")
    assert stage["diagnoses"][0]["rule"] == "mask.off-by-one", stage["diagnoses"]
    code, _, err = run_cli("replay", golden, "--backend", "numpy", "--mode", "both", "-o", tmp_path / "t.h5")
    assert code == 2 and "only --mode chained works" in err


def test_tokens_golden_judges_an_independent_port_on_the_kept_rows_only(tiny_loaded, c_port, tmp_path: Path) -> None:
    from tests.ports.real_ports import run_c_port

    golden = record_tiny(tiny_loaded, tmp_path / "sub.h5", tokens="1,-1")
    correct = _compare(golden, run_c_port(golden, tmp_path / "ok", case="case0"), case="case0")
    assert correct.passed, [(s.stage, s.status) for s in correct.cases[0].stages if s.failed]
    shown = correct.cases[0].stage("blocks.0.ln1").tables[0]
    assert shown.token == 1  # the first-8 table starts at the first kept token, not at an unrecorded one
    bug = _compare(golden, run_c_port(golden, tmp_path / "bug", case="case0", bug="ln-eps-1e-3"), case="case0")
    assert not bug.passed and bug.cases[0].origin == "blocks.0.ln1"
