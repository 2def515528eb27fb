"""The port's own weights for `compare --weights`: mapped, oriented and dequantized like the golden's.

A quantized port differs from the fp32 golden at every stage by more than fp32 noise. Judged
against its own weights (the introduced-error reference and the drift oracle both computed with
them), a correct quantized port passes and a real bug in it still stands out. Only parameters
the audit found with values its storage explains are taken from the port; any other one keeps the
golden's value (and the note says so): a mis-loaded weight is the audit's finding, not something
the comparison should learn to expect.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tracer.foreign import load_toml, resolve_map_path
from tracer.store import StageFile
from tracer.weights.audit import Finding, audit_open
from tracer.weights.match import Matcher
from tracer.weights.names import WeightMap, load_weight_map
from tracer.weights.readers import open_checkpoint
from tracer.weights.views import source_tensors


def optional_weight_map(path: str | os.PathLike | None) -> WeightMap | None:
    """The [weights] table of a map file, or None when there is no file or it has none."""
    if path is None:
        return None
    return load_weight_map(path) if "weights" in load_toml(resolve_map_path(path)) else None


def assemble(finding: Finding, matcher: Matcher) -> np.ndarray:
    """The parameter in the golden's shape and orientation, float32, from the checkpoint."""
    out = np.empty(finding.shape, dtype=np.float32)
    for piece in finding.source:
        piece.of(out)[...] = piece.view.apply(matcher.values(piece.view.tensor)[0])
    return out


def port_weights(ckpt_path: str | os.PathLike, golden: StageFile,
                 name_map: str | os.PathLike | None = None) -> tuple[dict[str, np.ndarray], str]:
    """HF name -> the port's value (float32, golden layout), and a one-line summary of them."""
    weights: dict[str, np.ndarray] = {}
    kept: list[str] = []

    def take(finding: Finding, golden_value: np.ndarray, matcher: Matcher) -> None:
        if finding.found_by is not None and finding.check.within:
            weights[finding.param] = assemble(finding, matcher)
        else:
            weights[finding.param] = golden_value
            kept.append(finding.param)

    with open_checkpoint(ckpt_path) as ckpt:
        result = audit_open(golden, ckpt, optional_weight_map(name_map), on_found=take)
    used = [f for f in result.findings if f.param not in kept]
    storages = sorted({result.storage[t] for f in used for t in source_tensors(f.source)})
    worst = max((f.check.rel_l2 for f in used), default=0.0)
    note = (f"port weights from {Path(ckpt_path).name}: {len(used)} tensors, max rel diff to golden {worst:.2g}, "
            f"{', '.join(storages) or 'none'}")
    if kept:
        shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        note += f"; golden values for {len(kept)} the checkpoint does not hold (see tracer weights): {shown}"
    return weights, note
