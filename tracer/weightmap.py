"""Weight maps for `tracer export`: HF GPT-2 parameter names -> the names (and layout) a port loads.

A port rarely loads `transformer.h.0.attn.c_attn.weight` as HF stores it: the hub's GPT-2
checkpoint drops the `transformer.` prefix, nanoGPT-style ports use `nn.Linear` and expect the
Conv1D weights transposed to [out, in]. A weight map is a small TOML file saying so, so the
exported file is exactly what the port reads, and the manifest records every rename and
transpose (docs/PORTS.md).

    [weights]
    "transformer.wte.weight" = "tok_embeddings.weight"
    "transformer.h.{i}.attn.c_attn.weight" = { name = "layers.{i}.qkv.weight", transpose = true }
    "transformer.*" = "*"          # * carries the matched text over
    "lm_head.weight" = ""          # left out

Exact entries win over patterns; patterns are tried in file order; a weight no entry matches
keeps its HF name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tracer.errors import TracerError
from tracer.foreign import load_toml


def weight_maps_dir() -> Path:
    return Path(str(resources.files("tracer") / "data" / "weight_maps"))


@dataclass(frozen=True)
class Rename:
    name: str  # "" = leave the weight out; may hold {i} and * to fill from the match
    transpose: bool = False


@dataclass(frozen=True)
class Exported:
    """One weight as written: its name in the file, the HF name it came from, and whether it was transposed."""

    name: str
    source: str
    array: np.ndarray
    transposed: bool


@dataclass
class WeightMap:
    exact: dict[str, Rename] = field(default_factory=dict)
    patterns: list[tuple[re.Pattern[str], Rename]] = field(default_factory=list)
    label: str = "hf"

    def rename(self, hf_name: str) -> Rename:
        if hf_name in self.exact:
            return self.exact[hf_name]
        for regex, target in self.patterns:
            m = regex.fullmatch(hf_name)
            if m:
                name = target.name.replace("{i}", m.groupdict().get("i") or "")
                return Rename(name.replace("*", m.groupdict().get("star") or ""), target.transpose)
        return Rename(hf_name)

    def apply(self, weights: dict[str, np.ndarray]) -> list[Exported]:
        """The weights under their new names; two weights landing on one name is an error in the map."""
        out: dict[str, Exported] = {}
        for hf_name, array in weights.items():
            r = self.rename(hf_name)
            if not r.name:
                continue
            if r.name in out:
                raise TracerError(f"weight map {self.label}: {out[r.name].source} and {hf_name} both become {r.name!r}")
            if r.transpose and array.ndim != 2:
                raise TracerError(f"weight map {self.label}: {hf_name} has {array.ndim} axes; only 2-D weights transpose")
            data = np.ascontiguousarray(array.T) if r.transpose else array
            out[r.name] = Exported(r.name, hf_name, data, r.transpose)
        return list(out.values())


def _pattern(key: str) -> re.Pattern[str]:
    """{i}: block index (digits); *: any text (at most one, carried into the new name)."""
    out = []
    for part in re.split(r"(\{i\}|\*)", key):
        out.append(r"(?P<i>\d+)" if part == "{i}" else r"(?P<star>.*)" if part == "*" else re.escape(part))
    return re.compile("".join(out))


def _rename(where: str, value: Any) -> Rename:
    if isinstance(value, str):
        return Rename(value)
    if isinstance(value, dict) and isinstance(value.get("name"), str) and set(value) <= {"name", "transpose"} \
            and isinstance(value.get("transpose", False), bool):
        return Rename(value["name"], value.get("transpose", False))
    raise TracerError(f"{where}: expected a name or {{ name = \"...\", transpose = true }}")


def load_weight_map(arg: str | os.PathLike | None) -> WeightMap:
    """A TOML file, or the bare name of a shipped map (`hub`, `nanogpt`); None keeps HF names."""
    if arg is None:
        return WeightMap()
    p = Path(arg)
    shipped = weight_maps_dir() / f"{p.name}.toml"
    if not p.is_file():
        if p.suffix or p.parent != Path(".") or not shipped.is_file():
            names = ", ".join(sorted(f.stem for f in weight_maps_dir().glob("*.toml")))
            raise TracerError(f"weight map {p} does not exist (shipped maps: {names})")
        p = shipped
    data = load_toml(p)
    if set(data) - {"weights", "description"} or not isinstance(data.get("weights"), dict):
        raise TracerError(f"{p}: expected a [weights] table (\"hf name\" = \"new name\")")
    wmap = WeightMap(label=str(arg))
    for key, value in data["weights"].items():
        where = f"{p}: entry {key!r}"
        if key.count("*") > 1 or key.count("{i}") > 1:
            raise TracerError(f"{where}: at most one {{i}} and one * per name")
        target = _rename(where, value)
        for token in ("{i}", "*"):
            if token in target.name and token not in key:
                raise TracerError(f"{where}: the new name uses {token} but the HF name has none to take it from")
        if "{i}" in key or "*" in key:
            wmap.patterns.append((_pattern(key), target))
        else:
            wmap.exact[key] = target
    return wmap
