"""Do two versions of the comparator give the same results? (the speed work must not change them)

    python -m benchmarks.equivalence --save before.json        # on the old version
    python -m benchmarks.equivalence --against before.json     # on the new one: exit 1 on a difference

Runs the test catalog: every `--inject` bug on the tiny golden (chained and teacher-forced) and on a
4-layer gpt2-shape golden, every bug of the independent ports (tests/ports/catalog.py; the C port's
incomplete dump and the NumPy-style port's complete one) on both goldens, and the correct ports
and backends. Per run it keeps the verdict, first divergence, origin and top diagnosis (which must
be identical) and every stage's status and tolerances (which must agree to within 1%).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TOLERANCE_SLACK = 0.01  # tolerances may differ by this share (the goal: equal to within 1%)


def summary(result) -> dict:
    """What must not change: verdict, divergence, origin, diagnosis; per stage status and tolerances."""
    case = next((c for c in result.cases if c.origin), result.cases[0])
    origin = case.stage(case.origin) if case.origin else None
    diagnosis = origin.diagnoses[0] if origin is not None and origin.diagnoses else None
    return {
        "passed": result.passed,
        "first_divergence": case.first_divergence,
        "origin": case.origin,
        "diagnosis": f"{diagnosis.rule}: {diagnosis.bug}" if diagnosis else None,
        "stages": {s.stage: {"status": s.status, "tolerance": s.tolerance, "local_tolerance": s.local_tolerance}
                   for c in result.cases for s in c.stages},
    }


def run_catalog(work: Path) -> dict[str, dict]:
    from backends.inject import CATALOG
    from backends.numpy_backend import NumpyBackend
    from tests.ports.catalog import CATALOG as PORT_CATALOG
    from tests.ports.real_ports import build_c_port, run_c_port, run_numpy_style_port
    from tracer.compare.comparator import CompareOptions, compare
    from tracer.compare.run import CompareRequest, run_compare
    from tracer.compare.tolerance import Tolerances
    from tracer.replay import replay
    from tracer.store import StageFile

    from scripts.bug_table import goldens  # the bug tables' goldens: tiny and a 4-layer gpt2 shape

    golden = goldens(4, work)
    out: dict[str, dict] = {}

    def backend_run(name: str, g: Path, bug: str | None, mode: str) -> None:
        trace = work / "trace.h5"
        replay(g, NumpyBackend("fp32", inject=bug), trace, mode=mode, force=True)
        with StageFile.open(g) as gf, StageFile.open(trace) as tf:
            out[name] = summary(compare(gf, tf, CompareOptions(Tolerances())))
        print(f"{name}: {'pass' if out[name]['passed'] else out[name]['origin']}", file=sys.stderr)

    def port_run(name: str, g: Path, bug: str | None, port: str) -> None:
        dump_dir = Path(tempfile.mkdtemp(dir=work)) / "dump"
        dump, name_map = (run_c_port(g, dump_dir, bug=bug), None) if port == "c" else \
            run_numpy_style_port(g, dump_dir, bug=bug)
        out[name] = summary(run_compare(CompareRequest(g, dump, name_map=name_map, quiet=True)))
        print(f"{name}: {'pass' if out[name]['passed'] else out[name]['origin']}", file=sys.stderr)

    for gname, g in golden.items():
        for mode in ("both",) if gname == "tiny" else ("chained",):
            backend_run(f"numpy/{gname}/{mode}/correct", g, None, mode)
            for bug in CATALOG:
                backend_run(f"numpy/{gname}/{mode}/{bug}", g, bug, mode)
    if build_c_port(work) is not None:
        for gname, g in golden.items():
            for port in ("c", "numpy-style"):
                port_run(f"{port}/{gname}/correct", g, None, port)
                for bug in PORT_CATALOG:
                    port_run(f"{port}/{gname}/{bug.name}", g, bug.name, port)
    return out


def differences(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    problems = []
    for run, old in before.items():
        new = after.get(run)
        if new is None:
            problems.append(f"{run}: not run now")
            continue
        for key in ("passed", "first_divergence", "origin", "diagnosis"):
            if old[key] != new[key]:
                problems.append(f"{run}: {key} {old[key]!r} -> {new[key]!r}")
        for stage, o in old["stages"].items():
            n = new["stages"].get(stage)
            if n is None or o["status"] != n["status"]:
                problems.append(f"{run} {stage}: status {o['status']} -> {n and n['status']}")
                continue
            for key in ("tolerance", "local_tolerance"):
                a, b = o[key], n[key]
                if (a is None) != (b is None) or (a is not None and abs(a - b) > TOLERANCE_SLACK * max(abs(a), 1e-30)):
                    problems.append(f"{run} {stage}: {key} {a} -> {b}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", type=Path, help="write this version's results here")
    parser.add_argument("--against", type=Path, help="compare this version's results with a saved file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracer-equivalence-") as tmp:
        results = run_catalog(Path(tmp))
    if args.save:
        args.save.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.against:
        before = json.loads(args.against.read_text())
        problems = differences(before, results)
        n_tol = sum(len(r["stages"]) for r in before.values())
        print(f"{len(before)} runs, {n_tol} stage verdicts and tolerance pairs compared: "
              f"{len(problems)} difference(s) (tolerance slack {TOLERANCE_SLACK:.0%})")
        for p in problems[:60]:
            print("  " + p)
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
