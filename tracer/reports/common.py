"""What every report format shares, so terminal, HTML, Markdown and JUnit say the same thing.

Number formatting, status glyphs, the error-to-tolerance ratio and its log-scale bar, the
near-miss rule, stage grouping by block with runs of uninteresting stages collapsed, the
one-line verdict and failure message, and debug-print lines. Formats only lay these out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from tracer.compare.result import CaseResult, CompareResult, First8, StageResult
from tracer.stages import EMBED_STAGES, split_stage

# A failing stage whose error is below this multiple of its tolerance is a near miss (tolerance
# question), not a bug: real bugs sit orders of magnitude above their tolerance.
NEAR_MISS = 3.0

# The error bar shows log10(error / tolerance) from 1e-3× to 1e6× (the tolerance is at 1/3).
BAR_LOG_LO, BAR_LOG_HI = -3.0, 6.0
TOL_FRACTION = -BAR_LOG_LO / (BAR_LOG_HI - BAR_LOG_LO)

STATUS_GLYPH = {"pass": "✓", "fail": "✗", "missing": "–", "shape-mismatch": "≠", "not-comparable": "?",
                "golden-nonfinite": "!"}
STATUS_STYLE = {"pass": "green", "fail": "red", "missing": "yellow", "shape-mismatch": "red",
                "not-comparable": "yellow", "golden-nonfinite": "red"}
DERIVED_MARK = "°"  # after a stage name: derived from the candidate's dump, not dumped itself
MISSING_SHOWN = 6
STATUS_COLOR = {"green": "#1a7f37", "red": "#cf222e", "yellow": "#9a6700"}  # the same, for HTML/SVG


def fmt_num(x: float | None) -> str:
    """At most 7 characters: 6.97, -0.0123, 512, 1.8e-5, 5.2e3, inf; None is '—'."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-2 <= abs(x) < 1e3:
        return f"{x:.3g}"
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"


def fmt_ratio(r: float | None) -> str:
    """A multiple of the tolerance: '0.03×', '3.9e5×'."""
    return "—" if r is None else f"{fmt_num(r)}×"


def ratio(error: float | None, tolerance: float | None) -> float | None:
    """error / tolerance (inf when the error is not finite or the tolerance is 0)."""
    if error is None or tolerance is None:
        return None
    if math.isnan(error) or math.isinf(error):
        return math.inf
    if tolerance <= 0:
        return math.inf if error > 0 else 0.0
    return error / tolerance


def chained_ratio(s: StageResult) -> float | None:
    return ratio(s.error, s.tolerance)


def local_ratio(s: StageResult) -> float | None:
    return ratio(s.local_error, s.local_tolerance)


def worst_ratio(s: StageResult) -> float | None:
    rs = [r for r in (chained_ratio(s), local_ratio(s)) if r is not None]
    return max(rs) if rs else None


def bar_fraction(r: float | None) -> float | None:
    """Where error/tolerance `r` falls on the log-scale bar, 0..1 (None: nothing to draw)."""
    if r is None:
        return None
    if r <= 0:
        return 0.0
    if math.isinf(r):
        return 1.0
    return min(max((math.log10(r) - BAR_LOG_LO) / (BAR_LOG_HI - BAR_LOG_LO), 0.0), 1.0)


def is_near_miss(s: StageResult) -> bool:
    """A failure that would pass with less than NEAR_MISS× its tolerance (each failing check)."""
    if s.status != "fail":
        return False
    failing = [r for r, fails in ((chained_ratio(s), s.fails_chained), (local_ratio(s), s.fails_local))
               if fails and r is not None]
    return bool(failing) and max(failing) < NEAR_MISS


def is_inherited(s: StageResult) -> bool:
    """Fails only because its inputs were already wrong: its introduced error is within tolerance."""
    return s.status == "fail" and not s.fails_local and s.local_error is not None


def passing_tolerance_line(s: StageResult) -> str:
    """The smallest tolerances under which this stage would have passed, and whether that is a near miss."""
    checks = []
    if s.fails_chained and s.min_passing_tolerance is not None:
        checks.append(("chained", s.min_passing_tolerance, s.tolerance, chained_ratio(s)))
    if s.fails_local and s.local_error is not None:
        checks.append(("introduced", s.local_error, s.local_tolerance, local_ratio(s)))
    if not checks:
        return ""
    if not all(math.isfinite(needed) for _, needed, _, _ in checks):
        return "no finite tolerance (values non-finite or masked differently) — a bug, not a near miss"
    parts = [f"{kind} tolerance ≥ {fmt_num(needed)} (now {fmt_num(tol)}: error is {fmt_ratio(r)} it)"
             for kind, needed, tol, r in checks]
    if is_near_miss(s):
        verdict = f"near miss (under {NEAR_MISS:g}× its tolerance): a tolerance question rather than a bug"
    elif is_inherited(s):
        verdict = "inherited: its own introduced error is within tolerance"
    else:
        verdict = "far above tolerance: a bug, not a near miss"
    return " and ".join(parts) + f" — {verdict}"


def out_of_tolerance(t: First8) -> list[bool]:
    """Cells to mark: the comparator's flags, plus any non-finite difference (masked on one side only)."""
    return [bool(bad) or not math.isfinite(d) for bad, d in zip(t.out_of_tolerance, t.diff)]


# -- grouping -----------------------------------------------------------------------------------

def block_label(stage: str) -> str:
    """'embedding', 'block 3' or 'final'."""
    i, local = split_stage(stage)
    if i is not None:
        return f"block {i}"
    return "embedding" if local in EMBED_STAGES else "final"


def local_name(stage: str) -> str:
    return split_stage(stage)[1]


def shown_name(s: StageResult) -> str:
    """The local stage name, marked when the stage was derived from the dump."""
    return local_name(s.stage) + (DERIVED_MARK if s.derived else "")


def coverage_line(case: CaseResult) -> str:
    """'coverage 30 of 35 stages (86%), 7 derived°; missing: embed.pos, … (+3)' and any localization note."""
    cov = case.coverage
    if not cov:
        return ""
    text = f"coverage {cov['compared']} of {cov['stages']} stages ({100 * cov['share']:.0f}%)"
    if cov.get("derived"):
        text += f", {len(cov['derived'])} derived{DERIVED_MARK} from the dump"
    missing = cov.get("missing") or []
    if missing:
        required = {s.stage for s in case.stages if s.status == "missing" and s.required}
        names = [n + (" (required)" if n in required else "") for n in missing[:MISSING_SHOWN]]
        more = f", … (+{len(missing) - MISSING_SHOWN})" if len(missing) > MISSING_SHOWN else ""
        text += f"; missing: {', '.join(names)}{more}"
    if cov.get("note"):
        text += f". Note: {cov['note']}"
    return text


def inputs_line(s: StageResult) -> str:
    """Where the introduced-error check took each input from, when not all from the candidate's dump."""
    if not s.inputs or all(src == "candidate" for src in s.inputs.values()):
        return ""
    return ", ".join(f"{local_name(n)}: {src}" for n, src in s.inputs.items()) + (
        f" (golden inputs: allowance for inherited drift {fmt_num(s.local_inherited)})"
        if s.local_inherited is not None else "")


@dataclass
class BlockGroup:
    label: str
    block: int | None
    stages: list[StageResult]


def group_by_block(stages: list[StageResult]) -> list[BlockGroup]:
    """Consecutive stages of one block (embedding, block i, final) in execution order."""
    groups: list[BlockGroup] = []
    for s in sorted(stages, key=lambda s: s.order):
        label = block_label(s.stage)
        if not groups or groups[-1].label != label:
            groups.append(BlockGroup(label, split_stage(s.stage)[0], []))
        groups[-1].stages.append(s)
    return groups


@dataclass
class Run:
    """Consecutive stages of one block shown as one line: all pass, or all fail only by inheritance."""

    kind: str  # "pass" | "inherited"
    stages: list[StageResult]

    def span(self, width: int = 16) -> str:
        """'ln1…attn.v', or 'attn.probs +8' when that does not fit in `width`."""
        first, last = local_name(self.stages[0].stage), local_name(self.stages[-1].stage)
        text = f"{first}…{last}"
        return text if len(text) <= width else f"{first} +{len(self.stages) - 1}"

    @property
    def worst(self) -> StageResult:
        return max(self.stages, key=lambda s: chained_ratio(s) or 0.0)

    @property
    def summary(self) -> str:
        n = len(self.stages)
        w = self.worst
        if self.kind == "pass":
            return f"{n} stages pass (worst {fmt_ratio(chained_ratio(w))} its tolerance)"
        return (f"{n} stages fail, inherited: none introduces error (chained error up to "
                f"{fmt_num(w.error)}, {fmt_ratio(chained_ratio(w))} its tolerance)")


def collapse(stages: list[StageResult], keep: set[str], verbose: bool = False) -> list[StageResult | Run]:
    """Rows of one block: runs of ≥2 passing stages become one Run, and so do runs of inherited
    failures in a block holding no stage of `keep` (first divergence, origin). `verbose`: no runs."""
    if verbose:
        return list(stages)
    collapse_inherited = not any(s.stage in keep for s in stages)
    rows: list[StageResult | Run] = []
    pending: list[StageResult] = []
    kind = None

    def flush() -> None:
        if len(pending) >= 2:
            rows.append(Run(kind, list(pending)))
        else:
            rows.extend(pending)
        pending.clear()

    for s in stages:
        k = None
        if s.stage not in keep:
            if s.status == "pass":
                k = "pass"
            elif collapse_inherited and is_inherited(s):
                k = "inherited"
        if k != kind or k is None:
            flush()
        kind = k
        if k is None:
            rows.append(s)
        else:
            pending.append(s)
    flush()
    return rows


# -- case-level wording --------------------------------------------------------------------------

def failing(case: CaseResult) -> list[StageResult]:
    return [s for s in case.stages if s.failed]


def focus_stages(case: CaseResult) -> list[StageResult]:
    """The stages a divergence section explains: the first divergence and the origin (once each)."""
    names = [n for n in (case.first_divergence, case.origin) if n]
    by_name = {s.stage: s for s in case.stages}
    return [by_name[n] for n in dict.fromkeys(names) if n in by_name]


def other_origins(case: CaseResult) -> list[StageResult]:
    """Further stages that introduce error themselves (a second bug, or the same bug in later blocks)."""
    return [s for s in case.stages if s.fails_local and s.stage != case.origin]


def top_diagnosis(s: StageResult) -> str:
    """'missing 1/√D scaling (confirmed)', or '' when no hypothesis explains the error."""
    if not s.diagnoses:
        return ""
    d = s.diagnoses[0]
    return f"{d.bug} ({d.verdict})"


def stage_counts(result: CompareResult) -> dict[str, int]:
    counts = {k: 0 for k in STATUS_GLYPH}
    for c in result.cases:
        for s in c.stages:
            counts[s.status] = counts.get(s.status, 0) + 1
    return counts


def verdict_line(result: CompareResult) -> str:
    """One line: PASS with the margin, or FAIL with first divergence, origin and top diagnosis."""
    counts = stage_counts(result)
    total = sum(counts.values())
    ncases = len(result.cases)
    if result.passed:
        worst = max(((worst_ratio(s) or 0.0, s.stage) for c in result.cases for s in c.stages), default=(0.0, ""))
        extra = "".join(f", {counts[k]} {k}" for k in ("missing", "not-comparable") if counts[k])
        derived = sum(1 for c in result.cases for s in c.stages if s.derived and s.status == "pass")
        extra += f" ({derived} derived from the dump)" if derived else ""
        return (f"PASS: {counts['pass']} of {total} stages within tolerance over {ncases} case"
                f"{'s' * (ncases != 1)}{extra}" + (f"; closest: {worst[1]} at {fmt_ratio(worst[0])} its tolerance"
                                                     if worst[1] else ""))
    parts = []
    if result.first_divergence:
        fd, case = result.first_divergence, _case(result, result.first_divergence["case"])
        origin = result.origin["stage"] if result.origin else None
        text = (f"first divergence and origin {fd['stage']}" if origin == fd["stage"] else
                f"first divergence {fd['stage']}" + (f", origin {origin}" if origin else ""))
        diag = top_diagnosis(case.stage(origin)) if case is not None and origin else ""
        parts.append(text + (f": {diag}" if diag else ""))
        if len(result.cases) > 1:
            parts.append(f"case {fd['case']}")
    if result.regressions:
        parts.append(f"{len(result.regressions)} regression{'s' * (len(result.regressions) != 1)} against "
                     f"the baseline")
    nfail = sum(1 for c in result.cases for s in c.stages if s.failed)
    return f"FAIL: {nfail} of {total} stages out of tolerance; " + "; ".join(parts)


def _case(result: CompareResult, name: str) -> CaseResult | None:
    return next((c for c in result.cases if c.case == name), None)


def failure_message(s: StageResult) -> str:
    """One line for a failing stage: numbers, where, top diagnosis."""
    if s.status == "shape-mismatch":
        return f"shape mismatch: {s.note or ''}".strip()
    if s.status == "golden-nonfinite":
        return s.note or "the golden has NaN/Inf values"
    if s.status == "missing":
        return "missing from the trace, and --require asks for it"
    parts = [f"error {fmt_num(s.error)} > tolerance {fmt_num(s.tolerance)}" if s.fails_chained
             else f"error {fmt_num(s.error)} (tolerance {fmt_num(s.tolerance)})"]
    if s.fails_local:
        parts.append(f"introduced {fmt_num(s.local_error)} > {fmt_num(s.local_tolerance)}")
    elif is_inherited(s):
        parts.append("inherited from its inputs")
    if s.where:
        parts.append(f"where: {s.where}")
    if s.diagnoses:
        parts.append(f"diagnosis: {top_diagnosis(s)}")
    return "; ".join(parts)


def backend_line(result: CompareResult) -> str:
    m = result.trace_meta
    text = str(m.get("backend", "")) or "—"
    if m.get("inject"):
        text += f" (inject {m['inject']})"
    if m.get("mode"):
        text += f", mode {m['mode']}"
    return text


def table_label(k: int, t: First8, token: int | None = None) -> str:
    """Tables come as [token 0, worst token, asked token] (duplicates dropped)."""
    where = f"token {t.token}" + (f", batch {t.batch}" if t.batch else "") + (
        f", head {t.head}" if t.head is not None else "")
    if k == 0:
        return where
    if k == 1:
        return f"worst: {where}" + (" (asked)" if token is not None and t.token == token else "")
    return f"asked: {where}"


# -- debug-print lines ----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def print_tags() -> dict[str, str]:
    """Local stage -> tag of debug-print lines: the first tag naming it in the shipped print_tags.toml,
    else AFTER_ + the local name without its 'attn.' prefix (AFTER_SCORES, AFTER_QKV, AFTER_EMBED_TOK)."""
    from tracer.foreign import PRINT_TAGS, load_toml, maps_dir
    from tracer.stages import BLOCK_STAGES, FINAL_STAGES

    shipped: dict[str, str] = {}
    for tag, local in load_toml(maps_dir() / PRINT_TAGS).get("tags", {}).items():
        if local:
            shipped.setdefault(local, tag)
    tags = {}
    for local in (*EMBED_STAGES, *BLOCK_STAGES, *FINAL_STAGES):
        fallback = "AFTER_" + local.removeprefix("attn.").replace(".", "_").upper()
        tags[local] = shipped.get(local, fallback)
    return tags


def print_line(stage: str, t: First8, values: list[float]) -> str:
    """`[AFTER_LN1] Layer 0, Token 0: [v0, ..., v7]`, the format `tracer import-log` reads back."""
    i, local = split_stage(stage)
    loc = []
    if t.batch:
        loc.append(f"Batch {t.batch}")
    if i is not None:
        loc.append(f"Layer {i}")
    if t.head is not None:
        loc.append(f"Head {t.head}")
    loc.append(f"Token {t.token}")
    vals = ", ".join("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.7g}"
                     for v in values)
    return f"[{print_tags()[local]}] {', '.join(loc)}: [{vals}]"
