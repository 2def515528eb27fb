"""Progress you can see: determinate rich bars on stderr while a command works, nothing otherwise.

Library code reports its steps with `track` (wrap a sized iterable) and `step` (count by hand).
Both are silent unless a command has opened `session(quiet)`, and that shows bars only when
stderr is a terminal and `--quiet` is not given, so tests, pipes and library users see nothing.
All steps of a command share one rich display: nested ones (the cases of a recording, the
stages of each case) show together, each as done/total with the time it has taken.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
Advance = Callable[..., None]

_board: Progress | None = None


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _console() -> Console:
    return Console(stderr=True)


@contextmanager
def session(quiet: bool) -> Iterator[None]:
    """Show the steps run inside as progress bars (on a terminal, without --quiet)."""
    global _board
    if _board is not None or not progress_enabled(quiet):
        yield
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    _board = Progress(*columns, console=_console(), transient=True)
    try:
        with _board:
            yield
    finally:
        _board = None


def _nothing(n: int = 1) -> None:
    return None


@contextmanager
def step(description: str, total: int | None) -> Iterator[Advance]:
    """A counted step: `with step("writing weights", 148) as advance: ... advance()`."""
    board = _board
    if board is None:
        yield _nothing
        return
    task = board.add_task(description, total=total)
    board.refresh()  # shown at once, even if the step is over before the next automatic refresh
    try:
        yield lambda n=1: board.advance(task, n)
        board.refresh()
    finally:
        board.remove_task(task)


def track(items: Iterable[T], description: str, quiet: bool = False, total: int | None = None) -> Iterator[T]:
    """Iterate `items`, one step each (`quiet` keeps this step silent even inside a session)."""
    if quiet or _board is None:
        yield from items
        return
    if total is None and isinstance(items, Sized):
        total = len(items)
    with step(description, total) as advance:
        for item in items:
            yield item
            advance()
