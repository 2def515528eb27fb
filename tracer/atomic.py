"""Atomic text output: write to a temporary name in the same directory, then rename."""

from __future__ import annotations

import os
from pathlib import Path

from tracer.errors import TracerError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    out = Path(path)
    if out.parent and not out.parent.is_dir():
        raise TracerError(f"cannot write {out}: directory {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TracerError(f"could not write {out}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
