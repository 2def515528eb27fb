"""What every file says about where it came from: producer, versions, and a trace's golden.

Kept free of torch so that reading, comparing and importing never pay for importing it.
"""

from __future__ import annotations

import importlib.metadata as md
import platform

from tracer.store import StageFile

PRODUCER = "gpt2-tracer"


def versions() -> dict[str, str]:
    """Versions of everything that can change the numbers, stored in every file."""
    out = {"python": platform.python_version()}
    for pkg in ("gpt2-tracer", "torch", "transformers", "numpy", "h5py"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


TRACE_COPIED_ATTRS = ("model_source", "tokenizer")


def trace_attrs(golden: StageFile, backend: str, mode: str, dtype: str, inject: str = "") -> dict:
    """Root attributes of a trace: the golden's identity, and which backend made it and how."""
    attrs = {key: golden.attrs[key] for key in TRACE_COPIED_ATTRS if key in golden.attrs}
    attrs.update({"producer": PRODUCER, "versions": versions(), "model_config": golden.model_config,
                  "golden_id": golden.golden_id, "backend": backend, "mode": mode, "dtype": dtype,
                  "inject": inject})
    return attrs
