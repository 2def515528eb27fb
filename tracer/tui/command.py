"""What `tracer diff` does: compare once, then browse the result interactively (or print it).

The interactive view reads stage values while the user moves around, so the trace file has
to outlive the comparison: a replayed (`--backend`) or converted (foreign dump) trace is kept
in a temporary directory until the viewer closes. Without a terminal, or with `--no-tui`,
it prints the same static report as `tracer compare`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from tracer.compare.result import CompareResult
from tracer.compare.run import CompareRequest, run_compare
from tracer.errors import TracerError
from tracer.store import Golden, StageFile

INSTALL_HINT = "the interactive diff needs textual: pip install 'gpt2-tracer[tui]' (or pass --no-tui)"


def require_textual() -> None:
    try:
        import textual  # noqa: F401
    except ImportError:
        raise TracerError(INSTALL_HINT) from None


def diff_command(golden: Path, trace: Path | None, backend: str | None, inject: str | None, case: str | None,
                 no_tui: bool, console: Console) -> int:
    """Exit code as `tracer compare`: 0 pass, 1 divergence (usage errors raise TracerError -> 2)."""
    if no_tui or not console.is_terminal:
        result = run_compare(CompareRequest(golden, trace, backend, inject, case=case))
        from tracer.reports.terminal import render_terminal

        render_terminal(result, console)
        return result.exit_code
    require_textual()  # before any replay: say it in one line, not after minutes of work
    if (trace is None) == (backend is None):
        raise TracerError("give either a TRACE file or --backend NAME (not both)")
    workdir = Path(tempfile.mkdtemp(prefix="tracer-diff-"))
    try:
        with Golden.open(golden) as g:
            path, label = _native_trace(golden, g, trace, backend, inject, case, workdir)
        result = run_compare(CompareRequest(golden, path, case=case))
        result.trace = label
        return browse(result, golden, path, case, console)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _native_trace(golden_path: Path, golden: Golden, trace: Path | None, backend: str | None, inject: str | None,
                  case: str | None, workdir: Path) -> tuple[Path, str]:
    """(an .h5 trace that stays readable while the viewer runs, what to call it)."""
    if backend is not None:
        from tracer.compare.run import replayed_trace

        path = replayed_trace(CompareRequest(golden_path, backend=backend, inject=inject), golden, workdir)
        return path, f"{backend} replay" + (f" (inject {inject})" if inject else "")
    if inject:
        raise TracerError("--inject needs --backend (it is applied while replaying)")
    from tracer.foreign import import_foreign, is_foreign

    assert trace is not None
    if not is_foreign(trace):
        return trace, trace.name
    out = workdir / f"{trace.stem or 'foreign'}.h5"
    import_foreign(trace, golden, out, case=case)
    return out, trace.name


def browse(result: CompareResult, golden: Path, trace: Path, case: str | None, console: Console) -> int:
    """Run the viewer on `result` (whose golden and trace are the given files); print kept lines."""
    from tracer.tui.app import DiffApp
    from tracer.tui.data import StageData

    chosen = pick_case(result, case)
    with Golden.open(golden) as g, StageFile.open(trace) as t:
        app = DiffApp(result, StageData(g, t, chosen.case), chosen)
        app.run()
    for line in app.yanked:
        console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
    return result.exit_code


def pick_case(result: CompareResult, case: str | None):
    """The asked case, else the one that diverges first, else the first."""
    name = case or (result.first_divergence or {}).get("case") or result.cases[0].case
    return next(c for c in result.cases if c.case == name)
