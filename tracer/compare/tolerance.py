"""Tolerances: how much error a correct implementation shows at each stage.

Two checks per stage, both on the row error of `metrics.row_error`:

* introduced (local) — the candidate's stage vs the float64 reference evaluated on the very
  inputs the candidate tapped. A correct stage only adds its own rounding, whatever it
  inherited, so this is depth-independent. Its tolerance is `margin × local noise`, the
  noise measured on the spot: the same stage evaluated in float32 with inputs and weights
  jittered by one rounding unit of the candidate's precision, output rounded to its
  storage dtype (`noise_unit`), against float64.
* chained — the candidate's stage vs the golden. A correct port drifts, and in peaked
  attention the drift reaches several % in deep blocks. Under `auto` its tolerance is
  `margin × drift of the oracle`, the NumPy fp32 backend replaying the same golden with
  every stage rounded to the candidate's precision. Under a preset it is the preset's fixed
  number, raised to the oracle's drift (rounded to the preset's precision) where that is larger.

Per-stage overrides come from a TOML file; see `Tolerances.from_toml`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracer.errors import TracerError, read_parsed

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# Rounding unit of the arithmetic each precision stands for (tf32: fp32 storage, 10-bit mantissa matmuls).
UNIT_ROUNDOFF = {"fp64": 2.0 ** -53, "fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
STORAGE = {"fp64": np.float64, "fp32": np.float32, "tf32": np.float32, "fp16": np.float16, "bf16": None}
# Preset chained thresholds (row error vs golden) when no oracle can run: dtype-level numbers.
PRESET_CHAINED = {"fp64": 1e-9, "fp32": 2e-4, "tf32": 2e-2, "fp16": 5e-2, "bf16": 2e-1}
# Floors below which no check fails: a few units of the precision, for exactly-computable stages.
FLOOR_LOCAL = {k: 8 * v for k, v in UNIT_ROUNDOFF.items()}
DEFAULT_MARGIN_LOCAL = 32.0
DEFAULT_MARGIN_CHAINED = 32.0
PRESETS = tuple(UNIT_ROUNDOFF)


# Mantissa bits dropped from fp32 by the precisions that keep fp32's exponent range.
DROPPED_BITS = {"bf16": 16, "tf32": 13}


# Block formats of quantized matmuls (ggml): values per block along the reduction axis, largest integer.
# A stage declared in one is a product whose operands are quantized to it; its output stays float.
BLOCK_FORMATS = {"q8_0": (32, 127)}


def quantize_blocks(x: np.ndarray, fmt: str, axis: int = -1) -> np.ndarray:
    """`x` through ggml's block format `fmt` along `axis` and back, as float64 (quantize_row_q8_0):
    each block of 32 scaled so its largest magnitude is 127, rounded to integers (to even, as the
    SIMD path does), its scale stored as fp16. An axis not a multiple of the block stays as it is."""
    size, top = BLOCK_FORMATS[fmt]
    a = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    if a.shape[-1] % size:
        return np.moveaxis(a, -1, axis).astype(np.float64)
    b = a.reshape(*a.shape[:-1], a.shape[-1] // size, size)
    scale = np.abs(b).max(-1, keepdims=True) / np.float32(top)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(b * np.where(scale > 0, 1 / scale, 0))
    out = (q * scale.astype(np.float16).astype(np.float32)).reshape(a.shape)
    return np.moveaxis(out, -1, axis).astype(np.float64)


def round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """Round values to `precision` (bf16 and tf32: fp32 with the mantissa rounded to 7 / 10 bits,
    to nearest even; a block format along the last axis), returned as float64."""
    if precision in BLOCK_FORMATS:
        return quantize_blocks(x, precision)
    if precision in DROPPED_BITS:
        drop = DROPPED_BITS[precision]
        f = np.asarray(x, dtype=np.float32)
        bits = f.view(np.uint32).astype(np.uint64)
        half = (1 << (drop - 1)) - 1
        rounded = ((bits + half + ((bits >> drop) & 1)) >> drop) << drop
        out = rounded.astype(np.uint32).view(np.float32).astype(np.float64)
        return np.where(np.isfinite(f), out, f)
    with np.errstate(over="ignore"):  # beyond the narrow format's range is inf, as the port would see
        return np.asarray(x).astype(STORAGE[precision]).astype(np.float64)


def precision_of(dtype_name: str, array_dtype: np.dtype | None = None) -> str:
    """Map a file's dtype attribute (or an array dtype) to a precision name."""
    name = (dtype_name or "").lower().replace("float", "fp").replace("bfp16", "bf16")
    aliases = {"fp32": "fp32", "fp64": "fp64", "fp16": "fp16", "bf16": "bf16", "tf32": "tf32", "half": "fp16",
               "double": "fp64", "single": "fp32"}
    if name in aliases:
        return aliases[name]
    if array_dtype is not None:
        return {np.dtype(np.float64): "fp64", np.dtype(np.float16): "fp16"}.get(np.dtype(array_dtype), "fp32")
    return "fp32"


TOML_KEYS = ("preset", "margin_local", "margin_chained", "stages")


def _non_negative(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TracerError(f"{where} must be a number >= 0, not {value!r}")
    return float(value)


def _quoted(pattern: str) -> str:
    return '"' + pattern.replace('"', '\\"') + '"'


def _check_glob(pattern: str, where: str) -> None:
    """A stage glob: stage-name characters plus * ? and balanced [...] classes."""
    stripped = re.sub(r"\[!?[^\]]+\]", "", pattern)
    if not pattern or not re.fullmatch(r"[A-Za-z0-9_.*?]+", stripped):
        raise TracerError(f"{where}: {pattern!r} is not a stage glob (stage names with * ? [..], e.g. "
                          "blocks.*.attn.probs or blocks.1[01].*)")


@dataclass
class StageOverride:
    pattern: str
    chained: float | None = None
    local: float | None = None


@dataclass
class Tolerances:
    """The tolerance policy of one comparison. `mode` is 'auto' or a preset name."""

    mode: str = "auto"
    precision: str | None = None  # None: the candidate's own precision (auto)
    margin_local: float = DEFAULT_MARGIN_LOCAL
    margin_chained: float = DEFAULT_MARGIN_CHAINED
    overrides: list[StageOverride] = field(default_factory=list)
    source: str = "auto"

    @classmethod
    def parse(cls, spec: str | None) -> Tolerances:
        """`auto` (default), a preset name, or a TOML file."""
        if spec in (None, "", "auto"):
            return cls()
        if spec in PRESETS:
            return cls(mode=spec, precision=spec, source=spec)
        path = Path(spec)
        if path.suffix == ".toml" or path.exists():
            return cls.from_toml(path)
        raise TracerError(f"unknown tolerance {spec!r}: use auto, one of {', '.join(PRESETS)}, or a .toml file")

    @classmethod
    def from_toml(cls, path: Path) -> Tolerances:
        """TOML: optional `preset = "auto"|"fp32"|...`, `margin_local`, `margin_chained`, and
        `[stages."<glob>"]` tables with `chained` and/or `local` thresholds (row error).
        Unknown keys, negative or non-numeric values are refused with the list of what is valid."""
        data = read_parsed(path, tomllib.loads, lambda exc: f"{path}: invalid TOML: {exc}",
                           missing=f"tolerance file {path} does not exist")
        unknown = sorted(set(data) - set(TOML_KEYS))
        if unknown:
            raise TracerError(f"{path}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(TOML_KEYS)})")
        preset = data.get("preset", "auto")
        if preset not in ("auto", *PRESETS):
            raise TracerError(f"{path}: preset {preset!r} is not one of auto, {', '.join(PRESETS)}")
        base = cls.parse(preset)
        base.source = str(path)
        for key in ("margin_local", "margin_chained"):
            if key in data:
                setattr(base, key, _non_negative(data[key], f"{path}: {key}"))
        stages = data.get("stages", {})
        if not isinstance(stages, dict):
            raise TracerError(f'{path}: stages must be tables such as [stages."blocks.*.attn.probs"]')
        for pattern, entry in stages.items():
            where = f"{path}: [stages.{_quoted(pattern)}]"
            if not isinstance(entry, dict) or not entry or not set(entry) <= {"chained", "local"}:
                raise TracerError(f"{where} takes only 'chained' and 'local' numbers (row error, >= 0)")
            _check_glob(pattern, where)
            base.overrides.append(StageOverride(pattern, *(_non_negative(entry[k], f"{where} {k}") if k in entry
                                                           else None for k in ("chained", "local"))))
        return base

    def check_patterns(self, stages: list[str]) -> None:
        """Every per-stage override must match a stage of the model compared (a typo would silently do nothing)."""
        for o in self.overrides:
            if not any(fnmatch.fnmatchcase(s, o.pattern) for s in stages):
                raise TracerError(f"{self.source}: [stages.{_quoted(o.pattern)}] matches no stage of this model "
                                  f"(stages: {stages[0]}, ..., {stages[-1]}; globs like blocks.*.attn.probs)")

    def override_for(self, stage: str, key: str) -> float | None:
        """The `key` ('chained' or 'local') threshold for `stage`: the last matching table that sets it."""
        hit = None
        for o in self.overrides:
            value = getattr(o, key)
            if value is not None and fnmatch.fnmatchcase(stage, o.pattern):
                hit = float(value)
        return hit

    def local_tolerance(self, stage: str, noise: float, precision: str, inherited: float | None = None) -> float:
        """`margin_local` × the stage's own noise — or, when the check had to take some inputs from
        the golden, × the error a correct port inherits there (the oracle's, see `oracle`)."""
        override = self.override_for(stage, "local")
        if override is not None:
            return override
        return max(self.margin_local * max(noise, inherited or 0.0), FLOOR_LOCAL[precision])

    def chained_tolerance(self, stage: str, drift: float | None, precision: str, local_tol: float | None) -> float:
        override = self.override_for(stage, "chained")
        if override is not None:
            return override
        if self.mode == "auto" and drift is not None:
            tol = self.margin_chained * drift
        else:  # a preset never asks less than a correct port of its precision drifts on this model
            tol = max(PRESET_CHAINED[precision], self.margin_chained * drift if drift is not None else 0.0)
        return max(tol, local_tol or 0.0, FLOOR_LOCAL[precision])

    def describe(self) -> str:
        if self.mode == "auto":
            text = (f"auto: introduced error ≤ {self.margin_local:g}× local noise; "
                    f"chained error ≤ {self.margin_chained:g}× oracle drift")
        else:
            text = (f"preset {self.mode}: chained ≤ max({PRESET_CHAINED[self.mode]:g}, {self.margin_chained:g}× oracle "
                    f"drift in {self.mode}); introduced ≤ {self.margin_local:g}× {self.mode} noise")
        if self.overrides:
            text += f"; {len(self.overrides)} per-stage override(s) from {self.source}"
        return text
