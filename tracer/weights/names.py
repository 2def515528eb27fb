"""Weight maps: which checkpoint tensor holds which HF parameter, in the port's own naming.

A weight map is the `[weights]` table of a TOML map file (the same files foreign traces use for
stage names, see docs/WEIGHTS.md): foreign tensor name (with `{i}` for the block index and `*`
for any text) -> HF parameter name, or a table saying more: `transpose = true` (the tensor holds
the parameter transposed, as nn.Linear [out, in] ports do), `part = "q"|"k"|"v"` (a third of
the fused c_attn along its output axis), `stacked = true` (the tensor's first axis is the block
index, as in llm.c). Without `--name-map`, HF names are recognised as they are, and a shipped map
is used when it names at least half of the checkpoint's tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tracer.errors import TracerError
from tracer.foreign import _pattern, load_toml, maps_dir, resolve_map_path
from tracer.weights.fingerprint import squeezed
from tracer.weights.golden import BLOCK_ORDER, FINAL_ORDER, TOP_ORDER
from tracer.weights.views import Piece, Source, View

PARTS = ("q", "k", "v")
HF_PREFIXES = ("", "model.")
_BLOCK = re.compile(r"transformer\.h\.(\{i\}|\d+)\.(.+)")


def is_param_name(name: str) -> bool:
    """An HF GPT-2 parameter name, or a template of one with {i} for the block index."""
    m = _BLOCK.fullmatch(name)
    return name in TOP_ORDER or name in FINAL_ORDER or bool(m and m.group(2) in BLOCK_ORDER)


@dataclass(frozen=True)
class Expect:
    """What a name map says one tensor holds."""

    tensor: str
    param: str
    transpose: bool | None = None   # None: the map does not say
    part: int | None = None         # index of the c_attn third (q 0, k 1, v 2)
    layer: int | None = None        # index along a stacked tensor's first axis


@dataclass(frozen=True)
class Rule:
    param: str
    transpose: bool | None = None
    part: int | None = None
    stacked: bool = False


class Scheme(Protocol):
    label: str

    def resolve(self, tensor: str, n_layer: int) -> list[Expect]: ...


@dataclass
class WeightMap:
    """The `[weights]` table of one map file."""

    label: str
    exact: dict[str, Rule] = field(default_factory=dict)
    patterns: list[tuple[str, re.Pattern[str], Rule]] = field(default_factory=list)  # key, regex, rule

    def resolve(self, tensor: str, n_layer: int) -> list[Expect]:
        rule, index = self.exact.get(tensor), None
        if rule is None:
            for _, regex, r in self.patterns:
                m = regex.fullmatch(tensor)
                if m:
                    rule, index = r, (m.group("i") if "i" in regex.groupindex else None)
                    break
        if rule is None:
            return []
        if rule.stacked:
            return [Expect(tensor, rule.param.replace("{i}", str(i)), rule.transpose, rule.part, i)
                    for i in range(n_layer)]
        if index is not None and int(index) >= n_layer:
            return []
        param = rule.param.replace("{i}", str(int(index))) if index is not None else rule.param
        return [Expect(tensor, param, rule.transpose, rule.part)]


def names_for(scheme: Scheme | None, param: str, n_layer: int) -> list[str]:
    """The tensor names a weight map gives `param` (names with `*` cannot be spelled out)."""
    if not isinstance(scheme, WeightMap):
        return []
    from tracer.weights.golden import layer_of

    layer = layer_of(param)
    out = []
    for key, rule in [*scheme.exact.items(), *((k, r) for k, _, r in scheme.patterns)]:
        spelled = key.replace("{i}", str(layer)) if layer is not None else key
        if "*" not in key and rule.param.replace("{i}", str(layer)) == param and ("{i}" in key) != rule.stacked:
            out.append(spelled)
        elif "*" not in key and "{i}" not in key and rule.param == param:
            out.append(key)
    return list(dict.fromkeys(out))


@dataclass
class HFNames:
    """Tensors named as HF names them (with or without `transformer.` / `model.` in front)."""

    params: frozenset[str]
    label: str = "HF GPT-2 names"

    def resolve(self, tensor: str, n_layer: int) -> list[Expect]:
        for prefix in HF_PREFIXES:
            if tensor.startswith(prefix):
                core = tensor[len(prefix):]
                for name in (core, f"transformer.{core}"):
                    if name in self.params:
                        return [Expect(tensor, name)]
        return []


def load_weight_map(path: str | os.PathLike) -> WeightMap:
    """The `[weights]` table of a map file (or shipped map name); every entry is checked."""
    p = resolve_map_path(path)
    table = load_toml(p).get("weights")
    if not isinstance(table, dict):
        raise TracerError(f"{p} has no weights table (the weight map; see docs/WEIGHTS.md)")
    wmap = WeightMap(p.stem if p.parent == maps_dir() else str(p))
    for key, value in table.items():
        rule = _rule(p, key, value)
        if "{i}" in key or "*" in key:
            wmap.patterns.append((key, _pattern(key), rule))
        else:
            wmap.exact[key] = rule
    return wmap


def _rule(p: Path, key: str, value: Any) -> Rule:
    where = f"{p}: [weights] entry {key!r}"
    if isinstance(value, str):
        value = {"param": value}
    if not isinstance(value, dict) or not isinstance(value.get("param"), str) or \
            set(value) - {"param", "transpose", "part", "stacked"}:
        raise TracerError(f"{where}: expected an HF parameter name or {{ param = \"...\", transpose = true, "
                          f"part = \"q\", stacked = true }}")
    param = value["param"]
    if not is_param_name(param):
        raise TracerError(f"{where}: {param!r} is not a GPT-2 parameter name (e.g. transformer.h.{{i}}.attn.c_attn.weight)")
    stacked = value.get("stacked", False)
    transpose = value.get("transpose")
    part = value.get("part")
    if not isinstance(stacked, bool) or not isinstance(transpose, (bool, type(None))):
        raise TracerError(f"{where}: transpose and stacked take true or false")
    if part is not None and (part not in PARTS or ".attn.c_attn." not in param):
        raise TracerError(f"{where}: part takes \"q\", \"k\" or \"v\", and only for attn.c_attn parameters")
    if "{i}" in param and "{i}" not in key and not stacked:
        raise TracerError(f"{where}: the parameter uses {{i}} but the name has none (or say stacked = true)")
    if stacked and ("{i}" not in param or "{i}" in key):
        raise TracerError(f"{where}: stacked = true needs {{i}} in the parameter and none in the name")
    return Rule(param, transpose, PARTS.index(part) if part else None, stacked)


def shipped_weight_maps() -> list[WeightMap]:
    return [load_weight_map(f) for f in sorted(maps_dir().glob("*.toml")) if "weights" in load_toml(f)]


def choose_scheme(tensors: list[str], params: frozenset[str], n_layer: int,
                  explicit: WeightMap | None) -> Scheme | None:
    """The given map, or the naming (HF names, a shipped map) that names most tensors, when it
    names at least half of them; None: everything is found by content."""
    if explicit is not None:
        return explicit
    best, best_score = None, 0
    for scheme in [HFNames(params), *shipped_weight_maps()]:
        score = sum(1 for t in tensors if any(e.param in params for e in scheme.resolve(t, n_layer)))
        if score > best_score:
            best, best_score = scheme, score
    return best if best_score and 2 * best_score >= len(tensors) else None


def expectations(scheme: Scheme | None, tensors: list[str], params: frozenset[str],
                 n_layer: int) -> dict[str, list[Expect]]:
    """Golden parameter -> what the naming says holds it."""
    out: dict[str, list[Expect]] = {}
    if scheme is None:
        return out
    for t in tensors:
        for e in scheme.resolve(t, n_layer):
            if e.param in params:
                out.setdefault(e.param, []).append(e)
    return out


def named_source(expects: list[Expect], shape: tuple[int, ...],
                 shapes: dict[str, tuple[int, ...]]) -> tuple[Source | None, str | None]:
    """The source the names describe, in the golden's `shape`; or None and why it cannot be."""
    parts = sorted((e for e in expects if e.part is not None), key=lambda e: e.part)
    if parts:
        axis = len(shape) - 1
        size = shape[axis] // len(PARTS)
        pieces = []
        for e in parts:
            piece_shape = list(shape)
            piece_shape[axis] = size
            view, why = _view(e, tuple(piece_shape), shapes[e.tensor])
            if view is None:
                return None, why
            pieces.append(Piece(view, axis, e.part * size, (e.part + 1) * size))
        if len(pieces) != len(PARTS) or len({p.start for p in pieces}) != len(PARTS):
            named = ", ".join(f"{PARTS[e.part]}: {e.tensor}" for e in parts)
            return None, f"the map names {named}, not one tensor for each of q, k and v"
        return tuple(pieces), None
    view, why = _view(expects[0], shape, shapes[expects[0].tensor])
    return ((Piece(view),), None) if view is not None else (None, why)


def _view(e: Expect, shape: tuple[int, ...], cand_shape: tuple[int, ...]) -> tuple[View | None, str | None]:
    """View of `e.tensor` in `shape`: as the map orients it, else the other way round (the audit then
    reports the orientation), cut at 0 along one axis when the tensor is longer there (padding)."""
    full = squeezed(cand_shape)
    unit = full[1:] if e.layer is not None else full
    if e.layer is not None and (len(full) < 2 or full[0] <= e.layer):
        return None, f"{e.tensor} {list(cand_shape)} has no layer {e.layer} along its first axis"
    target = squeezed(shape) if len(shape) > 2 else shape
    orientations = [bool(e.transpose), not e.transpose]
    for transpose in orientations:
        if transpose and len(unit) != 2:
            continue
        oriented = unit[::-1] if transpose else unit
        if len(oriented) != len(target):
            continue
        longer = [a for a in range(len(target)) if oriented[a] > target[a]]
        if oriented == target:
            return View(e.tensor, full, e.layer, transpose), None
        if len(longer) == 1 and all(oriented[a] == target[a] for a in range(len(target)) if a != longer[0]):
            return View(e.tensor, full, e.layer, transpose, longer[0], 0, target[longer[0]]), None
    return None, f"{e.tensor} has shape {list(cand_shape)}, which cannot hold a {list(shape)} parameter"
