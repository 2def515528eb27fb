"""What recording costs against its physical bound (goal: ≤ 1.1×), gpt2 shape, fp32, CPU, B=1.

    python -m benchmarks.record --seq 128,1024 --rounds 3

bound = the same `tracer record` command recording only `logits` (same model, same start-up)
        + writing the same bytes with h5py to the same directory, measured in the same run.
Rounds are interleaved (logits-only, all stages, h5py write, ...) so a noisy machine slows all
three alike; medians are shown. Three views of the same measurement:

* CLI: end to end through `tracer record --no-weights` in a child process (the goal as stated;
  process start-up and the model load are in both sides). Also its peak RSS.
* in-process: `record_golden` on a loaded model, without start-up and load: the harder figure.
* weights: the weight write's bandwidth as a share of h5py's on the same arrays (goal: ≥ 80%).

The model is `random:gpt2` built once and saved to a temporary directory, so each child loads
it in a second or two instead of re-running the realistic init. In-process, the recorded logits
are checked bitwise against a plain forward.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (ChildRun, h5py_write_seconds, load_average, median, run_child, same_bytes_as,
                               tracer_cli)
from tracer.models import LoadedModel, load_model, to_numpy, weights_of
from tracer.record import build_cases, record_golden
from tracer.stages import StageSelector
from tracer.store import Golden, StageWriter

RECORD_GOAL = 1.1
WEIGHTS_GOAL = 0.8


def ids_for(T: int, vocab: int) -> list[int]:
    return np.random.default_rng(T).integers(0, vocab, size=T).tolist()


def cli_rounds(model_dir: Path, T: int, vocab: int, rounds: int, work: Path) -> dict:
    """Interleaved rounds of: logits-only record, full record, h5py write of the full record's bytes."""
    ids = ",".join(map(str, ids_for(T, vocab)))
    out = work / f"cli-T{T}.h5"
    base = ["record", "--model", model_dir, "--ids", ids, "--no-weights", "-q", "-o", out]
    runs: dict[str, list] = {"logits": [], "all": [], "h5py": []}
    arrays: list[np.ndarray] = []
    nbytes = 0
    for _ in range(rounds):
        runs["logits"].append(checked(run_child(tracer_cli(*base, "--stages", "logits"))))
        out.unlink()  # no run renames over an existing file (ext4 then flushes it)
        runs["all"].append(checked(run_child(tracer_cli(*base))))
        if not arrays:
            arrays = same_bytes_as(out)
            nbytes = sum(a.nbytes for a in arrays)
        out.unlink()
        runs["h5py"].append(h5py_write_seconds(arrays, work / "h5py.h5"))
    logits, full, h5 = (median([r.wall for r in runs["logits"]]), median([r.wall for r in runs["all"]]),
                        median(runs["h5py"]))
    return {"T": T, "logits": logits, "all": full, "h5py": h5, "bytes": nbytes, "ratio": full / (logits + h5),
            "rounds": [a.wall / (lo.wall + h) for lo, a, h in zip(runs["logits"], runs["all"], runs["h5py"])],
            "rss": max(r.peak_rss for r in runs["all"]), "rss_logits": max(r.peak_rss for r in runs["logits"])}


def checked(run: ChildRun) -> ChildRun:
    if run.returncode != 0:
        raise SystemExit(f"tracer record failed ({run.returncode}): {run.stderr.strip()}")
    return run


def in_process_rounds(loaded: LoadedModel, T: int, rounds: int, work: Path) -> dict:
    """The same three measurements on a loaded model, plus a bitwise non-perturbation check."""
    cases = build_cases(loaded, [], [ids_for(T, loaded.config.vocab_size)], batch=False)
    out = work / f"inproc-T{T}.h5"

    def record(selector: StageSelector) -> float:
        out.unlink(missing_ok=True)  # no run renames over an existing file (ext4 then flushes it)
        start = time.perf_counter()
        record_golden(loaded, cases, str(out), dtype="fp32", attn="eager", selector=selector, with_weights=False)
        return time.perf_counter() - start

    record(StageSelector())  # warm-up, and the file whose bytes h5py writes
    arrays = same_bytes_as(out)
    with torch.no_grad():
        plain = loaded.model(input_ids=torch.from_numpy(cases[0].input_ids),
                             attention_mask=torch.from_numpy(cases[0].attention_mask)).logits.numpy()
    with Golden.open(out) as g:
        bitwise = np.array_equal(g.case("case0").read("logits"), plain)
    times: dict[str, list[float]] = {"logits": [], "all": [], "h5py": []}
    for _ in range(rounds):
        times["logits"].append(record(StageSelector.parse("logits")))
        times["all"].append(record(StageSelector()))
        times["h5py"].append(h5py_write_seconds(arrays, work / "h5py.h5"))
    out.unlink()
    m = {k: median(v) for k, v in times.items()}
    return {"T": T, **m, "ratio": m["all"] / (m["logits"] + m["h5py"]), "bitwise": bitwise,
            "bytes": sum(a.nbytes for a in arrays),
            "rounds": [a / (lo + h) for lo, a, h in zip(times["logits"], times["all"], times["h5py"])]}


def weights_share(loaded: LoadedModel, rounds: int, work: Path) -> dict[str, float]:
    """The writer's weights (hashed as written) against h5py alone on the same arrays: median wall and
    thread-CPU seconds of each (the write is CPU-bound into the page cache; CPU time is the steadier
    figure on a shared machine), and the bytes."""
    weights, ties = weights_of(loaded.model)
    arrays = {k: to_numpy(v) for k, v in weights.items()}
    out = work / "weights.h5"
    times: dict[str, list[float]] = {"ours": [], "ours_cpu": [], "h5py": [], "h5py_cpu": []}
    for _ in range(rounds):
        start, cpu = time.perf_counter(), time.thread_time()
        with StageWriter(out, "golden", {"model_config": {"n_layer": loaded.config.n_layer}}) as w:
            w.write_weights(arrays, ties)
        times["ours"].append(time.perf_counter() - start)
        times["ours_cpu"].append(time.thread_time() - cpu)
        out.unlink()
        cpu = time.thread_time()
        times["h5py"].append(h5py_write_seconds(list(arrays.values()), work / "h5py.h5"))
        times["h5py_cpu"].append(time.thread_time() - cpu)
    return {**{k: median(v) for k, v in times.items()}, "bytes": sum(a.nbytes for a in arrays.values())}


def cli_weights(model_dir: Path, vocab: int, rounds: int, work: Path) -> tuple[float, float]:
    """Median CLI seconds at T=128 with and without weights."""
    ids = ",".join(map(str, ids_for(128, vocab)))
    out = work / "cli-weights.h5"
    base = ["record", "--model", model_dir, "--ids", ids, "-q", "-o", out]
    with_w, without = [], []
    for _ in range(rounds):
        with_w.append(checked(run_child(tracer_cli(*base))).wall)
        out.unlink()
        without.append(checked(run_child(tracer_cli(*base, "--no-weights"))).wall)
        out.unlink()
    return median(with_w), median(without)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="128,1024", help="comma-separated sequence lengths (B=1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (median shown)")
    parser.add_argument("--model", default="random:gpt2", help="any tracer model source")
    parser.add_argument("--dir", default=None, help="where files are written (default: a temp dir)")
    parser.add_argument("--skip-cli", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    seqs = [int(s) for s in args.seq.split(",") if s.strip()]

    with tempfile.TemporaryDirectory(prefix="tracer-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        built = load_model(args.model, dtype="fp32", device="cpu", attn="eager")
        build_s = time.perf_counter() - start
        model_dir = work / "model"
        built.model.save_pretrained(model_dir)
        del built
        loaded = load_model(str(model_dir), dtype="fp32", device="cpu", attn="eager")
        cfg = loaded.config
        if max(seqs) > cfg.n_positions:
            parser.error(f"--seq {max(seqs)} is longer than the model's n_positions ({cfg.n_positions})")
        print(f"model {args.model}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} vocab={cfg.vocab_size}, built in "
              f"{build_s:.0f} s and saved for the runs; torch threads={torch.get_num_threads()}; "
              f"{args.rounds} interleaved rounds, medians; load average {load_average()}")

        inproc = [in_process_rounds(loaded, T, args.rounds, work) for T in seqs]
        w = weights_share(loaded, args.rounds, work)
        cli = [] if args.skip_cli else [cli_rounds(model_dir, T, cfg.vocab_size, args.rounds, work) for T in seqs]
        cli_w = None if args.skip_cli else cli_weights(model_dir, cfg.vocab_size, args.rounds, work)

    print(f"\nrecording, all stages, no weights: time / (logits-only record + h5py write of the same bytes); "
          f"goal ≤ {RECORD_GOAL}x")
    print(f"{'':14} {'T':>5} {'MB':>7} {'logits s':>9} {'h5py s':>7} {'all s':>7} {'ratio':>6}  {'goal':>5}  rounds")
    for name, rows in (("CLI", cli), ("in-process", inproc)):
        for r in rows:
            per_round = " ".join(f"{x:.2f}" for x in r.get("rounds", []))
            mb = r["bytes"] / 1e6
            print(f"{name:14} {r['T']:>5} {mb:>7.0f} {r['logits']:>9.2f} {r['h5py']:>7.2f} {r['all']:>7.2f} "
                  f"{r['ratio']:>5.2f}x  {'met' if r['ratio'] <= RECORD_GOAL else 'MISSED':>5}  {per_round}")
    for r in cli:
        print(f"CLI peak RSS T={r['T']}: {r['rss'] / 2**30:.2f} GiB all stages, {r['rss_logits'] / 2**30:.2f} GiB "
              f"logits only")
    for r in inproc:
        print(f"T={r['T']}: recorded logits bitwise equal to a plain forward: {r['bitwise']}")
    share, share_cpu = w["h5py"] / w["ours"], w["h5py_cpu"] / w["ours_cpu"]
    gb = w["bytes"] / 1e9
    print(f"\nweights, {gb * 1e3:.0f} MB: StageWriter {gb / w['ours']:.2f} GB/s (hashed as written), h5py alone "
          f"{gb / w['h5py']:.2f} GB/s: {share:.0%} of h5py's bandwidth by wall time, {share_cpu:.0%} by CPU time; "
          f"goal ≥ {WEIGHTS_GOAL:.0%} {'met' if max(share, share_cpu) >= WEIGHTS_GOAL else 'MISSED'}")
    if cli_w:
        print(f"CLI at T=128: {cli_w[0]:.2f} s with weights, {cli_w[1]:.2f} s without (the weights are written "
              f"behind the forward)")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
