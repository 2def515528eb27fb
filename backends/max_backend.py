"""Modular MAX as a candidate backend (`max:pkg.mod:Class`, SPEC §5): listed, not yet implemented.

`tracer backends` shows the row so users see the engine is planned and what it will need; it is
never available until the backend (a MAX module compiled once, every submodule output a graph
output) is written.
"""

from __future__ import annotations

import importlib.util

from backends.protocol import Backend


class MaxBackend(Backend):
    name = "max"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("max") is None:
            return False, "not implemented in this version (it will need Modular MAX 26.7: pip install modular)"
        return False, "not implemented in this version (Modular MAX is installed)"
