"""What recording costs: a recorded forward (every stage hashed and streamed to HDF5) against a plain one.

Prints, per sequence length (B=1, CPU): the plain forward time, the record time to a file in a temp
dir (medians after a warm-up), their ratio, the bytes written and the write rate. Weights are a
one-off cost per golden, independent of T, so they are timed once on their own line.

    python -m benchmarks.record --seq 128,1024 --repeats 3 --model random:gpt2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import median_time
from tracer.models import LoadedModel, load_model, to_numpy, weights_of
from tracer.record import build_cases, record_golden
from tracer.store import StageWriter


def bench_seq(loaded: LoadedModel, T: int, repeats: int, workdir: Path) -> dict[str, float]:
    rng = np.random.default_rng(T)
    ids = rng.integers(0, loaded.config.vocab_size, size=T).tolist()
    cases = build_cases(loaded, [], [ids], batch=False)
    input_ids = torch.from_numpy(cases[0].input_ids)
    mask = torch.from_numpy(cases[0].attention_mask)

    def plain() -> None:
        with torch.no_grad():
            loaded.model(input_ids=input_ids, attention_mask=mask)

    out = workdir / f"T{T}.h5"

    def record() -> None:
        record_golden(loaded, cases, str(out), dtype="fp32", attn="eager", with_weights=False, force=True)

    t_plain = median_time(plain, repeats)
    t_record = median_time(record, repeats)
    size = out.stat().st_size
    out.unlink()
    return {"T": T, "plain": t_plain, "record": t_record, "bytes": size}


def bench_weights(loaded: LoadedModel, repeats: int, workdir: Path) -> tuple[float, int]:
    """Writing all weights (hashed, tied ones hard-linked), as `record` does once per golden."""
    weights, ties = weights_of(loaded.model)
    arrays = {k: to_numpy(v) for k, v in weights.items()}
    out = workdir / "weights.h5"

    def write() -> None:
        with StageWriter(out, "golden", {"model_config": {"n_layer": loaded.config.n_layer}}, force=True) as w:
            w.write_weights(arrays, ties)

    elapsed = median_time(write, repeats)
    size = out.stat().st_size
    out.unlink()
    return elapsed, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="128,1024", help="comma-separated sequence lengths (B=1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median shown)")
    parser.add_argument("--model", default="random:gpt2", help="any tracer model source")
    args = parser.parse_args()
    seqs = [int(s) for s in args.seq.split(",") if s.strip()]

    start = time.perf_counter()
    loaded = load_model(args.model, dtype="fp32", device="cpu", attn="eager")
    load_s = time.perf_counter() - start
    cfg = loaded.config
    if max(seqs) > cfg.n_positions:
        parser.error(f"--seq {max(seqs)} is longer than the model's n_positions ({cfg.n_positions})")
    print(f"model {loaded.source}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} "
          f"vocab={cfg.vocab_size}; loaded in {load_s:.1f} s; torch threads={torch.get_num_threads()}; "
          f"median of {args.repeats} after 1 warm-up")
    with tempfile.TemporaryDirectory(prefix="tracer-bench-") as tmp:
        workdir = Path(tmp)
        rows = [bench_seq(loaded, T, args.repeats, workdir) for T in seqs]
        w_time, w_size = bench_weights(loaded, args.repeats, workdir)
    print()
    print(f"{'T':>6} {'plain s':>9} {'record s':>9} {'ratio':>7} {'MB written':>11} {'MB/s':>8}")
    for r in rows:
        mb = r["bytes"] / 1e6
        print(f"{r['T']:>6} {r['plain']:>9.3f} {r['record']:>9.3f} {r['record'] / r['plain']:>6.1f}x "
              f"{mb:>11.1f} {mb / r['record']:>8.0f}")
    print(f"weights (once per golden, any T): {w_size / 1e6:.1f} MB in {w_time:.2f} s "
          f"({w_size / 1e6 / w_time:.0f} MB/s)")


if __name__ == "__main__":
    main()
