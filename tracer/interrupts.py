"""Ctrl-C and SIGTERM end a command the same way: what was being written is discarded, one line says so.

The console script calls `install()`: both signals raise KeyboardInterrupt, and which one it
was is kept for the CLI's line. File writers run inside `Deferred`, which only notes a signal
and raises it at the writer's next checkpoint, because an exception raised inside h5py's
cleanup callbacks is swallowed there (the file would look complete). A second signal while
one is pending raises at once, so a hung backend can still be stopped.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
_received: list[str] = []


def _raise(signum: int, frame: FrameType | None) -> None:
    _received.append(SIGNALS.get(signum, "interrupted"))
    raise KeyboardInterrupt


def install() -> None:
    """Both signals raise KeyboardInterrupt (SIGTERM would otherwise kill us mid-write, temp file left)."""
    _received.clear()
    for signum in SIGNALS:
        signal.signal(signum, _raise)


def ignore() -> None:
    """The command is over: a late signal must not turn a finished run into a traceback at exit."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def how() -> str:
    """'interrupted' (SIGINT, the default) or 'terminated' (SIGTERM): the last signal seen."""
    return _received[-1] if _received else "interrupted"


class Deferred:
    """Signals arriving inside are noted and raised by `check()`; `restore()` puts the old handlers back."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> Deferred:
        if threading.current_thread() is threading.main_thread():
            self._old = {signum: signal.signal(signum, self._note) for signum in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        _received.append(SIGNALS[signum])
        if self.pending is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.pending = signum

    def check(self) -> None:
        if self.pending is not None:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._old = {}
