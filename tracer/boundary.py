"""The console script's one error boundary (SPEC §7): whatever goes wrong, one line and an exit code.

* A bare `tracer` prints the help on stderr and exits 2.
* Every usage error of the installed CLI library exits 2 with one line. Typer has shipped click
  as its own dependency and, since 0.2x, as a vendored copy (`typer._click`); both raise
  exceptions derived from a class named `ClickException`, so they are recognised by their class
  hierarchy, not by importing one particular click.
* `TracerError` and any `OSError` (HDF5 errors included) exit 2 with one line naming the file
  and the cause in words (disk full, read-only file system, permission denied).
* Ctrl-C and SIGTERM exit 2 with one line that says what, if anything, was completely written.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from tracer import atomic, interrupts
from tracer.errors import TracerError, os_error_reason

USAGE = 2
INTERRUPTED_BY_TYPER = 130  # typer turns a KeyboardInterrupt inside a command into this return value


def run_console(app: Any, err: Console, argv: list[str]) -> int:
    """Run the typer `app` on `argv` and return the process exit code; never raises (except bugs)."""
    interrupts.install()
    atomic.completed.clear()
    try:
        code = _dispatch(app, err, argv)
    except KeyboardInterrupt:  # landed while an error line was being printed
        code = _interrupted(err)
    interrupts.ignore()  # a signal now would only turn a finished command into noise at exit
    return code


def _dispatch(app: Any, err: Console, argv: list[str]) -> int:
    try:
        if not argv:
            with contextlib.redirect_stdout(sys.stderr):
                app(args=["--help"], prog_name="tracer", standalone_mode=False)
            return USAGE
        rc = app(args=argv, prog_name="tracer", standalone_mode=False)
    except KeyboardInterrupt:
        return _interrupted(err)
    except TracerError as exc:
        return fail(err, str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return fail(err, f"{where}{os_error_reason(exc)}")
    except EOFError:
        return fail(err, "no input (end of file)")
    except Exception as exc:
        if _is_click_exception(exc):
            return fail(err, usage_line(exc))
        if type(exc).__name__ in ("Exit", "Abort") and hasattr(exc, "exit_code"):
            return int(exc.exit_code)  # a command's own `raise typer.Exit(code)`
        if type(exc).__name__ == "Abort":
            return fail(err, "aborted")
        raise
    if rc == INTERRUPTED_BY_TYPER:
        return _interrupted(err)
    return rc if isinstance(rc, int) else 0


def _is_click_exception(exc: BaseException) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def usage_line(exc: Any) -> str:
    """`Invalid value for '--seed': ... (see 'tracer record --help')` on one line."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(message.split())
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return f"{message} (see '{path} --help')" if path else message


def fail(err: Console, message: str) -> int:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return USAGE


def _interrupted(err: Console) -> int:
    how = interrupts.how()
    done = [str(p) for p in atomic.completed]
    if done:
        text = f"{how} after {', '.join(done)} was completely written; nothing else was written"
    else:
        text = f"{how}: nothing was written"
    err.print(f"[bold red]{how}[/]{escape(text[len(how):])}", highlight=False, soft_wrap=True)
    return USAGE
