"""User-facing errors.

Anything the user can fix (bad path, wrong format, unknown stage, a full disk...) is raised
as a `TracerError`; the CLI prints its message on one line and exits with code 2. Everything
else is a bug in the tool and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


class TracerError(Exception):
    """An input or usage error explained in one line; CLI exit code 2."""


# What a user can act on, in words; everything else falls back to the system's own text.
ERRNO_WORDS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a parent is not a directory",
    errno.EISDIR: "is a directory",
    errno.EIO: "I/O error (failing disk or network file system?)",
}
_HDF5_ERRNO = re.compile(r"errno = (\d+)")


def os_error_reason(exc: BaseException) -> str:
    """Plain words for an OSError, including h5py's multi-line HDF5 messages (which carry
    `errno = N` among buffer addresses rather than in `exc.errno`)."""
    code = getattr(exc, "errno", None)
    text = str(getattr(exc, "strerror", None) or exc)
    if code is None:
        m = _HDF5_ERRNO.search(text)
        code = int(m[1]) if m else None
    if code in ERRNO_WORDS:
        detail = getattr(exc, "strerror", None)
        own = detail and detail != os.strerror(code)  # a message of ours, such as how much room is left
        return f"{ERRNO_WORDS[code]} ({detail})" if own else ERRNO_WORDS[code]
    if code:
        return os.strerror(code)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return re.sub(r"\s*\(.*", "", first) or first  # HDF5 appends "(file write failed: ... buf = 0x...)"


def io_error(action: str, path: str | os.PathLike, exc: BaseException) -> TracerError:
    """`cannot <action> <path>: <reason>` as a TracerError, ready to raise ... from None."""
    return TracerError(f"cannot {action} {path}: {os_error_reason(exc)}")


def read_parsed(path: Path, parse: Callable[[str], Any], invalid: Callable[[Exception], str],
                missing: str | None = None) -> Any:
    """`parse` (json.loads, tomllib.loads) of the UTF-8 text file `path`, or one line: `missing` when
    there is no such path (None: the OS's words), `invalid(error)` when it is not UTF-8 or does not
    parse, and the OS's reason when it cannot be read (a directory, no permission)."""
    if missing is not None and not path.exists():
        raise TracerError(missing)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TracerError(invalid(exc)) from None
    except OSError as exc:
        raise io_error("read", path, exc) from None
    try:
        return parse(text)
    except ValueError as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise TracerError(invalid(exc)) from None
