"""What a weight audit costs at real scale: a random gpt2-xl-shape checkpoint (1.5 B parameters),
saved as safetensors under shuffled names with the Conv1D weights transposed, audited against a
golden holding the same weights. Every parameter must be found by content alone.

Prints the checkpoint size, the audit's wall time and the audit process's peak resident memory
(its ratio to the checkpoint size; goals: under 60 s and under 2x). The audit runs in a fresh
process right after the files are written (warm page cache). Files go to --dir and are deleted.

    python -m benchmarks.weights --shape gpt2-xl --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from math import prod
from pathlib import Path

import numpy as np

from tracer.store import StageWriter
from tracer.synth import RANDOM_SHAPES, random_config
from tracer.weights.golden import BLOCK_ORDER, CONV1D_SUFFIXES

AUDIT = """
import json, resource, sys, time
from tracer.weights.audit import audit
start = time.perf_counter()
result = audit(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": rss, "passed": result.passed,
                  "found": sum(1 for f in result.findings if f.found_by), "parameters": len(result.findings),
                  "problems": [f.param for f in result.findings if not f.ok][:5]}))
"""


def param_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    s = RANDOM_SHAPES[shape]
    L, C, V, P = s["n_layer"], s["n_embd"], s["vocab_size"], s["n_positions"]
    local = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
             "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
             "mlp.c_proj.bias": (C,)}
    assert tuple(local) == BLOCK_ORDER
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (P, C)}
    for i in range(L):
        shapes.update({f"transformer.h.{i}.{k}": v for k, v in local.items()})
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def random_param(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Trained-looking magnitudes without the cost of tracer.synth's calibration (layer norms near 1)."""
    a = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith((".ln_1.weight", ".ln_2.weight", "ln_f.weight")):
        return 1.0 + 0.1 * a
    return a * np.float32(0.02 if name.endswith(".weight") else 0.01)


def write_files(shape: str, golden: Path, ckpt: Path, seed: int) -> int:
    """Golden (HF names, Conv1D layout) and checkpoint (shuffled names, Conv1D transposed), streamed
    one tensor at a time; returns the checkpoint's size in bytes."""
    shapes = param_shapes(shape)
    rng = np.random.default_rng(seed)
    names = list(shapes)
    order = rng.permutation(len(names))
    stored = {n: shapes[n][::-1] if n.endswith(CONV1D_SUFFIXES) else shapes[n] for n in names}
    header, offset = {}, 0
    for k in order:  # the file's own order is shuffled too
        n = names[k]
        size = prod(stored[n]) * 4
        header[f"tensor_{k:04d}"] = {"dtype": "F32", "shape": list(stored[n]), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    config = random_config(shape).to_dict()
    with open(ckpt, "wb") as fh, StageWriter(golden, "golden", {"model_config": config, "producer": "benchmark"}) as w:
        fh.write(len(head).to_bytes(8, "little") + head)
        base = fh.tell()
        for k, n in enumerate(names):
            a = random_param(rng, n, shapes[n])
            w.write_weights({n: a})
            fh.seek(base + header[f"tensor_{k:04d}"]["data_offsets"][0])
            fh.write(np.ascontiguousarray(a.T if n.endswith(CONV1D_SUFFIXES) else a).tobytes())
        w.write_weights({}, ties={"lm_head.weight": "transformer.wte.weight"})
    return base + offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2-xl", choices=list(RANDOM_SHAPES))
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="Where the two files are written.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tracer-weights-bench-", dir=args.dir))
    golden, ckpt = work / "golden.h5", work / "port.safetensors"
    try:
        start = time.perf_counter()
        size = write_files(args.shape, golden, ckpt, args.seed)
        print(f"{args.shape}: wrote golden + checkpoint ({size / 1e9:.2f} GB each) in {time.perf_counter() - start:.0f} s")
        proc = subprocess.run([sys.executable, "-c", AUDIT, str(golden), str(ckpt)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
        if proc.returncode != 0:
            sys.exit(f"audit failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"audit: {r['found']}/{r['parameters']} parameters found by content, passed={r['passed']}"
              + (f", problems: {r['problems']}" if r["problems"] else ""))
        print(f"time      {r['seconds']:.1f} s   (goal < 60 s)")
        print(f"peak RSS  {r['peak_rss'] / 1e9:.2f} GB = {r['peak_rss'] / size:.2f}x the checkpoint   (goal < 2x)")
    finally:
        for f in (golden, ckpt):
            f.unlink(missing_ok=True)
        work.rmdir()


if __name__ == "__main__":
    main()
