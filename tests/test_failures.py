"""The failure catalog (SPEC §7): every bad input and fault a user can meet, each with the contract
checked in full: the exit code, exactly one line on stderr (no traceback), no partial output, and the
files that were there before byte-for-byte untouched.

Faults go through the in-process entry point (`run_cli`, the very `main()` of the console script)
unless the contract is about the installed script or about signals: those run it in a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

from conftest import cli_command
from tracer.errors import TracerError
from tracer.store import Golden, StageWriter

REPORT_FORMATS = ("html", "json", "md", "junit")


# -- helpers -----------------------------------------------------------------------------------------

def checksums(directory: Path) -> dict[str, str]:
    """Every entry of `directory` (hidden ones included: lock and temp files count) -> sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.iterdir())}


def one_line(result, code: int = 2) -> str:
    """The contract of a failure: exit `code`, exactly one line on stderr, no traceback anywhere."""
    rc, out, err = result
    assert rc == code, (rc, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


@contextmanager
def untouched(directory: Path):
    """Nothing added, removed or changed in `directory` by what runs inside."""
    before = checksums(directory)
    yield
    assert checksums(directory) == before


def run_script(*args, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str]:
    proc = subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


@contextmanager
def tmpfs(directory: Path, options: str):
    """A tmpfs mounted at `directory` (skips the test where mounting is not permitted)."""
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True)


@pytest.fixture(scope="module")
def trace(tiny_golden, tmp_path_factory) -> Path:
    """The NumPy port's chained trace of the tiny golden (passes the comparison)."""
    from backends.numpy_backend import NumpyBackend
    from tracer.replay import replay

    out = tmp_path_factory.mktemp("failures") / "numpy.h5"
    replay(tiny_golden, NumpyBackend(), out)
    return out


@pytest.fixture
def work(tmp_path, tiny_golden, trace) -> Path:
    """A directory holding copies of the golden and trace, and a saved result JSON."""
    shutil.copy(tiny_golden, tmp_path / "g.h5")
    shutil.copy(trace, tmp_path / "t.h5")
    return tmp_path


# -- usage errors of the installed console script --------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["nope"], "No such command"),
    (["compare", "--bogus"], "--bogus"),
    (["record", "-p", "hi"], "--output"),
    (["record", "--seed", "abc", "-p", "hi", "-o", "x.h5"], "--seed"),
])
def test_usage_errors_of_the_installed_script(tmp_path, args, words):
    with untouched(tmp_path):
        line = one_line(run_script(*[tmp_path / a if a == "x.h5" else a for a in args]))
    assert words in line and "--help" in line


def test_bare_tracer_prints_the_help_and_exits_2():
    rc, out, err = run_script()
    assert rc == 2 and "Traceback" not in err
    assert "Usage" in err and "record" in err and "compare" in err


def test_usage_errors_of_the_standalone_click_are_caught_too(monkeypatch):
    """Older typer raises click's own exceptions instead of its vendored copy's."""
    click = pytest.importorskip("click")
    from rich.console import Console as RichConsole

    from tracer.boundary import run_console

    def app(**kwargs):
        raise click.UsageError("No such option: --bogus", ctx=None)

    err = io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = run_console(app, RichConsole(file=err, width=200), ["compare", "--bogus"])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert code == 2 and err.getvalue().strip() == "error: No such option: --bogus"


# -- outputs: never overwritten, never half-written, checked before the work ------------------------

@pytest.mark.parametrize("fmt", REPORT_FORMATS)
def test_report_into_a_read_only_directory_fails_before_comparing(run_cli, work, fmt, monkeypatch):
    import tracer.compare.run as run

    monkeypatch.setattr(run, "run_compare", lambda req: pytest.fail("compared before checking the output"))
    with tmpfs(work / "ro", "ro,size=64k") as ro, untouched(work):
        line = one_line(run_cli("compare", work / "g.h5", work / "t.h5", f"--{fmt}", ro / f"r.{fmt}"))
    assert f"r.{fmt}" in line and ("not writable" in line or "read-only" in line)


def test_read_only_file_system_at_the_rename_is_one_line(tmp_path, monkeypatch):
    """Where only the write itself finds out (os.access said yes): the cleanup must not raise again."""
    from tracer import atomic

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.os, "replace", erofs)
    monkeypatch.setattr(Path, "unlink", erofs)
    with pytest.raises(TracerError, match=r"cannot write .*r\.html: read-only file system$"):
        atomic.write_text_atomic(tmp_path / "r.html", "<html/>")


@pytest.mark.parametrize("option", ["--json", "--html"])
def test_existing_report_needs_force(run_cli, work, option):
    existing = work / "existing.out"
    existing.write_text("keep me")
    with untouched(work):
        line = one_line(run_cli("compare", work / "g.h5", work / "t.h5", option, existing))
    assert "already exists" in line and "--force" in line
    assert run_cli("compare", work / "g.h5", work / "t.h5", option, existing, "--force")[0] == 0
    assert existing.read_text() != "keep me"


def test_report_dash_o_existing_needs_force(run_cli, work):
    assert run_cli("compare", work / "g.h5", work / "t.h5", "--json", work / "r.json", "-q")[0] == 0
    existing = work / "r.md"
    existing.write_text("keep me")
    with untouched(work):
        assert "already exists" in one_line(run_cli("report", work / "r.json", "--format", "md", "-o", existing))
    assert run_cli("report", work / "r.json", "--format", "md", "-o", existing, "--force")[0] == 0
    assert "keep me" not in existing.read_text()


def test_two_reports_to_one_file_are_refused(run_cli, work):
    with untouched(work):
        line = one_line(run_cli("compare", work / "g.h5", work / "t.h5", "--json", work / "r", "--md", work / "r"))
    assert "--json and --md" in line


def test_two_records_to_one_output_at_once(tmp_path):
    """Exactly one wins; the other fails with a line (busy, or already there); the file is the winner's."""
    out = tmp_path / "same.h5"
    procs = [subprocess.Popen(cli_command("record", "-p", text, "-o", out, "-q"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
             for text in ("first", "second")]
    results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    winner = ("first", "second")[[r[0] for r in results].index(0)]
    loser = next(r for r in results if r[0] == 2)
    line = one_line(loser)
    assert "being written by another tracer process" in line or "already exists" in line
    with Golden.open(out) as g:
        assert g.case("case0").prompts == [winner]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.h5"]


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(run_cli, tmp_path):
    out = tmp_path / "g.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".g.h5.lock").write_text(str(holder.pid))
        with untouched(tmp_path):
            line = one_line(run_cli("record", "-p", "hi", "-o", out))
        assert f"pid {holder.pid}" in line and ".g.h5.lock" in line
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("record", "-p", "hi", "-o", out, "-q")[0] == 0  # its process is gone: stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5"]


# -- disk full ------------------------------------------------------------------------------------------

def test_disk_full_on_a_small_tmpfs(run_cli, tmp_path):
    with tmpfs(tmp_path / "small", "size=256k") as small, untouched(small):
        line = one_line(run_cli("record", "-p", "Hello there", "-o", small / "g.h5"))
    assert line.startswith("error: cannot write") and "disk full" in line and "0x" not in line


def test_disk_full_simulated(run_cli, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the free-space guard sees a nearly full disk."""
    import tracer.store as store

    class Full:
        f_bavail, f_frsize = 16, 4096

    monkeypatch.setattr(store.os, "statvfs", lambda path: Full())
    with untouched(tmp_path):
        line = one_line(run_cli("record", "-p", "Hello there", "-o", tmp_path / "g.h5"))
    assert "disk full" in line


def test_hdf5_enospc_reads_as_words(run_cli, tmp_path, monkeypatch):
    """A full disk met by HDF5 itself: its multi-line message with buffer addresses becomes 'disk full'."""
    raw = ("Can't write data (file write failed: time = Tue Dec  1 12:00:00 2026\n, filename = 'x', "
           "file descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x5590, "
           "total write size = 40960)")

    def fail(*args, **kwargs):
        raise OSError(raw)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail)  # chunked and small datasets
    monkeypatch.setattr(h5py.h5d, "create", fail)  # contiguous stages, created through HDF5's own call
    with untouched(tmp_path):
        line = one_line(run_cli("record", "-p", "hi", "-o", tmp_path / "g.h5"))
    assert line.endswith("g.h5: disk full")


# -- validated inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("toml, words", [
    ('[stages."blocks.*"]\nchained = "lots"\n', "chained must be a number >= 0, not 'lots'"),
    ('[stages."blocks.*"]\nchained = -0.05\n', "chained must be a number >= 0, not -0.05"),
    ("margin_local = -32\n", "margin_local must be a number >= 0"),
    ("margin = 4\n", "unknown key(s) margin (valid: preset, margin_local, margin_chained, stages)"),
    ('preset = "fp8"\n', "not one of auto, fp64, fp32"),
    ('[stages."blocks.*.attn probs"]\nlocal = 1e-3\n', "is not a stage glob"),
    ('[stages."blocks.9.*"]\nlocal = 1e-3\n', "matches no stage of this model"),
])
def test_bad_tolerance_file(run_cli, work, toml, words):
    (work / "tol.toml").write_text(toml)
    with untouched(work):
        assert words in one_line(run_cli("compare", work / "g.h5", work / "t.h5", "--tolerance", work / "tol.toml"))


def test_valid_tolerance_file_is_applied(run_cli, work):
    (work / "tol.toml").write_text('margin_local = 0\n[stages."blocks.[01].attn.probs"]\nchained = 0\nlocal = 0\n')
    code, out, err = run_cli("compare", work / "g.h5", work / "t.h5", "--tolerance", work / "tol.toml", "--json",
                             work / "r.json", "-q")
    assert code in (0, 1) and not err.strip(), err
    assert "1 per-stage override" in json.loads((work / "r.json").read_text())["tolerance"]


@pytest.mark.parametrize("args, words", [
    (["--case", "nope"], "no such case (cases: case0, case1, batch)"),
    (["--stage", "blocks.9.*"], "no stage matches 'blocks.9.*' (known: embed.tok"),
    (["--token", "999"], "--token 999 is out of range (valid tokens: case0: 0..11"),
    (["--token", "-1"], "--token -1 is out of range"),
])
def test_compare_options_checked_against_the_golden(run_cli, work, args, words, monkeypatch):
    import backends.registry as registry

    monkeypatch.setattr(registry, "resolve_backend", lambda *a, **k: pytest.fail("replayed before checking"))
    with untouched(work):
        assert words in one_line(run_cli("compare", work / "g.h5", "--backend", "numpy", *args))


def test_inspect_token_out_of_range_lists_the_valid_ones(run_cli, work):
    assert "valid tokens are 0..11" in one_line(run_cli("inspect", work / "g.h5", "--token", "999"))


def test_bad_name_map_and_tag_map(run_cli, work):
    npz = work / "port.npz"
    with h5py.File(work / "g.h5") as f:
        np.savez(npz, my_ln=f["cases/case0/stages/blocks.0.ln1"][()])
    (work / "names.toml").write_text('[names]\nmy_ln = "blocks.0.layernorm"\n')
    with untouched(work):
        line = one_line(run_cli("compare", work / "g.h5", npz, "--case", "case0", "--name-map", work / "names.toml"))
    assert "'blocks.0.layernorm' is not a canonical stage name" in line
    (work / "log.txt").write_text("[AFTER_LN1] Layer 0, Token 0: [0.1, 0.2]\n")
    (work / "tags.toml").write_bytes(b"[tags]\nAFTER_LN1 = \"ln1\xff\"\n")
    with untouched(work):
        line = one_line(run_cli("import-log", work / "log.txt", "--golden", work / "g.h5", "--case", "case0",
                                "--map", work / "tags.toml", "-o", work / "log.h5"))
    assert "tags.toml is not valid TOML" in line


def test_ten_thousand_token_prompt(run_cli, tmp_path):
    with untouched(tmp_path):
        assert "10000 tokens; the model takes at most 128" in one_line(
            run_cli("record", "-p", "x" * 10_000, "-o", tmp_path / "g.h5"))


def test_prompts_file_that_is_not_utf8(run_cli, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"caf\xe9\n")
    with untouched(tmp_path):
        line = one_line(run_cli("record", "--prompts-file", tmp_path / "prompts.txt", "-o", tmp_path / "g.h5"))
    assert "is not UTF-8 text (byte 0xe9 at offset 3)" in line


# -- damaged and foreign files ----------------------------------------------------------------------

def test_truncated_golden(run_cli, work):
    data = (work / "g.h5").read_bytes()
    (work / "g.h5").write_bytes(data[: len(data) // 2])
    with untouched(work):
        assert "corrupt or truncated" in one_line(run_cli("compare", work / "g.h5", work / "t.h5"))


def test_bit_flip_in_a_stage_names_it(run_cli, work):
    stage = "blocks.1.mlp.fc"
    with h5py.File(work / "t.h5") as f:
        offset = f[f"cases/case0/stages/{stage}"].id.get_offset()
    with open(work / "t.h5", "r+b") as fh:
        fh.seek(offset + 9)
        byte = fh.read(1)
        fh.seek(offset + 9)
        fh.write(bytes([byte[0] ^ 0x10]))
    with untouched(work):
        line = one_line(run_cli("compare", work / "g.h5", work / "t.h5"))
    assert "checksum mismatch" in line and stage in line and "case0" in line


def test_format_version_from_the_future(run_cli, work):
    with h5py.File(work / "g.h5", "r+") as f:
        f.attrs["format_version"] = 2
    with untouched(work):
        line = one_line(run_cli("inspect", work / "g.h5"))
    assert "format_version 2" in line and "newer gpt2-tracer" in line


def test_golden_read_while_another_process_records_it(work):
    """A reader sees the complete old file while a writer rebuilds that path; the rename swaps it whole."""
    with Golden.open(work / "g.h5") as g:
        old_id = g.golden_id
    attrs = {"model_config": {"n_layer": 1}, "weights_sha256": "new"}
    with StageWriter(work / "g.h5", "golden", attrs, force=True) as writer:
        writer.begin_case("case0", np.array([[1, 2]]), np.ones((1, 2)))
        code, out, err = run_script("inspect", work / "g.h5", "--json")
        assert code == 0, err
        assert json.loads(out)["metadata"]["golden_id"] == old_id
    with Golden.open(work / "g.h5") as g:
        assert g.golden_id != old_id and g.case_names() == ["case0"]


# -- exec: backends -----------------------------------------------------------------------------------

def test_exec_backend_that_hangs_is_stopped(run_cli, work):
    hang = f'exec:{sys.executable} -c "import time; time.sleep(60)" {{golden}} {{out}}'
    start = time.monotonic()
    with untouched(work):
        line = one_line(run_cli("replay", work / "g.h5", "--backend", hang, "--timeout", "1", "-o", work / "x.h5"))
    assert time.monotonic() - start < 20
    assert "did not finish within 1 s" in line and "--timeout" in line


def test_exec_backend_that_writes_garbage(run_cli, work):
    garbage = f'exec:{sys.executable} -c "import sys; open(sys.argv[2], \'wb\').write(b\'garbage\')" {{golden}} {{out}}'
    with untouched(work):
        line = one_line(run_cli("compare", work / "g.h5", "--backend", garbage, "--mode", "chained"))
    assert "exec program wrote neither a gpt2-tracer trace nor a usable foreign dump" in line


# -- signals ----------------------------------------------------------------------------------------

def test_sigint_just_after_the_final_rename(run_cli, tmp_path, monkeypatch):
    """The file is complete; the line says so instead of claiming nothing was written."""
    from tracer import atomic

    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", replace_then_interrupt)
    line = one_line(run_cli("record", "-p", "hi", "-o", tmp_path / "g.h5"))
    assert line == f"interrupted after {tmp_path / 'g.h5'} was completely written; nothing else was written"
    with Golden.open(tmp_path / "g.h5") as g:
        assert g.case("case0").prompts == ["hi"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5"]


SLOW_WRITER = """
import sys, time
from tracer.store import StageWriter
write = StageWriter.write_stage
def slow(self, *args, **kwargs):
    time.sleep(0.05)
    return write(self, *args, **kwargs)
StageWriter.write_stage = slow
from tracer.cli import main
sys.argv = ["tracer", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("command", ["record", "replay"])
def test_sigterm_mid_write_discards_the_file(work, command):
    """The console script's main() with stage writes slowed down so SIGTERM lands mid-file."""
    out = work / "out.h5"
    args = ["record", "-p", "Hello, world", "-o", out] if command == "record" else ["replay", work / "g.h5", "-o", out]
    before = checksums(work)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob(".out.h5.tmp-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the temporary file never appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        result = (proc.wait(timeout=60), *proc.communicate())
    finally:
        if proc.poll() is None:
            proc.kill()
    assert one_line(result) == "terminated: nothing was written"
    assert checksums(work) == before


# -- offline hub --------------------------------------------------------------------------------------

@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_without_network_fails_in_seconds(run_cli, tmp_path, monkeypatch, offline):
    """HF_HUB_OFFLINE is respected; without it an unreachable endpoint (a closed local port) is noticed
    at once instead of after a minute of retries. No external host is contacted."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.monotonic()
    with untouched(tmp_path):
        line = one_line(run_cli("record", "--model", "gpt2", "-p", "hi", "-o", tmp_path / "g.h5"))
    assert time.monotonic() - start < 4
    assert "save_pretrained" in line and "--model DIR" in line
    assert ("HF_HUB_OFFLINE is set" if offline else "unreachable (connection refused)") in line


# -- plugins from the current directory -------------------------------------------------------------

def test_backend_class_from_a_package_in_the_current_directory(run_cli, work, monkeypatch):
    pkg = work / "myport"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("from backends.numpy_backend import NumpyBackend\n\n\n"
                                "class Port(NumpyBackend):\n    name = 'myport'\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(work))])
    monkeypatch.delitem(sys.modules, "myport", raising=False)
    monkeypatch.delitem(sys.modules, "myport.mod", raising=False)
    code, out, err = run_cli("compare", "g.h5", "--backend", "myport.mod:Port", "-q")
    assert code == 0, err
    assert "neither installed nor under the current directory" in one_line(
        run_cli("compare", "g.h5", "--backend", "noport.mod:Port"))


# -- what a user sees while it works ------------------------------------------------------------------

def test_inspect_fits_80_columns(tiny_golden):
    from tracer.inspection import inspect_file, render_inspection
    from tracer.stages import StageSelector

    with Golden.open(tiny_golden) as g:
        info = inspect_file(g, StageSelector(), 0)
    xl = dict(info["cases"][0]["stages"][0], stage="blocks.47.attn.scores", shape=[1, 25, 1024, 1024],
              min=-12345.678, max=9.87654e-05, mean=-0.000123456, std=1234567.0)  # the widest row of gpt2-xl
    info["cases"][0]["stages"].append(xl)
    buf = io.StringIO()
    render_inspection(info, Console(file=buf, width=80, color_system=None))
    lines = buf.getvalue().splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    assert "…" not in buf.getvalue()
    text = " ".join(buf.getvalue().split())
    for s in info["cases"][0]["stages"]:
        row = next(line for line in lines if line.startswith(s["stage"] + " "))
        assert f"{s['std']:.3g}"[:4] in row, (s["stage"], row)  # std kept, digits reduced at most
        assert " ".join(f"{v:.4g}" for v in s["first8"]) in text  # all 8 values, on their own line(s)


def test_progress_shows_each_step_of_a_recording(tiny_loaded, tmp_path, monkeypatch):
    import tracer.progress as progress
    from tracer.record import build_cases, record_golden

    buf = io.StringIO()
    monkeypatch.setattr(progress, "_console", lambda: Console(file=buf, force_terminal=True, width=120))
    monkeypatch.setattr(progress, "progress_enabled", lambda quiet: not quiet)
    cases = build_cases(tiny_loaded, ["Hello", "World"], [], batch=False)
    with progress.session(quiet=False):
        record_golden(tiny_loaded, cases, str(tmp_path / "g.h5"), dtype="fp32", attn="eager",
                      progress=lambda items: progress.track(items, "recording"))
    shown = buf.getvalue()
    with Golden.open(tmp_path / "g.h5") as g:
        n_weights, n_stages = len(g.h5["weights"]) - 1, len(g.case("case0").stages())  # lm_head is a link
    for step in ("writing weights", "case0: forward, writing stages", "case1: forward, writing stages"):
        assert step in shown, step
    assert f"{n_weights}/{n_weights}" in shown and f"{n_stages}/{n_stages}" in shown and "2/2" in shown
    buf.truncate(0)
    with progress.session(quiet=True):
        record_golden(tiny_loaded, cases, str(tmp_path / "q.h5"), dtype="fp32", attn="eager")
    assert buf.getvalue() == ""
