"""`tracer record` and `tracer inspect` through the console entry point: results, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tracer.stages import canonical_stages
from tracer.store import Golden

from conftest import cli_command, have_tiny, load_tiny


@pytest.fixture(scope="module")
def model_arg(tmp_path_factory) -> str:
    """`--model` value for the tiny model: 'tiny' once shipped, else a save_pretrained dir of the stand-in."""
    if have_tiny():
        return "tiny"
    d = tmp_path_factory.mktemp("tiny_standin")
    load_tiny().model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, model_arg) -> Path:
    """`tracer record --model tiny --prompt "Hello, world" -o X` through the console script, run once."""
    out = tmp_path_factory.mktemp("cli") / "hello.h5"
    proc = subprocess.run(cli_command("record", "--model", model_arg, "--prompt", "Hello, world", "-o", out, "-q"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def assert_usage_error(result, directory: Path | None = None, before: list[str] | None = None) -> str:
    """Exit 2, exactly one line on stderr, no traceback, and no file left behind in `directory`."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    if directory is not None:
        assert sorted(p.name for p in directory.iterdir()) == (before or []), "a file was left behind"
    return lines[0]


# -- record -----------------------------------------------------------------------------------

def test_record_writes_the_prompt_and_every_stage(recorded: Path) -> None:
    with Golden.open(recorded) as g:
        assert g.case_names() == ["case0"]
        case = g.case("case0")
        assert case.input_ids.tolist() == [list(b"Hello, world")]
        assert case.prompts == ["Hello, world"]
        assert case.stages() == canonical_stages(g.n_layer)
        assert g.attrs["dtype"] == "fp32" and g.attrs["attn_implementation"] == "eager"
        assert g.has_weights
    assert [p.name for p in recorded.parent.iterdir()] == ["hello.h5"]


def test_record_stage_subset(run_cli, model_arg: str, tmp_path: Path) -> None:
    out = tmp_path / "sub.h5"
    code, _, err = run_cli("record", "--model", model_arg, "-p", "subset", "-o", out, "--stages", "blocks.0.*,logits", "-q")
    assert code == 0, err
    with Golden.open(out) as g:
        case = g.case("case0")
        assert case.stages() == [s for s in canonical_stages(g.n_layer) if s.startswith("blocks.0.")] + ["logits"]
        assert set(case.modules().values()) <= set(case.stages())
        assert case.read("lm_head").shape[-1] == g.model_config["vocab_size"]


def test_record_batch_and_ids(run_cli, model_arg: str, tmp_path: Path) -> None:
    out = tmp_path / "b.h5"
    code, _, err = run_cli("record", "--model", model_arg, "-p", "ab", "-p", "abcd", "--batch", "-o", out, "-q")
    assert code == 0, err
    with Golden.open(out) as g:
        assert g.case_names() == ["batch"]
        assert g.case("batch").attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    out2 = tmp_path / "ids.h5"
    code, _, err = run_cli("record", "--model", model_arg, "--ids", "5,6,7", "--ids", "9", "-o", out2, "-q")
    assert code == 0, err
    with Golden.open(out2) as g:
        assert [g.case(n).input_ids.tolist() for n in g.case_names()] == [[[5, 6, 7]], [[9]]]


def test_prompt_of_exactly_n_positions_is_accepted(run_cli, model_arg: str, tmp_path: Path) -> None:
    n_pos = load_tiny().config.n_positions
    code, _, err = run_cli("record", "--model", model_arg, "-p", "x" * n_pos, "-o", tmp_path / "full.h5", "-q",
                           "--stages", "logits", "--no-weights")
    assert code == 0, err


def test_force_overwrites(run_cli, model_arg: str, tmp_path: Path) -> None:
    out = tmp_path / "g.h5"
    assert run_cli("record", "--model", model_arg, "-p", "first", "-o", out, "-q")[0] == 0
    before = out.read_bytes()
    assert_usage_error(run_cli("record", "--model", model_arg, "-p", "second", "-o", out, "-q"), tmp_path, ["g.h5"])
    assert out.read_bytes() == before
    assert run_cli("record", "--model", model_arg, "-p", "second", "-o", out, "-q", "--force")[0] == 0
    with Golden.open(out) as g:
        assert g.case("case0").prompts == ["second"]
    assert [p.name for p in tmp_path.iterdir()] == ["g.h5"]


# -- record: bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--model", "./no/such/dir"], "does not exist"),
    (["-p", ""], "empty prompt"),
    (["-p", "x" * 129], "129 tokens"),
    (["--ids", "1,2,x"], "--ids"),
    (["--ids", "1,256"], "256"),
    (["--stages", "blocks.0.*,blocks.9.*"], "blocks.9.*"),
    (["--random", "gpt3"], "gpt3"),
    (["--dtype", "fp8"], "fp8"),
    (["--attn", "flash"], "flash"),
    ([], "nothing to record"),
])
def test_record_bad_input(run_cli, model_arg: str, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["record", "-o", tmp_path / "g.h5", "-q"]
    if "--model" not in args and "--random" not in args:
        base += ["--model", model_arg]
    if not any(a in args for a in ("-p", "--ids")) and args:
        base += ["-p", "hi"]
    line = assert_usage_error(run_cli(*base, *args), tmp_path)
    assert message in line


def test_record_unknown_model_name(run_cli, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = assert_usage_error(run_cli("record", "--model", "no-such-gpt2-model", "-p", "hi", "-o", tmp_path / "g.h5"),
                              tmp_path)
    assert "no-such-gpt2-model" in line


def test_record_unwritable_output(run_cli, model_arg: str, tmp_path: Path) -> None:
    assert_usage_error(run_cli("record", "--model", model_arg, "-p", "hi", "-o", tmp_path / "missing" / "g.h5"), tmp_path)
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    assert_usage_error(run_cli("record", "--model", model_arg, "-p", "hi", "-o", regular / "g.h5"), tmp_path, ["file.txt"])
    assert regular.read_text() == "x"
    assert_usage_error(run_cli("record", "--model", model_arg, "-p", "hi", "-o", tmp_path), tmp_path, ["file.txt"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_record_read_only_directory(run_cli, model_arg: str, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_usage_error(run_cli("record", "--model", model_arg, "-p", "hi", "-o", ro / "g.h5"), ro)
    finally:
        ro.chmod(0o755)


def test_error_after_model_load_is_one_line_in_a_fresh_process(run_cli_subprocess, model_arg: str, tmp_path: Path) -> None:
    """Library progress bars and warnings printed while loading must not reach the user's stderr."""
    result = run_cli_subprocess("record", "--model", model_arg, "-p", "", "-o", tmp_path / "g.h5")
    assert "empty prompt" in assert_usage_error(result, tmp_path)


def test_keyboard_interrupt_mid_record_leaves_nothing(run_cli, model_arg: str, tmp_path: Path, monkeypatch) -> None:
    from tracer.recorder import Recorder

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Recorder, "run", interrupted)
    line = assert_usage_error(run_cli("record", "--model", model_arg, "-p", "hi", "-o", tmp_path / "g.h5"), tmp_path)
    assert "interrupted" in line


@pytest.mark.slow
def test_ctrl_c_during_record(tmp_path: Path) -> None:
    """A real SIGINT while a big model is being written: exit 2, one line, no output and no temp file."""
    out = tmp_path / "big.h5"
    ids = ",".join(str(i % 50000) for i in range(1024))
    proc = subprocess.Popen(cli_command("record", "--random", "gpt2", "--ids", ids, "-o", out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".big.h5.tmp*")):
            assert proc.poll() is None, f"record ended before writing: {proc.communicate()}"
            assert time.monotonic() < deadline, "the temp file never appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# -- inspect ----------------------------------------------------------------------------------

def test_inspect_shows_metadata_and_every_stage(run_cli, recorded: Path) -> None:
    code, out, err = run_cli("inspect", recorded)
    assert code == 0, err
    with Golden.open(recorded) as g:
        assert g.golden_id in out
        case = g.case("case0")
        for stage in case.stages():
            assert stage in out, f"stage {stage} not shown in full"
            assert "×".join(map(str, case.dataset(stage).shape)) in out, f"shape of {stage} not shown"


def test_inspect_stage_glob_and_token(run_cli, recorded: Path) -> None:
    code, out, err = run_cli("inspect", recorded, "--stage", "blocks.0.attn.*", "--token", "0")
    assert code == 0, err
    assert "blocks.1." not in out and "logits" not in out
    code, out, err = run_cli("inspect", recorded, "--stage", "blocks.0.attn.*", "--token", "3", "--json")
    assert code == 0, err
    stages = json.loads(out)["cases"][0]["stages"]
    assert [s["stage"] for s in stages] == [s for s in canonical_stages(2) if s.startswith("blocks.0.attn.")]
    with Golden.open(recorded) as g:
        case = g.case("case0")
        for s in stages:
            assert s["token"] == 3
            expect = case.read(s["stage"])
            row = expect[0, :, 3] if expect.ndim == 4 else expect[0, 3]
            np.testing.assert_array_equal(np.array(s["first8"], dtype=np.float32), row.reshape(-1)[:8])


def test_inspect_json_statistics_match_the_file(run_cli, recorded: Path) -> None:
    code, out, err = run_cli("inspect", recorded, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format_version"] == 1 and info["metadata"]["kind"] == "golden"
    [case_info] = info["cases"]
    with Golden.open(recorded) as g:
        assert info["weights"] == len(g.h5["weights"])
        assert info["metadata"]["golden_id"] == g.golden_id
        case = g.case("case0")
        assert case_info["input_ids_shape"] == list(case.input_ids.shape)
        assert case_info["modules"] == len(case.modules())
        assert [s["stage"] for s in case_info["stages"]] == case.stages()
        for s in case_info["stages"]:
            data = case.read(s["stage"]).astype(np.float64)
            finite = data[np.isfinite(data)]
            assert s["shape"] == list(data.shape) and s["dtype"] == "float32"
            assert s["nonfinite"] == data.size - finite.size
            for key, value in (("min", finite.min()), ("max", finite.max()), ("mean", finite.mean()),
                               ("std", finite.std())):
                assert s[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (s["stage"], key)
        T = case.input_ids.shape[1]
        scores = next(s for s in case_info["stages"] if s["stage"] == "blocks.0.attn.scores")
        assert scores["nonfinite"] == g.model_config["n_head"] * T * (T - 1) // 2  # the causal mask, as -inf


@pytest.mark.parametrize("args, message", [
    (["--stage", "blocks.9.*"], "blocks.9.*"),
    (["--token", "999"], "out of range"),
])
def test_inspect_bad_options(run_cli, recorded: Path, args: list[str], message: str) -> None:
    assert message in assert_usage_error(run_cli("inspect", recorded, *args))


def test_inspect_bad_files(run_cli, tmp_path: Path) -> None:
    assert "no such file" in assert_usage_error(run_cli("inspect", tmp_path / "missing.h5"))
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    assert "HDF5" in assert_usage_error(run_cli("inspect", text))
