"""`--write-map`: the weight map the audit inferred, as TOML that `--name-map` reads back.

Names that differ only by the block number become one `{i}` entry, stacked tensors one
`stacked = true` entry; 2-D parameters get their orientation pinned (`transpose = true|false`),
so a later checkpoint that flips one is caught. What the format cannot say (a parameter split into
pieces other than c_attn's q/k/v thirds, a cut out of a fused tensor) is written as a comment.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from tracer.atomic import write_text_atomic
from tracer.weights.audit import AuditResult, Finding
from tracer.weights.golden import layer_of, layer_template
from tracer.weights.names import PARTS
from tracer.weights.views import Piece, source_tensors

def _spec(f: Finding, piece: Piece, n_pieces: int) -> dict | str:
    """The entry's table for one piece, or a comment when the format cannot express it."""
    v = piece.view
    spec: dict = {"param": f.param}
    if n_pieces > 1:
        if n_pieces != len(PARTS) or ".attn.c_attn." not in f.param or piece.axis != len(f.shape) - 1:
            return f"{f.param}: split into {n_pieces} pieces along axis {piece.axis}, not expressible"
        spec["part"] = PARTS[piece.start // (piece.stop - piece.start)]
    if v.axis is not None and v.start > 0:
        return f"{f.param}: {v.describe()} (cut out of a fused tensor), not expressible"
    if len(f.shape) == 2:
        spec["transpose"] = v.transpose
    if v.layer is not None:
        spec["stacked"] = True
    return spec


def _generalize(tensor: str, spec: dict) -> tuple[str, dict] | None:
    """(key, spec) with the block number replaced by {i}; None when the name does not carry it."""
    layer = layer_of(spec["param"])
    if layer is None:
        return None
    template = {**spec, "param": spec["param"].replace(f".h.{layer}.", ".h.{i}.")}
    if spec.get("stacked"):
        return tensor, template
    key = layer_template(tensor, layer)
    return (key, template) if key is not None else None


def infer_map(result: AuditResult) -> tuple[OrderedDict[str, dict], list[str]]:
    """Entries (name -> spec) and comments, in the golden's parameter order."""
    rows: list[tuple[str, dict]] = []
    comments: list[str] = []
    sources = {f.param: f.source for f in result.findings if f.found_by is not None}
    for f in result.findings:
        if f.found_by is None:
            comments.append(f"{f.param}: {f.status}, not in this map")
            continue
        tie = result.ties.get(f.param)
        if tie in sources and set(source_tensors(f.source)) <= set(source_tensors(sources[tie])):
            comments.append(f"{f.param}: tied to {tie} ({', '.join(source_tensors(f.source))})")
            continue
        for piece in f.source:
            spec = _spec(f, piece, len(f.source))
            if isinstance(spec, str):
                comments.append(spec)
            elif piece.view.layer is not None and piece.view.layer != layer_of(f.param):
                comments.append(f"{f.param}: layer {piece.view.layer} of stacked {piece.view.tensor}, not expressible")
            elif any(ch in piece.view.tensor for ch in "*{}"):
                comments.append(f"{f.param}: tensor name {piece.view.tensor!r} holds pattern characters")
            else:
                rows.append((piece.view.tensor, spec))
    general = {tensor: _generalize(tensor, spec) for tensor, spec in rows}
    templates: dict[str, set[str]] = {}
    for tensor, g in general.items():
        if g is not None:
            templates.setdefault(g[0], set()).add(json.dumps(g[1], sort_keys=True))
    entries: OrderedDict[str, dict] = OrderedDict()
    for tensor, spec in rows:  # golden order; one {i} entry where every block agrees
        g = general.get(tensor)
        if g is not None and len(templates[g[0]]) == 1:
            entries.setdefault(g[0], g[1])
        else:
            entries[tensor] = spec
    return entries, comments


def _toml_value(spec: dict) -> str:
    if set(spec) == {"param"}:
        return json.dumps(spec["param"])
    items = []
    for k, v in spec.items():
        items.append(f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {'true' if v else 'false'}")
    return "{ " + ", ".join(items) + " }"


def write_map(result: AuditResult, path: Path, force: bool = False) -> int:
    """Write the inferred map atomically; returns the number of entries."""
    entries, comments = infer_map(result)
    lines = [f"description = {json.dumps('weight map inferred by tracer weights from ' + Path(result.checkpoint).name)}",
             "", "[weights]"]
    lines += [f"{json.dumps(key)} = {_toml_value(spec)}" for key, spec in entries.items()]
    if comments:
        lines += [""] + [f"# {c}" for c in comments]
    write_text_atomic(path, "\n".join(lines) + "\n", force)
    return len(entries)
