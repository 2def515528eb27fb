"""Candidate backends: independent GPT-2 implementations replayed against a golden (SPEC §5)."""

from backends.protocol import Backend, Tap

__all__ = ["Backend", "Tap"]
