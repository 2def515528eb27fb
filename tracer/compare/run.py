"""What `tracer compare` does, end to end: get a trace, compare, write reports, gate."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from rich.console import Console

from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.result import CompareResult
from tracer.compare.tolerance import Tolerances
from tracer.allocator import reuse_large_allocations
from tracer.atomic import Reservation
from tracer.errors import TracerError
from tracer.progress import session, track
from tracer.stages import StageSelector, canonical_stages
from tracer.store import Golden, StageFile


@dataclass
class CompareRequest:
    golden: Path
    trace: Path | None = None
    backend: str | None = None
    inject: str | None = None
    precision: str = "fp32"
    mode: str | None = None           # with --backend; None: both, or chained for a --tokens golden
    tolerance: str | None = None
    stage: str | None = None
    token: int | None = None
    case: str | None = None
    name_map: Path | None = None
    reports: dict[str, Path] = field(default_factory=dict)   # fmt -> path (json, html, md, junit)
    baseline: Path | None = None
    update_baseline: bool = False
    require: str | None = None
    log_format: bool = False
    verbose: bool = False
    quiet: bool = False
    weights: Path | None = None       # the port's checkpoint: judge it against its own weights
    force: bool = False              # overwrite existing report files
    timeout: float | None = None     # exec: backends (None: their default)


def replayed_trace(req: CompareRequest, golden: Golden, workdir: Path) -> Path:
    from backends.registry import resolve_backend
    from tracer.replay import replay

    backend = resolve_backend(req.backend, req.precision, req.inject, req.timeout)
    out = workdir / "trace.h5"
    mode = req.mode or ("chained" if golden.attrs.get("tokens") else "both")  # teacher forcing needs every row
    replay(req.golden, backend, out, mode, progress=partial(track, description=f"replaying ({req.backend})",
                                                                  quiet=req.quiet))
    return out


def run_compare(req: CompareRequest) -> CompareResult:
    """Compare (replaying first with --backend), attach baseline regressions; no output."""
    if (req.trace is None) == (req.backend is None):
        raise TracerError("give either a TRACE file or --backend NAME (not both)")
    if req.inject and not req.backend:
        raise TracerError("--inject needs --backend (it is applied while replaying)")
    tolerances = Tolerances.parse(req.tolerance)
    selector = StageSelector.parse(req.stage)
    reuse_large_allocations()  # this process compares: big temporaries from the heap (see tracer.allocator)
    workdir = Path(tempfile.mkdtemp(prefix="tracer-compare-"))
    cleanup = lambda: None  # noqa: E731
    try:
        with Golden.open(req.golden) as golden:
            check_request(req, golden, tolerances)
            if req.backend:
                trace = StageFile.open(replayed_trace(req, golden, workdir))
                cleanup = trace.close
            elif req.trace is not None and _is_foreign(req.trace):
                from tracer.foreign import open_trace_any

                trace, cleanup = open_trace_any(req.trace, golden, case=req.case, name_map=req.name_map,
                                                warn=_warn)
            else:
                trace = StageFile.open(req.trace)
                cleanup = trace.close
            options = CompareOptions(tolerances, selector, req.token, [req.case] if req.case else None,
                                     require_selector(req.require, golden))
            if req.weights is not None:
                from tracer.weights.load import port_weights

                options.weights, options.weights_note = port_weights(req.weights, golden, req.name_map)
            result = compare(golden, trace, options,
                             progress=partial(track, description="comparing", quiet=req.quiet))
    finally:
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    if req.trace is None:
        result.trace = f"{req.backend} replay" + (f" (inject {req.inject})" if req.inject else "")
    if req.baseline is not None:
        from tracer.gate import load_baseline, regressions, write_baseline

        result.baseline = str(req.baseline)
        if req.update_baseline:
            write_baseline(result, req.baseline)
        else:
            result.regressions = regressions(result, load_baseline(req.baseline))
    elif req.update_baseline:
        raise TracerError("--update-baseline needs --baseline FILE")
    return result


def require_selector(spec: str | None, golden: Golden) -> StageSelector | None:
    """`--require all` or globs: the stages a trace must hold (a glob matching no stage is an error)."""
    if not spec:
        return None
    if spec.strip() == "all":
        return StageSelector(("*",))
    selector = StageSelector.parse(spec)
    selector.select(golden.case(golden.case_names()[0]).stages(), what="stage for --require")
    return selector


def check_request(req: CompareRequest, golden: Golden, tolerances: Tolerances) -> None:
    """What the golden alone can refute — before any replay, and listing what is valid."""
    if req.case is not None and not golden.has_case(req.case):
        raise TracerError(f"--case {req.case!r}: {golden.path} has no such case (cases: "
                          f"{', '.join(golden.case_names()) or 'none'})")
    stages = canonical_stages(golden.n_layer)
    StageSelector.parse(req.stage).select(stages)
    tolerances.check_patterns(stages)
    if req.token is not None:
        names = [req.case] if req.case is not None else golden.case_names()
        lengths = {name: int(golden.case(name).input_ids.shape[1]) for name in names}
        if not 0 <= req.token < max(lengths.values(), default=0):
            valid = ", ".join(f"{name}: 0..{T - 1}" for name, T in lengths.items())
            raise TracerError(f"--token {req.token} is out of range (valid tokens: {valid})")


def _warn(message: str) -> None:
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _is_foreign(path: Path) -> bool:
    from tracer.foreign import is_foreign

    return is_foreign(path)


def compare_command(req: CompareRequest, console: Console) -> int:
    """Run the comparison, print the terminal report, write the asked-for files; exit code.

    Report paths (and an updated baseline) are reserved before the comparison runs, so an
    existing, unwritable or busy output fails at once, not after the replay."""
    from tracer.reports import write_report

    with contextlib.ExitStack() as outputs:
        for path in _report_paths(req):
            outputs.enter_context(Reservation(path, req.force))
        if req.update_baseline and req.baseline is not None:
            outputs.enter_context(Reservation(req.baseline, force=True))
        with session(req.quiet):
            result = run_compare(req)
        for fmt, path in req.reports.items():
            write_report(result, fmt, path, console, force=req.force)
    if not req.quiet:
        from tracer.reports.terminal import render_terminal

        render_terminal(result, console, stage_glob=req.stage, token=req.token, log_format=req.log_format,
                        verbose=req.verbose)
        for fmt, path in req.reports.items():
            console.print(f"wrote {fmt} report -> {path}")
        if req.update_baseline:
            console.print(f"baseline updated -> {req.baseline}")
    return result.exit_code


def _report_paths(req: CompareRequest) -> list[Path]:
    seen: dict[str, str] = {}
    for fmt, path in req.reports.items():
        key = os.path.abspath(path)
        if key in seen:
            raise TracerError(f"--{seen[key]} and --{fmt} both write {path}: give each report its own file")
        seen[key] = fmt
    return list(req.reports.values())
