"""Backends that exist only for the tests: a third-party plugin and deliberately broken ones."""

from __future__ import annotations

from backends.numpy_backend import NumpyBackend


class EchoNumpy(NumpyBackend):
    """A third-party backend as a user would write one: here, the NumPy forward under another name."""

    name = "echo-numpy"


class Raising(NumpyBackend):
    name = "raising"

    def forward(self, input_ids, tap, attention_mask=None):
        tap("embed.tok", self.w.wte[input_ids])
        raise ValueError("kernel exploded\nsecond line of the message")


class WrongShapeLogits(NumpyBackend):
    name = "wrong-shape"

    def forward(self, input_ids, tap, attention_mask=None):
        return super().forward(input_ids, tap, attention_mask)[..., :-1]


class UnknownStage(NumpyBackend):
    name = "unknown-stage"

    def forward(self, input_ids, tap, attention_mask=None):
        return tap("blocks.0.attn.qk", self.w.wte[input_ids])


class DoubleTap(NumpyBackend):
    name = "double-tap"

    def forward(self, input_ids, tap, attention_mask=None):
        tap("embed.tok", self.w.wte[input_ids])
        return tap("embed.tok", self.w.wte[input_ids])


class NotABackend:
    """Has no forward: the registry must refuse it."""
