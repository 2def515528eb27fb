"""The comparison result: one object every report reads (terminal, JSON, HTML, Markdown, JUnit).

`RESULT_SCHEMA_VERSION` versions the JSON form (`CompareResult.to_json`); docs/RESULT_SCHEMA.md
documents each field. Reports only read this; they never open golden or trace files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracer.compare.metrics import StageMetrics

RESULT_SCHEMA_VERSION = 2
STATUSES = ("pass", "fail", "missing", "shape-mismatch", "not-comparable", "golden-nonfinite")
FAILED_STATUSES = ("fail", "shape-mismatch", "golden-nonfinite")


@dataclass
class Diagnosis:
    """A hypothesis re-applied to the stage's inputs, and how much of the error it reproduces."""

    rule: str          # e.g. "constant.attn-scale", "param.bias.dropped", "generic.scale"
    bug: str           # what the port got wrong, in words
    verdict: str       # "confirmed" (reproduces to the noise floor) or "likely" (explains most of it)
    before: float      # introduced row error vs the correct reference
    after: float       # row error vs the hypothesis
    evidence: str      # one line with the numbers


@dataclass
class First8:
    """First 8 values of one token (query row for attention stages), both sides."""

    token: int
    batch: int
    head: int | None
    golden: list[float]
    candidate: list[float]
    diff: list[float]
    out_of_tolerance: list[bool]


@dataclass
class StageResult:
    stage: str
    order: int
    status: str
    shape: list[int] | None = None
    candidate_shape: list[int] | None = None
    dtype: str | None = None
    metrics: StageMetrics | None = None
    error: float | None = None              # chained row error vs golden
    tolerance: float | None = None          # chained threshold
    drift: float | None = None              # oracle's chained row error (auto), for reference
    local_error: float | None = None        # error introduced at this stage
    local_noise: float | None = None
    local_tolerance: float | None = None
    local_source: str | None = None         # "isolated" | "chained inputs..." | None
    local_inherited: float | None = None    # oracle's inherited error where golden inputs stood in
    inputs: dict[str, str] | None = None    # input stage -> "candidate" | "derived" | "golden"
    derived: str | None = None              # how the stage was derived from the candidate's dump
    required: bool = False                  # missing although --require asks for it
    amplification: float | None = None      # error / local_error
    fails_chained: bool = False
    fails_local: bool = False
    min_passing_tolerance: float | None = None  # smallest chained tolerance under which it would pass
    where: str | None = None
    diagnoses: list[Diagnosis] = field(default_factory=list)
    tables: list[First8] = field(default_factory=list)
    note: str | None = None

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES or (self.status == "missing" and self.required)


@dataclass
class CaseResult:
    case: str
    stages: list[StageResult]
    first_divergence: str | None = None
    origin: str | None = None
    origin_reasoning: str | None = None
    coverage: dict[str, Any] = field(default_factory=dict)   # see localize.coverage_of

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)


@dataclass
class Regression:
    case: str
    stage: str
    kind: str          # "new-failure" | "error-grew" | "missing"
    baseline: float | None
    current: float | None
    detail: str


@dataclass
class CompareResult:
    golden: str
    trace: str
    golden_meta: dict[str, Any]
    trace_meta: dict[str, Any]
    tolerance: str
    cases: list[CaseResult]
    first_divergence: dict[str, str] | None = None   # {"case":..., "stage":...}
    origin: dict[str, str] | None = None
    regressions: list[Regression] = field(default_factory=list)
    baseline: str | None = None
    schema_version: int = RESULT_SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return not any(s.failed for c in self.cases for s in c.stages) and not self.regressions

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return _jsonable(d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        if path is not None:
            from tracer.atomic import write_text_atomic

            write_text_atomic(path, text, force=True)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompareResult:
        d = _unjson(d)
        cases = []
        for c in d["cases"]:
            stages = []
            for s in c["stages"]:
                s = dict(s)
                s["metrics"] = StageMetrics(**s["metrics"]) if s.get("metrics") else None
                s["diagnoses"] = [Diagnosis(**x) for x in s.get("diagnoses", [])]
                s["tables"] = [First8(**x) for x in s.get("tables", [])]
                stages.append(StageResult(**s))
            cases.append(CaseResult(c["case"], stages, c.get("first_divergence"), c.get("origin"),
                                    c.get("origin_reasoning"), c.get("coverage") or {}))
        return cls(golden=d["golden"], trace=d["trace"], golden_meta=d["golden_meta"], trace_meta=d["trace_meta"],
                   tolerance=d["tolerance"], cases=cases, first_divergence=d.get("first_divergence"),
                   origin=d.get("origin"), regressions=[Regression(**r) for r in d.get("regressions", [])],
                   baseline=d.get("baseline"), schema_version=d.get("schema_version", RESULT_SCHEMA_VERSION))

    @classmethod
    def load(cls, path: str | Path) -> CompareResult:
        from tracer.errors import TracerError, read_parsed

        p = Path(path)
        d = read_parsed(p, json.loads, lambda exc: f"{p} is not a valid result JSON: {exc}",
                        missing=f"no such file: {p}")
        if not isinstance(d, dict) or "schema_version" not in d or "cases" not in d:
            raise TracerError(f"{p} is not a gpt2-tracer result (no schema_version/cases)")
        if d["schema_version"] != RESULT_SCHEMA_VERSION:
            raise TracerError(f"{p} has result schema_version {d['schema_version']}; this tracer reads "
                              f"{RESULT_SCHEMA_VERSION}")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as exc:
            raise TracerError(f"{p} is not a valid result JSON: missing or unexpected field {exc}") from None


# JSON has no inf/nan: encode them as strings and back.
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _unjson(x: Any) -> Any:
    if x in ("inf", "-inf", "nan") and isinstance(x, str):
        return float(x)
    if isinstance(x, dict):
        return {k: _unjson(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    return x
