"""The max backend's compile, cold and cached: two fresh processes on one new MAX cache directory.

    python -m benchmarks.max_compile                      # goldens/tiny.h5
    python -m benchmarks.max_compile G.h5 --module max:my_pkg.gpt2:MaxGPT2LMHeadModel

The first process starts with an empty cache (XDG_CACHE_HOME pointed at a new directory: MAX
compiles its kernels and the graph), the second finds what the first left there. Each reports
the backend's prepare (build the module, trace, compile, bind the weights) and the forward of
every case of the golden (a no-op tap: compute and copying out only). Needs the [max] extra.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_GOLDEN = Path(__file__).parents[1] / "goldens" / "tiny.h5"


def child(golden: Path, spec: str) -> dict[str, float]:
    """Time one backend's prepare and forwards in this process."""
    start = time.perf_counter()
    from backends.registry import resolve_backend
    from tracer.store import Golden

    backend = resolve_backend(spec)
    imported = time.perf_counter()
    with Golden.open(golden) as g:
        backend.prepare(g.weights(), g.model_config)
        prepared = time.perf_counter()
        for name in g.case_names():
            case = g.case(name)
            backend.forward(case.input_ids, lambda stage, value: value, case.attention_mask)
    done = time.perf_counter()
    return {"import": imported - start, "prepare": prepared - imported, "forward": done - prepared}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("golden", nargs="?", type=Path, default=DEFAULT_GOLDEN)
    parser.add_argument("--module", default="max", help="backend spec (default: the reference port)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.golden, args.module)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="max-cache-") as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache, "HF_HUB_OFFLINE": "1"}
        for label in ("cold", "cached"):
            cmd = [sys.executable, "-m", "benchmarks.max_compile", str(args.golden), "--module", args.module, "--child"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{label} run failed:\n{proc.stderr[-2000:]}")
            rows.append((label, json.loads(proc.stdout.strip().splitlines()[-1])))
    print(f"{args.golden} through {args.module}; {os.cpu_count()} CPUs")
    print(f"{'':>7} {'import s':>9} {'prepare s':>10} {'forward s':>10}")
    for label, t in rows:
        print(f"{label:>7} {t['import']:>9.1f} {t['prepare']:>10.1f} {t['forward']:>10.2f}")
    print(f"prepare cold / cached: {rows[0][1]['prepare'] / rows[1][1]['prepare']:.0f}x")


if __name__ == "__main__":
    main()
