"""Progress bars for long work: rich on a terminal, silent otherwise or with --quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def track(items: Iterable[T], description: str, quiet: bool = False, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a progress bar on stderr when it is a terminal."""
    if not progress_enabled(quiet):
        yield from items
        return
    from rich.console import Console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)
