"""`tracer import-log`: a port's debug-print lines, turned into a partial trace.

Hand-written ports often print the first values of a few tensors:

    [AFTER_LN1] Layer 0, Token 0: [0.1234, -0.5, ...]

A tag map names the stage of each tag. Every stage seen is stored at its full golden shape,
NaN where the log says nothing, with `partial=1` on the dataset and a boolean mask under
`/cases/<case>/present/<stage>`, so the comparator compares exactly the printed values.
Conventions (which values a line means for attention stages, print precision) are in
docs/FOREIGN.md.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracer.atomic import check_output_path
from tracer.errors import TracerError
from tracer.foreign import (
    PRINT_TAGS,
    Warn,
    default_warn,
    is_local_stage,
    load_toml,
    maps_dir,
    pick_case,
    resolve_map_path,
)
from tracer.provenance import trace_attrs
from tracer.stages import (
    EMBED_STAGES,
    FINAL_STAGES,
    SEED_LABELS,
    block_stage,
    layout_of,
    stage_order,
)
from tracer.store import CaseView, Golden, StageWriter

TAG_LINE = re.compile(r"\[(?P<tag>[^\]]+)\](?P<rest>.*)")
LOCATED = re.compile(r"\s*(batch|layer|token|head)\s*\d", re.IGNORECASE)  # what makes a line a tag line
FIELD = re.compile(r"(batch|layer|token|head)\s+(\d+)", re.IGNORECASE)
FIELDS = re.compile(r"\s*(?:(?:batch|layer|token|head)\s+\d+\s*,?\s*)+", re.IGNORECASE)
VALUES = re.compile(r"\[?(?P<values>[^\[\]]*)\]?")
DECIMAL = re.compile(r"[+-]?\d*(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[+-]?\d+))?")
ELLIPSIS = ("...", "\u2026")


def normalize_tag(tag: str) -> str:
    """`after o proj`, `AFTER_O_PROJ` and `After-O-Proj` are one tag."""
    return re.sub(r"[\s_\-]+", "_", tag.strip()).upper()


def load_tag_map(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Normalized tag -> local stage name ("" = ignore): known labels, shipped tags, then `path` over them."""
    tags = {normalize_tag(k): v for k, v in SEED_LABELS.items()}
    for p in [maps_dir() / PRINT_TAGS] + ([resolve_map_path(path)] if path is not None else []):
        data = load_toml(p)
        if set(data) - {"tags", "description"} or not isinstance(data.get("tags", {}), dict):
            raise TracerError(f"{p}: expected a [tags] table (TAG = \"stage\")")
        for tag, stage in data.get("tags", {}).items():
            if not isinstance(stage, str) or (stage and not is_local_stage(stage)):
                raise TracerError(f"{p}: tag {tag!r}: {stage!r} is not a stage name such as ln1, attn.q or logits")
            tags[normalize_tag(tag)] = stage
    return tags


@dataclass
class ImportSummary:
    case: str
    values: dict[str, int] = field(default_factory=dict)  # stage -> values imported, execution order
    tokens: list[int] = field(default_factory=list)  # token positions the log covers
    unknown_tags: dict[str, int] = field(default_factory=dict)  # tag -> lines
    missing: list[str] = field(default_factory=list)  # stages the log has but the golden lacks
    lines: int = 0  # tag lines imported


@dataclass
class _Line:
    tag: str
    fields: dict[str, int]
    values: np.ndarray
    resolution: float  # half a unit of the last printed digit: the print's own rounding


def _parse(rest: str, where: str) -> _Line:
    head, colon, tail = rest.partition(":")
    found = FIELD.findall(head) if FIELDS.fullmatch(head) else []
    fields = {key.lower(): int(value) for key, value in found}
    if not found or len(fields) != len(found):
        raise TracerError(f"{where}: cannot parse location {head.strip()!r} (expected e.g. 'Layer 0, Token 3')")
    if "token" not in fields:
        raise TracerError(f"{where}: the line gives no 'Token N'")
    m = VALUES.fullmatch(tail.strip())
    if not colon or not m:
        raise TracerError(f"{where}: cannot parse values {tail.strip()[:40]!r} (expected ': [v0, v1, ...]')")
    texts = [t for t in re.split(r"[,\s]+", m["values"].strip()) if t and t not in ELLIPSIS]
    try:
        values = np.array([float(t) for t in texts], dtype=np.float64)
    except ValueError:
        bad = next(t for t in texts if not _is_float(t))
        raise TracerError(f"{where}: cannot parse values: {bad!r} is not a number") from None
    if not values.size:
        raise TracerError(f"{where}: cannot parse values: the list is empty")
    return _Line("", fields, values, max(_resolution(t) for t in texts))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _resolution(text: str) -> float:
    m = DECIMAL.fullmatch(text)
    if not m:  # nan, inf
        return 0.0
    return 0.5 * 10.0 ** (int(m["exp"] or 0) - len(m["frac"] or ""))


class _Stage:
    """One stage being filled: NaN everywhere the log is silent, and the mask of what it gave."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.data = np.full(shape, np.nan, dtype=np.float64 if dtype == np.float64 else np.float32)
        self.present = np.zeros(shape, dtype=bool)
        self.resolution = 0.0

    def put(self, line: _Line, stage: str, where: str) -> None:
        b = line.fields.get("batch", 0)
        b = 0 if self.data.shape[0] == 1 else b  # embed.pos is stored once for the batch
        t, head = line.fields["token"], line.fields.get("head", 0)
        if layout_of(stage) == "BTC":  # [B,T,X]: the token's row
            if "head" in line.fields:
                raise TracerError(f"{where}: 'Head' is only meaningful for attention stages, not {stage}")
            index: tuple = (b, t, np.arange(line.values.size))
            room = self.data.shape[2]
        else:  # [B,H,T,X]: the token's [H,X] slice flattened, from head `head` on
            X = self.data.shape[3]
            flat = head * X + np.arange(line.values.size)
            index, room = (b, flat // X, t, flat % X), (self.data.shape[1] - head) * X
        if line.values.size > room:
            raise TracerError(f"{where}: {line.values.size} values, but {stage} holds {room} at that position")
        self.data[index] = line.values
        self.present[index] = True
        self.resolution = max(self.resolution, line.resolution)


def _stage_name(local: str, fields: dict[str, int], n_layer: int, where: str) -> str:
    if local in EMBED_STAGES or local in FINAL_STAGES:  # outside the blocks: "Layer" means nothing
        return local
    if "layer" not in fields:
        raise TracerError(f"{where}: {local} is a per-layer stage; the line needs 'Layer N'")
    if fields["layer"] >= n_layer:
        raise TracerError(f"{where}: layer {fields['layer']} out of range (the golden has {n_layer} layers)")
    return block_stage(fields["layer"], local)


def _check_range(fields: dict[str, int], limits: dict[str, int], where: str) -> None:
    for key, limit in limits.items():
        if key in fields and fields[key] >= limit:
            raise TracerError(f"{where}: {key} {fields[key]} out of range (the golden case has {limit})")


def read_log(log_path: Path, golden: Golden, view: CaseView, tags: dict[str, str]) -> tuple[dict[str, _Stage],
                                                                                             ImportSummary]:
    """Parse every tag line into full-shape stage buffers; no output is touched."""
    n_layer = golden.n_layer
    B, T = view.input_ids.shape
    limits = {"batch": B, "token": T, "head": int(golden.model_config.get("n_head", 1))}
    stages: dict[str, _Stage] = {}
    summary = ImportSummary(view.name)
    unknown: Counter[str] = Counter()
    tokens: set[int] = set()
    missing: set[str] = set()
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise TracerError(f"cannot read {log_path}: {exc.strerror}") from None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        m = TAG_LINE.match(raw.lstrip())
        if not m or not LOCATED.match(m["rest"]):
            continue  # ordinary log output, even when it starts with a bracket ("[INFO] ...")
        local = tags.get(normalize_tag(m["tag"]))
        if local is None:
            unknown[m["tag"].strip()] += 1
            continue
        if not local:
            continue
        where = f"{log_path}:{lineno}"
        line = _parse(m["rest"], where)
        stage = _stage_name(local, line.fields, n_layer, where)
        _check_range(line.fields, limits, where)
        if stage in missing or (stage not in stages and not view.has(stage)):
            missing.add(stage)
            continue
        if stage not in stages:
            ds = view.dataset(stage)
            stages[stage] = _Stage(ds.shape, ds.dtype)
        stages[stage].put(line, stage, where)
        tokens.add(line.fields["token"])
        summary.lines += 1
    order = stage_order(n_layer)
    summary.values = {s: int(stages[s].present.sum()) for s in sorted(stages, key=order.__getitem__)}
    summary.tokens = sorted(tokens)
    summary.unknown_tags = dict(unknown)
    summary.missing = sorted(missing, key=order.__getitem__)
    return stages, summary


def import_log(log_path: str | os.PathLike, golden: Golden, out: str | os.PathLike, *,
               tag_map: str | os.PathLike | None = None, case: str | None = None, force: bool = False,
               warn: Warn = default_warn) -> ImportSummary:
    """Convert a log of debug-print lines into a trace file holding the printed values (partial stages)."""
    log = Path(log_path)
    if not log.is_file():
        raise TracerError(f"no such log file: {log}")
    tags = load_tag_map(tag_map)
    view = golden.case(pick_case(golden, case))
    check_output_path(out, force)
    stages, summary = read_log(log, golden, view, tags)
    unknown = ", ".join(f"{t} ({n} line{'s' * (n > 1)})" for t, n in summary.unknown_tags.items())
    if not stages:
        if unknown:
            raise TracerError(f"no tag in {log} maps to a stage (found: {unknown}); pass --map with a [tags] table")
        raise TracerError(f"{log} has no debug-print lines such as '[AFTER_LN1] Layer 0, Token 0: [v0, v1, ...]'")
    if unknown:
        warn(f"{log}: unknown tags left out: {unknown}")
    if summary.missing:
        warn(f"the golden has no {', '.join(summary.missing)}: those log lines are left out")
    order = stage_order(golden.n_layer)
    dtype = golden.attrs.get("dtype", "fp32")
    with StageWriter(out, "trace", trace_attrs(golden, f"log:{log.name}", "chained", dtype), force=force) as writer:
        writer.begin_case(view.name, view.input_ids, view.attention_mask, view.prompts)
        for stage in summary.values:
            buf = stages[stage]
            writer.write_stage(view.name, stage, buf.data, order[stage], partial=1, print_atol=buf.resolution)
            writer.write_stage(view.name, stage, buf.present, order[stage], group="present")
    return summary


def import_log_command(log: Path, golden: Path, map: Path | None, case: str | None, out: Path, force: bool,
                       quiet: bool) -> None:
    """Body of `tracer import-log`: warnings on stderr, a one-line summary on stdout."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True)
    with Golden.open(golden) as g:
        summary = import_log(log, g, out, tag_map=map, case=case, force=force,
                             warn=lambda msg: err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False,
                                                        soft_wrap=True))
    if not quiet:
        total = sum(summary.values.values())
        tokens = ", ".join(str(t) for t in summary.tokens)
        Console().print(f"imported {total} values of {len(summary.values)} stage(s) at token(s) {tokens} "
                        f"from {summary.lines} line(s) of {log} (case {summary.case}) -> {out}", markup=False,
                        highlight=False, soft_wrap=True)
