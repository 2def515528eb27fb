"""Diagnosis as hypothesis testing (SPEC §6).

Each rule re-applies one suspected bug to the inputs the failing stage actually saw, with
the same reference code that defines the stage (`reference.Reference.evaluate` knobs), and
measures how much of the candidate's error that reproduces:

    before = row error of candidate vs correct reference   (the error introduced here)
    after  = row error of candidate vs the hypothesis

"confirmed" when `after` is within the stage's own noise tolerance (the bug reproduces the
candidate to the noise floor), "likely" when it removes most of the error (after ≤ 0.3 ×
before), silence otherwise. Generic rules (scale, sign, zeros, token shift, transposition,
reduced-precision rounding, overflow) cover bugs no specific rule names. Nothing here is
keyed to how a trace was produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tracer.compare.hypotheses import (
    ConstantFit,
    Hypothesis,
    describe_value,
    fits_for,
    hypotheses_for,
)
from tracer.compare.metrics import is_masked, row_error
from tracer.compare.reference import Lookup, Reference, softmax
from tracer.compare.result import Diagnosis
from tracer.compare.tolerance import round_to
from tracer.stages import split_stage

LIKELY_FRACTION = 0.3


def scores_distance(candidate: np.ndarray, hypothesis: np.ndarray, rows: np.ndarray) -> float:
    """Row error over unmasked entries; a different mask pattern on real rows is infinitely far."""
    cm, hm = is_masked(candidate), is_masked(hypothesis)
    if (np.broadcast_to(rows, cm.shape) & (cm != hm)).any():
        return float("inf")
    return row_error(candidate, hypothesis, np.broadcast_to(rows, cm.shape) & ~hm)[0]  # only those elements count


@dataclass
class StageEvidence:
    """What diagnosis needs about one failing stage."""

    stage: str
    candidate: np.ndarray
    reference: np.ndarray           # correct stage on the same inputs (float64)
    inputs: Callable[[str], np.ndarray]
    ids: np.ndarray
    mask: np.ndarray
    valid: np.ndarray               # comparable elements
    rows: np.ndarray                # comparable rows (token validity, broadcastable)
    before: float
    tolerance: float                # the stage's local tolerance (noise floor × margin)
    precision: str                  # candidate precision
    derived: frozenset[str] = frozenset()   # inputs derived from the dump (not dumped themselves)


def _distance(ev: StageEvidence, hyp: np.ndarray) -> float:
    if split_stage(ev.stage)[1] == "attn.scores":
        return scores_distance(ev.candidate, hyp, ev.rows)
    if hyp.shape != ev.candidate.shape:
        return float("inf")
    with np.errstate(all="ignore"):
        return row_error(ev.candidate, hyp, ev.valid)[0]


# A rounding hypothesis cannot reproduce the candidate to the fp32 noise floor: where the candidate's
# own fp32 error crosses a rounding boundary of the narrow format, one ulp of it remains. Explaining
# this share of the error is its confirmation.
ROUNDING_CONFIRMED = 0.05
ROUNDED_MATCH = 0.99


def _rounded_match(ev: StageEvidence, grid: np.ndarray) -> float:
    """Share of compared elements where the candidate is exactly the hypothesis' rounded value."""
    valid = np.broadcast_to(ev.valid, ev.candidate.shape) & np.isfinite(grid)
    if not valid.any():
        return 0.0
    return float(np.mean(np.isclose(ev.candidate[valid], grid[valid], rtol=1e-9, atol=0.0)))


def _verdict(ev: StageEvidence, after: float, rounding: bool = False, grid: np.ndarray | None = None) -> str | None:
    """`rounding`: the hypothesis rounds to a narrow format; `grid`: its values, when its output lies on that
    format's grid — then agreeing on all but a few boundary cases (`ROUNDED_MATCH`) confirms it."""
    if after <= ev.tolerance or (rounding and np.isfinite(ev.before) and after <= ROUNDING_CONFIRMED * ev.before):
        return "confirmed"
    if grid is not None and _rounded_match(ev, grid) >= ROUNDED_MATCH:
        return "confirmed"
    if np.isfinite(ev.before) and after <= LIKELY_FRACTION * ev.before:
        return "likely"
    return None


def _evidence(before: float, after: float, what: str) -> str:
    return f"{what} reproduces the candidate: error {before:.3g} → {after:.2g}"


def _evaluate(ev: StageEvidence, ref: Reference, hyp: Hypothesis) -> np.ndarray:
    knobs, inputs = dict(hyp.knobs), ev.inputs
    upstream = knobs.pop("upstream", {})
    if upstream:  # inputs recomputed with their own hypothesis
        def inputs(name: str) -> np.ndarray:
            if name in upstream:
                return ref.evaluate(name, Lookup(ev.inputs), ev.ids, ev.mask, np.float64, **upstream[name])
            return ev.inputs(name)
    value = inputs(hyp.same_as) if hyp.same_as else ref.evaluate(
        ev.stage, Lookup(inputs), ev.ids, ev.mask, np.float64, **knobs)
    value = np.asarray(value, dtype=np.float64)
    return round_to(value, hyp.round_output) if hyp.round_output else value


def _test(ev: StageEvidence, ref: Reference, hyp: Hypothesis) -> Diagnosis | None:
    try:
        value = _evaluate(ev, ref, hyp)
    except (KeyError, ValueError):
        return None  # an input the hypothesis needs is not available, or the shapes do not fit
    after = _distance(ev, value)
    verdict = _verdict(ev, after, rounding=hyp.family == "precision", grid=value if hyp.round_output else None)
    if not verdict:
        return None
    return Diagnosis(hyp.rule, hyp.bug, verdict, ev.before, after,
                     _evidence(ev.before, after, f"re-applying '{hyp.bug}' to the stage's inputs"))


def _fit(ev: StageEvidence, ref: Reference, fit: ConstantFit) -> Diagnosis | None:
    """Fit one constant of the formula to the candidate: best grid value, refined by golden-section
    search (closed form for a scale), then judged like any hypothesis."""
    def residual(v: float) -> float:
        try:
            value = ref.evaluate(ev.stage, Lookup(ev.inputs), ev.ids, ev.mask, np.float64, **{fit.knob: v})
        except (KeyError, IndexError, ValueError):
            return float("inf")
        return _distance(ev, np.asarray(value, dtype=np.float64))

    if fit.knob == "scale":
        value = _fit_scale(ev, ref, fit)
    else:
        scored = sorted((residual(v), v) for v in fit.grid)
        value = scored[0][1]
        if not fit.integer and np.isfinite(scored[0][0]):
            value = _golden_section(residual, fit.grid, value, fit.log)
    if value is None or value == fit.default or (not fit.integer and
                                                 abs(value - fit.default) <= 1e-3 * max(abs(fit.default), 1e-12)):
        return None
    after = residual(value)
    verdict = _verdict(ev, after)
    if not verdict:
        return None
    shown = describe_value(value, fit, ref)
    default = describe_value(fit.default, fit, ref)
    return Diagnosis(fit.rule, f"{fit.what} is {shown} instead of {default}", verdict, ev.before, after,
                     _evidence(ev.before, after, f"fitting the {fit.what} ({shown})"))


def _fit_scale(ev: StageEvidence, ref: Reference, fit: ConstantFit) -> float | None:
    """Least-squares scale of q·kᵀ against the candidate's unmasked scores."""
    try:
        raw = ref.evaluate(ev.stage, Lookup(ev.inputs), ev.ids, ev.mask, np.float64, scale=1.0)
    except KeyError:
        return None
    ok = np.broadcast_to(ev.rows, raw.shape) & np.isfinite(raw) & np.isfinite(ev.candidate) & ~is_masked(raw)
    den = float(np.sum(raw[ok] ** 2))
    return float(np.sum(raw[ok] * ev.candidate[ok]) / den) if den > 0 else None


def _golden_section(f, grid: tuple[float, ...], best: float, log: bool, iters: int = 30) -> float:
    """Minimise f between the grid neighbours of `best`."""
    k = grid.index(best)
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    tr = (np.log10, lambda x: 10.0 ** x) if log else (lambda x: x, lambda x: x)
    a, b = tr[0](lo), tr[0](hi)
    phi = (math.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = f(tr[1](c)), f(tr[1](d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = f(tr[1](c))
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = f(tr[1](d))
    x = tr[1]((a + b) / 2)
    return x if f(x) <= f(best) else best


def diagnose(ev: StageEvidence, ref: Reference) -> list[Diagnosis]:
    """Every hypothesis of the stage (definition-derived, fitted constants, generic); reported:
    the confirmed ones, or — when none is confirmed — the likely ones, best reproduction first."""
    found: list[Diagnosis] = []
    nonfinite = ~np.isfinite(ev.candidate) & ev.valid & np.isfinite(ev.reference)
    # A hypothesis far from the truth may make NaN or Inf (ctx re-evaluated from the scores instead of the
    # probs multiplies their -inf; fp16 rounding underflows): its distance says so, not a warning.
    with np.errstate(all="ignore"):
        if nonfinite.any():
            found += _overflow(ev, nonfinite)
        else:
            for hyp in hypotheses_for(ev.stage, ref, ev.precision, ev.derived):
                d = _test(ev, ref, hyp)
                if d:
                    found.append(d)
            for fit in fits_for(ev.stage, ref):
                d = _fit(ev, ref, fit)
                if d:
                    found.append(d)
            found += _generic(ev, ref)
    if any(d.verdict == "confirmed" for d in found):
        found = [d for d in found if d.verdict == "confirmed"]
    found.sort(key=lambda d: (d.rule.startswith("generic."), d.rule.startswith("precision."), d.after))
    return _dedupe(found)[:3]


def _dedupe(found: list[Diagnosis]) -> list[Diagnosis]:
    seen, out = set(), []
    for d in found:
        if d.bug not in seen:
            seen.add(d.bug)
            out.append(d)
    return out


def _named_factor(alpha: float, ref: Reference) -> str:
    D, C = ref.spec.head_dim, ref.spec.n_embd
    known = {"√D": math.sqrt(D), "1/√D": 1 / math.sqrt(D), "D": D, "1/D": 1 / D, "√C": math.sqrt(C),
             "1/√C": 1 / math.sqrt(C), "2": 2.0, "1/2": 0.5, "-1": -1.0}
    for name, value in known.items():
        if abs(alpha - value) <= 0.01 * abs(value):
            return f" = {name}"
    return ""


def _generic(ev: StageEvidence, ref: Reference) -> list[Diagnosis]:
    c, r, valid = ev.candidate, ev.reference, ev.valid
    if split_stage(ev.stage)[1] == "attn.scores":
        valid = valid & ~is_masked(r)
        r = np.where(valid, r, 0.0)
        c = np.where(valid, c, 0.0)
    out: list[Diagnosis] = []
    cv, rv = c[valid].astype(np.float64), r[valid].astype(np.float64)
    if cv.size and not cv.any() and rv.any():
        return [Diagnosis("generic.zeros", "stage is all zeros: never computed, or its buffer never written",
                          "confirmed", ev.before, 1.0, f"all {cv.size} compared values are exactly 0 "
                          f"(golden RMS {np.sqrt(np.mean(rv ** 2)):.3g})")]
    rr = float(rv @ rv)
    if rr > 0:
        alpha = float(cv @ rv) / rr
        after = row_error(c, alpha * r, valid)[0]
        verdict = _verdict(ev, after)
        if verdict and abs(alpha - 1) > 1e-3:
            what = "sign flipped" if abs(alpha + 1) < 0.01 else f"values scaled by a constant {alpha:.4g}"
            out.append(Diagnosis("generic.scale", what + _named_factor(alpha, ref), verdict, ev.before, after,
                                 f"candidate/reference = {alpha:.4g}{_named_factor(alpha, ref)} on all elements: "
                                 f"error {ev.before:.3g} → {after:.2g} after rescaling"))
    t_axis = 2 if ev.candidate.ndim == 4 else 1
    for shift in (1, -1):
        hyp = np.roll(r, shift, axis=t_axis)
        after = row_error(c, hyp, valid)[0]
        verdict = _verdict(ev, after)
        if verdict:
            direction = "later" if shift == 1 else "earlier"
            out.append(Diagnosis("generic.token-shift", f"values shifted by one token (each row holds the {direction}"
                                 f" neighbour's value)", verdict, ev.before, after,
                                 _evidence(ev.before, after, f"shifting the reference by {shift:+d} token")))
    if r.ndim == 4 and r.shape[-1] == r.shape[-2] and split_stage(ev.stage)[1] != "attn.scores":
        after = row_error(c, np.swapaxes(r, -1, -2), valid)[0]
        verdict = _verdict(ev, after)
        if verdict:
            out.append(Diagnosis("generic.transposed", "last two axes transposed", verdict, ev.before, after,
                                 _evidence(ev.before, after, "transposing the reference")))
    if ev.precision in ("fp32", "fp64"):
        for low in ("fp16", "bf16"):
            rounded = round_to(r, low)
            after = row_error(c, rounded, valid)[0]
            verdict = _verdict(ev, after, rounding=True, grid=rounded)
            if verdict == "confirmed":
                out.append(Diagnosis("generic.low-precision", f"values carry {low} rounding in an {ev.precision} "
                                     "port (a buffer or an op in reduced precision)", verdict, ev.before, after,
                                     _evidence(ev.before, after, f"rounding the reference to {low}")))
                break
    return out


def _overflow(ev: StageEvidence, nonfinite: np.ndarray) -> list[Diagnosis]:
    idx = [int(i) for i in np.unravel_index(int(np.argmax(nonfinite)), nonfinite.shape)]
    value = ev.candidate[tuple(idx)]
    text = f"first non-finite value {value} at index {idx} (reference {ev.reference[tuple(idx)]:.4g})"
    out = [Diagnosis("generic.overflow", "overflow to Inf/NaN", "confirmed", ev.before, float("inf"), text)]
    if split_stage(ev.stage)[1] == "attn.probs":
        i = split_stage(ev.stage)[0]
        sc = np.asarray(ev.inputs(f"blocks.{i}.attn.scores"), dtype=np.float64)
        real_rows = np.broadcast_to(ev.rows, nonfinite.shape).any(-1)
        rows_bad = nonfinite.any(-1) & real_rows
        for dtype, limit in ((np.float16, 11.09), (np.float32, 88.72)):
            with np.errstate(all="ignore"):
                hyp = softmax(sc.astype(dtype), subtract_max=False)
            hyp_bad = ~np.isfinite(hyp).all(-1) & real_rows
            if rows_bad.any() and np.array_equal(hyp_bad, rows_bad):
                top = float(np.max(np.where(np.isfinite(sc), sc, -np.inf)))
                out.insert(0, Diagnosis(
                    "softmax.no-max-subtraction", f"softmax without subtracting the row max: exp overflows "
                    f"{np.dtype(dtype).name} above {limit}", "confirmed", ev.before, 0.0,
                    f"exp(scores) in {np.dtype(dtype).name} without max subtraction overflows on exactly the "
                    f"{int(rows_bad.sum())} rows the candidate does (max score {top:.3g} > {limit})"))
                break
    return out
