"""`tracer replay`: run a candidate backend on a golden's inputs, stream every tapped stage to a trace.

The backend never knows the mode; the tap decides it (SPEC §5). In chained mode the tap
records the value and hands it back, so the candidate runs on its own numbers. In isolated
(teacher-forced) mode it records the value and hands back the golden value of that stage,
so each stage's error is its own. `both` runs the forward twice per case. Chained values go
under `/cases/<case>/stages`, isolated ones under `/cases/<case>/isolated` (also when only
isolated mode is asked for: a group name always means one mode).

Values are written the moment they are tapped, so the trace is never held in memory, and
everything the backend gets wrong (bad stage names, a crash, wrong-shaped logits) becomes
one TracerError line with nothing written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from backends.exec_backend import ExecBackend
from backends.inject import describe_catalog
from backends.protocol import Backend
from backends.registry import backend_class, resolve_backend
from tracer.atomic import Reservation, check_output_path
from tracer.errors import TracerError, io_error
from tracer.progress import session, step, track
from tracer.provenance import trace_attrs
from tracer.stages import stage_order
from tracer.store import CaseView, Golden, StageWriter

MODES = ("chained", "isolated", "both")
GROUPS = {"chained": ("stages",), "isolated": ("isolated",), "both": ("stages", "isolated")}
class StageTap:
    """The `tap` of one forward: records each stage, returns the value the backend goes on with."""

    def __init__(self, backend: Backend, writer: StageWriter, golden_case: CaseView, group: str,
                 orders: dict[str, int], on_stage: Callable[[], None] = lambda: None):
        self.on_stage = on_stage
        self.backend = backend
        self.writer = writer
        self.golden_case = golden_case
        self.group = group
        self.teacher_forced = group == "isolated"
        self.orders = orders
        self.seen: set[str] = set()

    def __call__(self, stage: str, value: Any) -> Any:
        name, case = self.backend.name, self.golden_case.name
        if stage not in self.orders:
            raise TracerError(f"backend {name} tapped unknown stage {stage!r} in case {case!r} "
                              f"(not a canonical stage of this {len(self.orders)}-stage model)")
        if stage in self.seen:
            raise TracerError(f"backend {name} tapped stage {stage!r} twice in one forward of case {case!r}")
        self.seen.add(stage)
        array = np.asarray(self.backend.to_numpy(value))
        self.record(stage, array)
        if not self.teacher_forced or not self.golden_case.has(stage):
            return value
        if self.golden_case.dataset(stage).shape != array.shape:
            return value  # recorded as-is; the comparator reports the shape mismatch
        return self.backend.from_numpy(self.golden_case.read(stage), like=value)

    def record(self, stage: str, array: np.ndarray) -> None:
        try:
            declared = getattr(self.backend, "declared_precision", lambda _: None)(stage)
            self.writer.write_stage(self.golden_case.name, stage, array, self.orders[stage], group=self.group,
                                    **({"precision": declared} if declared else {}))
        except OSError as exc:
            raise io_error("write", self.writer.path, exc) from None
        self.on_stage()


def expected_logits_shape(case: CaseView) -> tuple[int, ...]:
    if case.has("logits"):
        return case.full_shape("logits")
    return (*case.input_ids.shape, int(case.file.model_config["vocab_size"]))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def replay_case(backend: Backend, case: CaseView, writer: StageWriter, group: str, orders: dict[str, int]) -> None:
    """One forward of `case` with a tap writing into `group`; the returned logits are checked."""
    with step(f"{case.name}: {group} forward, writing stages", len(case.stages())) as advance:
        tap = StageTap(backend, writer, case, group, orders, advance)
        try:
            logits = backend.forward(case.input_ids, tap, case.attention_mask)
            array = np.asarray(backend.to_numpy(logits))
        except TracerError:
            raise
        except Exception as exc:
            raise TracerError(f"backend {backend.name} failed in case {case.name!r}: {_one_line(exc)}") from None
    expected = expected_logits_shape(case)
    if array.shape != expected:
        raise TracerError(f"backend {backend.name} returned logits of shape {tuple(array.shape)} in case "
                          f"{case.name!r}, expected {expected}")
    if "logits" not in tap.seen:
        tap.record("logits", array)


def _prepare(backend: Backend, golden: Golden) -> None:
    if not golden.has_weights:
        raise TracerError(f"{golden.path} has no weights: replay needs them (record without --no-weights)")
    try:
        backend.prepare(golden.weights(), golden.model_config)
    except TracerError:
        raise
    except Exception as exc:
        raise TracerError(f"backend {backend.name} failed to prepare the golden's weights: {_one_line(exc)}") from None


def replay(golden_path: str | Path, backend: Backend | ExecBackend, out_path: str | Path, mode: str = "chained",
           force: bool = False, progress: Callable[[Iterable], Iterable] | None = None) -> None:
    """Replay every case of `golden_path` through `backend` (an instance) into the trace `out_path`."""
    if mode not in MODES:
        raise TracerError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if mode != "chained":
        with Golden.open(golden_path) as golden:
            if golden.attrs.get("tokens"):
                raise TracerError(f"{golden_path} kept only tokens {golden.attrs['tokens']} (--tokens): teacher-forced "
                                  "replay feeds every row of the golden back, so only --mode chained works with it")
    if isinstance(backend, ExecBackend):
        backend.produce(golden_path, out_path, mode=mode, force=force)
        return
    check_output_path(out_path, force)
    with Golden.open(golden_path) as golden:
        _prepare(backend, golden)
        orders = stage_order(golden.n_layer)
        with StageWriter(out_path, "trace", trace_attrs(golden, backend.name, mode, backend.precision, backend.inject or ""), force=force) as writer:
            names = golden.case_names()
            for name in (progress(names) if progress else names):
                case = golden.case(name)
                writer.begin_case(name, case.input_ids, case.attention_mask, case.prompts)
                for group in GROUPS[mode]:
                    replay_case(backend, case, writer, group, orders)


# -- what `tracer replay` calls -------------------------------------------------------------
def print_catalog(console: Console, backend_spec: str | None = None) -> None:
    """The fault-injection catalog as a table; with a backend, which bugs it implements."""
    supported = None
    if backend_spec:
        cls = backend_class(backend_spec)
        supported = getattr(cls, "supported_injections", frozenset())
    table = Table(title="fault-injection catalog (--inject NAME)")
    table.add_column("bug", style="bold")
    table.add_column("stage")
    table.add_column("what the port got wrong")
    if supported is not None:
        table.add_column(escape(backend_spec))
    for name, stage, description in describe_catalog():
        row = [name, stage, description]
        if supported is not None:
            row.append("yes" if name in supported else "no")
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)


def replay_command(golden: Path | None, backend_spec: str, out: Path | None, mode: str = "chained",
                   precision: str = "fp32", inject: str | None = None, force: bool = False, quiet: bool = False,
                   console: Console | None = None, timeout: float | None = None) -> None:
    """Everything `tracer replay` does, so the CLI is a thin typer wrapper around it."""
    console = console or Console()
    if inject == "list":
        print_catalog(console, backend_spec)
        return
    if golden is None:
        raise TracerError("replay needs a GOLDEN file (or --inject list to show the bug catalog)")
    if out is None:
        raise TracerError("replay needs an output trace: -o TRACE.h5")
    if mode not in MODES:
        raise TracerError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    with Reservation(out, force), session(quiet):  # an unwritable or busy output fails before loading anything
        backend = resolve_backend(backend_spec, precision, inject, timeout)
        replay(golden, backend, out, mode, force, progress=partial(track, description=f"replaying ({backend.name})",
                                                                   quiet=quiet))
    if not quiet:
        what = ", ".join(x for x in (getattr(backend, "precision", ""), mode, inject and f"inject {inject}") if x)
        console.print(f"replayed {golden} through {backend.name} ({what}) -> {out}")
