"""An external program for `--backend exec:`: writes a trace of GOLDEN at OUT with the NumPy backend.

Usage: write_trace.py GOLDEN OUT [--mode MODE] [--npz | --fail | --nothing | --garbage]

With --npz it writes what a port outside this project would: one .npz of canonical stage names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from backends.numpy_backend import NumpyBackend
from tracer.replay import replay
from tracer.store import Golden


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("golden")
    parser.add_argument("out")
    parser.add_argument("--mode", default="chained")
    parser.add_argument("--npz", action="store_true", help="write a foreign .npz instead of a trace")
    parser.add_argument("--fail", action="store_true", help="exit 3 after a message on stderr")
    parser.add_argument("--nothing", action="store_true", help="exit 0 without writing")
    parser.add_argument("--garbage", action="store_true", help="write a file that is no trace")
    args = parser.parse_args()
    if args.fail:
        print("loading weights", file=sys.stderr)
        print("port crashed: CUDA error: illegal memory access", file=sys.stderr)
        return 3
    if args.nothing:
        return 0
    if args.garbage:
        Path(args.out).write_bytes(b"not a trace at all")
        return 0
    if args.npz:
        write_npz(args.golden, args.out)
        return 0
    replay(args.golden, NumpyBackend(), args.out, mode=args.mode)
    return 0


def write_npz(golden_path: str, out: str) -> None:
    """The first case's stages through the backend protocol, collected by a plain dict tap."""
    stages: dict[str, np.ndarray] = {}

    def tap(stage: str, value: np.ndarray) -> np.ndarray:
        stages[stage] = value
        return value

    backend = NumpyBackend()
    with Golden.open(golden_path) as golden:
        backend.prepare(golden.weights(), golden.model_config)
        case = golden.case(golden.case_names()[0])
        backend.forward(case.input_ids, tap, case.attention_mask)
    with open(out, "wb") as f:  # a file object: np.savez would append .npz to a path
        np.savez(f, **stages)


if __name__ == "__main__":
    sys.exit(main())
