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

from collections.abc import Mapping
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
                 ref: Reference | None = None) -> OracleDrift:
    """Replay the golden with the NumPy backend, rounded to `precision`, and measure its drift.

    `valid_for(stage, golden_array)` gives the comparable elements of a stage. `golden_inputs`
    maps a stage to the inputs its check takes from the golden; for those stages the oracle's
    inherited error is measured with `ref`.
    """
    from backends.numpy_backend import NumpyBackend

    backend = NumpyBackend(precision="fp64" if precision == "fp64" else "fp32")
    backend.prepare(weights, config)
    out = OracleDrift()
    golden_inputs = golden_inputs or {}
    keep = {n for stage, subst in golden_inputs.items() for n in (ref.inputs_of(stage) if ref else ())} - \
        {n for subst in golden_inputs.values() for n in subst}
    values: dict[str, np.ndarray] = {}
    ids, mask = case.input_ids, case.attention_mask

    def tap(stage: str, value: np.ndarray) -> np.ndarray:
        rounded = round_to(value, precision).astype(value.dtype) if precision not in ("fp32", "fp64") else value
        if stage in keep:
            values[stage] = rounded
        if case.has(stage):
            golden = case.read(stage)
            if golden.shape == rounded.shape:
                valid = valid_for(stage, golden)
                with np.errstate(all="ignore"):
                    out.chained[stage] = row_error(rounded, golden, valid)[0]
                if stage in golden_inputs and ref is not None:
                    subst = golden_inputs[stage]
                    lookup = Lookup(lambda n: case.read(n) if n in subst else values[n])
                    with np.errstate(all="ignore"):
                        check = ref.evaluate(stage, lookup, ids, mask, np.float64)
                        out.inherited[stage] = row_error(rounded, check, valid_for(stage, check))[0]
        return rounded

    backend.forward(ids, tap, attention_mask=mask)
    return out
