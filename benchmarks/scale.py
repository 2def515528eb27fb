"""gpt2-xl shape, T=1024, B=1, fp32, CPU: record and compare complete on a 24 GiB machine; time and peak
RSS of each step (goal: compare peak RSS ≤ golden weights + 4× the largest stage; record bounded).

    python -m benchmarks.scale                      # build, record, replay, compare
    python -m benchmarks.scale --skip-compare       # build and record only

Each step is its own child process (wall time, CPU time, peak RSS from wait4):
build (`random:gpt2-xl`, realistic init, saved with save_pretrained so the record loads it like
any local model), `tracer record` (all stages, with weights: compare's `auto` needs them),
`tracer replay --backend numpy`, `tracer compare`. Needs about 3× the golden's size of free disk
(golden ≈ 6.2 GB of weights + 14.5 GB of stages at T=1024).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from benchmarks.common import ChildRun, load_average, run_child, tracer_cli


def build(model: str, out: Path) -> None:
    """Child process: realistic random init of `model`, saved as a local model directory."""
    from tracer.models import load_model

    load_model(model).model.save_pretrained(out)


def memory_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def show(name: str, run: ChildRun, note: str = "") -> None:
    status = "ok" if run.returncode == 0 else f"exit {run.returncode}"
    print(f"{name:8} {run.wall:>8.0f} {run.cpu:>8.0f} {run.peak_rss / 2**30:>9.2f}  {status:8} {note}", flush=True)
    if run.returncode not in (0, 1):
        print("         " + run.stderr.strip()[-1500:].replace("\n", "\n         "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt2-xl")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where files are written (default: a temp dir)")
    parser.add_argument("--skip-compare", action="store_true", help="build and record only")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds allowed for each step")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.model, args.build)
        return
    with tempfile.TemporaryDirectory(prefix="tracer-scale-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"{args.model}, T={args.seq}, B=1, fp32, CPU; {os.cpu_count()} CPUs, "
              f"{memory_total() / 2**30:.1f} GiB RAM, {shutil.disk_usage(work).free / 1e9:.0f} GB free in {work}; "
              f"load average {load_average()}")
        print(f"{'step':8} {'wall s':>8} {'cpu s':>8} {'peak GiB':>9}  status")
        model_dir, golden, trace = work / "model", work / "golden.h5", work / "trace.h5"
        made = run_child([sys.executable, "-m", "benchmarks.scale", "--model", args.model, "--build", model_dir],
                         timeout=args.timeout)
        show("build", made)
        if made.returncode:
            return
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        ids = ",".join(map(str, np.random.default_rng(args.seq).integers(0, vocab, size=args.seq)))
        rec = run_child(tracer_cli("record", "--model", model_dir, "--ids", ids, "-q", "-o", golden),
                        timeout=args.timeout)
        shutil.rmtree(model_dir)
        if rec.returncode:
            show("record", rec)
            return
        with h5py.File(golden, "r") as f:
            stages = [ds.nbytes for ds in f["cases/case0/stages"].values()]
            weights = sum({ds.id: ds.nbytes for ds in f["weights"].values()}.values())
        show("record", rec, f"{golden.stat().st_size / 1e9:.1f} GB file: {weights / 1e9:.1f} GB weights, "
                            f"{sum(stages) / 1e9:.1f} GB stages, largest {max(stages) / 1e6:.0f} MB")
        if args.skip_compare:
            return
        rep = run_child(tracer_cli("replay", golden, "--backend", "numpy", "-q", "-o", trace), timeout=args.timeout)
        show("replay", rep)
        if rep.returncode:
            return
        cmp = run_child(tracer_cli("compare", golden, trace, "-q"), timeout=args.timeout)
        budget = weights + 4 * max(stages)
        show("compare", cmp, f"peak RSS / (weights + 4 x largest stage) = {cmp.peak_rss / budget:.2f} (goal ≤ 1)")
        print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
