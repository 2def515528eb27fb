"""Foreign traces (SPEC §4): activation dumps of other runtimes, converted into native trace files.

A port written in C++, Rust, JAX or TransformerLens dumps its activations its own way: an `.npz`,
a `.safetensors` file or a directory of `<name>.npy`. Rather than teaching the comparator every
format, a dump is converted once into an ordinary trace (same writer, same checksums): names go
through a small TOML name map, layouts are rearranged into the canonical ones, and the inputs of
the golden case it lines up with are copied in. The map syntax is documented in docs/FOREIGN.md.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tracer.atomic import check_output_path
from tracer.dumpnotes import dump_notes
from tracer.errors import TracerError, read_parsed
from tracer.provenance import trace_attrs
from tracer.stages import (
    BLOCK_STAGES,
    EMBED_STAGES,
    FINAL_STAGES,
    canonical_stages,
    hf_aliases,
    hf_sources,
    layout_of,
    split_stage,
    stage_order,
)
from tracer.store import Golden, StageWriter, Trace

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

FOREIGN_SUFFIXES = (".npz", ".safetensors")
AXES = frozenset("BTSHDC")  # batch, token (query), key position, head, head dim, width (= H*D)
Warn = Callable[[str], None]


class ForeignWarning(UserWarning):
    """Imported data the tool could not fully use (unknown names, unconvertible layouts): worth a look."""


def default_warn(message: str) -> None:
    warnings.warn(message, ForeignWarning, stacklevel=3)


def is_foreign(path: str | os.PathLike) -> bool:
    """True for what `import_foreign` reads: .npz, .safetensors, or a directory holding .npy files."""
    p = Path(path)
    if p.is_dir():
        return any(p.glob("*.npy"))
    return p.suffix.lower() in FOREIGN_SUFFIXES


# -- TOML maps -------------------------------------------------------------------------------------
PRINT_TAGS = "print_tags.toml"  # tags of debug-print lines ([AFTER_LN1] Layer 0, Token 0: [...])
MAP_ALIASES = {"seed_tags": "print_tags"}  # former names of shipped maps


def maps_dir() -> Path:
    return Path(str(resources.files("tracer") / "data" / "maps"))


def resolve_map_path(arg: str | os.PathLike) -> Path:
    """A map file, or the bare name of a shipped one (`transformerlens`, `pycandle`, `print_tags`;
    `seed_tags`, its former name, still works)."""
    p = Path(arg)
    if p.is_file():
        return p
    shipped = maps_dir() / f"{MAP_ALIASES.get(p.name, p.name)}.toml"
    if p.suffix == "" and p.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(f.stem for f in maps_dir().glob("*.toml")))
    raise TracerError(f"map file {p} does not exist (shipped maps: {names})")


def load_toml(path: Path) -> dict[str, Any]:
    return read_parsed(path, tomllib.loads, lambda exc: f"{path} is not valid TOML: {exc}")


def is_local_stage(local: str) -> bool:
    """A canonical stage name without its block prefix: `ln1`, `attn.q`, `embed.sum`, `logits`..."""
    return local in BLOCK_STAGES or local in EMBED_STAGES or local in FINAL_STAGES


def _is_stage_template(stage: str) -> bool:
    """`blocks.{i}.attn.q`, `blocks.3.ln1` or `logits`: canonical once {i} is a block index."""
    try:
        i, local = split_stage(stage.replace("{i}", "0"))
    except ValueError:
        return False
    return local in BLOCK_STAGES if i is not None else local in EMBED_STAGES or local in FINAL_STAGES


# -- name maps -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one foreign name goes. `stage` "" = known, deliberately not imported."""

    stage: str
    layout: str | None = None  # axis letters of the foreign array, when it is not the canonical layout


@dataclass(frozen=True)
class Resolved:
    stage: str
    layout: str | None
    rank: int  # 0 explicit (map entry or canonical name), 1 HF source module, 2 HF pass-through module


@dataclass
class NameMap:
    """Foreign name -> canonical stage. Empty map: only canonical names are accepted."""

    exact: dict[str, Target] = field(default_factory=dict)
    patterns: list[tuple[re.Pattern[str], Target]] = field(default_factory=list)
    hf_prefixes: tuple[str, ...] = ()
    hf_suffixes: tuple[str, ...] = ("",)

    def resolve(self, name: str, n_layer: int) -> Resolved | None:
        """Exact entry, then canonical name, then patterns in file order, then the HF alias table."""
        if name in self.exact:
            t = self.exact[name]
            return Resolved(t.stage, t.layout, 0)
        if name in _canonical(n_layer):
            return Resolved(name, None, 0)
        for regex, t in self.patterns:
            m = regex.fullmatch(name)
            if m:
                stage = t.stage.replace("{i}", m.group("i")) if "{i}" in t.stage else t.stage
                return Resolved(stage, t.layout, 0)
        return self._resolve_hf(name, n_layer)

    def _resolve_hf(self, name: str, n_layer: int) -> Resolved | None:
        if not self.hf_prefixes:
            return None
        aliases, sources = _hf_tables(n_layer)
        for suffix in self.hf_suffixes:
            if not name.endswith(suffix):
                continue
            stem = name[: len(name) - len(suffix)] if suffix else name
            for prefix in self.hf_prefixes:
                if not stem.startswith(prefix):
                    continue
                core = stem[len(prefix):]
                for path in (core, f"transformer.{core}"):
                    if path in aliases:
                        return Resolved(aliases[path], None, 1 if path in sources else 2)
        return None


@lru_cache(maxsize=8)
def _canonical(n_layer: int) -> frozenset[str]:
    return frozenset(canonical_stages(n_layer))


@lru_cache(maxsize=8)
def _hf_tables(n_layer: int) -> tuple[dict[str, str], dict[str, str]]:
    return hf_aliases(n_layer), hf_sources(n_layer)


def _pattern(key: str) -> re.Pattern[str]:
    """`blocks.{i}.hook_q` -> regex: {i} is a block index (digits, same value each time), * any text."""
    out, seen_i = [], False
    for part in re.split(r"(\{i\}|\*)", key):
        if part == "{i}":
            out.append(r"(?P=i)" if seen_i else r"(?P<i>\d+)")
            seen_i = True
        elif part == "*":
            out.append(".*")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def _check_layout(layout: str, stage: str) -> str | None:
    """Why `layout` cannot be converted to the canonical layout of `stage` (None when it can)."""
    letters = layout.upper()
    if not letters or set(letters) - AXES or len(set(letters)) != len(letters):
        return f"layout {layout!r} must be distinct letters from B T S H D C"
    dst = _canonical_axes(stage.replace("{i}", "0"))
    src = letters.replace("C", "HD") if "C" in letters and "C" not in dst else letters
    dst = dst.replace("C", "HD") if "C" in dst and "C" not in src else dst
    if sorted(src.replace("B", "")) != sorted(dst.replace("B", "")):
        return f"layout {layout!r} does not hold the axes of {stage} ({layout_of(stage.replace('{i}', '0'))})"
    return None


def load_name_map(path: str | os.PathLike) -> NameMap:
    """Parse a name map file; every mistake in it is reported with the entry that has it."""
    p = resolve_map_path(path)
    data = load_toml(p)
    unknown = set(data) - {"names", "hf", "description", "weights"}  # [weights]: tracer.weights.names
    if unknown:
        raise TracerError(f"{p}: unknown table(s) {', '.join(sorted(unknown))} (expected [names] and [hf])")
    if not isinstance(data.get("names", {}), dict) or not isinstance(data.get("hf", {}), dict):
        raise TracerError(f"{p}: [names] and [hf] must be tables")
    nmap = NameMap()
    for key, value in data.get("names", {}).items():
        target = _target(p, key, value)
        if "{i}" in key or "*" in key:
            nmap.patterns.append((_pattern(key), target))
        else:
            nmap.exact[key] = target
    hf = data.get("hf")
    if hf is not None:
        prefixes, suffixes = hf.get("prefixes", [""]), hf.get("suffixes", [""])
        lists = [x for x in (prefixes, suffixes) if isinstance(x, list) and all(isinstance(y, str) for y in x)]
        if len(lists) != 2 or set(hf) - {"prefixes", "suffixes"}:
            raise TracerError(f"{p}: [hf] takes 'prefixes' and 'suffixes', each a list of strings")
        nmap.hf_prefixes, nmap.hf_suffixes = tuple(prefixes), tuple(suffixes)
    return nmap


def _target(p: Path, key: str, value: Any) -> Target:
    where = f"{p}: entry {key!r}"
    if isinstance(value, str):
        stage, layout = value, None
    elif isinstance(value, dict) and isinstance(value.get("stage"), str) and set(value) <= {"stage", "layout"}:
        stage, layout = value["stage"], value.get("layout")
        if layout is not None and not isinstance(layout, str):
            raise TracerError(f"{where}: layout must be a string such as \"BTHD\"")
    else:
        raise TracerError(f"{where}: expected a stage name or {{ stage = \"...\", layout = \"...\" }} "
                          f"(quote names that hold dots: \"blocks.{{i}}.hook_q\" = ...)")
    if stage and not _is_stage_template(stage):
        raise TracerError(f"{where}: {stage!r} is not a canonical stage name (e.g. blocks.{{i}}.attn.q, logits)")
    if "{i}" in stage and "{i}" not in key:
        raise TracerError(f"{where}: the stage uses {{i}} but the name has no {{i}} to take it from")
    if layout is not None:
        problem = _check_layout(layout, stage) if stage else None
        if problem:
            raise TracerError(f"{where}: {problem}")
        layout = layout.upper()
    return Target(stage, layout)


# -- layouts ---------------------------------------------------------------------------------------
def _canonical_axes(stage: str) -> str:
    """The canonical layout as distinct letters: the key axis of BHTT is S."""
    layout = layout_of(stage)
    return layout[:-1] + "S" if layout.endswith("TT") else layout


def convert_layout(array: np.ndarray, src: str, dst: str, n_head: int) -> np.ndarray:
    """Rearrange `array` (axes `src`) into `dst`: transpose, split C into H·D or merge H,D into C.

    A missing B is added back (size 1); a `src` naming B for an array without it means the batch
    axis was squeezed. Raises ValueError when the axes cannot be matched.
    """
    if "B" in src and array.ndim == len(src) - 1:
        src = src.replace("B", "")
    if array.ndim != len(src):
        raise ValueError(f"layout {src} has {len(src)} axes, the array {array.ndim}")
    if "B" not in src:
        array, src = array[None], "B" + src
    if "C" in src and "C" not in dst:
        k = src.index("C")
        if array.shape[k] % n_head:
            raise ValueError(f"width {array.shape[k]} does not split into {n_head} heads")
        array = array.reshape(array.shape[:k] + (n_head, array.shape[k] // n_head) + array.shape[k + 1:])
        src = src.replace("C", "HD")
    merge = "C" in dst and "C" not in src
    target = dst.replace("C", "HD") if merge else dst
    if sorted(src) != sorted(target):
        raise ValueError(f"axes {src} cannot be arranged as {dst}")
    array = array.transpose([src.index(a) for a in target])
    if merge:
        k = target.index("H")
        array = array.reshape(array.shape[:k] + (-1,) + array.shape[k + 2:])
    return np.ascontiguousarray(array)


def fit_shape(array: np.ndarray, golden_shape: tuple[int, ...] | None) -> np.ndarray:
    """Add back a squeezed batch axis of size 1; anything else stays as it is (the comparator judges)."""
    if golden_shape and golden_shape[0] == 1 and array.shape == tuple(golden_shape[1:]):
        return array[None]
    return array


# -- reading dumps ---------------------------------------------------------------------------------
def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Dump:
    """The arrays of one dump, read one at a time; any failure to parse is a one-line TracerError."""

    def __init__(self, path: Path):
        self.path = path
        self._close: Callable[[], None] = lambda: None
        suffix = path.suffix.lower()
        self.what = "directory of .npy files" if path.is_dir() else f"{suffix} file"
        try:
            if path.is_dir():
                files = {f.stem: f for f in sorted(path.glob("*.npy"))}
                self.names = list(files)
                self._get = lambda n: np.load(files[n], allow_pickle=False)
            elif suffix == ".npz":
                npz = np.load(path, allow_pickle=False)
                if not isinstance(npz, np.lib.npyio.NpzFile):
                    raise ValueError("it holds a single array, not a zip archive of arrays")
                self.names, self._get, self._close = list(npz.files), npz.__getitem__, npz.close
            else:
                from safetensors import safe_open

                handle = safe_open(str(path), framework="numpy").__enter__()
                self.names, self._get = list(handle.keys()), handle.get_tensor
                self._close = lambda: handle.__exit__(None, None, None)
        except Exception as exc:  # any parse failure of a third-party format is bad input
            raise TracerError(f"{path.name} is not a valid {self.what} ({_reason(exc)})") from None

    def read(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self._get(name))
        except Exception as exc:  # a corrupt member, or a dtype NumPy cannot hold (bf16 in safetensors)
            reason = _reason(exc)
            hint = "; NumPy has no bfloat16: save such tensors as float32" if "bfloat16" in reason else ""
            raise TracerError(f"{self.path.name}: cannot read array {name!r} ({reason}){hint}") from None

    def close(self) -> None:
        self._close()


@contextmanager
def _open_dump(path: Path) -> Iterator[_Dump]:
    if not path.exists():
        raise TracerError(f"no such file or directory: {path}")
    if not is_foreign(path):
        raise TracerError(f"{path} is not a foreign dump (.npz, .safetensors, or a directory of .npy files)")
    dump = _Dump(path)
    try:
        yield dump
    finally:
        dump.close()


# -- shared with import-log ------------------------------------------------------------------------
def pick_case(golden: Golden, case: str | None) -> str:
    """The golden case a one-case dump or log lines up with."""
    names = golden.case_names()
    if case is not None:
        return golden.case(case).name  # unknown case: TracerError listing the cases
    if len(names) != 1:
        raise TracerError(f"{golden.path} has {len(names)} cases ({', '.join(names)}); "
                          f"name the one the data belongs to with --case")
    return names[0]


_DTYPE_NAMES = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}


def dtype_name(dtypes: list[np.dtype]) -> str:
    """The least precise float dtype among the stages, in the names tolerance presets use."""
    floats = [d for d in dtypes if d.kind == "f"]
    if not floats:
        return str(dtypes[0]) if dtypes else ""
    worst = max(floats, key=lambda d: np.finfo(d).eps)
    return _DTYPE_NAMES.get(worst, str(worst))


def _storable(array: np.ndarray) -> bool:
    try:
        h5py.h5t.py_create(array.dtype, logical=True)
    except TypeError:
        return False
    return True


# -- import ----------------------------------------------------------------------------------------
@dataclass
class ForeignSummary:
    case: str
    stages: dict[str, str]  # canonical stage -> foreign name it came from
    unknown: list[str]  # foreign names that map to no canonical stage
    skipped: list[str]  # names the map marks as known but not canonical ("")


def _plan(names: list[str], nmap: NameMap, n_layer: int, case: str,
          warn: Warn) -> tuple[ForeignSummary, dict[str, str | None]]:
    """Which foreign array becomes which stage (and its layout); duplicates go by rank, then dump order."""
    canonical = _canonical(n_layer)
    chosen: dict[str, tuple[str, Resolved]] = {}
    unknown, skipped, clashes = [], [], []
    for name in names:
        r = nmap.resolve(name, n_layer)
        if r is None or (r.stage and r.stage not in canonical):
            unknown.append(name)
        elif not r.stage:
            skipped.append(name)
        elif r.stage not in chosen or r.rank < chosen[r.stage][1].rank:
            chosen[r.stage] = (name, r)
        elif r.rank == 0 and chosen[r.stage][1].rank == 0:
            clashes.append(f"{name} (kept {chosen[r.stage][0]} for {r.stage})")
    if clashes:
        warn(f"several names map to the same stage, later ones ignored: {', '.join(clashes)}")
    summary = ForeignSummary(case, {stage: n for stage, (n, _) in chosen.items()}, unknown, skipped)
    return summary, {stage: r.layout for stage, (_, r) in chosen.items()}


def import_foreign(path: str | os.PathLike, golden: Golden, out: str | os.PathLike, *, case: str | None = None,
                   name_map: str | os.PathLike | None = None, force: bool = False,
                   warn: Warn = default_warn) -> ForeignSummary:
    """Convert a foreign dump into a native trace file `out` lined up with one case of `golden`."""
    src = Path(path)
    case_name = pick_case(golden, case)
    view = golden.case(case_name)
    nmap = load_name_map(name_map) if name_map is not None else NameMap()
    nmap, declared_dtype = dump_notes(src, nmap)  # tracer_dump.h / .rs manifest: layouts, bf16 source dtype
    check_output_path(out, force)  # fail before reading a possibly large dump
    n_layer, n_head = golden.n_layer, int(golden.model_config.get("n_head", 1))
    with _open_dump(src) as dump:
        plan, layouts = _plan(dump.names, nmap, n_layer, case_name, warn)
        if not plan.stages:
            found = ", ".join(dump.names[:5]) + (", ..." if len(dump.names) > 5 else "") or "no arrays"
            hint = "check the name map" if name_map is not None else "pass --name-map (e.g. transformerlens, pycandle)"
            raise TracerError(f"{src.name} has no array named after a canonical stage (found: {found}); {hint}")
        if plan.unknown:
            warn(f"{src.name}: {len(plan.unknown)} array(s) map to no canonical stage and were left out: "
                 f"{', '.join(plan.unknown[:8])}{', ...' if len(plan.unknown) > 8 else ''}")
        order = stage_order(n_layer)
        dtypes: list[np.dtype] = []
        with StageWriter(out, "trace", trace_attrs(golden, f"foreign:{src.name}", "chained", ""), force=force) as writer:
            writer.begin_case(case_name, view.input_ids, view.attention_mask, view.prompts)
            for stage in sorted(plan.stages, key=order.__getitem__):
                foreign = plan.stages[stage]
                array = _canonical_array(dump.read(foreign), stage, layouts[stage],
                                         view.dataset(stage).shape if view.has(stage) else None, n_head, warn)
                if not _storable(array):
                    warn(f"{foreign}: dtype {array.dtype} cannot be stored in a trace; {stage} left out")
                    continue
                dtypes.append(array.dtype)
                writer.write_stage(case_name, stage, array, order[stage], foreign_name=foreign)
            writer.set_attr("dtype", declared_dtype or dtype_name(dtypes))
            if plan.unknown:  # reports list them: a misnamed array must not pass unnoticed
                writer.set_attr("foreign_unmatched", ", ".join(plan.unknown))
    return plan


def _canonical_array(array: np.ndarray, stage: str, layout: str | None, golden_shape: tuple[int, ...] | None,
                     n_head: int, warn: Warn) -> np.ndarray:
    if layout is not None:
        try:
            return convert_layout(array, layout, _canonical_axes(stage), n_head)
        except ValueError as exc:
            warn(f"{stage}: {exc}; stored as given {list(array.shape)}")
            return array
    return fit_shape(array, golden_shape)


def open_trace_any(path: str | os.PathLike, golden: Golden, case: str | None = None,
                   name_map: str | os.PathLike | None = None,
                   warn: Warn = default_warn) -> tuple[Trace, Callable[[], None]]:
    """Open a native trace, or convert a foreign dump into a temporary one and open that.

    Call the returned cleanup when done: it closes the trace and deletes any temporary file.
    """
    p = Path(path)
    if not is_foreign(p):
        trace = Trace.open(p)
        return trace, trace.close
    tmp = Path(tempfile.mkdtemp(prefix="tracer-foreign-"))
    try:
        out = tmp / f"{p.stem or 'foreign'}.h5"
        import_foreign(p, golden, out, case=case, name_map=name_map, warn=warn)
        trace = Trace.open(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    def cleanup() -> None:
        trace.close()
        shutil.rmtree(tmp, ignore_errors=True)

    return trace, cleanup
