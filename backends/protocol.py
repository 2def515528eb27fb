"""The backend protocol (SPEC §5).

A backend is one class: `prepare(weights, config)` once, then `forward(input_ids, tap)` per
case, calling `tap(stage_name, value)` after every canonical stage it computes and carrying
on with whatever `tap` returns. The tap decides the mode, the backend never knows it:
chained mode returns the value unchanged, isolated (teacher-forced) mode returns the golden
value, so each stage's error is its own. Backends know nothing about tolerances.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tracer.errors import TracerError

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # HF names of the tanh-approximation GELU


@runtime_checkable
class Tap(Protocol):
    def __call__(self, stage: str, value: Any) -> Any:
        """Record `value` as canonical stage `stage`; return the value the backend continues with."""


class Backend:
    """Base class for backends. Subclasses set `name` and implement `prepare` and `forward`.

    `to_numpy` / `from_numpy` let the tap move values of device backends (CuPy, torch) to the
    host for recording and golden values back in isolated mode; NumPy backends inherit them.
    """

    name: str = "backend"
    # Precisions the backend accepts; None accepts any (plugins that ignore the option).
    precisions: tuple[str, ...] | None = None
    # Fault-injection bugs this backend implements (names from backends.inject.CATALOG).
    supported_injections: frozenset[str] = frozenset()
    # Stages (globs) the engine computes in another precision than `precision` by design, e.g.
    # {"blocks.*.mlp.act": "fp16"} for a GELU read from a float16 table. Replay stores it as the
    # stage's `precision` attribute and `auto` tolerances judge that stage at that precision.
    stage_precisions: dict[str, str] = {}

    def __init__(self, precision: str = "fp32", inject: str | None = None):
        if self.precisions is not None and precision not in self.precisions:
            raise TracerError(f"{self.name} backend: unknown precision {precision!r} ({', '.join(self.precisions)})")
        if inject is not None:
            from backends.inject import validate_injection

            validate_injection(inject, type(self))
        self.precision = precision
        self.inject = inject

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """Whether this backend can run on this machine, and why not."""
        return True, ""

    def declared_precision(self, stage: str) -> str | None:
        """The precision this backend declares for `stage` when it differs from `precision`."""
        return next((p for glob, p in self.stage_precisions.items() if fnmatch.fnmatchcase(stage, glob)), None)

    def prepare(self, weights: dict[str, np.ndarray], config: dict) -> None:
        raise NotImplementedError

    def forward(self, input_ids: np.ndarray, tap: Tap, attention_mask: np.ndarray | None = None) -> Any:
        """Logits [B,T,V] for right-padded `input_ids` [B,T] (mask 1 = real token)."""
        raise NotImplementedError

    def check_gpt2_config(self, config: dict) -> None:
        """Refuse configs outside what the built-in ports implement (tanh GELU, 1/√D scaling)."""
        act = config.get("activation_function", "gelu_new")
        if act not in TANH_GELUS:
            raise TracerError(f"{self.name} backend implements GPT-2's tanh GELU, not activation_function={act!r}")
        if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
            raise TracerError(f"{self.name} backend implements GPT-2's 1/sqrt(D) attention scaling only")

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def from_numpy(self, array: np.ndarray, like: Any) -> Any:
        return np.asarray(array, dtype=getattr(like, "dtype", array.dtype))
