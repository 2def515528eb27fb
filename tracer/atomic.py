"""One rule for every file tracer writes (SPEC §7).

* An existing file is refused without --force, and so are a directory, a missing directory and
  one we may not write to.
* The path is reserved first, by creating `.NAME.lock` next to it exclusively (it holds our
  pid). A command reserves its outputs before the long work, so a read-only or full directory,
  or a second tracer writing the same path, fails at once with one line: never after minutes
  of work, and never by silently replacing the other's file. A lock left by a killed process
  (its pid is gone) is taken over.
* Content goes to `.NAME.tmp-PID` in the same directory and is renamed onto the path only
  when complete; on any error or interrupt the temporary file is removed and the path keeps
  what it had.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tracer.errors import TracerError, io_error

# Outputs this process has renamed into place, so an interrupt can say what is complete.
completed: list[Path] = []
_held: dict[str, int] = {}  # absolute path -> nesting depth of this process's reservations
LOCK_BIRTH_S = 10.0  # a lock file still empty after this long was left by a process killed at birth


def check_output_path(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to clobber an existing file (without --force) or write where we cannot."""
    out = Path(path)
    if out.is_dir():
        raise TracerError(f"output path {out} is a directory")
    if out.exists() and not force:
        raise TracerError(f"{out} already exists (use --force to overwrite)")
    check_parent_writable(out)
    return out


def check_parent_writable(out: Path) -> None:
    """The directory `out` goes into exists and can be written: checked before any long work."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise TracerError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TracerError(f"cannot write {out}: directory {parent} is not writable")


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _holder(lock: Path) -> int | None:
    """The live pid holding `lock` (0 while its creator has not written it yet), or None if stale or gone."""
    try:
        text = lock.read_text(encoding="ascii", errors="replace").strip()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if not text:
        return 0 if age < LOCK_BIRTH_S else None
    try:
        pid = int(text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, another user's
    return pid


class Reservation:
    """Holds the lock file of one output path; nested reservations of a path in one process share it."""

    def __init__(self, path: str | os.PathLike, force: bool = False):
        self.path = check_output_path(path, force)
        self.force = force
        self.lock = lock_path(self.path)
        self._key = os.path.abspath(self.path)

    def __enter__(self) -> Reservation:
        if self._key not in _held:
            self._acquire()
            check_output_path(self.path, self.force)  # finished by another process while we waited for the lock
        _held[self._key] = _held.get(self._key, 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        _held[self._key] -= 1
        if not _held[self._key]:
            del _held[self._key]
            with contextlib.suppress(OSError):
                self.lock.unlink(missing_ok=True)

    def _acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _holder(self.lock)
                if pid is None:  # stale: its process is gone
                    with contextlib.suppress(OSError):
                        self.lock.unlink()
                    continue
                who = f"pid {pid}" if pid else "a process starting up"
                raise TracerError(f"{self.path} is being written by another tracer process ({who}); "
                                  f"if none is running, delete {self.lock}") from None
            except OSError as exc:
                raise io_error("write", self.path, exc) from None
            try:
                os.write(fd, str(os.getpid()).encode())
            except OSError as exc:
                os.close(fd)
                with contextlib.suppress(OSError):
                    self.lock.unlink()
                raise io_error("write", self.path, exc) from None
            os.close(fd)
            return
        raise TracerError(f"could not lock {self.path}: {self.lock} keeps coming back")


class OutputFile:
    """One output being written: reserved on enter, written at `tmp`, renamed onto `path` by `commit()`;
    left without a commit (error, interrupt), the temporary file is removed."""

    def __init__(self, path: str | os.PathLike, force: bool = False):
        self._reservation = Reservation(path, force)
        self.path = self._reservation.path
        self.force = force
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.committed = False

    def __enter__(self) -> OutputFile:
        self._reservation.__enter__()
        return self

    def commit(self) -> None:
        rename_into_place(self.tmp, self.path, self.force)
        self.committed = True

    def __exit__(self, *exc: object) -> None:
        try:
            if not self.committed:
                with contextlib.suppress(OSError):  # on a read-only file system even this fails
                    self.tmp.unlink(missing_ok=True)
        finally:
            self._reservation.__exit__(*exc)


def rename_into_place(tmp: Path, path: Path, force: bool) -> None:
    """The last step of every output: a complete temporary file becomes `path`."""
    if not force and path.exists():
        raise TracerError(f"{path} already exists (use --force to overwrite)")
    try:
        os.replace(tmp, path)
        completed.append(path)
    except OSError as exc:
        raise io_error("write", path, exc) from None
    except BaseException:  # Ctrl-C: if it landed just after the rename, the file is complete and says so
        if path not in completed and not tmp.exists() and path.exists():
            completed.append(path)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, force: bool = False) -> None:
    """Write a text file by the rule above (a reservation of `path` this process holds is reused)."""
    with OutputFile(path, force) as out:
        try:
            out.tmp.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise io_error("write", out.path, exc) from None
        out.commit()
