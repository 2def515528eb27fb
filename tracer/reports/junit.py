"""JUnit XML: CI systems show each stage as a test, so a failing stage is a failing test.

One <testsuite> per case, one <testcase classname=CASE name=STAGE> per stage. fail and
shape-mismatch are <failure>s (error, tolerance, where, diagnosis); missing and
not-comparable are <skipped>; baseline regressions are extra failing testcases named
`regression:<stage>`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from tracer.compare.result import CaseResult, CompareResult, Regression, StageResult
from tracer.reports.common import coverage_line, failure_message, passing_tolerance_line


def render_junit(result: CompareResult) -> str:
    suites = ET.Element("testsuites", name="tracer compare")
    by_case: dict[str, list[Regression]] = {}
    for r in result.regressions:
        by_case.setdefault(r.case, []).append(r)
    for case in result.cases:
        _suite(suites, case.case, case, by_case.pop(case.case, []))
    for name, regressions in by_case.items():  # regressions of cases no longer in the trace
        _suite(suites, name, None, regressions)
    _count(suites, suites.findall("testsuite"))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _suite(parent: ET.Element, name: str, case: CaseResult | None, regressions: list[Regression]) -> None:
    suite = ET.SubElement(parent, "testsuite", name=name)
    if case is not None and coverage_line(case):
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="coverage", value=coverage_line(case))
    for s in case.stages if case else []:
        _stage_case(suite, name, s, case)
    for r in regressions:
        tc = ET.SubElement(suite, "testcase", classname=name, name=f"regression:{r.stage}", time="0")
        failure = ET.SubElement(tc, "failure", message=f"{r.kind}: {r.detail}", type=r.kind)
        failure.text = f"baseline {r.baseline}, now {r.current}"
    _count(suite, suite.findall("testcase"))


def _stage_case(suite: ET.Element, classname: str, s: StageResult, case: CaseResult) -> None:
    tc = ET.SubElement(suite, "testcase", classname=classname, name=s.stage, time="0")
    if s.failed:
        failure = ET.SubElement(tc, "failure", message=failure_message(s), type=s.status)
        lines = [f"{role}: {s.stage}" for role, n in (("first divergence", case.first_divergence),
                                                      ("origin", case.origin)) if n == s.stage]
        if s.stage == case.origin and case.origin_reasoning:
            lines.append(case.origin_reasoning)
        line = passing_tolerance_line(s)
        if line:
            lines.append(f"would pass at {line}")
        lines += [f"diagnosis ({d.verdict}): {d.bug} [{d.rule}]: {d.evidence}" for d in s.diagnoses]
        if s.derived:
            lines.append(f"derived: not in the dump: {s.derived}")
        if s.note:
            lines.append(f"note: {s.note}")
        failure.text = "\n".join(lines)
    elif s.status in ("missing", "not-comparable"):
        message = "the trace has no such stage" if s.status == "missing" else (s.note or "not comparable")
        ET.SubElement(tc, "skipped", message=f"{s.status}: {message}")


def _count(element: ET.Element, tests: list[ET.Element]) -> None:
    """tests/failures/skipped/errors attributes, summed over testcases or child suites."""
    if element.tag == "testsuites":
        totals = {k: sum(int(t.get(k, 0)) for t in tests) for k in ("tests", "failures", "skipped", "errors")}
    else:
        totals = {"tests": len(tests), "failures": sum(t.find("failure") is not None for t in tests),
                  "skipped": sum(t.find("skipped") is not None for t in tests), "errors": 0}
    for k, v in totals.items():
        element.set(k, str(v))
