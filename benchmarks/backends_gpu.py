"""Forward time of the GPU backends (cupy, triton) against torch eager on CUDA, gpt2 shape.

    python -m benchmarks.backends_gpu [--sizes 1x1024,8x1024] [--precisions fp32,fp16] [--repeats 10]

Per precision and batch size: the HF `GPT2LMHeadModel` forward (attn eager, no KV cache) and
each backend's forward with a no-op tap (returns each value unchanged, records nothing), all
on the same weights, GPU synchronized around every timed call; medians after a warm-up. Then,
unless --no-record-tap, the same backends with a recording tap that copies every stage to the
host (what `tracer replay` pays before writing), timed once: at B=8 fp32 that is ~16 GB per
forward. Weights use HF's default init: timing does not depend on the values, and the
realistic init would cost tens of seconds of CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable

import numpy as np
import torch

from backends.registry import backend_class, resolve_backend
from benchmarks.common import median_time
from tracer.errors import TracerError
from tracer.models import to_numpy, weights_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def synchronize() -> None:
    """Wait for torch's and cupy's work on the device (they may use different streams)."""
    torch.cuda.synchronize()
    try:
        import cupy
    except ImportError:
        return
    cupy.cuda.Device().synchronize()


def gpu_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median milliseconds of `fn` run to completion on the GPU."""
    synchronize()
    return 1e3 * median_time(lambda: (fn(), synchronize()), repeats, warmup)


def build_model(shape: str, layers: int) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    from tracer.synth import random_config

    torch.manual_seed(0)
    config = random_config(shape, **({"n_layer": layers} if layers else {}))
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).eval()


def host_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    weights, ties = weights_of(model)
    arrays = {k: to_numpy(v) for k, v in weights.items()}
    arrays.update({alias: arrays[target] for alias, target in ties.items()})
    return arrays


def runs_here(spec: str) -> bool:
    """Whether backend `spec` can run on this machine; says why not."""
    try:
        available, why = backend_class(spec).availability()
    except TracerError as exc:
        available, why = False, str(exc)
    if not available:
        print(f"{spec}: skipped ({why})")
    return available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--layers", type=int, default=0, help="override n_layer (0: the shape's)")
    parser.add_argument("--sizes", default="1x1024,8x1024", help="BxT pairs")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--backends", default="cupy,triton")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-record-tap", action="store_true", help="skip the recording-tap timings")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("backends_gpu: CUDA is not available here")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
    specs = [s for s in args.backends.split(",") if s and runs_here(s)]

    master = build_model(args.shape, args.layers)
    weights = host_weights(master)
    config = json.loads(master.config.to_json_string(use_diff=False))
    print(f"{torch.cuda.get_device_name()}; {args.shape}, {config['n_layer']} layers; medians of {args.repeats} "
          f"after {args.warmup} warm-ups (recording tap: one run, it moves GBs)")
    header = f"{'precision':<9} {'B x T':<9} {'torch eager':>12}" + "".join(
        f" {s + ' ms':>12} {'ratio':>6}" for s in specs)
    rows_noop, rows_rec = [header], [header]
    rng = np.random.default_rng(0)
    for precision in args.precisions.split(","):
        model = copy.deepcopy(master).to(device="cuda", dtype=DTYPES[precision])
        backends = {}
        for spec in specs:
            backend = resolve_backend(spec, precision)
            backend.prepare(weights, config)
            backends[spec] = backend
        for B, T in sizes:
            ids = rng.integers(0, config["vocab_size"], size=(B, T), dtype=np.int64)
            mask = np.ones((B, T), dtype=np.int8)
            ids_t = torch.from_numpy(ids).cuda()

            def torch_forward(m=model, ids_t=ids_t) -> None:  # bound now: the loop deletes `model` later
                with torch.inference_mode():
                    m(input_ids=ids_t, use_cache=False)

            base = gpu_time(torch_forward, args.repeats, args.warmup)
            noop, rec = [], []
            for spec, backend in backends.items():
                ms = gpu_time(lambda b=backend: b.forward(ids, lambda stage, v: v, mask), args.repeats, args.warmup)
                noop.append(ms)
                if not args.no_record_tap:
                    def recording_tap(stage: str, value, b=backend):
                        b.to_numpy(value)
                        return value

                    rec.append(gpu_time(lambda b=backend, tap=recording_tap: b.forward(ids, tap, mask), 1, 0))
            lead = f"{precision:<9} {f'{B}x{T}':<9} {base:>12.2f}"
            rows_noop.append(lead + "".join(f" {ms:>12.2f} {ms / base:>6.2f}" for ms in noop))
            rows_rec.append(lead + "".join(f" {ms:>12.2f} {ms / base:>6.2f}" for ms in rec))
        del backends, model
        torch.cuda.empty_cache()
    print("\nno-op tap (compute only); ratio = backend / torch eager\n" + "\n".join(rows_noop))
    if not args.no_record_tap:
        print("\nrecording tap (every stage copied to the host); ratio = backend / torch eager\n" + "\n".join(rows_rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
