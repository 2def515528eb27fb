"""`--backend exec:"CMD {golden} {out}"`: an external program writes the whole trace.

Why: a port in C++, Rust or another Python environment cannot be imported as a Backend
class, but it can read the golden and write its stages. The program is run without a shell
(the command is split like a shell would), `{golden}` becomes the golden path, `{out}` a
temporary path next to the final output and `{mode}` the replay mode. What it leaves at
`{out}` must be a gpt2-tracer trace of that very golden or, where `tracer.foreign` is
installed, a foreign `.npz` / `.safetensors` / `.npy` directory, which is converted. Only a
validated trace is renamed into place; anything else leaves no file behind.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import h5py

from tracer.atomic import Reservation, rename_into_place
from tracer.errors import TracerError
from tracer.store import Golden, Trace

EXEC_PREFIX = "exec:"
DEFAULT_TIMEOUT_S = 3600.0  # generous: a real port of gpt2-xl on a slow machine; --timeout to change it


class ExecBackend:
    """Not a `Backend`: no forward, it produces a whole trace; `replay()` dispatches on it."""

    name = "exec"
    precision = ""
    inject = None
    supported_injections: frozenset[str] = frozenset()

    def __init__(self, command: str, timeout: float | None = None):
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise TracerError(f"exec: cannot parse command {command!r}: {exc}") from None
        if not self.argv:
            raise TracerError('exec: empty command (use exec:"CMD {golden} {out}")')
        if not any("{out}" in arg for arg in self.argv):
            raise TracerError(f"exec command {command!r} has no {{out}}: the program must be told where to write")
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        if not self.timeout > 0:
            raise TracerError(f"--timeout must be a positive number of seconds, not {self.timeout:g}")
        self.command = command

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, ""

    def produce(self, golden_path: str | os.PathLike, out_path: str | os.PathLike, mode: str = "chained",
                force: bool = False) -> None:
        """Run the program, validate what it wrote, rename it onto `out_path` (reserved meanwhile)."""
        if mode != "chained" and not any("{mode}" in arg for arg in self.argv):
            raise TracerError(f"--mode {mode} asked for, but the exec command has no {{mode}} to pass it on")
        with Golden.open(golden_path) as golden:
            golden_id = golden.golden_id
        with Reservation(out_path, force) as reservation:
            out = reservation.path
            tmp = out.with_name(f".{out.name}.exec-{os.getpid()}{out.suffix}")
            argv = [arg.replace("{golden}", str(golden_path)).replace("{out}", str(tmp)).replace("{mode}", mode)
                    for arg in self.argv]
            try:
                self._run(argv, tmp)
                if h5py.is_hdf5(tmp):
                    self._check_trace(tmp, golden_id, golden_path)
                    rename_into_place(tmp, out, force)
                else:
                    self._import_foreign(tmp, golden_path, out)
            finally:
                _remove(tmp)

    def _run(self, argv: list[str], tmp: Path) -> None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise TracerError(f"exec program {argv[0]} did not finish within {self.timeout:g} s and was stopped "
                              "(raise --timeout if it needs longer)") from None
        except OSError as exc:
            raise TracerError(f"exec: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            last = f": {lines[-1].strip()}" if lines else " (no stderr)"
            raise TracerError(f"exec program {argv[0]} exited with code {done.returncode}{last}")
        if not tmp.exists():
            raise TracerError(f"exec program {argv[0]} exited 0 but wrote nothing at {tmp}")

    @staticmethod
    def _check_trace(tmp: Path, golden_id: str, golden_path: str | os.PathLike) -> None:
        try:
            with Trace.open(tmp) as trace:
                trace_golden = trace.golden_id
        except TracerError as exc:
            raise TracerError(f"exec program's output is not a usable trace: {exc}") from None
        if trace_golden != golden_id:
            raise TracerError(f"exec program wrote a trace of golden {trace_golden or '(none)'}, "
                              f"but {golden_path} is golden {golden_id}")

    @staticmethod
    def _import_foreign(tmp: Path, golden_path: str | os.PathLike, out: Path) -> None:
        from tracer.foreign import import_foreign

        try:
            with Golden.open(golden_path) as golden:
                import_foreign(_with_foreign_suffix(tmp), golden, out, force=True)
        except TracerError as exc:
            raise TracerError(f"exec program wrote neither a gpt2-tracer trace nor a usable foreign dump: {exc}") \
                from None


def _with_foreign_suffix(path: Path) -> Path:
    """Rename `path` so its suffix says its format (.npz zip, .safetensors, or a .npy directory)."""
    if path.is_dir():
        return path
    with open(path, "rb") as f:
        magic = f.read(2)
    target = path.with_name(path.name + (".npz" if magic == b"PK" else ".safetensors"))
    os.replace(path, target)
    return target


def _remove(tmp: Path) -> None:
    for p in (tmp, tmp.with_name(tmp.name + ".npz"), tmp.with_name(tmp.name + ".safetensors")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
