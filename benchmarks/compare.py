"""Compare throughput and memory on a realistic gpt2-shape golden (goal: ≥ 1 GB/s, peak ≤ 2× largest stage).

    python -m benchmarks.compare --seq 1024

Records a golden and a correct NumPy fp32 trace of the same ids, then times `compare` under the
default `auto` tolerances (with its oracle replay and per-stage float64 re-evaluation) and under the
fp32 preset (no oracle). Prints MB of stage data compared per second and the peak traced Python
memory (tracemalloc: NumPy buffers included) against the largest single stage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from backends.numpy_backend import NumpyBackend
from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.tolerance import Tolerances
from tracer.models import load_model
from tracer.record import build_cases, record_golden
from tracer.replay import replay
from tracer.store import StageFile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--model", default="random:gpt2")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    loaded = load_model(args.model)
    ids = np.random.default_rng(0).integers(0, 256, size=args.seq).tolist()
    golden, trace = work / "g.h5", work / "t.h5"
    record_golden(loaded, build_cases(loaded, [], [ids], batch=False), str(golden), dtype="fp32", attn="eager")
    del loaded
    replay(golden, NumpyBackend("fp32"), trace)
    with StageFile.open(trace) as t:
        case = t.case("case0")
        sizes = {s: case.dataset(s).nbytes for s in case.stages()}
    total, largest = sum(sizes.values()), max(sizes.values())
    print(f"model {args.model}, T={args.seq}: {len(sizes)} stages, {total / 1e6:.0f} MB per side, "
          f"largest stage {largest / 1e6:.1f} MB")
    print(f"{'tolerance':>10} {'seconds':>8} {'MB/s':>8} {'peak MB':>8} {'peak/largest':>13} passed")
    for spec in ("auto", "fp32"):
        tracemalloc.start()
        start = time.perf_counter()
        with StageFile.open(golden) as g, StageFile.open(trace) as t:
            result = compare(g, t, CompareOptions(Tolerances.parse(spec)))
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # both sides are read: golden + trace bytes
        print(f"{spec:>10} {seconds:>8.2f} {2 * total / 1e6 / seconds:>8.0f} {peak / 1e6:>8.0f} "
              f"{peak / largest:>12.1f}x {result.passed}")


if __name__ == "__main__":
    main()
