"""Reports: JSON round trip and schema, JUnit, HTML, Markdown, terminal at 80 columns, debug-print lines.

Results come from real comparisons of the tiny golden (module-scoped, built once): a correct
NumPy replay, one with a missing 1/√D in the scores, and a tampered one whose trace lacks a
stage, stores one with the wrong shape and one as integers, on top of an erf GELU.
"""

from __future__ import annotations

import copy
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from backends.numpy_backend import NumpyBackend
from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.result import CompareResult
from tracer.compare.tolerance import Tolerances
from tracer.errors import TracerError
from tracer.gate import load_baseline, regressions, write_baseline
from tracer.importlog import FIELD, LOCATED, TAG_LINE, load_tag_map, normalize_tag
from tracer.replay import replay
from tracer.reports import write_report
from tracer.reports.common import fmt_num, out_of_tolerance, passing_tolerance_line, print_tags
from tracer.reports.html import render_html
from tracer.reports.junit import render_junit
from tracer.reports.markdown import render_markdown
from tracer.reports.terminal import render_terminal
from tracer.stages import split_stage
from tracer.store import StageFile

SCHEMA = Path(__file__).resolve().parents[1] / "tracer" / "reports" / "result.schema.json"
MISSING, WRONG_SHAPE, INTEGER = "blocks.1.attn.ctx", "blocks.1.mlp.fc", "logits"


class TamperedNumpy(NumpyBackend):
    """The NumPy port with an erf GELU whose dump skips one stage and mangles two others."""

    def forward(self, input_ids, tap, attention_mask=None):
        def tampered(stage, value):
            if stage == MISSING:
                return value
            if stage == WRONG_SHAPE:
                tap(stage, value[..., :-3])
                return value
            if stage == INTEGER:
                tap(stage, np.asarray(value).astype(np.int32))
                return value
            return tap(stage, value)

        return super().forward(input_ids, tampered, attention_mask)


@dataclass
class Results:
    passing: CompareResult
    failing: CompareResult        # no-attn-scale: origin blocks.0.attn.scores, confirmed diagnosis
    tampered: CompareResult       # gelu-erf + missing + shape-mismatch + not-comparable
    regressed: CompareResult      # failing, gated against a baseline of the passing run


def _compare(golden: Path, trace: Path) -> CompareResult:
    with StageFile.open(golden) as g, StageFile.open(trace) as t:
        return compare(g, t, CompareOptions(Tolerances(), token=2))


@pytest.fixture(scope="module")
def results(tiny_golden, tmp_path_factory) -> Results:
    tmp = tmp_path_factory.mktemp("reports")
    traces = {"pass": NumpyBackend("fp32"), "fail": NumpyBackend("fp32", inject="no-attn-scale"),
              "tampered": TamperedNumpy("fp32", inject="gelu-erf")}
    out = {}
    for name, backend in traces.items():
        replay(tiny_golden, backend, tmp / f"{name}.h5", mode="chained" if name == "tampered" else "both")
        out[name] = _compare(tiny_golden, tmp / f"{name}.h5")
    write_baseline(out["pass"], tmp / "baseline.json")
    regressed = _compare(tiny_golden, tmp / "fail.h5")
    regressed.regressions = regressions(regressed, load_baseline(tmp / "baseline.json"))
    regressed.baseline = str(tmp / "baseline.json")
    return Results(out["pass"], out["fail"], out["tampered"], regressed)


def test_fixture_results_are_what_the_tests_need(results):
    assert results.passing.passed and not results.failing.passed
    assert results.failing.origin["stage"] == "blocks.0.attn.scores"
    assert results.failing.cases[0].stage("blocks.0.attn.scores").diagnoses
    statuses = {s.status for c in results.tampered.cases for s in c.stages}
    assert statuses == {"pass", "fail", "missing", "shape-mismatch", "not-comparable"}
    assert results.regressed.regressions


# -- JSON -------------------------------------------------------------------------------------------

def _reject_constant(name: str):
    raise AssertionError(f"bare {name} in JSON")


@pytest.mark.parametrize("which", ["passing", "failing", "tampered", "regressed"])
def test_json_round_trip(results, which, tmp_path):
    result = getattr(results, which)
    path = tmp_path / "r.json"
    write_report(result, "json", path, Console(file=None))
    text = path.read_text()
    data = json.loads(text, parse_constant=_reject_constant)
    assert data["schema_version"] == 2 and data["passed"] == result.passed
    loaded = CompareResult.load(path)
    assert loaded.to_json() == result.to_json()
    if which != "passing":
        assert loaded == result  # no NaN in these results: dataclass equality holds


def test_json_encodes_infinities_as_strings(results, tmp_path):
    text = results.failing.to_json()
    assert '"-inf"' in text  # masked scores in the First-8 tables
    loaded = CompareResult.from_dict(json.loads(text))
    table = loaded.cases[0].stage("blocks.0.attn.scores").tables[0]
    assert math.isinf(table.golden[-1]) and table.golden[-1] < 0


def _validate(value, schema, root, path="$"):
    """Enough of JSON Schema for result.schema.json: type, const, enum, required, properties,
    additionalProperties: false, items, maxItems, oneOf, $ref."""
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return _validate(value, node, root, path)
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            try:
                _validate(value, option, root, path)
                matches += 1
            except AssertionError:
                pass
        assert matches == 1, f"{path}: {value!r} matches {matches} of oneOf"
        return None
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != {schema['const']!r}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
                  "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
                  "null": lambda v: v is None,
                  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert any(checks[t](value) for t in types), f"{path}: {value!r} is not {types}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{path}: unexpected {sorted(extra)}"
        for key, sub in props.items():
            if key in value:
                _validate(value[key], sub, root, f"{path}.{key}")
    if isinstance(value, list):
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: too many items"
        for k, item in enumerate(value):
            if "items" in schema:
                _validate(item, schema["items"], root, f"{path}[{k}]")
    return None


@pytest.mark.parametrize("which", ["passing", "failing", "tampered", "regressed"])
def test_results_validate_against_the_json_schema(results, which):
    schema = json.loads(SCHEMA.read_text())
    _validate(json.loads(getattr(results, which).to_json()), schema, schema)


def test_schema_validator_rejects_a_broken_result(results):
    schema = json.loads(SCHEMA.read_text())
    data = json.loads(results.failing.to_json())
    data["cases"][0]["stages"][0]["status"] = "exploded"
    with pytest.raises(AssertionError, match="exploded"):
        _validate(data, schema, schema)
    data = json.loads(results.failing.to_json())
    data["cases"][0]["stages"][3]["surprise"] = 1
    with pytest.raises(AssertionError, match="surprise"):
        _validate(data, schema, schema)


# -- JUnit ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["passing", "failing", "tampered"])
def test_junit_one_testcase_per_stage_failures_match(results, which):
    result = getattr(results, which)
    root = ET.fromstring(render_junit(result))
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [c.case for c in result.cases]
    for suite, case in zip(suites, result.cases):
        cases = suite.findall("testcase")
        assert [t.get("name") for t in cases] == [s.stage for s in case.stages]
        assert {t.get("classname") for t in cases} == {case.case}
        failed = {t.get("name") for t in cases if t.find("failure") is not None}
        assert failed == {s.stage for s in case.stages if s.status in ("fail", "shape-mismatch")}
        skipped = {t.get("name") for t in cases if t.find("skipped") is not None}
        assert skipped == {s.stage for s in case.stages if s.status in ("missing", "not-comparable")}
        assert int(suite.get("tests")) == len(case.stages)
        assert int(suite.get("failures")) == len(failed) and int(suite.get("skipped")) == len(skipped)
    assert int(root.get("failures")) == sum(s.failed for c in result.cases for s in c.stages)


def test_junit_failure_carries_numbers_where_and_diagnosis(results):
    result = results.failing
    case = result.cases[0]
    origin = case.stage(case.origin)
    root = ET.fromstring(render_junit(result))
    tc = next(t for t in root.iter("testcase") if t.get("name") == origin.stage
              and t.get("classname") == case.case)
    failure = tc.find("failure")
    message = failure.get("message")
    assert fmt_num(origin.error) in message and fmt_num(origin.tolerance) in message
    assert origin.where in message and origin.diagnoses[0].bug in message
    assert origin.diagnoses[0].evidence in failure.text


def test_junit_regressions_are_failing_testcases(results):
    result = results.regressed
    root = ET.fromstring(render_junit(result))
    names = [t.get("name") for t in root.iter("testcase") if t.get("name").startswith("regression:")]
    assert sorted(names) == sorted(f"regression:{r.stage}" for r in result.regressions)
    for t in root.iter("testcase"):
        if t.get("name").startswith("regression:"):
            assert t.find("failure") is not None
    assert int(root.get("failures")) == sum(s.failed for c in result.cases for s in c.stages) + len(names)


# -- HTML -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["passing", "failing", "tampered"])
def test_html_plot_has_one_mark_per_stage(results, which):
    result = getattr(results, which)
    page = render_html(result)
    svgs = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len(svgs) == len(result.cases)
    for svg, case in zip(svgs, result.cases):
        marks = re.findall(r'class="pt [^"]*" data-stage="([^"]+)"', svg)
        assert marks == [s.stage for s in sorted(case.stages, key=lambda s: s.order)]


def test_html_marks_first_divergence_and_origin(results):
    result = results.failing
    case = result.cases[0]
    page = render_html(result)
    svg = re.search(r"<svg\b.*?</svg>", page, flags=re.S).group(0)
    marker = re.search(rf'<g class="marker" data-stage="{re.escape(case.origin)}">(.*?)</g>', svg, flags=re.S)
    assert marker and "origin" in marker.group(1) and case.origin in marker.group(1)
    assert "first divergence" in marker.group(1)  # same stage here: one labelled marker
    origin = case.stage(case.origin)
    assert origin.diagnoses[0].bug in page.replace("&#x27;", "'")
    for table in origin.tables:
        assert page.count('class="v oot"') >= sum(out_of_tolerance(table))


def test_html_is_self_contained(results):
    for result in (results.passing, results.failing, results.tampered):
        page = render_html(result)
        assert not re.search(r"https?://|//[a-z0-9]", page, flags=re.I)
        assert "<script" not in page.lower() and "url(" not in page.lower() and "@import" not in page
        assert not re.search(r"\bsrc\s*=", page, flags=re.I)
        for href in re.findall(r'\bhref\s*=\s*"([^"]*)"', page, flags=re.I):
            assert href.startswith("#")


def test_html_escapes_text(results):
    result = copy.deepcopy(results.failing)
    result.trace = '<img src=x onerror="alert(1)">&'
    result.cases[0].case = "<b>case</b>"
    page = render_html(result)
    assert "<img" not in page and "<b>case</b>" not in page
    assert "&lt;img src=x" in page and "&lt;b&gt;case&lt;/b&gt;" in page


# -- Markdown ---------------------------------------------------------------------------------------

def test_markdown_names_origin_diagnosis_and_failing_stages(results):
    result = results.failing
    case = result.cases[0]
    origin = case.stage(case.origin)
    md = render_markdown(result)
    first_line = md.splitlines()[0]
    assert "FAIL" in first_line and case.origin in first_line
    assert origin.diagnoses[0].bug in md and origin.diagnoses[0].evidence in md
    assert f"| `{case.origin}` | fail |" in md
    n_fail = sum(s.failed for s in case.stages)
    n_pass = sum(s.status == "pass" for s in case.stages)
    assert f"{n_fail} failing stages, {n_pass} passing" in md
    # the origin's First-8 table: 8 value columns, golden values shown
    rows = [line for line in md.splitlines() if line.startswith("| golden |")]
    assert len(rows) == sum(1 for c in result.cases if c.origin for _ in c.stage(c.origin).tables)
    assert fmt_num(origin.tables[0].golden[0]) in rows[0]
    assert rows[0].count("|") == len(origin.tables[0].golden) + 2


def test_markdown_passing_is_one_verdict(results):
    md = render_markdown(results.passing)
    assert md.startswith("✅ **PASS")
    assert "Divergence" not in md


# -- terminal ---------------------------------------------------------------------------------------

def _terminal(result: CompareResult, **kwargs) -> str:
    console = Console(width=80, record=True, color_system=None, force_terminal=False)
    render_terminal(result, console, **kwargs)
    return console.export_text()


def test_terminal_fits_80_columns_and_shows_first8_with_markers(results):
    result = results.failing
    text = _terminal(result)
    assert max(len(line) for line in text.splitlines()) <= 80
    origin = result.cases[0].stage(result.cases[0].origin)
    diff_rows = [line for line in text.splitlines() if "|diff|" in line]
    tables = [t for c in result.cases if c.first_divergence for s in _focus(c) for t in s.tables]
    assert len(diff_rows) == len(tables)
    for row, table in zip(diff_rows, tables):
        assert row.count("*") == sum(out_of_tolerance(table))
    golden_rows = [line for line in text.splitlines() if "golden " in line and "│" in line]
    worst = origin.tables[1]
    assert any(all(fmt_num(v) in row for v in worst.golden) for row in golden_rows)
    assert "would pass at" in text and "a bug, not a near miss" in text


def _focus(case):
    from tracer.reports.common import focus_stages

    return focus_stages(case)


def test_terminal_every_status_fits_80_columns(results):
    text = _terminal(results.tampered, verbose=True)
    assert max(len(line) for line in text.splitlines()) <= 80
    for glyph in ("✓", "✗", "–", "≠", "?"):
        assert glyph in text


def test_terminal_passing_is_compact_and_green(results):
    text = _terminal(results.passing)
    assert "PASS" in text and "FAIL" not in text
    assert "attn.scores" not in text  # no stage table unless verbose
    verbose = _terminal(results.passing, verbose=True)
    assert "attn.scores" in verbose


def test_terminal_collapses_passing_runs_unless_verbose(results):
    result = results.failing
    short, full = _terminal(result), _terminal(result, verbose=True)
    case = result.cases[0]
    passing_block0 = [s for s in case.stages if s.status == "pass" and s.stage.startswith("blocks.0.")]
    assert len(passing_block0) >= 2
    first, last = (split_stage(passing_block0[k].stage)[1] for k in (0, -1))
    assert f"{first}…{last}" in short
    assert len(short.splitlines()) < len(full.splitlines())


def test_terminal_stage_glob_filters_rows(results):
    text = _terminal(results.tampered, stage_glob="blocks.1.*", verbose=True)
    table = text.split("divergence")[0]
    assert "block 1" in table and "block 0" not in table and "embedding" not in table
    with pytest.raises(TracerError, match="no stage matches"):
        _terminal(results.tampered, stage_glob="blocks.9.*")


def test_log_format_lines_parse_back(results):
    result = results.failing
    text = _terminal(result, log_format=True)
    lines = [m for m in (TAG_LINE.match(line) for line in text.splitlines()) if m and LOCATED.match(m["rest"])]
    expected = []  # per failing case: golden lines, then candidate lines
    for case in result.cases:
        if case.first_divergence:
            tables = [(s, t) for s in _focus(case) for t in case.stage(s.stage).tables]
            expected += [("golden", st) for st in tables] + [("candidate", st) for st in tables]
    assert len(lines) == len(expected) > 0
    for m, (side, (stage, table)) in zip(lines, expected):
        layer, local = split_stage(stage.stage)
        assert m["tag"] == print_tags()[local]
        head, _, tail = m["rest"].partition(":")
        fields = {k.lower(): int(v) for k, v in FIELD.findall(head)}
        assert fields["token"] == table.token and fields.get("layer") == layer
        assert fields.get("head") == table.head and fields.get("batch", 0) == table.batch
        values = [float(v) for v in tail.strip().strip("[]").split(",")]
        np.testing.assert_allclose(values, getattr(table, side), rtol=1e-6)


def test_print_tags_come_from_the_shipped_map():
    tags = print_tags()
    known = load_tag_map()
    for local, tag in tags.items():
        if normalize_tag(tag) in known:
            assert known[normalize_tag(tag)] == local
    assert tags["ln1"] == "AFTER_LN1" and tags["mlp.act"] == "AFTER_GELU" and tags["logits"] == "LOGITS"
    assert tags["attn.scores"] == "AFTER_SCORES"


# -- shared wording ---------------------------------------------------------------------------------

def test_near_miss_reads_differently_from_a_bug(results):
    case = results.failing.cases[0]
    bug = case.stage(case.origin)
    assert "a bug, not a near miss" in passing_tolerance_line(bug)
    near = copy.deepcopy(bug)
    near.error, near.min_passing_tolerance = 1.5 * near.tolerance, 1.5 * near.tolerance
    near.local_error, near.fails_local = 0.5 * near.local_tolerance, False
    line = passing_tolerance_line(near)
    assert "near miss" in line and "not a near miss" not in line and fmt_num(near.error) in line


# -- write_report / tracer report -------------------------------------------------------------------

@pytest.mark.parametrize("fmt,render", [("md", render_markdown), ("junit", render_junit), ("html", render_html)])
def test_tracer_report_renders_a_saved_result(results, tmp_path, run_cli, fmt, render):
    saved = tmp_path / "result.json"
    results.failing.to_json(saved)
    out = tmp_path / f"report.{fmt}"
    code, stdout, stderr = run_cli("report", saved, "--format", fmt, "-o", out)
    assert code == 0, stderr
    assert out.read_text() == render(CompareResult.load(saved))
    assert not list(tmp_path.glob(".*tmp*"))


def test_tracer_report_terminal_prints(results, tmp_path, run_cli):
    saved = tmp_path / "result.json"
    results.failing.to_json(saved)
    code, stdout, _ = run_cli("report", saved)
    assert code == 0 and "first divergence" in stdout and results.failing.origin["stage"] in stdout


def test_tracer_report_bad_input_is_one_line_exit_2(results, tmp_path, run_cli):
    saved = tmp_path / "result.json"
    results.failing.to_json(saved)
    code, _, stderr = run_cli("report", saved, "--format", "pdf", "-o", tmp_path / "x.pdf")
    assert code == 2 and "html" in stderr and "junit" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pdf").exists()
    (tmp_path / "bad.json").write_text("{not json")
    code, _, stderr = run_cli("report", tmp_path / "bad.json", "--format", "md")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
