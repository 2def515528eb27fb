"""The HTML report: one self-contained file (inline CSS and SVG, no script, no external URL).

Summary, then per case an SVG plot of error per stage on a log scale — chained error, the
error each stage introduces, their tolerances, failing stages, the first divergence and the
origin labelled, block boundaries — the stage table, the divergence with its First-8 tables,
and the metadata of both files. Every piece of text is escaped.
"""

from __future__ import annotations

import math
from html import escape

from tracer.compare.result import CaseResult, CompareResult, First8, StageResult
from tracer.reports.common import (
    STATUS_COLOR,
    STATUS_GLYPH,
    STATUS_STYLE,
    backend_line,
    bar_fraction,
    chained_ratio,
    coverage_line,
    fmt_num,
    fmt_ratio,
    focus_stages,
    group_by_block,
    inputs_line,
    is_inherited,
    other_origins,
    out_of_tolerance,
    passing_tolerance_line,
    shown_name,
    table_label,
    verdict_line,
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1180px;color:#1f2328;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:18px 0 6px}
code,.num,td.v{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.verdict{font-size:16px;font-weight:600;padding:10px 14px;border-radius:6px;margin:12px 0}
.verdict.pass{background:#dafbe1;color:#1a7f37}.verdict.fail{background:#ffebe9;color:#cf222e}
table{border-collapse:collapse;margin:6px 0}
th,td{padding:2px 8px;text-align:left;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.n{text-align:right;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:nowrap}
tr.block th{background:#ddf4ff;color:#0969da;text-align:left}
tr.focus td{font-weight:700;background:#fff8c5}
.st-pass{color:#1a7f37}.st-fail,.st-shape-mismatch{color:#cf222e}.st-missing,.st-not-comparable{color:#9a6700}
.bar{position:relative;width:140px;height:10px;background:#f6f8fa;border-radius:2px}
.bar span{position:absolute;left:0;top:0;bottom:0;border-radius:2px}
.bar i{position:absolute;top:-2px;bottom:-2px;width:1px;background:#57606a}
.facts th{background:none;border:none;padding-right:14px;white-space:nowrap}
.facts td{border:none}
.diag.confirmed{color:#1a7f37;font-weight:700}.diag.likely{color:#9a6700;font-weight:700}
.evidence{color:#57606a}
table.f8 td,table.f8 th{text-align:right;padding:2px 10px}
table.f8 td.oot{background:#ffebe9;color:#cf222e;font-weight:700}
.dim{color:#57606a}.muted{color:#8c959f}
svg{width:100%;height:auto;border:1px solid #d0d7de;border-radius:6px;background:#fff}
.meta td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
details>summary{cursor:pointer;font-weight:600;margin:8px 0}
"""

W, H = 1100, 360
ML, MR, MT, MB = 64, 16, 40, 56
ZERO_GAP = 18  # pixels between the zero line and the lowest decade
CHAINED, LOCAL, TOL, LOCAL_TOL = "#0969da", "#bc4c00", "#57606a", "#d18616"


def render_html(result: CompareResult) -> str:
    """The whole report as one HTML document."""
    status = "pass" if result.passed else "fail"
    title = f"tracer compare: {'PASS' if result.passed else 'FAIL'}"
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="dim">{escape(result.golden)} vs {escape(result.trace)}</p>',
            f'<div class="verdict {status}">{escape(verdict_line(result))}</div>',
            _summary(result)]
    if len(result.cases) > 1:
        body.append(_cases_table(result))
    if result.regressions:
        body.append(_regressions(result))
    for k, case in enumerate(result.cases):
        section = _case_section(case)
        if case.first_divergence or (k == 0 and result.passed):
            body.append(section)
        else:
            body.append(f"<details><summary>case {escape(case.case)}: all {len(case.stages)} stages pass"
                        f"</summary>{section}</details>")
    body.append(_metadata(result))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _facts(rows: list[tuple[str, str]]) -> str:
    """Label / already-escaped HTML pairs as a borderless table."""
    return '<table class="facts">' + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + \
        "</table>"


def _summary(result: CompareResult) -> str:
    g, t = result.golden_meta, result.trace_meta
    rows = [("golden", f"<code>{escape(result.golden)}</code> {escape(str(g.get('model_source', '')))}"),
            ("trace", f"<code>{escape(result.trace)}</code>"),
            ("backend", escape(backend_line(result))),
            ("dtype", escape(f"golden {g.get('dtype', '—')}, trace {t.get('dtype', '—')}")),
            ("tolerance", escape(result.tolerance))]
    if result.first_divergence:
        rows.append(("first divergence", _stage_ref(result.first_divergence)))
    if result.origin:
        rows.append(("origin", _stage_ref(result.origin)))
    if result.baseline:
        rows.append(("baseline", f"<code>{escape(result.baseline)}</code>"))
    return _facts(rows)


def _stage_ref(ref: dict[str, str]) -> str:
    return (f'<a href="#{_anchor(ref["case"], ref["stage"])}"><code>{escape(ref["stage"])}</code></a>'
            f' <span class="dim">(case {escape(ref["case"])})</span>')


def _anchor(case: str, stage: str) -> str:
    return escape("s-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{case}--{stage}"))


def _cases_table(result: CompareResult) -> str:
    rows = "".join(
        f"<tr><td>{escape(c.case)}</td><td class=\"n\">{len(c.stages)}</td>"
        f"<td class=\"n\">{sum(s.failed for s in c.stages)}</td>"
        f"<td>{escape(c.first_divergence or '—')}</td><td>{escape(c.origin or '—')}</td></tr>"
        for c in result.cases)
    return ("<h2>Cases</h2><table><tr><th>case</th><th>stages</th><th>failing</th><th>first divergence</th>"
            f"<th>origin</th></tr>{rows}</table>")


def _regressions(result: CompareResult) -> str:
    rows = "".join(f"<tr><td>{escape(r.case)}</td><td><code>{escape(r.stage)}</code></td>"
                   f"<td class=\"st-fail\">{escape(r.kind)}</td><td class=\"n\">{fmt_num(r.baseline)}</td>"
                   f"<td class=\"n\">{fmt_num(r.current)}</td><td>{escape(r.detail)}</td></tr>"
                   for r in result.regressions)
    return ("<h2>Regressions against the baseline</h2><table><tr><th>case</th><th>stage</th><th>kind</th>"
            f"<th>baseline</th><th>now</th><th>detail</th></tr>{rows}</table>")


def _case_section(case: CaseResult) -> str:
    parts = [f"<h2>Case {escape(case.case)}</h2>", f"<p>{escape(coverage_line(case))}</p>", plot_svg(case),
             _stage_table(case)]
    if case.first_divergence:
        parts.append(_divergence(case))
    return "\n".join(parts)


# -- SVG plot ------------------------------------------------------------------------------------

def _log_range(case: CaseResult) -> tuple[float, float]:
    values = [v for s in case.stages for v in (s.error, s.tolerance, s.local_error, s.local_tolerance)
              if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return -8.0, 0.0
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    return float(lo - (hi == lo)), float(hi + 1)


def plot_svg(case: CaseResult) -> str:
    """Error per stage in execution order, log scale; one `class="pt"` mark per stage."""
    stages = sorted(case.stages, key=lambda s: s.order)
    n = max(len(stages), 1)
    lo, hi = _log_range(case)
    step = (W - ML - MR) / n

    def x(k: int) -> float:
        return ML + (k + 0.5) * step

    def y(v: float) -> float:  # zeros on their own line below the lowest decade, infinities on the ceiling
        if v <= 0:
            return H - MB
        if math.isinf(v):
            return MT
        return H - MB - ZERO_GAP - (min(max(math.log10(v), lo), hi) - lo) / (hi - lo) * (H - MT - MB - ZERO_GAP)

    out = [f'<svg viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="error per stage, case {escape(case.case)}">',
           f'<text x="{ML}" y="18" font-size="13" font-weight="600">row error per stage (log scale), '
           f'case {escape(case.case)}</text>']
    for e in [None, *range(int(lo), int(hi) + 1)]:  # the zero line, then decades
        yy = y(0.0 if e is None else 10.0 ** e)
        out.append(f'<line x1="{ML}" x2="{W - MR}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eaeef2"/>'
                   f'<text x="{ML - 6}" y="{yy + 4:.1f}" font-size="11" text-anchor="end" fill="#57606a">'
                   f'{"0" if e is None else f"1e{e}"}</text>')
    start = 0
    for group in group_by_block(stages):  # block boundaries, labelled where the block has room
        xx, width = ML + start * step, len(group.stages) * step
        label = f"b{group.block}" if group.block is not None else ("emb" if group.label == "embedding" else "final")
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{MT}" y2="{H - MB}" stroke="#d0d7de" '
                   f'stroke-dasharray="2,3"/>')
        if width >= 7 * len(label) + 4:
            out.append(f'<text x="{xx + 3:.1f}" y="{H - MB + 14}" font-size="11" fill="#57606a">{escape(label)}</text>')
        elif label == "final":
            out.append(f'<text x="{W - MR}" y="{H - MB + 14}" font-size="11" fill="#57606a" text-anchor="end">final'
                       '</text>')
        start += len(group.stages)
    out += _markers(case, stages, x, y)
    for attr, color, dash, width in (("tolerance", TOL, "6,4", 1.5), ("local_tolerance", LOCAL_TOL, "2,3", 1.5),
                                     ("local_error", LOCAL, "", 1.5), ("error", CHAINED, "", 2)):
        out.append(_polyline(stages, attr, x, y, color, dash, width))
    radius = min(4.5, max(1.5, 0.45 * step))
    for k, s in enumerate(stages):
        out.append(_point(s, x(k), y, radius))
    out.append(_legend())
    out.append("</svg>")
    return "\n".join(out)


def _polyline(stages: list[StageResult], attr: str, x, y, color: str, dash: str, width: float) -> str:
    """One series; a stage without the value breaks the line."""
    segments, current = [], []
    for k, s in enumerate(stages):
        v = getattr(s, attr)
        if v is None or math.isnan(v):
            if current:
                segments.append(current)
            current = []
            continue
        current.append(f"{x(k):.1f},{y(v):.1f}")
    if current:
        segments.append(current)
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return "".join(f'<polyline class="series-{attr}" points="{" ".join(seg)}" fill="none" stroke="{color}" '
                   f'stroke-width="{width}"{dash_attr}/>' for seg in segments)


def _point(s: StageResult, xx: float, y, radius: float) -> str:
    tip = escape(f"{s.stage}: {s.status}; error {fmt_num(s.error)} (tol {fmt_num(s.tolerance)}); "
                 f"introduced {fmt_num(s.local_error)} (tol {fmt_num(s.local_tolerance)})")
    data = f'class="pt st-{escape(s.status)}" data-stage="{escape(s.stage)}"'
    if s.error is None:  # nothing compared: a glyph on the axis
        color = STATUS_COLOR[STATUS_STYLE[s.status]]
        return (f'<text {data} x="{xx:.1f}" y="{H - MB - 4}" font-size="13" text-anchor="middle" '
                f'fill="{color}"><title>{tip}</title>{escape(STATUS_GLYPH[s.status])}</text>')
    parts = []
    if s.local_error is not None and not math.isnan(s.local_error):
        fill = STATUS_COLOR["red"] if s.fails_local else LOCAL
        side = 1.6 * radius
        parts.append(f'<rect x="{xx - side / 2:.1f}" y="{y(s.local_error) - side / 2:.1f}" width="{side:.1f}" '
                     f'height="{side:.1f}" fill="{fill}"/>')
    color = STATUS_COLOR["red"] if s.fails_chained else CHAINED
    radius *= 1.25 if s.failed else 1.0
    return "".join(parts) + (f'<circle {data} cx="{xx:.1f}" cy="{y(s.error):.1f}" r="{radius:.1f}" fill="{color}" '
                             f'stroke="#fff" stroke-width="1"><title>{tip}</title></circle>')


def _markers(case: CaseResult, stages: list[StageResult], x, y) -> list[str]:
    """Labelled vertical lines at the first divergence and the origin."""
    index = {s.stage: k for k, s in enumerate(stages)}
    marks: dict[str, list[str]] = {}
    for name, label in ((case.first_divergence, "first divergence"), (case.origin, "origin")):
        if name and name in index:
            marks.setdefault(name, []).append(label)
    out = []
    for name, labels in marks.items():
        xx = x(index[name])
        text = " = ".join(labels) + f": {name}"
        anchor = "start" if xx < W / 2 else "end"
        dx = 5 if anchor == "start" else -5
        out.append(f'<g class="marker" data-stage="{escape(name)}"><line x1="{xx:.1f}" x2="{xx:.1f}" y1="{MT - 8}" '
                   f'y2="{H - MB}" stroke="#cf222e" stroke-width="1.5"/><text x="{xx + dx:.1f}" y="{MT - 2}" '
                   f'font-size="12" font-weight="600" fill="#cf222e" text-anchor="{anchor}">{escape(text)}</text></g>')
    return out


def _legend() -> str:
    items = [("line", CHAINED, "", "chained error"), ("line", LOCAL, "", "introduced error"),
             ("line", TOL, "6,4", "chained tolerance"), ("line", LOCAL_TOL, "2,3", "introduced tolerance"),
             ("dot", "#cf222e", "", "failing check")]
    out, xx, yy = [], ML, H - 16
    for kind, color, dash, label in items:
        if kind == "line":
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{xx}" x2="{xx + 22}" y1="{yy - 4}" y2="{yy - 4}" stroke="{color}" '
                       f'stroke-width="2"{dash_attr}/>')
        else:
            out.append(f'<circle cx="{xx + 11}" cy="{yy - 4}" r="5" fill="{color}"/>')
        out.append(f'<text x="{xx + 28}" y="{yy}" font-size="12" fill="#1f2328">{escape(label)}</text>')
        xx += 40 + 7 * len(label)
    return "".join(out)


# -- tables --------------------------------------------------------------------------------------

def _bar(r: float | None) -> str:
    frac = bar_fraction(r)
    if frac is None:
        return ""
    color = STATUS_COLOR["red"] if r is not None and r > 1 else STATUS_COLOR["green"]
    return (f'<div class="bar" title="error / tolerance = {escape(fmt_ratio(r))}">'
            f'<span style="width:{100 * frac:.1f}%;background:{color}"></span>'
            f'<i style="left:{100 * (1 / 3):.1f}%"></i></div>')


def _stage_table(case: CaseResult) -> str:
    focus = {n for n in (case.first_divergence, case.origin) if n}
    rows = ["<table><tr><th>stage</th><th>status</th><th>error</th><th>tolerance</th><th>introduced</th>"
            "<th>its tolerance</th><th>amplification</th><th>error / tolerance (log, 1e-3…1e6)</th></tr>"]
    for group in group_by_block(case.stages):
        rows.append(f'<tr class="block"><th colspan="8">{escape(group.label)}</th></tr>')
        for s in group.stages:
            cls = ' class="focus"' if s.stage in focus else ""
            status = s.status + (" (inherited)" if is_inherited(s) else "")
            rows.append(
                f'<tr{cls} id="row-{_anchor(case.case, s.stage)}"><td><code>{escape(shown_name(s))}</code></td>'
                f'<td class="st-{escape(s.status)}">{escape(STATUS_GLYPH[s.status])} {escape(status)}</td>'
                f'<td class="n">{fmt_num(s.error)}</td><td class="n">{fmt_num(s.tolerance)}</td>'
                f'<td class="n">{fmt_num(s.local_error)}</td><td class="n">{fmt_num(s.local_tolerance)}</td>'
                f'<td class="n">{escape(fmt_ratio(s.amplification))}</td><td>{_bar(chained_ratio(s))}</td></tr>')
    rows.append("</table>")
    return "<h3>Stages</h3>" + "".join(rows)


def _divergence(case: CaseResult) -> str:
    parts = ["<h3>Divergence</h3>"]
    if case.origin_reasoning:
        parts.append(f"<p>{escape(case.origin_reasoning)}</p>")
    for s in focus_stages(case):
        parts.append(_stage_detail(case, s))
    more = other_origins(case)
    if more:
        parts.append("<p>Also introducing error: " + ", ".join(f"<code>{escape(s.stage)}</code>" for s in more)
                     + "</p>")
    return "\n".join(parts)


def _stage_detail(case: CaseResult, s: StageResult) -> str:
    roles = [r for r, n in (("first divergence", case.first_divergence), ("origin", case.origin)) if n == s.stage]
    rows = [("status", f'<span class="st-{escape(s.status)}">{escape(s.status)}</span>'),
            ("error", escape(f"{fmt_num(s.error)} (tolerance {fmt_num(s.tolerance)}, oracle drift "
                             f"{fmt_num(s.drift)})")),
            ("introduced", escape(f"{fmt_num(s.local_error)} (tolerance {fmt_num(s.local_tolerance)}; "
                                  f"{s.local_source or 'not checked'})"))]
    if s.where:
        rows.append(("where", escape(s.where)))
    if s.derived:
        rows.append(("derived", escape(f"not in the dump: {s.derived}")))
    if s.note:
        rows.append(("note", escape(s.note)))
    if inputs_line(s):
        rows.append(("inputs", escape(inputs_line(s))))
    line = passing_tolerance_line(s)
    if line:
        rows.append(("would pass at", escape(line)))
    for d in s.diagnoses:
        rows.append(("diagnosis", f'<span class="diag {escape(d.verdict)}">{escape(d.verdict)}</span> '
                     f'{escape(d.bug)} <code class="dim">{escape(d.rule)}</code><br>'
                     f'<span class="evidence">{escape(d.evidence)}</span>'))
    if s.failed and not s.diagnoses:
        rows.append(("diagnosis", '<span class="dim">no hypothesis reproduces this error</span>'))
    if s.metrics is not None:
        m = s.metrics
        rows.append(("metrics", escape(f"max abs {fmt_num(m.max_abs)}, max rel {fmt_num(m.max_rel)}, cosine "
                                       f"{m.cosine:.6f}, SQNR {fmt_num(m.sqnr_db)} dB, mismatch "
                                       f"{m.mismatch_pct:.1f}% of {m.n_compared}, worst at {m.worst_index}")))
    tables = "".join(_first8(k, t) for k, t in enumerate(s.tables))
    return (f'<h3 id="{_anchor(case.case, s.stage)}"><code>{escape(s.stage)}</code> '
            f'<span class="dim">— {escape(" and ".join(roles))}</span></h3>{_facts(rows)}{tables}')


def _first8(k: int, t: First8) -> str:
    marks = out_of_tolerance(t)
    head = "".join(f"<th>{i}</th>" for i in range(len(t.golden)))

    def row(label: str, values: list[float], mark: bool, absolute: bool = False) -> str:
        cells = []
        for v, bad in zip(values, marks):
            text = fmt_num(abs(v) if absolute else v) + ("*" if bad and mark else "")
            cells.append(f'<td class="v{" oot" if bad and mark else ""}">{escape(text)}</td>')
        return f"<tr><th>{label}</th>{''.join(cells)}</tr>"

    return (f'<p><b>{escape(table_label(k, t))}</b> <span class="dim">(* out of tolerance)</span></p>'
            f'<table class="f8"><tr><th></th>{head}</tr>{row("golden", t.golden, False)}'
            f'{row("candidate", t.candidate, True)}{row("|diff|", t.diff, True, True)}</table>')


def _metadata(result: CompareResult) -> str:
    keys = list(dict.fromkeys([*result.golden_meta, *result.trace_meta]))
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(result.golden_meta.get(k, '')))}</td>"
                   f"<td>{escape(str(result.trace_meta.get(k, '')))}</td></tr>" for k in keys)
    return (f'<h2>Metadata</h2><table class="meta"><tr><th></th><th>golden</th><th>trace</th></tr>{rows}</table>'
            f'<p class="muted">result schema version {result.schema_version}</p>')
