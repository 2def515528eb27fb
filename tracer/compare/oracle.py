"""The drift oracle of `auto` tolerances.

A correct fp32 port drifts from the golden, a little at block 0 and by several % in the
attention of deep blocks, where softmax amplifies rounding. How much, at each stage, is
measured rather than guessed: the NumPy backend replays the golden (chained) with every
stage rounded to the candidate's storage precision, and its row error per stage is the
drift a correct implementation of that precision shows on this very model and input.
"""

from __future__ import annotations

import numpy as np

from tracer.compare.metrics import row_error
from tracer.compare.tolerance import round_to
from tracer.store import CaseView


def oracle_drift(case: CaseView, weights: dict[str, np.ndarray], config: dict, precision: str,
                 valid_for) -> dict[str, float]:
    """Stage -> row error of a correct NumPy replay (rounded to `precision`) vs the golden.

    `valid_for(stage, golden_array)` gives the comparable elements of a stage.
    """
    from backends.numpy_backend import NumpyBackend

    backend = NumpyBackend(precision="fp64" if precision == "fp64" else "fp32")
    backend.prepare(weights, config)
    drift: dict[str, float] = {}

    def tap(stage: str, value: np.ndarray) -> np.ndarray:
        rounded = round_to(value, precision).astype(value.dtype) if precision not in ("fp32", "fp64") else value
        if case.has(stage):
            golden = case.read(stage)
            if golden.shape == rounded.shape:
                valid = valid_for(stage, golden)
                with np.errstate(all="ignore"):
                    drift[stage] = row_error(np.where(valid, rounded, 0.0), np.where(valid, golden, 0.0), valid)[0]
        return rounded

    backend.forward(case.input_ids, tap, attention_mask=case.attention_mask)
    return drift
