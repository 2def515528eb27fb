"""GPU verification of the candidate backends: one PASS / FAIL / SKIP line per check, exit 1 on any FAIL.

Why a script and not tests: it needs a CUDA machine and a full gpt2-shape model, and its output
is the evidence (origin, worst headroom, seconds) an engineer reads after one run on a GPU.
What it checks, on goldens recorded on CUDA from one realistic random gpt2-shape model
(`tracer.synth`, initialised once on the CPU, saved, reloaded per variant):

  (a) goldens: fp32 eager, fp32 sdpa, fp16 eager, bf16 eager; cases `case0` (T random ids) and
      `batch` (two rows, the second right-padded);
  (b, c) clean replays (chained + isolated) pass: cupy and triton fp32 under `auto`, fp16 under the
      fp16 preset, bf16 goldens under the bf16 preset, triton TF32 under the tf32 preset, and an
      fp16 candidate against the fp32 golden under `auto`; every stage present, zero false alarms;
  (d) every injected bug a backend supports is localized at its stage (origin == its catalog origin);
  (e) the sdpa golden passes against the eager golden of the same model.

Backends in `--optional` (triton) are skipped with the reason when they cannot be loaded or refuse
a precision; any other error is a FAIL line and the script goes on. Replays run here on the GPU;
their comparisons (CPU-bound) run in a pool of processes, overlapping the next replays.

    python -m benchmarks.gpu_check            # on a CUDA machine, from the repo root
    python -m benchmarks.gpu_check --device cpu --layers 2 --tokens 32 --backends numpy   # CPU dry run of the flow
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from backends.inject import CATALOG
from backends.registry import backend_class, resolve_backend
from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.result import CompareResult
from tracer.compare.tolerance import Tolerances
from tracer.errors import TracerError
from tracer.models import load_model
from tracer.record import build_cases, record_golden
from tracer.replay import replay
from tracer.store import Golden, StageFile

GOLDENS = (("fp32", "eager"), ("fp32", "sdpa"), ("fp16", "eager"), ("bf16", "eager"))
# (golden, backend precision, tolerance): what a clean replay must pass. None = auto. A backend that
# refuses a precision is skipped for it, unless the precision is in REQUIRED_PRECISIONS.
CLEAN_RUNS = (
    ("fp32-eager", "fp32", None),
    ("fp16-eager", "fp16", "fp16"),
    ("bf16-eager", "fp32", "bf16"),
    ("bf16-eager", "bf16", "bf16"),
    ("fp32-eager", "tf32", "tf32"),
    ("fp32-eager", "fp16", None),
)
REQUIRED_PRECISIONS = {"cupy": {"fp32", "fp16"}}


class Skip(Exception):
    """The check does not apply here (an optional backend cannot run it)."""


class Failed(Exception):
    """The check ran and its expectation did not hold."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, Skip):
        return "SKIP", str(exc)
    return "FAIL", str(exc) if isinstance(exc, Failed) else one_line(exc)


def outcome(check: Callable[[], str]) -> tuple[str, str]:
    """(status, detail) of one check; any crash is one FAIL line and the next check still runs."""
    try:
        return "PASS", check()
    except Exception as exc:
        return classify(exc)


class Checks:
    """Runs checks and prints `STATUS  what  detail  [seconds]` for each, in the order they were made.

    A check is either run here (`run`) or split (`submit`): its GPU part (the replay) runs here and
    its CPU part (the comparison, the slow half) in the process pool, so comparisons of earlier
    checks overlap the replays of later ones. At most `max_pending` traces wait on disk.
    """

    def __init__(self, pool: ProcessPoolExecutor, max_pending: int):
        self.pool, self.max_pending = pool, max_pending
        self.pending: deque[tuple[str, Future | tuple[str, str], float]] = deque()
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def run(self, what: str, check: Callable[[], str]) -> None:
        self.drain(0)
        start = time.perf_counter()
        status, detail = outcome(check)
        self.report(what, status, detail, time.perf_counter() - start)

    def submit(self, what: str, prepare: Callable[[], tuple]) -> None:
        """`prepare()` runs here and returns the arguments of `compare_job`, which runs in the pool."""
        start = time.perf_counter()
        item: Future | tuple[str, str]
        try:
            item = self.pool.submit(compare_job, *prepare())
        except Exception as exc:
            item = classify(exc)
        self.pending.append((what, item, time.perf_counter() - start))
        self.drain(self.max_pending)

    def drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            what, item, seconds = self.pending.popleft()
            if isinstance(item, Future):
                try:
                    status, detail, remote = item.result()
                except Exception as exc:  # the worker process died
                    status, detail, remote = "FAIL", one_line(exc), 0.0
                seconds += remote
            else:
                status, detail = item
            self.report(what, status, detail, seconds)

    def report(self, what: str, status: str, detail: str, seconds: float) -> None:
        self.counts[status] += 1
        print(f"{status:4}  {what:<58} {detail}  [{seconds:.1f}s]", flush=True)


# -- goldens -----------------------------------------------------------------------------------
def save_master(args: argparse.Namespace, workdir: Path) -> Path:
    """Realistic random init of the shape, once, on the CPU, saved for every variant to load."""
    from transformers import GPT2LMHeadModel
    from transformers.utils.logging import disable_progress_bar

    from tracer.synth import random_config, realistic_init_

    disable_progress_bar()
    overrides = {"n_layer": args.layers} if args.layers else {}
    model = GPT2LMHeadModel(random_config(args.shape, **overrides))
    realistic_init_(model, args.seed)
    path = workdir / "model"
    model.save_pretrained(path)
    return path


def record_variant(model_dir: Path, dtype: str, attn: str, args: argparse.Namespace, out: Path) -> str:
    loaded = load_model(str(model_dir), dtype=dtype, device=args.device, attn=attn)
    rng = np.random.default_rng(args.seed)
    T, vocab = args.tokens, loaded.config.vocab_size
    full = rng.integers(0, vocab, size=T).tolist()
    short = rng.integers(0, vocab, size=max(1, T * 3 // 5)).tolist()
    cases = build_cases(loaded, [], [full], batch=False) + build_cases(loaded, [], [full, short], batch=True)
    record_golden(loaded, cases, str(out), dtype=dtype, attn=attn, force=True, seed=args.seed)
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"{len(cases)} cases, T={T}, {out.stat().st_size / 1e6:.0f} MB"


# -- replay + compare --------------------------------------------------------------------------
def compare_files(golden: Path, trace: Path, tolerance: str | None, cases: list[str] | None = None) -> CompareResult:
    with Golden.open(golden) as g, StageFile.open(trace) as t:
        return compare(g, t, CompareOptions(Tolerances.parse(tolerance), cases=cases))


def replay_trace(golden: Path, spec: str, precision: str, optional: bool, out: Path,
                 inject: str | None = None) -> Path:
    """Replay `golden` through the backend (chained + isolated) into `out`, here, on the GPU."""
    try:
        backend = resolve_backend(spec, precision, inject)
    except TracerError as exc:
        if optional or precision not in REQUIRED_PRECISIONS.get(spec, {"fp32"}):
            raise Skip(str(exc)) from None
        raise
    replay(golden, backend, out, mode="both", force=True)
    return out


def compare_job(golden: Path, trace: Path, tolerance: str | None, cases: list[str] | None, bug: str | None,
                delete_trace: bool) -> tuple[str, str, float]:
    """In a pool process: compare and judge (pass expected, or `bug` at its origin); (status, detail, seconds)."""
    start = time.perf_counter()
    try:
        result = compare_files(golden, trace, tolerance, cases)
        status, detail = outcome(lambda: expect_origin(result, bug) if bug else expect_pass(result))
    except Exception as exc:
        status, detail = classify(exc)
    finally:
        if delete_trace:
            trace.unlink(missing_ok=True)
    return status, detail, time.perf_counter() - start


def headroom(result: CompareResult) -> str:
    """The stage closest to its tolerance (chained or introduced), as a share of that tolerance."""
    worst, where = 0.0, "-"
    for case in result.cases:
        for s in case.stages:
            for err, tol in ((s.error, s.tolerance), (s.local_error, s.local_tolerance)):
                if err is not None and tol and np.isfinite(err) and err / tol > worst:
                    worst, where = err / tol, f"{case.case}/{s.stage}"
    return f"worst {where} at {100 * worst:.0f}% of its tolerance"


def expect_pass(result: CompareResult) -> str:
    missing = sorted({s.stage for c in result.cases for s in c.stages if s.status == "missing"})
    if missing:
        raise Failed(f"{len(missing)} stage(s) missing, first {missing[0]}")
    if not result.passed:
        first = result.first_divergence or {}
        origin = result.origin or {}
        raise Failed(f"first divergence {first.get('case')}/{first.get('stage')}, origin {origin.get('stage')}; "
                     f"{headroom(result)}")
    return f"all stages pass; {headroom(result)}"


def expect_origin(result: CompareResult, bug: str) -> str:
    want = CATALOG[bug].origin
    origin = (result.origin or {}).get("stage")
    first = (result.first_divergence or {}).get("stage")
    if origin != want:
        raise Failed(f"origin {origin} (first divergence {first}), expected {want}")
    stage = next(s for c in result.cases for s in c.stages if s.stage == origin)
    diagnosis = f"; diagnosis: {stage.diagnoses[0].bug} ({stage.diagnoses[0].verdict})" if stage.diagnoses else ""
    return f"origin {origin}, first divergence {first}{diagnosis}"


# -- main ----------------------------------------------------------------------------------------
def check_backend(checks: Checks, spec: str, optional: bool, need: Callable[[str], Path], workdir: Path) -> None:
    """(b, c) clean replays and (d) injected bugs of one backend."""
    problem = backend_problem(spec)

    def cannot_run() -> None:
        raise (Skip if optional else Failed)(problem)

    traces = (workdir / f"trace-{spec.replace(':', '_')}-{n}.h5" for n in itertools.count())
    for key, precision, tolerance in CLEAN_RUNS:
        def clean(key=key, precision=precision, tolerance=tolerance) -> tuple:
            if problem:
                cannot_run()
            trace = replay_trace(need(key), spec, precision, optional, next(traces))
            return need(key), trace, tolerance, None, None, True

        checks.submit(f"(b,c) {spec} {precision} vs {key} golden, {tolerance or 'auto'}", clean)
    if problem:
        checks.run(f"(d) {spec} injected bugs", cannot_run)
        return
    for bug in sorted(getattr(backend_class(spec), "supported_injections", ())):
        def injected(bug=bug) -> tuple:
            trace = replay_trace(need("fp32-eager"), spec, "fp32", optional, next(traces), inject=bug)
            return need("fp32-eager"), trace, None, ["case0"], bug, True

        checks.submit(f"(d) {spec} --inject {bug}", injected)


def backend_problem(spec: str) -> str | None:
    """Why `spec` cannot run here, or None."""
    try:
        available, why = backend_class(spec).availability()
    except TracerError as exc:
        return str(exc)
    except Exception as exc:
        return one_line(exc)
    return None if available else why


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where the goldens are recorded (cuda; cpu for a dry run)")
    parser.add_argument("--shape", default="gpt2", help="random shape of tracer.synth (gpt2, gpt2-medium, ...)")
    parser.add_argument("--layers", type=int, default=0, help="override n_layer (0: the shape's)")
    parser.add_argument("--tokens", type=int, default=128, help="T of the random ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="cupy,triton", help="comma-separated backend specs")
    parser.add_argument("--optional", default="triton", help="backends skipped (not failed) when they cannot run")
    parser.add_argument("--keep", type=Path, help="keep the model and goldens in this directory")
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="processes comparing traces while the GPU replays the next ones")
    args = parser.parse_args()
    specs = [s for s in args.backends.split(",") if s]
    optional = set(args.optional.split(","))

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 goldens are true fp32
    torch.backends.cudnn.allow_tf32 = False
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # for the pool processes
        os.environ[var] = "2"
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"gpu_check: {args.shape} (layers {args.layers or 'as shape'}), T={args.tokens}, device {args.device}, "
          f"backends {', '.join(specs)}, {args.workers} comparing processes; files in {workdir}", flush=True)
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    checks = Checks(pool, max_pending=args.workers + 2)
    try:
        model_dir = workdir / "model"
        checks.run(f"init {args.shape} (realistic, CPU) and save", lambda: str(save_master(args, workdir)))
        goldens: dict[str, Path] = {}
        for dtype, attn in GOLDENS:
            key = f"{dtype}-{attn}"
            path = workdir / f"golden-{key}.h5"

            def rec(dtype=dtype, attn=attn, key=key, path=path) -> str:
                detail = record_variant(model_dir, dtype, attn, args, path)
                goldens[key] = path
                return detail

            checks.run(f"(a) record {key} golden on {args.device}", rec)

        def need(key: str) -> Path:
            if key not in goldens:
                raise Failed(f"no {key} golden (its recording failed)")
            return goldens[key]

        checks.submit("(e) fp32 sdpa golden vs fp32 eager golden, auto",
                      lambda: (need("fp32-eager"), need("fp32-sdpa"), None, None, None, False))
        for spec in specs:
            check_backend(checks, spec, spec in optional, need, workdir)
        checks.drain(0)
    finally:
        pool.shutdown(cancel_futures=True)
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    c = checks.counts
    print(f"gpu_check: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped "
          f"in {time.perf_counter() - start:.0f}s", flush=True)
    return 1 if c["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
