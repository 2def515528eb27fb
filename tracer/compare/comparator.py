"""Streaming comparison of a trace against its golden (SPEC §6).

Walks each case's stages in execution order, holding only the stages that a later stage
still reads (its data-flow inputs and what its diagnosis rules need). Per stage it runs
two checks (see `tolerance`): chained error vs the golden, and error introduced at the
stage, by re-evaluating the stage in float64 on the inputs the candidate tapped (or, for
teacher-forced traces, on the golden's). Localization and diagnosis follow from those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tracer.compare.align import align
from tracer.compare.diagnose import StageEvidence, diagnose, hypothesis_inputs, scores_distance
from tracer.compare.localize import describe_where, first8_tables, origin_of
from tracer.compare.metrics import is_masked, row_error, stage_metrics, valid_mask
from tracer.compare.oracle import oracle_drift
from tracer.compare.reference import Lookup, Reference, allowed_mask
from tracer.compare.result import CaseResult, CompareResult, StageResult
from tracer.compare.tolerance import UNIT_ROUNDOFF, Tolerances, precision_of, round_to
from tracer.errors import TracerError
from tracer.stages import StageSelector, layout_of, split_stage, stage_inputs
from tracer.store import CaseView, StageFile

META_KEYS = ("model_source", "dtype", "device", "attn_implementation", "tf32", "golden_id", "backend", "mode",
             "inject", "created", "producer", "kind")


@dataclass
class CompareOptions:
    tolerances: Tolerances
    selector: StageSelector = StageSelector()
    token: int | None = None          # extra first-8 table token (besides 0 and the worst)
    cases: list[str] | None = None
    weights: dict | None = None       # the port's own weights (compare --weights), instead of the golden's
    weights_note: str | None = None   # where they came from and how far they are from the golden's


def _meta(f: StageFile) -> dict:
    return {k: f.attrs[k] for k in META_KEYS if k in f.attrs}


def check_pairing(golden: StageFile, trace: StageFile) -> None:
    """The trace must come from this golden: same golden_id (weights + inputs)."""
    gid, tid = golden.golden_id, trace.golden_id
    if gid and tid and gid != tid:
        raise TracerError(f"{trace.path} was made from another golden (golden_id {tid}, "
                          f"{golden.path} has {gid}): replay it from this golden")


def compare(golden: StageFile, trace: StageFile, options: CompareOptions,
            progress: Callable | None = None) -> CompareResult:
    """Compare every common case; `progress` wraps the stage iterator (rich bar)."""
    check_pairing(golden, trace)
    names = [c for c in golden.case_names() if trace.has_case(c)]
    if options.cases:
        names = [c for c in names if c in options.cases]
    if not names:
        raise TracerError(f"{trace.path} has no case in common with {golden.path} "
                          f"(golden: {', '.join(golden.case_names())}; trace: {', '.join(trace.case_names()) or 'none'})")
    weights = options.weights if options.weights is not None else golden.weights() if golden.has_weights else None
    ref = Reference(weights or {}, golden.model_config)
    precision = options.tolerances.precision or precision_of(str(trace.attrs.get("dtype", "")))
    cases = []
    for name in names:
        cases.append(_CaseComparison(golden.case(name), trace.case(name), ref, weights, precision, options,
                                     golden.model_config).run(progress))
    if not any(_stage_present(c) for c in cases):
        raise TracerError(f"{trace.path} contains no stage of {golden.path} (empty trace or wrong stage names)")
    result = CompareResult(golden=str(golden.path), trace=str(trace.path), golden_meta=_meta(golden),
                           trace_meta=_meta(trace), tolerance=options.tolerances.describe()
                           + ("" if weights else " (golden has no weights: no introduced-error checks on "
                              "weighted stages, dtype preset for chained checks)")
                           + (f"; {options.weights_note}" if options.weights_note else ""), cases=cases)
    for c in cases:
        if c.first_divergence and result.first_divergence is None:
            result.first_divergence = {"case": c.case, "stage": c.first_divergence}
            if c.origin:
                result.origin = {"case": c.case, "stage": c.origin}
    return result


def _stage_present(case: CaseResult) -> bool:
    return any(s.status != "missing" for s in case.stages)


class _CaseComparison:
    def __init__(self, golden: CaseView, trace: CaseView, ref: Reference, weights, precision: str,
                 options: CompareOptions, config: dict):
        self.g, self.t, self.ref, self.weights = golden, trace, ref, weights
        self.precision, self.options, self.config = precision, options, config
        self.ids, self.mask = golden.input_ids, golden.attention_mask
        if trace.has_inputs and not np.array_equal(trace.input_ids, self.ids):
            raise TracerError(f"case {golden.name!r}: the trace was run on other input ids than the golden")
        self.allowed = allowed_mask(self.mask)
        low = precision not in ("fp32", "fp64")
        self.noise_ref = ref.jittered(UNIT_ROUNDOFF[precision], weight_precision=precision if low else None)
        self.isolated = bool(trace.stages("isolated"))
        # An isolated-only trace has no chained values: its teacher-forced values stand in for them.
        self.group = "stages" if trace.stages("stages") or not self.isolated else "isolated"
        self.g_cache: dict[str, np.ndarray] = {}
        self.c_cache: dict[str, np.ndarray] = {}

    # -- helpers ----------------------------------------------------------------------------
    def valid_for(self, stage: str, array: np.ndarray) -> np.ndarray:
        allowed = self.allowed if split_stage(stage)[1] == "attn.scores" else None
        return valid_mask(layout_of(stage), array.shape, self.mask, allowed)

    def rows_for(self, stage: str, array: np.ndarray) -> np.ndarray:
        return valid_mask(layout_of(stage), array.shape, self.mask, None)

    def golden_value(self, name: str) -> np.ndarray:
        if name not in self.g_cache:
            self.g_cache[name] = self.g.read(name)
        return self.g_cache[name]

    def candidate_input(self, name: str) -> np.ndarray:
        """The value the candidate tapped for an input stage (golden where it tapped none)."""
        if name in self.c_cache:
            return self.c_cache[name]
        if self.t.has(name, self.group) and not self.t.is_partial(name):
            value, _ = align(self.t.read(name, self.group), self.golden_value(name), layout_of(name))
            if value is not None and value.dtype.kind == "f":
                return value
        raise KeyError(name)

    # -- main loop --------------------------------------------------------------------------
    def run(self, progress: Callable | None) -> CaseResult:
        names = self.options.selector.select(self.g.stages())
        last_use = self._last_use(names)
        drift = self._drift()
        results = []
        for k, stage in enumerate(progress(names) if progress else names):
            results.append(self.compare_stage(stage, k, drift))
            for cache in (self.g_cache, self.c_cache):
                for name in [n for n in cache if last_use.get(n, -1) <= k]:
                    del cache[name]
        case = CaseResult(self.g.name, results)
        failed = [s for s in results if s.failed]
        case.first_divergence = failed[0].stage if failed else None
        case.origin, case.origin_reasoning = origin_of(results, self.config) if failed else (None, None)
        return case

    def _last_use(self, names: list[str]) -> dict[str, int]:
        n_layer = self.ref.spec.n_layer
        last: dict[str, int] = {}
        for k, stage in enumerate(names):
            needed = set(stage_inputs(stage, n_layer)) | hypothesis_inputs(stage, self.ref) | {stage}
            if split_stage(stage)[1] == "attn.scores":
                needed.add(stage.replace("attn.scores", "attn.probs"))
            for n in needed:
                last[n] = k
        return last

    def _drift(self) -> dict[str, float] | None:
        if self.weights is None:
            return None
        return oracle_drift(self.g, self.weights, self.config, self.precision, self.valid_for)

    def compare_stage(self, stage: str, order: int, drift: dict[str, float] | None) -> StageResult:
        g = self.golden_value(stage)
        res = StageResult(stage=stage, order=order, status="pass", shape=list(g.shape), dtype=str(g.dtype))
        if not self.t.has(stage, self.group):
            res.status = "missing"
            return res
        c = self.t.read(stage, self.group)
        res.candidate_shape = list(c.shape)
        if c.dtype.kind not in "fc" or g.dtype.kind not in "fc":
            res.status, res.note = "not-comparable", f"dtype {c.dtype} vs {g.dtype}: not floating point"
            return res
        if c.shape != g.shape:
            c, res.note = align(c, g, layout_of(stage))
            if c is None:
                res.status = "shape-mismatch"
                res.note = f"candidate shape {res.candidate_shape} vs golden {list(g.shape)}"
                return res
        self.c_cache[stage] = c
        valid = self.valid_for(stage, g)
        if self.t.is_partial(stage):
            valid = valid & self.t.present(stage)
            atol = float(self.t.dataset(stage).attrs.get("print_atol", 0.0))
            res.note = f"partial trace: {int(valid.sum())} values present, printed to ±{atol:.1g}"
            with np.errstate(all="ignore"):  # printed values are rounded: only error beyond the rounding counts
                d = c.astype(np.float64) - g
                c = np.where(valid, g + np.sign(d) * np.maximum(np.abs(d) - atol, 0.0), c)
        is_scores = split_stage(stage)[1] == "attn.scores"
        mask_mismatch = 0
        if is_scores:
            c, mask_mismatch, note = self._scores_masking(stage, c, g)
            res.note = note or res.note
        with np.errstate(all="ignore"):
            res.error, per_row = row_error(np.where(valid, c, 0.0), np.where(valid, g, 0.0), valid)
            if mask_mismatch:
                res.error = float("inf")
        res.drift = drift.get(stage) if drift else None
        local_rows, evidence = self._local_check(stage, res, c, g)
        res.tolerance = self.options.tolerances.chained_tolerance(stage, res.drift, self.precision,
                                                                  res.local_tolerance)
        res.metrics = stage_metrics(g, c, valid, res.tolerance, mask_mismatch)
        res.fails_chained = not res.error <= res.tolerance
        if res.metrics.first_nonfinite is not None:
            res.fails_chained = True
        res.min_passing_tolerance = res.error
        if res.local_error is not None and res.local_error > 0:
            res.amplification = res.error / res.local_error if np.isfinite(res.error) else None
        res.status = "fail" if res.fails_chained or res.fails_local else "pass"
        if res.failed:
            rows_err = local_rows if res.fails_local else per_row
            tol = res.local_tolerance if res.fails_local else res.tolerance
            with np.errstate(all="ignore"):
                diff = np.where(valid, c - g, 0.0)
            res.where = describe_where(stage, rows_err, tol, diff, valid, self.config)
            res.diagnoses = diagnose(evidence, self.ref) if evidence else self._diagnose_chained(stage, c, g, valid, res)
        res.tables = first8_tables(stage, g, c, valid, per_row, res.tolerance, self.options.token)
        return res

    def _scores_masking(self, stage: str, c: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, int, str | None]:
        """Masked entries compare as masked-or-not. Finite candidate scores at masked positions are
        fine when the candidate's own probs are 0 there (it masked inside its softmax)."""
        rows = np.broadcast_to(self.rows_for(stage, g), g.shape)
        differs = rows & (is_masked(c) != is_masked(g))
        if not differs.any():
            return c, 0, None
        probs_name = stage.replace("attn.scores", "attn.probs")
        unmasked_where_golden_masks = differs & is_masked(g)
        if not (differs & ~is_masked(g)).any() and self.t.has(probs_name, self.group):
            p = self.t.read(probs_name, self.group)
            if p.shape == g.shape and np.all(np.abs(p[unmasked_where_golden_masks]) <= 1e-6):
                return np.where(is_masked(g), -np.inf, c), 0, "scores tapped before masking; the candidate's probs " \
                    "are 0 at every masked position, so its mask is applied inside softmax"
        return c, int(differs.sum()), f"{int(differs.sum())} score entries masked differently from the golden"

    def _local_check(self, stage: str, res: StageResult, c: np.ndarray,
                     g: np.ndarray) -> tuple[np.ndarray | None, StageEvidence | None]:
        """Error introduced at this stage: candidate vs float64 reference on the inputs it saw.

        Fills the local fields of `res`; returns the per-row introduced errors and, when the
        check fails, the evidence diagnosis works from."""
        if (self.ref.needs_weights(stage) and self.weights is None) or self.t.is_partial(stage):
            return None, None
        if self.isolated and self.t.has(stage, "isolated"):
            cand, lookup, res.local_source = self.t.read(stage, "isolated"), self.golden_value, "isolated"
            if cand.shape != g.shape:
                return None, None
        else:
            cand, lookup, res.local_source = c, self.candidate_input, "chained inputs"
            try:
                for name in stage_inputs(stage, self.ref.spec.n_layer):
                    lookup(name)
            except KeyError:
                lookup, res.local_source = self.golden_value, "golden inputs (inputs not in trace)"
        inputs = Lookup(lookup)
        with np.errstate(all="ignore"):
            reference = self.ref.evaluate(stage, inputs, self.ids, self.mask, np.float64)
            noisy = round_to(self.noise_ref.evaluate(stage, inputs, self.ids, self.mask, np.float32), self.precision)
            valid_local = self.valid_for(stage, reference)
            rows = self.rows_for(stage, reference)
            res.local_error, local_rows = row_error(cand, reference, valid_local)
            if split_stage(stage)[1] == "attn.scores":  # a differently masked row is infinitely wrong
                mask_rows = (np.broadcast_to(rows, cand.shape) & (is_masked(cand) != is_masked(reference))).any(-1)
                if mask_rows.any():
                    res.local_error, local_rows = float("inf"), np.where(mask_rows, np.inf, local_rows)
                res.local_noise = scores_distance(noisy, reference, rows)
            else:
                res.local_noise = row_error(noisy, reference, valid_local)[0]
        res.local_tolerance = self.options.tolerances.local_tolerance(stage, res.local_noise, self.precision)
        res.fails_local = not res.local_error <= res.local_tolerance
        if not res.fails_local:
            return local_rows, None
        return local_rows, StageEvidence(stage, cand, reference, inputs, self.ids, self.mask, valid_local, rows,
                                         res.local_error, res.local_tolerance, self.precision)

    def _diagnose_chained(self, stage: str, c: np.ndarray, g: np.ndarray, valid: np.ndarray, res: StageResult):
        """No introduced-error data: test hypotheses against the golden on golden inputs."""
        if self.ref.needs_weights(stage) and self.weights is None:
            return []
        try:
            reference = self.ref.evaluate(stage, Lookup(self.golden_value), self.ids, self.mask, np.float64)
        except KeyError:
            return []
        ev = StageEvidence(stage, c, reference, Lookup(self.golden_value), self.ids, self.mask, valid,
                           self.rows_for(stage, g), res.error, res.tolerance, self.precision)
        return diagnose(ev, self.ref)
