"""How long `tracer diff` freezes when the user moves to another stage, on a gpt2-shape trace.

    python -m benchmarks.tui_switch --seq 1024 [--work DIR] [--inject mask-off-by-one]
    python -m benchmarks.tui_switch --model gpt2-xl --layers 2    # xl widths, 2 blocks

Records a random-init gpt2 golden of `--seq` token ids with `tracer record --random gpt2 --ids`,
replays it through the NumPy backend with an injected bug (`tracer replay`), compares once,
then drives the viewer headless (textual's pilot) through every stage, timing each key press:
the CPU time the viewer is busy (the freeze a user feels) and the wall time until the screen is
idle again. It also times the data layer alone (reading one stage slice: one batch row, one
head; the logits a block of 2048 columns) and head changes on attention stages. Pages of the
files stay in the OS cache from recording: these are warm-cache numbers.
Files (and the comparison result) are kept in `--work` (default: a new temporary directory) so
reruns skip recording, replaying and comparing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tracer.compare.result import CompareResult
from tracer.compare.run import CompareRequest, run_compare
from tracer.stages import layout_of
from tracer.store import Golden, StageFile
from tracer.tui.app import DiffApp
from tracer.tui.command import pick_case
from tracer.tui.data import StageData


def tracer(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("tracer")), *args], check=True)


def files(work: Path, seq: int, model: str, inject: str, layers: int | None) -> tuple[Path, Path]:
    name = f"{model}{f'-{layers}l' if layers else ''}-{seq}"
    golden, trace = work / f"{name}.h5", work / f"{name}-{inject}.h5"
    if not golden.exists():
        ids = np.random.default_rng(0).integers(0, 50257, size=seq).tolist()
        start = time.perf_counter()
        if layers:
            record_fewer_layers(model, layers, ids, golden)
        else:
            tracer("record", "--random", model, "--ids", ",".join(map(str, ids)), "-o", str(golden), "-q")
        print(f"recorded {golden.name} in {time.perf_counter() - start:.0f} s")
    if not trace.exists():
        start = time.perf_counter()
        tracer("replay", str(golden), "--backend", "numpy", "--inject", inject, "-o", str(trace), "-q")
        print(f"replayed {trace.name} in {time.perf_counter() - start:.0f} s")
    return golden, trace


def record_fewer_layers(model: str, layers: int, ids: list[int], out: Path) -> None:
    """A real shape's widths with only `layers` blocks: gpt2-xl's slices without its 30 GB of files."""
    from transformers import GPT2LMHeadModel

    from tracer.models import LoadedModel, byte_decode, byte_encode
    from tracer.record import build_cases, record_golden
    from tracer.synth import random_config, realistic_init_

    config = random_config(model, n_layer=layers)
    config._attn_implementation = "eager"
    net = GPT2LMHeadModel(config)
    realistic_init_(net, 0)
    loaded = LoadedModel(net.eval(), f"random:{model}(n_layer={layers})", "bytes", byte_encode, byte_decode)
    record_golden(loaded, build_cases(loaded, [], [ids], batch=False), str(out), dtype="fp32", attn="eager")


def stats(seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    return f"median {statistics.median(ms):6.1f}  p90 {ms[int(0.9 * (len(ms) - 1))]:6.1f}  max {ms[-1]:6.1f} ms"


async def drive(app: DiffApp, size: tuple[int, int]) -> dict[str, tuple[list[float], list[float]]]:
    """Per kind of move: (wall seconds from key press until the screen is idle again, CPU seconds
    the process spent meanwhile). The wall time includes the pilot's own fixed waits (see the
    'no-op key' row); CPU time is what the viewer itself was busy, i.e. the freeze."""
    times: dict[str, tuple[list[float], list[float]]] = {}

    async def press(key: str, label: str | None = None) -> None:
        """Press `key`; file the timing under `label` (default: the kind of stage it lands on)."""
        wall, cpu = time.perf_counter(), time.process_time()
        await pilot.press(key)
        await pilot.pause()
        walls, cpus = times.setdefault(label or f"next stage ({layout_of(app.stage)})", ([], []))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)

    async with app.run_test(size=size) as pilot:
        await pilot.press("home")
        await pilot.pause()
        for _ in range(10):
            await press("x", "no-op key (pilot overhead)")
        for _ in range(len(app.stages) - 1):
            await press("j")
        for key in ("o", "n", "n", "n", "p", "p", "f", "n", "n", "n", "n"):
            await press(key, "jump n/p/o/f")
        app.select(app.case.origin or app.stages[0].stage)
        await pilot.pause()
        for _ in range(12):
            await press("plus", "next head (attn.scores)")
        for key in ("l", "h", "full_stop", "right_square_bracket", "left_square_bracket", "m", "m", "m"):
            await press(key, "token/column/page/metric")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--model", default="gpt2", help="--random shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    parser.add_argument("--inject", default="mask-off-by-one")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=None, help="Only this many blocks (the shape's widths).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-tui-"))
    work.mkdir(parents=True, exist_ok=True)
    golden, trace = files(work, args.seq, args.model, args.inject, args.layers)
    saved = trace.with_suffix(".result.json")
    if saved.exists():
        result = CompareResult.load(saved)
    else:
        start = time.perf_counter()
        result = run_compare(CompareRequest(golden, trace, quiet=True))
        result.to_json(saved)
        print(f"compared once in {time.perf_counter() - start:.0f} s")
    print(f"golden {golden.stat().st_size / 1e9:.2f} GB, trace {trace.stat().st_size / 1e9:.2f} GB")
    case = pick_case(result, None)
    with Golden.open(golden) as g, StageFile.open(trace) as t:
        data = StageData(g, t, case.case)
        reads = []
        for s in case.stages:
            begin = time.perf_counter()
            piece = StageData(g, t, case.case).get(s.stage)
            piece.errors("rel", slice(0, 20), slice(0, 120))
            piece.first8(0, s.tolerance)
            reads.append((time.perf_counter() - begin, s.stage, piece.golden.nbytes))
        slowest = max(reads)
        print(f"data layer, read a slice + First-8 + errors of a window, n={len(reads)}: "
              f"{stats([r[0] for r in reads])} (slowest {slowest[1]}, {slowest[2] / 1e6:.1f} MB per side)")
        for size in ((80, 24), (200, 60)):
            times = asyncio.run(drive(DiffApp(result, data, case), size))
            print(f"-- viewer at {size[0]}x{size[1]}: CPU busy per key (the freeze) | wall time key -> idle")
            for label, (walls, cpus) in sorted(times.items()):
                print(f"{label:<28} n={len(cpus):<4} {stats(cpus)} | {stats(walls)}")


if __name__ == "__main__":
    main()
