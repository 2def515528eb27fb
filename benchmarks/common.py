"""Shared helpers of the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class ChildRun:
    """One child process: wall seconds, CPU seconds (user + system) and peak RSS, from wait4."""

    wall: float
    cpu: float
    peak_rss: int  # bytes
    returncode: int
    stderr: str


# A child forked from this (large) process would count this process's memory in its own peak RSS,
# so children start from a small launcher: it forks and execs the command, and reports the
# command's own wall time, CPU time, peak RSS and exit code from wait4.
_LAUNCHER = """
import os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(argv[0], argv)
_, status, ru = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{time.perf_counter() - start} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss * 1024} "
            f"{os.waitstatus_to_exitcode(status)}")
"""


def run_child(argv: Sequence[str], timeout: float | None = None) -> ChildRun:
    """Run `argv` to completion: its own wall time, CPU time (user + system) and peak RSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        report, errors = Path(tmp) / "report", Path(tmp) / "stderr"
        with open(errors, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), *map(str, argv)],
                                    stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = errors.read_text()
        if not report.exists():
            return ChildRun(float(timeout or 0), 0.0, 0, -9, f"killed after {timeout:.0f} s\n{text}")
        wall, cpu, rss, code = report.read_text().split()
        return ChildRun(float(wall), float(cpu), int(rss), int(code), text)


def tracer_cli(*args: object) -> list[str]:
    """argv of this interpreter's `tracer` console script."""
    script = Path(sys.executable).with_name("tracer")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "tracer.cli"]
    return head + [str(a) for a in args]


def h5py_write_seconds(arrays: list[np.ndarray], path: Path) -> float:
    """Wall time to write `arrays` as contiguous datasets of a new HDF5 file and rename it into place:
    the disk's speed for these bytes, the way any HDF5 writer would get it."""
    tmp = path.with_name(path.name + ".tmp")
    start = time.perf_counter()
    with h5py.File(tmp, "w") as f:
        for k, a in enumerate(arrays):
            f.create_dataset(str(k), data=a)
    os.replace(tmp, path)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def same_bytes_as(golden: Path, group: str = "stages") -> list[np.ndarray]:
    """Arrays of the shapes and dtypes of every dataset under `group` of a file (touched: in memory)."""
    shapes: list[tuple[tuple[int, ...], np.dtype]] = []

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and f"/{group}/" in f"/{name}":
            shapes.append((obj.shape, obj.dtype))

    with h5py.File(golden, "r") as f:
        f.visititems(visit)
    return [np.ones(shape, dtype) for shape, dtype in shapes]


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
