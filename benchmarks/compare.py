"""What comparing costs against its lower bound (goal: CPU ≤ 4×) and its memory (goal: peak RSS ≤ golden
weights + 4× the largest stage), gpt2 shape, fp32, CPU, B=1, default `auto` tolerances.

    python -m benchmarks.compare --seq 256,1024 --rounds 1

Per sequence length: a golden (`tracer record`, with weights: `auto` needs them) and a correct
trace (`tracer replay --backend numpy`) of the same ids, then, each in its own child process
(CPU time = user + system, peak RSS from wait4):

* lower bound: read both files and take a vectorised max |golden - trace| per stage;
* `tracer compare GOLDEN TRACE -q`, which must pass (exit 0).

The model is `random:gpt2` built once and saved to a temporary directory for the children.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from benchmarks.common import ChildRun, load_average, median, run_child, tracer_cli
from tracer.models import load_model

CPU_GOAL = 4.0
RSS_GOAL = 1.0  # x (golden weights + 4 x largest stage)


def lower_bound(golden: Path, trace: Path) -> None:
    """Child process: read every stage of both files and reduce max |a - b| (the cheapest honest compare)."""
    worst = 0.0
    with h5py.File(golden, "r") as g, h5py.File(trace, "r") as t:
        for case in g["cases"]:
            stages = t[f"cases/{case}/stages"]
            for name, ds in g[f"cases/{case}/stages"].items():
                if name in stages:
                    a, b = ds[()], stages[name][()]
                    with np.errstate(invalid="ignore"):
                        d = np.abs(a - b)  # -inf - -inf (masked scores) is NaN: ignored below
                    worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
    print(worst)


def products(golden: Path) -> None:
    """Child process: CPU seconds of the matrix products of `auto`'s three forwards alone (the oracle's
    and the noise twin's in float32, the reference's in float64; attention's full square), on one BLAS
    thread as the comparison runs them, with random operands of the golden's shapes: arithmetic the
    lower bound does not do."""
    from threadpoolctl import threadpool_limits

    with h5py.File(golden, "r") as f:
        config = json.loads(f.attrs["model_config"])
        T = next(iter(f["cases"].values()))["input_ids"].shape[-1]
    C, H, L, V = config["n_embd"], config["n_head"], config["n_layer"], config["vocab_size"]
    D, F = C // H, config.get("n_inner") or 4 * C
    # per layer: qkv, out, fc, mlp.out, q·kᵀ, probs·v; then the logits
    shapes = [(1, T, C, 3 * C), (1, T, C, C), (1, T, C, F), (1, T, F, C), (H, T, D, T), (H, T, T, D)] * L
    shapes.append((1, T, C, V))
    rng = np.random.default_rng(0)
    spent = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        for dtype in (np.float32, np.float32, np.float64):
            for h, m, k, n in shapes:
                a = rng.standard_normal((h, m, k), dtype=np.float32).astype(dtype)
                b = rng.standard_normal((h, k, n), dtype=np.float32).astype(dtype)
                start = time.process_time()
                a @ b
                spent += time.process_time() - start
    print(spent, file=sys.stderr)  # the launcher keeps a child's stderr


def sizes(golden: Path) -> tuple[int, int, int]:
    """(stage bytes of one side, largest stage bytes, weight bytes) of a golden."""
    with h5py.File(golden, "r") as f:
        stages = [ds.nbytes for case in f["cases"].values() for ds in case["stages"].values()]
        weights = {ds.id: ds.nbytes for ds in f["weights"].values()}  # tied names are one object
    return sum(stages), max(stages), sum(weights.values())


def checked(run: ChildRun, what: str) -> ChildRun:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    return run


def bench(model_dir: Path, T: int, vocab: int, rounds: int, work: Path, timeout: float) -> dict:
    golden, trace = work / f"g{T}.h5", work / f"t{T}.h5"
    ids = ",".join(map(str, np.random.default_rng(T).integers(0, vocab, size=T)))
    checked(run_child(tracer_cli("record", "--model", model_dir, "--ids", ids, "-q", "--force", "-o", golden)),
            "record")
    replay = checked(run_child(tracer_cli("replay", golden, "--backend", "numpy", "-q", "--force", "-o", trace)),
                     "replay")
    side, largest, weights = sizes(golden)
    matmul = checked(run_child([sys.executable, "-m", "benchmarks.compare", "--products", golden]), "products")
    low: list[ChildRun] = []
    ours: list[ChildRun] = []
    for _ in range(rounds):
        low.append(checked(run_child([sys.executable, "-m", "benchmarks.compare", "--lower-bound", golden, trace]),
                           "lower bound"))
        ours.append(checked(run_child(tracer_cli("compare", golden, trace, "-q"), timeout=timeout), "tracer compare"))
    golden.unlink()
    trace.unlink()
    return {"T": T, "side": side, "largest": largest, "weights": weights, "replay": replay.wall,
            "low_cpu": median([r.cpu for r in low]), "low_rss": max(r.peak_rss for r in low),
            "cpu": median([r.cpu for r in ours]), "wall": median([r.wall for r in ours]),
            "rss": max(r.peak_rss for r in ours), "products": float(matmul.stderr.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="256,1024", help="comma-separated sequence lengths (B=1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per measurement (median CPU shown)")
    parser.add_argument("--model", default="random:gpt2", help="any tracer model source")
    parser.add_argument("--dir", default=None, help="where files are written (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for one tracer compare")
    parser.add_argument("--lower-bound", nargs=2, type=Path, metavar=("GOLDEN", "TRACE"), help=argparse.SUPPRESS)
    parser.add_argument("--products", type=Path, metavar="GOLDEN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lower_bound:
        lower_bound(*args.lower_bound)
        return
    if args.products:
        products(args.products)
        return
    seqs = [int(s) for s in args.seq.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="tracer-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        built = load_model(args.model)
        build_s = time.perf_counter() - start
        built.model.save_pretrained(work / "model")
        vocab = built.config.vocab_size
        del built
        print(f"model {args.model}, built in {build_s:.0f} s; {args.rounds} round(s), medians; "
              f"load average {load_average()}")
        rows = [bench(work / "model", T, vocab, args.rounds, work, args.timeout) for T in seqs]
    print(f"\ncomparison, auto tolerances: CPU time / lower bound (read both + max |diff| per stage); goal ≤ {CPU_GOAL:.0f}x")
    print(f"{'T':>5} {'MB/side':>8} {'bound cpu s':>12} {'MB/cpu-s':>9} {'compare cpu s':>14} {'wall s':>7} "
          f"{'ratio':>7}  goal")
    for r in rows:
        ratio = r["cpu"] / r["low_cpu"]
        print(f"{r['T']:>5} {r['side'] / 1e6:>8.0f} {r['low_cpu']:>12.2f} {2 * r['side'] / 1e6 / r['low_cpu']:>9.0f} "
              f"{r['cpu']:>14.2f} {r['wall']:>7.1f} {ratio:>6.1f}x  {'met' if ratio <= CPU_GOAL else 'MISSED'}")
    print("\nof which arithmetic the bound does not do: the matrix products of the three forwards alone "
          "(oracle and noise twin float32, reference float64)")
    for r in rows:
        print(f"{r['T']:>5} {r['products']:>8.2f} cpu s = {r['products'] / r['low_cpu']:.1f}x the bound "
              f"({r['products'] / r['cpu']:.0%} of tracer compare)")
    print(f"\npeak RSS: tracer compare / (golden weights + 4 x largest stage); goal ≤ {RSS_GOAL:.0f}x")
    print(f"{'T':>5} {'weights MB':>11} {'largest MB':>11} {'budget MB':>10} {'compare MB':>11} {'ratio':>7}  "
          f"{'bound MB':>9}  goal")
    for r in rows:
        budget = r["weights"] + 4 * r["largest"]
        ratio = r["rss"] / budget
        print(f"{r['T']:>5} {r['weights'] / 1e6:>11.0f} {r['largest'] / 1e6:>11.0f} {budget / 1e6:>10.0f} "
              f"{r['rss'] / 1e6:>11.0f} {ratio:>6.2f}x  {r['low_rss'] / 1e6:>9.0f}  "
              f"{'met' if ratio <= RSS_GOAL else 'MISSED'}")
    replays = ", ".join(f"{r['replay']:.0f} s at T={r['T']}" for r in rows)
    print(f"(replaying the numpy trace took {replays}; load average at the end: {load_average()})")


if __name__ == "__main__":
    main()
