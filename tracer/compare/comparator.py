"""Streaming comparison of a trace against its golden (SPEC §6).

Walks each case's stages in execution order, holding only the stages that a later stage
still reads. Per stage it runs two checks (see `tolerance`): chained error vs the golden, and
error introduced at the stage, by re-evaluating the stage in float64 on the inputs the
candidate has — dumped, or derived from what it dumped (`derive`) — or, for teacher-forced
traces, on the golden's. Where an input is truly absent the golden's value stands in and the
check allows the inherited drift a correct port shows there (measured by the oracle).
Localization and diagnosis follow from those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tracer.compare.blocked import BlockedCheck
from tracer.compare.derive import CandidateStages
from tracer.compare.diagnose import StageEvidence, diagnose, scores_distance
from tracer.compare.localize import (
    coverage_of,
    describe_where,
    first8_tables,
    origin_of,
)
from tracer.compare.metrics import ChainedPass, is_masked, row_error, row_errors, valid_mask
from tracer.compare.oracle import OracleDrift, oracle_drift
from tracer.compare.precisions import StagePrecisions
from tracer.compare.reference import Lookup, Reference, allowed_mask
from tracer.compare.result import CaseResult, CompareResult, StageResult
from tracer.compare.tolerance import Tolerances, precision_of, round_to
from tracer.errors import TracerError
from tracer.stages import StageSelector, layout_of, split_stage, stage_inputs
from tracer.store import WHOLE_UNDER_SUBSET, CaseView, StageFile

META_KEYS = ("model_source", "dtype", "device", "attn_implementation", "tf32", "golden_id", "backend", "mode",
             "inject", "created", "producer", "kind", "foreign_unmatched")


@dataclass
class CompareOptions:
    tolerances: Tolerances
    selector: StageSelector = StageSelector()
    token: int | None = None          # extra first-8 table token (besides 0 and the worst)
    cases: list[str] | None = None
    require: StageSelector | None = None   # missing stages matching it fail (--require)
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


def candidate_precision(trace: StageFile, declared: str) -> tuple[str, str | None]:
    """The precision the candidate computed in. A float64 dump whose values are all exactly
    float32 numbers is an fp32 port saved as doubles: judged as fp32, with a note. The first batch
    row of a few stages decides (hundreds of values), so the check reads no stage whole before the
    comparison reads it again."""
    if declared != "fp64":
        return declared, None
    for case in trace.cases():
        for group in ("stages", "isolated"):
            for name in case.stages(group)[:6]:
                ds = case.dataset(name, group)
                if ds.dtype != np.float64:
                    continue
                a = ds[0] if ds.ndim else ds[()]
                finite = a[np.isfinite(a)]
                if finite.size and not np.array_equal(finite.astype(np.float32).astype(np.float64), finite):
                    return "fp64", None
    return "fp32", "float64 values that are all exact float32 numbers: judged as an fp32 port"


def compare(golden: StageFile, trace: StageFile, options: CompareOptions,
            progress: Callable | None = None) -> CompareResult:
    """Compare every common case; `progress` wraps the stage iterator (rich bar).

    BLAS runs on one thread meanwhile: the comparison's products are small to medium and come
    between element-wise passes, where an idle OpenBLAS thread spins. On 2 cores (gpt2, T=256)
    two threads cost 1.7x the CPU time for 2% less wall time."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _compare(golden, trace, options, progress)


def _compare(golden: StageFile, trace: StageFile, options: CompareOptions,
             progress: Callable | None = None) -> CompareResult:
    check_pairing(golden, trace)
    names = [c for c in golden.case_names() if trace.has_case(c)]
    if options.cases:
        unknown = [c for c in options.cases if not golden.has_case(c)]
        if unknown:
            raise TracerError(f"{golden.path} has no case {unknown[0]!r} (cases: {', '.join(golden.case_names())})")
        names = [c for c in names if c in options.cases]
    if not names:
        raise TracerError(f"{trace.path} has no case in common with {golden.path} "
                          f"(golden: {', '.join(golden.case_names())}; trace: {', '.join(trace.case_names()) or 'none'})")
    weights = options.weights if options.weights is not None else \
        golden.weights_on_demand() if golden.has_weights else None
    ref = Reference(weights or {}, golden.model_config)
    declared = options.tolerances.precision or precision_of(str(trace.attrs.get("dtype", "")))
    precision, precision_note = (declared, None) if options.tolerances.precision else \
        candidate_precision(trace, declared)
    cases = []
    for name in names:
        cases.append(_CaseComparison(golden.case(name), trace.case(name), ref, weights, precision, options,
                                     golden.model_config).run(progress))
    if not any(c.coverage.get("compared", 0) for c in cases):
        raise TracerError(f"{trace.path} contains no stage of {golden.path} (empty trace or wrong stage names)")
    tolerance = options.tolerances.describe()
    if not weights:
        tolerance += " (golden has no weights: no introduced-error checks on weighted stages, dtype preset for " \
                     "chained checks)"
    if precision_note:
        tolerance += f"; {precision_note}"
    if golden.attrs.get("tokens"):
        tolerance += f"; the golden kept tokens {golden.attrs['tokens']} (--tokens): only those rows are compared"
    if options.weights_note:
        tolerance += f"; {options.weights_note}"
    result = CompareResult(golden=str(golden.path), trace=str(trace.path), golden_meta=_meta(golden),
                           trace_meta=_meta(trace), tolerance=tolerance, cases=cases)
    for c in cases:
        if c.first_divergence and result.first_divergence is None:
            result.first_divergence = {"case": c.case, "stage": c.first_divergence}
            if c.origin:
                result.origin = {"case": c.case, "stage": c.origin}
    return result


class _CaseComparison:
    def __init__(self, golden: CaseView, trace: CaseView, ref: Reference, weights, precision: str,
                 options: CompareOptions, config: dict):
        self.g, self.t, self.ref, self.weights = golden, trace, ref, weights
        self.precision, self.options, self.config = precision, options, config
        self.ids, self.mask = golden.input_ids, golden.attention_mask
        if trace.has_inputs and not np.array_equal(trace.input_ids, self.ids):
            raise TracerError(f"case {golden.name!r}: the trace was run on other input ids than the golden")
        self.allowed = allowed_mask(self.mask)
        # A golden recorded with --tokens holds only these positions (k and v whole): its stages are
        # read back at full length with NaN rows elsewhere, and only the kept rows are compared.
        self.kept = next((p for s in golden.stages() if (p := golden.positions(s)) is not None), None)
        self.compared = self.mask.astype(bool)
        if self.kept is not None:
            recorded = np.zeros(self.mask.shape[1], dtype=bool)
            recorded[self.kept] = True
            self.compared = self.compared & recorded
        self.isolated = bool(trace.stages("isolated"))
        # An isolated-only trace has no chained values: its teacher-forced values stand in for them.
        self.group = "stages" if trace.stages("stages") or not self.isolated else "isolated"
        self.g_cache: dict[str, np.ndarray] = {}
        self.cand = CandidateStages(trace, self.group, golden, self.golden_value, ref, self.ids, self.mask,
                                    weights is not None)
        self.precisions = StagePrecisions(trace, self.group, self.cand.dumped, precision, ref, self.ids, self.mask)
        self.blocked = BlockedCheck(ref, self.precisions, self.ids, self.mask, self.allowed)

    # -- helpers ----------------------------------------------------------------------------
    def _tokens_of(self, stage: str) -> np.ndarray:
        """The tokens whose rows are compared: real ones, and of those the kept ones under --tokens."""
        return self.mask if split_stage(stage)[1] in WHOLE_UNDER_SUBSET else self.compared

    def valid_for(self, stage: str, array: np.ndarray) -> np.ndarray:
        allowed = self.allowed if split_stage(stage)[1] == "attn.scores" else None
        return valid_mask(layout_of(stage), array.shape, self._tokens_of(stage), allowed)

    def rows_for(self, stage: str, array: np.ndarray) -> np.ndarray:
        return valid_mask(layout_of(stage), array.shape, self._tokens_of(stage), None)

    def golden_value(self, name: str) -> np.ndarray:
        if name not in self.g_cache:
            value, kept = self.g.read(name), self.g.positions(name)
            if kept is not None:  # back to full length, NaN at the rows not recorded (never compared)
                full = np.full(self.g.full_shape(name), np.nan, dtype=value.dtype)
                index = [slice(None)] * full.ndim
                index[layout_of(name).index("T")] = kept
                full[tuple(index)] = value
                value = full
            self.g_cache[name] = value
        return self.g_cache[name]

    def candidate_input(self, name: str) -> np.ndarray:
        """The candidate's value of an input stage, dumped or derived (KeyError when it has none)."""
        if not self.cand.available(name):
            raise KeyError(name)
        value = self.cand.read(name).array
        if value is None or value.dtype.kind != "f":
            raise KeyError(name)
        return value

    def input_sources(self, stage: str) -> dict[str, str]:
        """Where each input of the stage's introduced-error check comes from: candidate, derived, golden."""
        out = {}
        for name in stage_inputs(stage, self.ref.spec.n_layer):
            if self.cand.available(name):
                out[name] = "candidate" if self.cand.dumped(name) else "derived"
            else:
                out[name] = "golden"
        return out

    # -- main loop --------------------------------------------------------------------------
    def run(self, progress: Callable | None) -> CaseResult:
        names = self.options.selector.select(self.g.stages())
        last_use = self._last_use(names)
        position = {name: k for k, name in enumerate(names)}
        steps = iter(progress(names) if progress else names)
        results: list[StageResult] = []
        drift = OracleDrift() if self.weights is not None else None

        def compare_through(k: int) -> None:
            """Compare every stage up to position k, in order, and drop what no later stage reads."""
            while len(results) <= k:
                stage = next(steps)
                results.append(self.compare_stage(stage, len(results), drift))
                for cache in (self.g_cache, self.cand.cache):
                    for name in [n for n in cache if last_use.get(n, -1) <= len(results) - 1]:
                        del cache[name]

        if drift is not None:  # in step with the oracle's replay: each golden stage is read once. A stage is
            # compared when the oracle reaches the next one, so the oracle's own value of it is gone by then.
            self._drift(names, drift, lambda stage: compare_through(position[stage] - 1) if stage in position else None)
        compare_through(len(names) - 1)
        case = CaseResult(self.g.name, results)
        failed = [s for s in results if s.failed]
        case.first_divergence = failed[0].stage if failed else None
        case.origin, case.origin_reasoning = origin_of(results, self.config) if failed else (None, None)
        case.coverage = coverage_of(results, self.config)
        return case

    def _last_use(self, names: list[str]) -> dict[str, int]:
        n_layer = self.ref.spec.n_layer
        last: dict[str, int] = {}
        for k, stage in enumerate(names):
            needed = set(stage_inputs(stage, n_layer)) | {stage}
            i, local = split_stage(stage)
            if local == "attn.scores":
                needed.add(stage.replace("attn.scores", "attn.probs"))
            if local in ("embed.tok", "embed.pos", "embed.sum", "attn.qkv", "attn.q", "attn.k", "attn.v"):
                needed |= {"embed.sum", "embed.tok", "embed.pos"} if i is None else \
                    {f"blocks.{i}.attn.{x}" for x in ("qkv", "q", "k", "v")}
            for n in needed:
                last[n] = max(last.get(n, -1), k)
        return last

    def _drift(self, names: list[str], drift: OracleDrift, measured: Callable[[str], None]) -> None:
        """Run the oracle's replay, filling `drift`; `measured(stage)` follows each of its stages."""
        substituted = {}
        if not self.isolated:
            for stage in names:
                if self.cand.dumped(stage) and not self.t.is_partial(stage):
                    golden_inputs = frozenset(n for n, src in self.input_sources(stage).items() if src == "golden")
                    if golden_inputs:
                        substituted[stage] = golden_inputs
        oracle_drift(self.g, self.weights, self.config, self.precision, self.valid_for, substituted, self.ref,
                     golden=self.golden_value, measured=measured, into=drift,
                     stage_precision=self.precisions.judged,
                     quantized_input=self.precisions.quantized_input)

    def _golden_nonfinite(self, stage: str, g: np.ndarray) -> tuple[int, float | None]:
        """NaN/Inf values of the golden in compared rows (-inf stands for masked scores); and, for a stage
        other than the scores whose every token row is compared, its largest magnitude, for the metrics
        (the caller drops it where fewer elements are compared: a partial trace)."""
        is_scores = split_stage(stage)[1] == "attn.scores"
        with np.errstate(invalid="ignore"):  # two reductions without temporaries see the usual case: none at all
            if g.size == 0:
                return 0, None
            hi, lo = g.max(), None if is_scores else g.min()
            if np.isfinite(hi) and (is_scores or np.isfinite(lo)):
                whole = not is_scores and bool(self._tokens_of(stage).all())
                return 0, max(float(hi), -float(lo), 0.0) if whole else None
        rows = np.broadcast_to(self.rows_for(stage, g), g.shape)
        bad = ~np.isfinite(g) & rows
        if is_scores:
            bad &= ~np.isneginf(g)
        return int(bad.sum()), None

    def compare_stage(self, stage: str, order: int, drift: OracleDrift | None) -> StageResult:
        g = self.golden_value(stage)
        res = StageResult(stage=stage, order=order, status="pass", shape=list(g.shape), dtype=str(g.dtype))
        golden_abs_max = None
        if g.dtype.kind in "fc":
            n_bad, golden_abs_max = self._golden_nonfinite(stage, g)
            if n_bad:
                res.status = "golden-nonfinite"
                res.note = (f"the golden itself has {n_bad} NaN/Inf value(s) in this stage: nothing can be "
                            "judged against it; re-record the golden")
                return res
        if not (self.cand.dumped(stage) or self.cand.available(stage)):
            res.status = "missing"
            res.required = self.options.require is not None and self.options.require.matches(stage)
            return res
        value = self.cand.read(stage)
        res.derived = value.derived
        if self.cand.dumped(stage):
            res.candidate_shape = list(self.t.dataset(stage, self.group).shape)
        c = value.array
        if c is None:
            res.status = "shape-mismatch" if value.floating else "not-comparable"
            res.note = value.note
            return res
        if g.dtype.kind not in "fc":
            res.status, res.note = "not-comparable", f"golden dtype {g.dtype}: not floating point"
            return res
        res.note = value.note
        valid = self.valid_for(stage, g)
        shown = c  # First-8 tables show the candidate's own values (for a log: exactly what the port printed)
        if self.t.is_partial(stage):
            valid, golden_abs_max = valid & self.t.present(stage), None
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
            chained = ChainedPass(c, g, valid, golden_abs_max)
        res.error, per_row = (float("inf") if mask_mismatch else chained.error), chained.per_row
        res.drift = drift.chained.get(stage) if drift else None
        local_rows, evidence = self._local_check(stage, res, c, g, drift)
        res.tolerance = self.options.tolerances.chained_tolerance(
            stage, res.drift, self.precisions.judged(stage), res.local_tolerance)
        res.metrics = chained.metrics(res.tolerance, mask_mismatch)
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
            if evidence is not None:
                res.diagnoses = diagnose(evidence, self.ref)
            elif res.local_error is None:  # no introduced-error check was possible: test against the golden
                res.diagnoses = self._diagnose_chained(stage, c, g, valid, res)
        res.tables = first8_tables(stage, g, shown if self.t.is_partial(stage) else c, valid, per_row,
                                   res.tolerance, float(np.sqrt(chained.golden_sq / max(res.metrics.n_compared, 1))),
                                   self.options.token, first=0 if self.kept is None else int(self.kept[0]))
        return res

    def _scores_masking(self, stage: str, c: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, int, str | None]:
        """Masked entries compare as masked-or-not. A port that masks inside its softmax, or never
        writes the masked entries of its score buffer, dumps finite scores there: where its own
        probs are exactly 0 the key was masked, whatever the score buffer holds."""
        masked = is_masked(c)
        note = None
        probs_name = stage.replace("attn.scores", "attn.probs")
        if self.cand.dumped(probs_name):
            p = self.cand.read(probs_name).array
            if p is not None and p.shape == g.shape:
                unwritten = ~masked & (p == 0)
                if unwritten.any():
                    masked = masked | unwritten
                    note = ("scores dumped without their mask (finite values at masked keys); the keys the "
                            "candidate's probs give exactly 0 are taken as masked")
        c = np.where(masked, -np.inf, c)
        differs = np.broadcast_to(self.rows_for(stage, g), g.shape) & (masked != is_masked(g))
        if differs.any():
            note = f"{int(differs.sum())} score entries masked differently from the golden"
        return c, int(differs.sum()), note

    def _local_check(self, stage: str, res: StageResult, c: np.ndarray, g: np.ndarray,
                     drift: OracleDrift | None) -> tuple[np.ndarray | None, StageEvidence | None]:
        """Error introduced at this stage: candidate vs float64 reference on the inputs it saw.

        Fills the local fields of `res`; returns the per-row introduced errors and, when the
        check fails, the evidence diagnosis works from."""
        if (self.ref.needs_weights(stage) and self.weights is None) or self.t.is_partial(stage):
            return None, None
        inherited = None
        if self.isolated and self.t.has(stage, "isolated"):
            cand, lookup, res.local_source = self.t.read(stage, "isolated"), self.golden_value, "isolated"
            if cand.shape != g.shape:
                return None, None
        else:
            cand = c
            sources = self.input_sources(stage)
            res.inputs = sources
            golden_in = {n for n, src in sources.items() if src == "golden"}
            if golden_in:
                lookup = lambda n: self.golden_value(n) if n in golden_in else self.candidate_input(n)  # noqa: E731
                res.local_source = f"chained inputs; golden {', '.join(sorted(golden_in))} (not in trace)"
                inherited = drift.inherited.get(stage) if drift else None
                if inherited is None:
                    return None, None  # no measure of what a correct port inherits there: chained rule only
                res.local_inherited = inherited
            else:
                lookup = self.candidate_input
                res.local_source = "chained inputs" + ("" if "derived" not in sources.values() else " (some derived)")
        inputs = Lookup(lookup)
        precision = self.precisions.precision_of(stage)
        reference = None
        with np.errstate(all="ignore"):
            valid_local, rows = self.valid_for(stage, cand), self.rows_for(stage, cand)
            blockwise = self.blocked.run(stage, cand, inputs, valid_local, rows)
            if blockwise is not None:
                res.local_error, local_rows, res.local_noise = blockwise
            else:
                reference = self.ref.evaluate(stage, inputs, self.ids, self.mask, np.float64)
                noisy = self.precisions.noisy(stage, inputs, precision)
                if split_stage(stage)[1] == "attn.scores":  # a differently masked row is infinitely wrong
                    res.local_error, local_rows = row_error(cand, reference, valid_local)
                    mask_rows = (np.broadcast_to(rows, cand.shape) & (is_masked(cand) != is_masked(reference))).any(-1)
                    if mask_rows.any():
                        res.local_error, local_rows = float("inf"), np.where(mask_rows, np.inf, local_rows)
                    res.local_noise = scores_distance(noisy, reference, rows)
                else:
                    (res.local_error, local_rows), (res.local_noise, _) = row_errors(reference, valid_local, cand,
                                                                                     noisy)
                del noisy
            if res.derived:
                res.local_noise = max(res.local_noise, self._derivation_noise(stage, g, valid_local))
        res.local_tolerance = self.options.tolerances.local_tolerance(
            stage, res.local_noise, self.precisions.judged_at(precision), inherited)
        res.fails_local = not res.local_error <= res.local_tolerance
        if not res.fails_local:
            return local_rows, None
        if reference is None:  # diagnosis needs the whole reference: evaluated again, for failing stages only
            with np.errstate(all="ignore"):
                reference = self.ref.evaluate(stage, inputs, self.ids, self.mask, np.float64)
        derived = frozenset(n for n, src in (res.inputs or {}).items() if src == "derived")
        return local_rows, StageEvidence(stage, cand, reference, inputs, self.ids, self.mask, valid_local, rows,
                                         res.local_error, res.local_tolerance, self.precisions.judged_at(precision),
                                         derived)

    def _derivation_noise(self, stage: str, g: np.ndarray, valid: np.ndarray) -> float:
        """What deriving the stage adds by itself: the derivation applied to golden sources rounded
        to the candidate's precision (e.g. embed.sum − embed.tok carries the rounding of the sum)."""
        d = self.cand.derivation(stage)
        if d is None or d.exact:
            return 0.0
        precision = self.precisions.precision_of(stage)
        rounded = lambda n: round_to(self.precisions.noise_ref(precision).perturb(self.golden_value(n)),  # noqa: E731
                                     self.precisions.judged_at(precision))
        return row_error(self.cand.derive(stage, d, rounded), g, valid)[0]

    def _diagnose_chained(self, stage: str, c: np.ndarray, g: np.ndarray, valid: np.ndarray, res: StageResult):
        """No introduced-error data: test hypotheses against the golden on golden inputs."""
        if self.ref.needs_weights(stage) and self.weights is None:
            return []
        try:
            reference = self.ref.evaluate(stage, Lookup(self.golden_value), self.ids, self.mask, np.float64)
        except KeyError:
            return []
        ev = StageEvidence(stage, c, reference, Lookup(self.golden_value), self.ids, self.mask, valid,
                           self.rows_for(stage, g), res.error, res.tolerance,
                           self.precisions.judged(stage))
        return diagnose(ev, self.ref)
