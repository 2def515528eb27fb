"""Reports of a comparison: terminal, HTML, Markdown, JUnit and JSON, all from one CompareResult.

Reports only read the result (or its JSON via `CompareResult.load`); they never open golden
or trace files, so `tracer report RESULT.json` renders any format later, on another machine.
Files are written atomically: a reader never sees half a report.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from tracer.atomic import check_output_path, write_text_atomic
from tracer.compare.result import CompareResult
from tracer.errors import TracerError

FORMATS = ("terminal", "html", "md", "junit", "json")
TERMINAL_FILE_WIDTH = 100  # a terminal report written to a file: plain text this wide


def _renderer(fmt: str) -> Callable[[CompareResult], str]:
    if fmt == "html":
        from tracer.reports.html import render_html

        return render_html
    if fmt == "md":
        from tracer.reports.markdown import render_markdown

        return render_markdown
    if fmt == "junit":
        from tracer.reports.junit import render_junit

        return render_junit
    if fmt == "json":
        return lambda result: result.to_json() + "\n"
    return _terminal_text


def _terminal_text(result: CompareResult) -> str:
    from tracer.reports.terminal import render_terminal

    console = Console(file=io.StringIO(), width=TERMINAL_FILE_WIDTH, color_system=None, force_terminal=False,
                      force_jupyter=False, legacy_windows=False)
    render_terminal(result, console)
    return console.file.getvalue()


def check_format(fmt: str) -> str:
    """The canonical format name, or a TracerError listing the formats."""
    name = {"markdown": "md", "xml": "junit"}.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise TracerError(f"unknown report format {fmt!r} (formats: {', '.join(FORMATS)})")
    return name


def write_report(result: CompareResult, fmt: str, path: Path | None, console: Console, force: bool = False) -> None:
    """Write `result` as `fmt` to `path` (an existing file only with `force`), or print it on `console`
    when `path` is None."""
    fmt = check_format(fmt)
    if path is None:
        if fmt == "terminal":
            from tracer.reports.terminal import render_terminal

            render_terminal(result, console)
        else:
            console.print(_renderer(fmt)(result), markup=False, highlight=False, emoji=False, soft_wrap=True,
                          end="")
        return
    write_text_atomic(path, _renderer(fmt)(result), force)


def report_command(result_json: Path, fmt: str, out: Path | None, console: Console, force: bool = False) -> None:
    """`tracer report RESULT.json --format F [-o FILE]`: render a saved result (exit 0 once rendered;
    the pass/fail verdict is `tracer compare`'s exit code and is inside the report)."""
    fmt = check_format(fmt)
    if out is not None:
        check_output_path(out, force)  # before reading the result
    result = CompareResult.load(result_json)
    write_report(result, fmt, out, console, force)
    if out is not None:
        console.print(f"wrote {fmt} report -> {out}", highlight=False)
