"""NumPy backend forward time against a torch CPU forward of the same model (goal: ≤ 1.5×), then,
where CUDA is available, the GPU rows of `benchmarks.backends_gpu` (cupy, triton vs torch eager).

    python -m benchmarks.backends --seq 128,1024 --repeats 3

Both run the realistic random gpt2-shape model (B=1) from the same golden weights; the NumPy
backend gets a no-op tap (returns each value unchanged, records nothing), so only compute is timed.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from backends.numpy_backend import NumpyBackend
from benchmarks.common import median_time
from tracer.models import load_model, to_numpy, weights_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="128,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="random:gpt2")
    args = parser.parse_args()
    loaded = load_model(args.model)
    weights, ties = weights_of(loaded.model)
    arrays = {k: to_numpy(v) for k, v in weights.items()}
    arrays.update({alias: arrays[target] for alias, target in ties.items()})
    config = loaded.model.config.to_dict()
    backend = NumpyBackend("fp32")
    backend.prepare(arrays, config)
    print(f"model {loaded.source}; torch threads={torch.get_num_threads()}; median of {args.repeats} after 1 warm-up")
    print(f"{'T':>6} {'torch s':>9} {'numpy s':>9} {'ratio':>7}")
    for T in (int(t) for t in args.seq.split(",")):
        ids = np.random.default_rng(T).integers(0, 256, size=(1, T))
        mask = np.ones_like(ids, dtype=np.int8)

        def torch_forward() -> None:
            with torch.no_grad():
                loaded.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

        def numpy_forward() -> None:
            backend.forward(ids, lambda stage, value: value, attention_mask=mask)

        t_torch = median_time(torch_forward, args.repeats)
        t_numpy = median_time(numpy_forward, args.repeats)
        print(f"{T:>6} {t_torch:>9.3f} {t_numpy:>9.3f} {t_numpy / t_torch:>6.2f}x")
    if torch.cuda.is_available():  # the GPU rows: cupy and triton against torch eager CUDA
        from benchmarks.backends_gpu import main as gpu_main

        gpu_main(["--no-record-tap"])
    else:
        print("GPU rows (cupy, triton vs torch eager CUDA): no CUDA here; see python -m benchmarks.backends_gpu")


if __name__ == "__main__":
    main()
