"""CI gate: compare a result against a checked-in baseline (SPEC §7).

A regression is, per case and stage:
  * new-failure — the stage fails now and did not in the baseline;
  * error-grew  — its chained or introduced error grew more than `GROWTH_FACTOR`× over the
    baseline *and* now exceeds `NOISE_SHARE` of its tolerance (tiny errors may move by
    machine/BLAS without meaning anything);
  * missing     — the baseline compared it and the trace no longer has it.
`--update-baseline` rewrites the file from the current result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tracer.atomic import write_text_atomic
from tracer.compare.result import CompareResult, Regression
from tracer.errors import TracerError, read_parsed

BASELINE_SCHEMA_VERSION = 1
GROWTH_FACTOR = 4.0
NOISE_SHARE = 0.1


def baseline_of(result: CompareResult) -> dict:
    cases, coverage = {}, {}
    for case in result.cases:
        cases[case.case] = {s.stage: {"status": s.status, "error": s.error, "local_error": s.local_error}
                            for s in case.stages}
        coverage[case.case] = case.coverage
    return {"schema_version": BASELINE_SCHEMA_VERSION, "golden_id": result.golden_meta.get("golden_id", ""),
            "backend": result.trace_meta.get("backend", ""), "tolerance": result.tolerance, "cases": cases,
            "coverage": coverage}


def write_baseline(result: CompareResult, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(_finite(baseline_of(result)), indent=1, sort_keys=True), force=True)


def load_baseline(path: str | Path) -> dict:
    p = Path(path)
    data = read_parsed(p, json.loads, lambda exc: f"baseline {p} is not valid JSON: {exc}",
                       missing=f"baseline {p} does not exist (create it with --update-baseline)")
    if not isinstance(data, dict) or data.get("schema_version") != BASELINE_SCHEMA_VERSION or "cases" not in data:
        raise TracerError(f"{p} is not a gpt2-tracer baseline (schema_version {BASELINE_SCHEMA_VERSION})")
    return data


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def _num(x) -> float | None:
    return None if x is None else float(x)


def regressions(result: CompareResult, baseline: dict) -> list[Regression]:
    """Every regression of `result` against `baseline` (see module docstring)."""
    if baseline.get("golden_id") and result.golden_meta.get("golden_id") and \
            baseline["golden_id"] != result.golden_meta["golden_id"]:
        raise TracerError("baseline was made with another golden (golden_id differs): re-create it with "
                          "--update-baseline")
    found = []
    for case in result.cases:
        base = baseline["cases"].get(case.case, {})
        current = {s.stage: s for s in case.stages}
        for stage, b in base.items():
            s = current.get(stage)
            if s is None:
                continue  # not selected this run
            if s.status == "missing" and b["status"] != "missing":
                found.append(Regression(case.case, stage, "missing", _num(b["error"]), None,
                                        "compared in the baseline, missing from the trace now"))
            elif s.failed and b["status"] not in ("fail", "shape-mismatch"):
                found.append(Regression(case.case, stage, "new-failure", _num(b["error"]), s.error,
                                        f"{s.status} now, {b['status']} in the baseline"))
            else:
                found += _growth(case.case, stage, s, b)
    return found


def _growth(case: str, stage: str, s, b: dict) -> list[Regression]:
    out = []
    for label, now, before, tol in (("chained error", s.error, _num(b.get("error")), s.tolerance),
                                    ("introduced error", s.local_error, _num(b.get("local_error")),
                                     s.local_tolerance)):
        if now is None or before is None or tol is None:
            continue
        if now > GROWTH_FACTOR * before and now > NOISE_SHARE * tol:
            out.append(Regression(case, stage, "error-grew", before, now,
                                  f"{label} {before:.3g} → {now:.3g} (> {GROWTH_FACTOR:g}× the baseline and > "
                                  f"{NOISE_SHARE:g}× its tolerance {tol:.2g})"))
    return out
