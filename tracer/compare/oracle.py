"""The drift oracle of `auto` tolerances.

A correct fp32 port drifts from the golden, a little at block 0 and by several % in the
attention of deep blocks, where softmax amplifies rounding. How much, at each stage, is
measured rather than guessed: the NumPy backend replays the golden (chained) with every
stage rounded to the candidate's storage precision, and its row error per stage is the
drift a correct implementation of that precision shows on this very model and input.

The same replay measures what a stage's introduced-error check must allow when some of its
inputs are missing from the candidate's dump and the golden's values stand in for them: the
check then sees the drift the candidate inherited at those inputs. The oracle runs that very
check on its own values (its stage vs the stage re-evaluated with the golden at the same
inputs), which is the inherited error a correct port shows there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from tracer.compare.metrics import row_error
from tracer.compare.reference import Lookup, Reference
from tracer.compare.tolerance import round_to
from tracer.store import CaseView


@dataclass
class OracleDrift:
    chained: dict[str, float] = field(default_factory=dict)     # stage -> row error vs the golden
    inherited: dict[str, float] = field(default_factory=dict)   # stage -> error of the golden-input check


def oracle_drift(case: CaseView, weights: dict[str, np.ndarray], config: dict, precision: str, valid_for,
                 golden_inputs: Mapping[str, frozenset[str]] | None = None,
                 ref: Reference | None = None, golden: Callable[[str], np.ndarray] | None = None,
                 measured: Callable[[str], None] | None = None, into: OracleDrift | None = None,
                 stage_precision: Callable[[str], str] | None = None,
                 quantized_input: Callable[[str], str | None] | None = None) -> OracleDrift:
    """Replay the golden with the NumPy backend, rounded to `precision`, and measure its drift.

    `valid_for(stage, golden_array)` gives the comparable elements of a stage. `golden_inputs`
    maps a stage to the inputs its check takes from the golden; for those stages the oracle's
    inherited error is measured with `ref`. `golden(name)` reads a golden stage (default: from
    `case`); the comparator passes its own cached reader so each stage is read from disk once.
    `measured(stage)` is called as soon as a stage's drift is known, so the comparison can run
    in step with the replay instead of after it (a stage is then held in memory once); the drift
    goes into `into` when given, which the comparison reads as it fills. `stage_precision(stage)`
    overrides `precision` for the rounding of single stages a backend declared computed in another
    (a correct port of that engine rounds there too). `quantized_input(stage)` names the block
    format a product reading the stage quantizes it to: the replay continues with that value,
    while the stage's own drift is measured before it.
    """
    from backends.numpy_backend import NumpyBackend

    backend = NumpyBackend(precision="fp64" if precision == "fp64" else "fp32")
    backend.prepare(weights, config)
    out = into if into is not None else OracleDrift()
    golden_inputs = golden_inputs or {}
    golden = golden or case.read
    keep = {n for stage, subst in golden_inputs.items() for n in (ref.inputs_of(stage) if ref else ())} - \
        {n for subst in golden_inputs.values() for n in subst}
    values: dict[str, np.ndarray] = {}
    ids, mask = case.input_ids, case.attention_mask

    def tap(stage: str, value: np.ndarray) -> np.ndarray:
        p = stage_precision(stage) if stage_precision is not None else precision
        rounded = round_to(value, p).astype(value.dtype) if p not in ("fp32", "fp64") else value
        if stage in keep:
            values[stage] = rounded
        if case.has(stage):
            expected = golden(stage)
            if expected.shape == rounded.shape:
                valid = valid_for(stage, expected)
                with np.errstate(all="ignore"):
                    out.chained[stage] = row_error(rounded, expected, valid)[0]
                if stage in golden_inputs and ref is not None:
                    subst = golden_inputs[stage]
                    lookup = Lookup(lambda n: golden(n) if n in subst else values[n])
                    with np.errstate(all="ignore"):
                        check = ref.evaluate(stage, lookup, ids, mask, np.float64)
                        out.inherited[stage] = row_error(rounded, check, valid_for(stage, check))[0]
        if measured is not None:
            measured(stage)
        fmt = quantized_input(stage) if quantized_input is not None else None
        return round_to(rounded, fmt).astype(rounded.dtype) if fmt else rounded

    backend.forward(ids, tap, attention_mask=mask)
    return out
