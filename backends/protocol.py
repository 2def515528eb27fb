"""The backend protocol (SPEC §5).

A backend is one class: `prepare(weights, config)` once, then `forward(input_ids, tap)` per
case, calling `tap(stage_name, value)` after every canonical stage it computes and carrying
on with whatever `tap` returns. The tap decides the mode, the backend never knows it:
chained mode returns the value unchanged, isolated (teacher-forced) mode returns the golden
value, so each stage's error is its own. Backends know nothing about tolerances.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


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
    # Fault-injection bugs this backend implements (names from backends.inject.CATALOG).
    supported_injections: frozenset[str] = frozenset()

    def __init__(self, precision: str = "fp32", inject: str | None = None):
        self.precision = precision
        self.inject = inject

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """Whether this backend can run on this machine, and why not."""
        return True, ""

    def prepare(self, weights: dict[str, np.ndarray], config: dict) -> None:
        raise NotImplementedError

    def forward(self, input_ids: np.ndarray, tap: Tap, attention_mask: np.ndarray | None = None) -> Any:
        """Logits [B,T,V] for right-padded `input_ids` [B,T] (mask 1 = real token)."""
        raise NotImplementedError

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def from_numpy(self, array: np.ndarray, like: Any) -> Any:
        return np.asarray(array, dtype=getattr(like, "dtype", array.dtype))
