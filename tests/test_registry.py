"""Backend registry: built-ins, module:Class plugins, entry points and exec: programs."""

from __future__ import annotations

import importlib.metadata as md
import io
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))

from goldens import record, stage_arrays  # noqa: E402

from backends import registry  # noqa: E402
from backends.exec_backend import ExecBackend  # noqa: E402
from backends.numpy_backend import NumpyBackend  # noqa: E402
from backends.registry import backends_command, list_backends, resolve_backend  # noqa: E402
from tracer.errors import TracerError  # noqa: E402
from tracer.replay import replay  # noqa: E402
from tracer.store import Trace  # noqa: E402

WRITER = f"{shlex.quote(sys.executable)} {shlex.quote(str(PLUGINS / 'write_trace.py'))}"


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    return record(tmp_path_factory.mktemp("registry") / "golden.h5", batch=False, prompts=["Hello, world"])


@pytest.fixture(scope="module")
def numpy_stages(golden, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("numpy") / "trace.h5"
    replay(golden, NumpyBackend(), out)
    return stage_arrays(out, "case0")


def assert_same_stages(trace: Path, expected: dict[str, np.ndarray]) -> None:
    got = stage_arrays(trace, "case0")
    assert list(got) == list(expected)
    for stage, value in expected.items():
        np.testing.assert_array_equal(got[stage], value, err_msg=stage)


def test_builtins_are_listed_and_numpy_runs():
    infos = {info.name: info for info in list_backends()}
    assert {"numpy", "cupy", "triton"} <= set(infos)
    assert infos["numpy"].available and infos["numpy"].origin == "built-in"
    for info in infos.values():
        assert info.available or info.why, f"{info.name} unavailable without a reason"
    backend = resolve_backend("numpy", "fp64", "skip-ln-f")
    assert isinstance(backend, NumpyBackend) and (backend.precision, backend.inject) == ("fp64", "skip-ln-f")


def test_unavailable_builtin_says_why(monkeypatch):
    monkeypatch.setitem(registry.BUILTINS, "cupy", "backends.no_such_backend_module:CupyBackend")
    info = {i.name: i for i in list_backends()}["cupy"]
    assert not info.available and "no_such_backend_module" in info.why
    with pytest.raises(TracerError, match="cannot import backends.no_such_backend_module"):
        resolve_backend("cupy")


def test_module_class_plugin_round_trips(golden, numpy_stages, tmp_path):
    backend = resolve_backend("sample_backends:EchoNumpy")
    assert backend.name == "echo-numpy"
    out = tmp_path / "trace.h5"
    replay(golden, backend, out)
    assert Trace.open(out).attrs["backend"] == "echo-numpy"
    assert_same_stages(out, numpy_stages)


def test_entry_point_plugin(monkeypatch):
    ep = md.EntryPoint(name="echo", value="sample_backends:EchoNumpy", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {"echo": ep})
    assert type(resolve_backend("echo")).__name__ == "EchoNumpy"
    info = {i.name: i for i in list_backends()}["echo"]
    assert info.available and info.origin.startswith("entry point")
    with pytest.raises(TracerError, match=r"known: numpy, cupy, triton, llamacpp, max, echo"):
        resolve_backend("nope")


@pytest.mark.parametrize("spec, message", [
    ("nope", r"unknown backend 'nope' \(known: numpy.*package.module:Class.*exec:"),
    ("sample_backends:Missing", "module sample_backends has no 'Missing'"),
    ("sample_backends:NotABackend", "is not a backend"),
    ("no_such_module_xyz:Thing", "cannot import no_such_module_xyz"),
    ("exec:", "empty command"),
    ("exec:prog {golden}", "has no {out}"),
    ("exec:prog 'unclosed {out}", "cannot parse command"),
])
def test_bad_specs(spec, message):
    with pytest.raises(TracerError, match=message):
        resolve_backend(spec)


def test_inject_is_checked_against_the_backend():
    with pytest.raises(TracerError, match="unknown bug 'bogus' for --inject"):
        resolve_backend("numpy", inject="bogus")
    with pytest.raises(TracerError, match="do not apply to exec"):
        resolve_backend(f"exec:{WRITER} {{golden}} {{out}}", inject="skip-wpe")


def test_exec_program_round_trips(golden, numpy_stages, tmp_path):
    backend = resolve_backend(f"exec:{WRITER} {{golden}} {{out}} --mode {{mode}}")
    assert isinstance(backend, ExecBackend)
    out = tmp_path / "trace.h5"
    replay(golden, backend, out, mode="both")
    assert_same_stages(out, numpy_stages)
    with Trace.open(out) as t:
        assert t.case("case0").stages("isolated") == list(numpy_stages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.h5"]


def test_exec_program_writing_a_foreign_npz_is_converted(golden, numpy_stages, tmp_path):
    out = tmp_path / "trace.h5"
    replay(golden, resolve_backend(f"exec:{WRITER} {{golden}} {{out}} --npz"), out)
    with Trace.open(out) as t:
        assert t.golden_id  # a native trace now, lined up with the golden's case
    assert_same_stages(out, numpy_stages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.h5"]


@pytest.mark.parametrize("args, mode, message", [
    ("--fail", "chained", r"exited with code 3: port crashed: CUDA error: illegal memory access$"),
    ("--nothing", "chained", r"exited 0 but wrote nothing at .*\.trace\.h5\.exec-"),
    ("--garbage", "chained", r"wrote neither a gpt2-tracer trace nor a usable foreign dump"),
    ("", "isolated", r"--mode isolated asked for, but the exec command has no \{mode\}"),
])
def test_exec_failures_leave_nothing(args, mode, message, golden, tmp_path):
    backend = resolve_backend(f"exec:{WRITER} {{golden}} {{out}} {args}")
    with pytest.raises(TracerError, match=message):
        replay(golden, backend, tmp_path / "trace.h5", mode=mode)
    assert list(tmp_path.iterdir()) == []


def test_exec_trace_of_another_golden_is_refused(golden, tmp_path):
    other = record(tmp_path / "other.h5", batch=False, prompts=["different"])
    backend = resolve_backend(f"exec:{WRITER} {shlex.quote(str(other))} {{out}}")
    with pytest.raises(TracerError, match="wrote a trace of golden .*, but .* is golden"):
        replay(golden, backend, tmp_path / "trace.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.h5"]


def test_exec_missing_program(golden, tmp_path):
    backend = resolve_backend("exec:/no/such/program {golden} {out}")
    with pytest.raises(TracerError, match="cannot run '/no/such/program'"):
        replay(golden, backend, tmp_path / "trace.h5")


def test_backends_command_table():
    buf = io.StringIO()
    backends_command(Console(file=buf, width=200))
    lines = buf.getvalue().splitlines()
    numpy_row = next(line for line in lines if "numpy" in line and "built-in" in line)
    assert "yes" in numpy_row
