"""GPU recording: B=8, T=1024, gpt2 shape, fp32, every stage copied to pinned host buffers on a side
stream and written behind the forward; throughput against the output disk's bandwidth.

    python -m benchmarks.record_gpu --batch 8 --seq 1024 --rounds 3 [--dir /fast/disk]

Per round (interleaved, medians shown): a logits-only record, an all-stages record (no weights)
and an h5py write of the same bytes from host memory. Prints the record's throughput, the disk's
h5py bandwidth, their ratio (goal: the recording runs at the disk's speed, ≥ 0.9×) and the time
ratio against the bound logits-only + h5py write (goal ≤ 1.1×, as on CPU). The recorded logits are
checked bitwise against a plain forward. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import h5py_write_seconds, load_average, median, same_bytes_as
from tracer.models import load_model
from tracer.record import build_cases, record_golden
from tracer.stages import StageSelector
from tracer.store import Golden

TIME_GOAL = 1.1
THROUGHPUT_GOAL = 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--dir", default=None, help="output directory (default: a temp dir)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: GPU recording benchmark skipped")
        return
    loaded = load_model(args.model, dtype="fp32", device="cuda", attn="eager")
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, loaded.config.vocab_size, size=args.seq).tolist() for _ in range(args.batch)]
    cases = build_cases(loaded, [], ids, batch=True)
    input_ids = torch.from_numpy(cases[0].input_ids).cuda()
    mask = torch.from_numpy(cases[0].attention_mask).cuda()

    def plain() -> torch.Tensor:
        with torch.no_grad():
            logits = loaded.model(input_ids=input_ids, attention_mask=mask).logits
        torch.cuda.synchronize()
        return logits

    with tempfile.TemporaryDirectory(prefix="tracer-gpu-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        out = work / "g.h5"

        def record(selector: StageSelector) -> float:
            start = time.perf_counter()
            record_golden(loaded, cases, str(out), dtype="fp32", attn="eager", selector=selector,
                          with_weights=False, force=True)
            return time.perf_counter() - start

        reference = plain().cpu().numpy()
        record(StageSelector())  # warm-up, and the file whose bytes h5py writes
        with Golden.open(out) as g:
            bitwise = np.array_equal(g.case("batch").read("logits"), reference)
        arrays = same_bytes_as(out)
        nbytes = sum(a.nbytes for a in arrays)
        times: dict[str, list[float]] = {"plain": [], "logits": [], "all": [], "h5py": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            plain()
            times["plain"].append(time.perf_counter() - start)
            times["logits"].append(record(StageSelector.parse("logits")))
            times["all"].append(record(StageSelector()))
            times["h5py"].append(h5py_write_seconds(arrays, work / "h5py.h5"))
        del arrays
    m = {k: median(v) for k, v in times.items()}
    rate, disk = nbytes / m["all"], nbytes / m["h5py"]
    ratio = m["all"] / (m["logits"] + m["h5py"])
    print(f"{torch.cuda.get_device_name()}, {args.model}, B={args.batch}, T={args.seq}, fp32, eager; "
          f"{args.rounds} interleaved rounds, medians; load average {load_average()}")
    print(f"plain forward {m['plain']:.3f} s, logits-only record {m['logits']:.2f} s, all stages {m['all']:.2f} s "
          f"({nbytes / 1e9:.1f} GB), h5py write of the same bytes {m['h5py']:.2f} s")
    print(f"throughput {rate / 1e9:.2f} GB/s vs disk (h5py) {disk / 1e9:.2f} GB/s: {rate / disk:.2f}x, "
          f"goal ≥ {THROUGHPUT_GOAL}x {'met' if rate / disk >= THROUGHPUT_GOAL else 'MISSED'}")
    print(f"record / (logits-only + h5py write) = {ratio:.2f}x, goal ≤ {TIME_GOAL}x "
          f"{'met' if ratio <= TIME_GOAL else 'MISSED'}")
    print(f"recorded logits bitwise equal to a plain forward: {bitwise}; peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, peak host RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
