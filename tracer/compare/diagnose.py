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
from dataclasses import dataclass, field

import numpy as np

from tracer.compare.metrics import is_masked, row_error
from tracer.compare.reference import Lookup, Reference, softmax
from tracer.compare.result import Diagnosis
from tracer.compare.tolerance import round_to
from tracer.stages import resid_pre, split_stage

LIKELY_FRACTION = 0.3


@dataclass(frozen=True)
class Hypothesis:
    rule: str
    bug: str
    knobs: dict = field(default_factory=dict)
    same_as: str | None = None   # the stage's value is simply this other stage (a step skipped)


def _ln_rules(eps: float, src: str) -> list[Hypothesis]:
    rules = [
        Hypothesis("ln.eps-outside-sqrt", "LayerNorm adds eps outside the square root: (x-μ)/(σ+eps)",
                   {"eps_outside": True}),
        Hypothesis("ln.unbiased-variance", "LayerNorm uses the unbiased (N-1) variance instead of the biased (N) one",
                   {"unbiased": True}),
        Hypothesis("ln.no-mean", "LayerNorm without mean subtraction (RMSNorm)", {"center": False}),
        Hypothesis("ln.no-affine", "LayerNorm gain and bias not applied", {"affine": False}),
        Hypothesis("ln.skipped", "LayerNorm skipped: the stage equals its input", same_as=src),
    ]
    rules += [Hypothesis("ln.eps", f"LayerNorm eps = {e:g} instead of {eps:g}", {"eps": e})
              for e in (0.0, 1e-12, 1e-6, 1e-3, 1e-2) if not math.isclose(e, eps)]
    return rules


def _linear_rules(square: bool) -> list[Hypothesis]:
    rules = [Hypothesis("linear.no-bias", "bias not added", {"drop_bias": True})]
    if square:
        rules.append(Hypothesis("linear.untransposed", "Conv1D weight used untransposed (HF Conv1D stores W as "
                                "[in, out]; the port multiplied by Wᵀ)", {"transpose": True}))
    return rules


def hypotheses_for(stage: str, ref: Reference) -> list[Hypothesis]:
    """The specific hypotheses of a canonical stage."""
    i, local = split_stage(stage)
    s = ref.spec
    D, C = s.head_dim, s.n_embd
    b = lambda name: f"blocks.{i}.{name}"  # noqa: E731
    if local == "embed.tok":
        return [Hypothesis("embed.id-offset", f"token ids off by {k:+d}", {"id_offset": k}) for k in (1, -1)]
    if local == "embed.pos":
        return [Hypothesis("pos.offset", f"positions start at {k} instead of 0", {"pos_offset": k}) for k in (1, -1)]
    if local == "embed.sum":
        return [Hypothesis("embed.no-pos", "position embedding (wpe) not added", {"pos_scale": 0.0}),
                Hypothesis("embed.no-tok", "token embedding not added", {"tok_scale": 0.0}),
                Hypothesis("embed.scaled", f"token embedding scaled by √C = {math.sqrt(C):.4g}",
                           {"tok_scale": math.sqrt(C)})]
    if local == "ln1":
        return _ln_rules(s.eps, resid_pre(i))
    if local == "ln2":
        return _ln_rules(s.eps, b("resid_mid"))
    if local == "final.ln":
        return _ln_rules(s.eps, f"blocks.{s.n_layer - 1}.resid_post")
    if local in ("attn.qkv", "mlp.fc"):
        return _linear_rules(square=False)
    if local in ("attn.out", "mlp.out"):
        return _linear_rules(square=local == "attn.out")
    if local in ("attn.q", "attn.k", "attn.v"):
        which = "qkv".index(local[-1])
        rules = [Hypothesis("qkv.split-order", f"{local} taken from the {'qkv'[j]} slice of c_attn (split order)",
                            {"order": tuple(j if n == which else n for n in range(3))}) for j in range(3) if j != which]
        return rules + [Hypothesis("heads.split-layout", "heads split as [T, D, H] instead of [T, H, D]",
                                   {"dh_swapped": True}),
                        Hypothesis("qkv.interleaved", "fused qkv read per head as [H, 3, D] (interleaved) instead of "
                                   "GPT-2's [3, H, D]", {"interleaved": True})]
    if local == "attn.scores":
        return [
            Hypothesis("scores.no-scale", f"missing 1/√D scaling (√D = {math.sqrt(D):g})", {"scale": 1.0}),
            Hypothesis("scores.scale-1/D", f"scores scaled by 1/D = 1/{D} instead of 1/√D", {"scale": 1.0 / D}),
            Hypothesis("scores.qk-swapped", "q and k swapped: k·qᵀ (scores transposed before masking)",
                       {"swap_qk": True}),
            Hypothesis("mask.off-by-one", "causal mask off by one: query t also sees key t+1", {"mask_shift": 1}),
            Hypothesis("mask.hides-diagonal", "causal mask off by one: query t cannot see itself",
                       {"mask_shift": -1}),
            Hypothesis("mask.missing", "no causal mask: queries attend to future tokens", {"causal": False}),
        ]
    if local == "attn.probs":
        return [Hypothesis("softmax.wrong-axis", "softmax over the query axis instead of the key axis", {"axis": -2})]
    if local == "attn.ctx":
        return [Hypothesis("heads.merge-layout", "heads merged as [T, D, H] instead of [T, H, D]",
                           {"dh_swapped": True}),
                Hypothesis("ctx.probs-transposed", "attention probs transposed before ·v", {"transpose_probs": True})]
    if local == "resid_mid":
        return [Hypothesis("resid.from-normalized", "residual taken from the LayerNorm output ln1 instead of the "
                           "block input", {"residual_from": b("ln1")}),
                Hypothesis("resid.missing", "residual connection missing: resid_mid = attn.out",
                           same_as=b("attn.out"))]
    if local == "resid_post":
        return [Hypothesis("resid.from-normalized", "residual taken from the LayerNorm output ln2 instead of "
                           "resid_mid", {"residual_from": b("ln2")}),
                Hypothesis("resid.skips-attention", "mlp.out added to the block input, dropping the attention branch",
                           {"residual_from": resid_pre(i)}),
                Hypothesis("resid.missing", "residual connection missing: resid_post = mlp.out",
                           same_as=b("mlp.out"))]
    if local == "mlp.act":
        return [Hypothesis("gelu.erf", "exact erf GELU instead of the tanh approximation (gelu_new)",
                           {"activation": "gelu"}),
                Hypothesis("gelu.sigmoid", "sigmoid approximation x·σ(1.702x) instead of tanh GELU",
                           {"activation": "quick_gelu"}),
                Hypothesis("gelu.relu", "ReLU instead of GELU", {"activation": "relu"})]
    return []


def hypothesis_inputs(stage: str, ref: Reference) -> set[str]:
    """Stages beyond the data-flow inputs that some hypothesis of `stage` reads."""
    extra = set()
    for h in hypotheses_for(stage, ref):
        extra.update(v for k, v in h.knobs.items() if k == "residual_from")
        if h.same_as:
            extra.add(h.same_as)
    return extra


def scores_distance(candidate: np.ndarray, hypothesis: np.ndarray, rows: np.ndarray) -> float:
    """Row error over unmasked entries; a different mask pattern on real rows is infinitely far."""
    cm, hm = is_masked(candidate), is_masked(hypothesis)
    if (np.broadcast_to(rows, cm.shape) & (cm != hm)).any():
        return float("inf")
    valid = np.broadcast_to(rows, cm.shape) & ~hm
    return row_error(np.where(valid, candidate, 0.0), np.where(valid, hypothesis, 0.0), valid)[0]


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


def _distance(ev: StageEvidence, hyp: np.ndarray) -> float:
    if split_stage(ev.stage)[1] == "attn.scores":
        return scores_distance(ev.candidate, hyp, ev.rows)
    if hyp.shape != ev.candidate.shape:
        return float("inf")
    with np.errstate(all="ignore"):
        return row_error(ev.candidate, hyp, ev.valid)[0]


def _verdict(ev: StageEvidence, after: float) -> str | None:
    if after <= ev.tolerance:
        return "confirmed"
    if np.isfinite(ev.before) and after <= LIKELY_FRACTION * ev.before:
        return "likely"
    return None


def _evidence(before: float, after: float, what: str) -> str:
    return f"{what} reproduces the candidate: error {before:.3g} → {after:.2g}"


def diagnose(ev: StageEvidence, ref: Reference) -> list[Diagnosis]:
    """Specific then generic rules; confirmed first, then likely, best reproduction first."""
    found: list[Diagnosis] = []
    nonfinite = ~np.isfinite(ev.candidate) & ev.valid & np.isfinite(ev.reference)
    if nonfinite.any():
        found += _overflow(ev, nonfinite)
    else:
        for hyp in hypotheses_for(ev.stage, ref):
            try:
                value = ev.inputs(hyp.same_as) if hyp.same_as else ref.evaluate(
                    ev.stage, Lookup(ev.inputs), ev.ids, ev.mask, np.float64, **hyp.knobs)
            except KeyError:
                continue  # an input the hypothesis needs was not tapped
            after = _distance(ev, np.asarray(value, dtype=np.float64))
            verdict = _verdict(ev, after)
            if verdict:
                found.append(Diagnosis(hyp.rule, hyp.bug, verdict, ev.before, after,
                                       _evidence(ev.before, after, f"re-applying '{hyp.bug}' to the stage's inputs")))
        found += _generic(ev, ref)
    rank = {"confirmed": 0, "likely": 1}
    found.sort(key=lambda d: (rank[d.verdict], d.rule.startswith("generic."), d.after))
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
            after = row_error(c, round_to(r, low), valid)[0]
            verdict = _verdict(ev, after)
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
