"""What precision each stage of a candidate is judged at, and how a correct implementation of that
precision computes the stage (the noise twin of `tolerance`).

A trace has one precision, but an engine may compute single stages in another by design (the
stage's `precision` attribute, written by replay from the backend's `stage_precisions`): llama.cpp's
GELU is an fp16 table, its q8_0 matmuls quantize their activations. Tolerances, the noise twin and
the oracle then treat that stage, and only it, as such.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tracer.compare.reference import Reference
from tracer.compare.tolerance import BLOCK_FORMATS, UNIT_ROUNDOFF, round_to
from tracer.stages import canonical_stages, stage_inputs
from tracer.store import CaseView


class StagePrecisions:
    """Per-stage precisions of one case's candidate, and the noise twins that go with them."""

    def __init__(self, trace: CaseView, group: str, dumped: Callable[[str], bool], precision: str, ref: Reference,
                 ids: np.ndarray, mask: np.ndarray):
        self.t, self.group, self.dumped, self.precision = trace, group, dumped, precision
        self.ref, self.ids, self.mask = ref, ids, mask
        self._noise_refs: dict[str, Reference] = {}
        self._precisions: dict[str, str] = {}
        self._consumers: dict[str, list[str]] | None = None

    def precision_of(self, stage: str) -> str:
        """The candidate's precision at `stage`: the trace's, unless its backend declared the stage
        computed in another (the dataset's `precision` attribute: llama.cpp's GELU is an fp16 table)."""
        if stage not in self._precisions:
            declared = self.t.dataset(stage, self.group).attrs.get("precision") if self.dumped(stage) else None
            known = declared in UNIT_ROUNDOFF or declared in BLOCK_FORMATS
            self._precisions[stage] = declared if known else self.precision
        return self._precisions[stage]

    def judged(self, stage: str) -> str:
        """The precision the tolerances of `stage` use."""
        return self.judged_at(self.precision_of(stage))

    def judged_at(self, precision: str) -> str:
        """The precision tolerances use: a block-quantized product stores its output in the trace's."""
        return self.precision if precision in BLOCK_FORMATS else precision

    def quantized_input(self, stage: str) -> str | None:
        """The block format `stage` is quantized to where the product reading it was declared in one
        (llama.cpp's q8_0 matmuls quantize their activations): the oracle continues with that value."""
        if self._consumers is None:
            n_layer = self.ref.spec.n_layer
            self._consumers = {}
            for s in canonical_stages(n_layer):
                for source in stage_inputs(s, n_layer):
                    self._consumers.setdefault(source, []).append(s)
        declared = (self.precision_of(s) for s in self._consumers.get(stage, []))
        return next((p for p in declared if p in BLOCK_FORMATS), None)

    def noise_ref(self, precision: str) -> Reference:
        """The noise twin of a precision: inputs jittered by its rounding unit, weights rounded to it
        when it is narrower than fp32 (to the block format for a quantized product)."""
        if precision not in self._noise_refs:
            low = precision not in ("fp32", "fp64")
            self._noise_refs[precision] = self.ref.jittered(UNIT_ROUNDOFF[self.judged_at(precision)],
                                                            weight_precision=precision if low else None)
        return self._noise_refs[precision]

    def noisy(self, stage: str, inputs, precision: str, twin: Reference | None = None, **knobs) -> np.ndarray:
        """The stage as a correct implementation of `precision` computes it from `inputs`: the noise
        twin in float32, rounded as that precision stores it. A block format quantizes the product's
        operands (`round_inputs`) and stores its output in the trace's precision."""
        twin = twin or self.noise_ref(precision)
        if precision in BLOCK_FORMATS:
            knobs["round_inputs"] = precision
        out = twin.evaluate(stage, inputs, self.ids, self.mask, np.float32, **knobs)
        judged = self.judged_at(precision)
        return out if judged == "fp32" and out.dtype == np.float32 else round_to(out, judged)  # fp32: as it is
