"""HDF5 golden / trace files (SPEC §4, format_version 1).

One writer and one reader serve both kinds of file. The writer streams: each stage is
written (and hashed) the moment it is handed over, so memory stays bounded by the stage
being written. Files are built under a temporary name and renamed only when complete, so
an interrupted run never leaves a file that looks valid. Every dataset carries an xxh3-64
content hash that full reads verify, so a flipped bit names its stage.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import xxhash

from tracer.atomic import OutputFile
from tracer.errors import TracerError, io_error
from tracer.interrupts import Deferred
from tracer.stages import canonical_stages, layout_of, split_stage

FORMAT = "gpt2-tracer"
FORMAT_VERSION = 1
JSON_ATTRS = ("model_config", "versions")
ROOM_MARGIN = 1 << 20  # free space a writer keeps: HDF5 must be able to flush its metadata and close
METADATA_PER_DATASET = 4 << 10  # measured ~0.8 KiB (object header, attributes, links)


def content_hash(array: np.ndarray) -> str:
    """xxh3-64 of the array's C-order bytes (hex): cheap enough to hash every stage."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).view(np.uint8).data)


def weights_digest(hashes: dict[str, str]) -> str:
    """One hash of all weights from their per-tensor content hashes (names included, order-free)."""
    h = xxhash.xxh3_128()
    for name in sorted(hashes):
        h.update(f"{name}={hashes[name]};".encode())
    return h.hexdigest()


# -- storage dtypes ---------------------------------------------------------------------------
# Rounding a value to a storage dtype moves it by at most UNIT_ROUNDOFF x |value|, or by
# SUBNORMAL_FLOOR where the result is subnormal (round to nearest even).
UNIT_ROUNDOFF = {"fp64": 2.0**-53, "fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
SUBNORMAL_FLOOR = {"fp64": 2.0**-1075, "fp32": 2.0**-150, "fp16": 2.0**-25, "bf16": 2.0**-134}
STORAGE_DTYPES = ("fp32", "fp16", "bf16")
# (computed dtype, storage dtype) pairs that store every value exactly.
EXACT_STORAGE = {("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"),
                 ("fp64", "fp64")}


def natural_storage(dtype: str) -> str:
    """What stages of a model computed in `dtype` are stored as by default (bf16 widens exactly to fp32)."""
    return "fp32" if dtype == "bf16" else dtype


def storage_rounding(dtype: str, storage: str) -> tuple[float, float]:
    """(relative, absolute) bound on what storing `dtype` values as `storage` changes them by."""
    if (dtype, storage) in EXACT_STORAGE:
        return 0.0, 0.0
    return UNIT_ROUNDOFF[storage], SUBNORMAL_FLOOR[storage]


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept NaN (numpy has no bf16)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    out = bits >> 16
    out &= 1
    out += 0x7FFF
    out += bits
    out >>= 16
    out = out.astype(np.uint16)
    out[np.isnan(values)] = 0x7FC0
    return out


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def narrow(values: np.ndarray, storage: str, what: str) -> np.ndarray:
    """Round float values to the storage dtype; a finite value that would become Inf is refused."""
    if storage == "bf16":
        stored = to_bf16_bits(values)
        overflow = np.isinf(from_bf16_bits(stored))
    else:
        with np.errstate(over="ignore"):  # overflow is checked right below, by stage name
            stored = values.astype({"fp16": np.float16, "fp32": np.float32}[storage], copy=False)
        overflow = np.isinf(stored) if stored.dtype != values.dtype else None
    if overflow is not None and overflow.any() and np.isfinite(values[overflow]).any():
        biggest = float(np.abs(values[np.isfinite(values)]).max())
        raise TracerError(f"{what} has values beyond the {storage} range (|x| up to {biggest:.4g}): "
                          f"store it as {'bf16 or ' if storage == 'fp16' else ''}fp32")
    return stored


def widen(ds: h5py.Dataset, data: np.ndarray) -> np.ndarray:
    """Stage values as float32 again when they were stored narrower than computed."""
    stored = ds.attrs.get("storage_dtype")
    if stored == "bf16":
        return from_bf16_bits(data)
    if stored == "fp16":
        return data.astype(np.float32)
    return data


CHUNK_BYTES = 1 << 20
COMPRESS_MIN_BYTES = 64 << 10  # smaller datasets stay contiguous: a chunk index would outweigh the saving


def chunk_shape(shape: tuple[int, ...], itemsize: int, layout: str | None) -> tuple[int, ...]:
    """About 1 MiB of whole rows along the token axis (axis 0 without a layout); heads stay whole.

    One token's slice of any stage then lies in one chunk (`read_token` decompresses one chunk),
    and whole-stage reads stream through chunks that fit HDF5's default 1 MiB chunk cache.
    """
    split = layout.index("T") if layout and "T" in layout else 0
    chunk = [1] + list(shape[1:split]) + list(shape[split:]) if split else list(shape)
    row = itemsize * int(np.prod([n for k, n in enumerate(chunk) if k != split]))
    chunk[split] = min(shape[split], max(1, CHUNK_BYTES // max(row, 1)))
    return tuple(max(1, n) for n in chunk)


WRITE_BLOCK = 256 << 10  # fits L2: hashed from cache after its write


def _allocated_contiguous() -> h5py.h5p.PropDCID:
    """Contiguous storage allocated at creation and never filled by HDF5: the writer puts the bytes
    there itself (`StageWriter._write_hashed`), so HDF5 never touches that raw data."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


# HDF5's own calls for what every dataset gets (creation, its str / int attributes): about a third
# of h5py's per-object cost, which adds up over hundreds of weights and stages. The objects are
# exactly what h5py's high-level calls make (UTF-8 names, variable-length UTF-8 str, int64).
_ALLOCATED = _allocated_contiguous()
_LINKS = h5py.h5p.create(h5py.h5p.LINK_CREATE)
_LINKS.set_char_encoding(h5py.h5t.CSET_UTF8)
_STR = h5py.h5t.py_create(h5py.string_dtype(), logical=True)
_SCALAR = h5py.h5s.create(h5py.h5s.SCALAR)


def _new_contiguous(parent: h5py.Group, name: str, array: np.ndarray) -> h5py.Dataset:
    space = h5py.h5s.create_simple(array.shape)
    dsid = h5py.h5d.create(parent.id, name.encode(), h5py.h5t.py_create(array.dtype), space, dcpl=_ALLOCATED,
                           lcpl=_LINKS)
    return h5py.Dataset(dsid)


def _set_attrs(ds: h5py.Dataset, attrs: dict[str, Any]) -> None:
    """Attributes of a new dataset: str and int through HDF5 directly, anything else through h5py."""
    for name, value in attrs.items():
        if isinstance(value, str):
            tid, data = _STR, np.array(value, dtype=h5py.string_dtype())
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            tid, data = h5py.h5t.NATIVE_INT64, np.array(value, dtype=np.int64)
        else:
            ds.attrs[name] = value
            continue
        h5py.h5a.create(ds.id, name.encode(), tid, _SCALAR).write(data)


# Every query reads every key: k and v stay whole under a token subset, so the attention of the kept
# query rows can still be re-evaluated from the golden alone.
WHOLE_UNDER_SUBSET = frozenset({"attn.k", "attn.v"})


def token_positions(spec: str, T: int) -> np.ndarray:
    """Positions of a `--tokens` spec in a sequence of T tokens: comma-separated indices and slices,
    negative from the end (`0,5,-1`, `0:8`, `-16:`); slices clip to T, an index outside it is an error."""
    picked: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        try:
            if ":" in part:
                bounds = [int(x) if x.strip() else None for x in part.split(":")]
                if len(bounds) > 3:
                    raise ValueError
                picked.update(range(T)[slice(*bounds)])
            else:
                index = int(part)
                if not -T <= index < T:
                    raise TracerError(f"--tokens {spec!r}: token {index} is outside a case of {T} tokens")
                picked.add(index % T)
        except ValueError:
            raise TracerError(f"--tokens {spec!r}: {part!r} is not an index or a start:stop slice") from None
    if not picked:
        raise TracerError(f"--tokens {spec!r} keeps no token of a case of {T} tokens")
    return np.array(sorted(picked), dtype=np.int64)


@dataclass(frozen=True)
class DatasetOptions:
    """How datasets go to disk: `compression` none | lzf | gzip[:LEVEL] (lossless, byte shuffle
    first), `storage_dtype` of stages (None: as computed; fp32 | fp16 | bf16), and `tokens`, a subset
    of positions kept along the T axis of every stage but k and v (None: all)."""

    compression: str = "none"
    storage_dtype: str | None = None
    tokens: str | None = None

    @classmethod
    def parse(cls, compression: str = "none", storage_dtype: str | None = None,
              tokens: str | None = None) -> DatasetOptions:
        name, _, level = compression.partition(":")
        valid = name in ("none", "lzf", "gzip") and (not level or (name == "gzip" and level in "123456789"
                                                                      and len(level) == 1))
        if not valid:
            raise TracerError(f"unknown compression {compression!r} (none, lzf, gzip or gzip:1 ... gzip:9)")
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
            raise TracerError(f"unknown storage dtype {storage_dtype!r} (choose from {', '.join(STORAGE_DTYPES)})")
        if tokens is not None:
            token_positions(tokens, 1 << 30)  # the syntax, before any work
        return cls(compression, storage_dtype, tokens)

    def create_kwargs(self, array: np.ndarray, layout: str | None) -> dict[str, Any]:
        """h5py `create_dataset` keywords for `array`: contiguous, or chunked with a lossless filter."""
        if self.compression == "none" or array.ndim == 0 or array.nbytes < COMPRESS_MIN_BYTES:
            return {}
        name, _, level = self.compression.partition(":")
        opts = {"compression": name, "shuffle": True, "chunks": chunk_shape(array.shape, array.itemsize, layout)}
        if name == "gzip":
            opts["compression_opts"] = int(level or 4)
        return opts


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StageWriter:
    """Writes a golden or trace file by the output rule of `tracer.atomic`. Use as a context manager.

    Entering reserves the path (a second writer of it fails there) and opens a temporary file;
    a clean exit renames it onto `path`. On any exception (a full disk, Ctrl-C, SIGTERM) it is
    deleted and `path` is untouched. Signals are deferred to the next write (see
    `tracer.interrupts`), so they cannot be lost inside h5py.
    `options` (set before writing) chooses compression and the stages' storage dtype.
    """

    options: DatasetOptions = DatasetOptions()

    def __init__(self, path: str | os.PathLike, kind: str, attrs: dict[str, Any], force: bool = False):
        if kind not in ("golden", "trace"):
            raise ValueError(f"kind must be golden or trace, not {kind!r}")
        self._output = OutputFile(path, force)
        self.path = self._output.path
        self.tmp = self._output.tmp
        self.kind = kind
        self._attrs = dict(attrs)
        self._h5: h5py.File | None = None
        self._signals = Deferred()
        self._datasets = 0
        self._weight_hashes: dict[str, str] = {}
        self._input_hashes: dict[str, str] = {}
        self._orders: dict[str, dict[str, int]] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> StageWriter:
        self._output.__enter__()
        self._signals.__enter__()
        try:
            self._h5 = h5py.File(self.tmp, "w", track_order=True)  # cases keep their recording order
        except BaseException as exc:
            self._signals.restore()
            self._output.__exit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, OSError):
                raise io_error("write", self.path, exc) from None
            raise
        return self

    def _check_interrupt(self) -> None:
        self._signals.check()

    def _check_room(self, nbytes: int) -> None:
        """Stop with ENOSPC before HDF5 meets a full disk: its metadata flush then fails inside h5py's
        cleanup callbacks, which print pages of ignored errors and can crash the process. The margin
        keeps room for the metadata of every dataset so far, so the file still closes cleanly."""
        self._datasets += 1
        if not hasattr(os, "statvfs"):  # not POSIX: HDF5's own error is all there is
            return
        st = os.statvfs(self.tmp.parent)
        free = st.f_bavail * st.f_frsize
        headroom = ROOM_MARGIN + METADATA_PER_DATASET * self._datasets
        if free < nbytes + headroom:
            raise OSError(errno.ENOSPC, f"only {free / 2**20:.1f} MiB free; {nbytes / 2**20:.1f} MiB to write plus "
                                        f"{headroom / 2**20:.1f} MiB kept to close the file")

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._h5 is not None
        try:
            if exc_type is None:
                self._signals.check()
                self._finish_attrs()
                self._h5.close()
                self._signals.check()
                self._output.commit()
        except OSError as err:
            raise io_error("write", self.path, err) from None
        finally:
            self._close()
            self._signals.restore()
            self._output.__exit__(exc_type, exc, tb)  # removes the temporary file unless committed
        if exc_type is not None and issubclass(exc_type, OSError):
            raise io_error("write", self.path, exc) from None
        if self._signals.pending is not None:
            raise KeyboardInterrupt  # arrived during the rename: the file is complete, the command stops
        return False

    def _close(self) -> None:
        with contextlib.suppress(Exception):  # closing a file on a full disk fails again; it is discarded anyway
            if self._h5 is not None and self._h5.id.valid:
                self._h5.close()

    def _finish_attrs(self) -> None:
        root = self._h5.attrs
        attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "created": _now()}
        attrs.update(self._attrs)
        if self.kind == "golden" and "golden_id" not in attrs:
            attrs["golden_id"] = self.golden_id()
        for key, value in attrs.items():
            if key in JSON_ATTRS and not isinstance(value, str):
                value = json.dumps(value, sort_keys=True)
            root[key] = value if value is not None else ""

    def set_attr(self, key: str, value: Any) -> None:
        self._attrs[key] = value

    def golden_id(self) -> str:
        """Content hash of weights + inputs, so a trace can name the golden it replayed.

        The weights enter through `weights_xxh3` (`weights_digest` of their content hashes), or
        `weights_sha256` in files written before it.
        """
        h = hashlib.sha256()
        h.update(str(self._attrs.get("weights_xxh3") or self._attrs.get("weights_sha256", "")).encode())
        for name in sorted(self._input_hashes):
            h.update(f"{name}:{self._input_hashes[name]}".encode())
        return h.hexdigest()[:16]

    # -- content ---------------------------------------------------------------------------
    def _dataset(self, group: str, name: str, array: np.ndarray,
                 layout: str | None = None) -> tuple[h5py.Dataset, str]:
        """A new dataset holding `array`, and its content hash (also stored as its `xxh3` attribute)."""
        self._check_interrupt()
        array = np.ascontiguousarray(array)  # head-split views arrive strided: one copy, here
        self._check_room(array.nbytes)
        parent = self._h5.require_group(group)
        chunked = self.options.create_kwargs(array, layout)
        if chunked or array.ndim == 0 or array.size == 0:
            digest = content_hash(array)
            ds = parent.create_dataset(name, data=array, **chunked)
        else:
            ds = _new_contiguous(parent, name, array)
            digest = self._write_hashed(ds.id.get_offset(), array)
        _set_attrs(ds, {"xxh3": digest})
        return ds, digest

    def _write_hashed(self, offset: int, array: np.ndarray) -> str:
        """Write a contiguous dataset's bytes at its allocated offset in blocks, each hashed right after
        the write brought it into cache: one pass over memory instead of two, no HDF5 copy, no GIL."""
        data = array.reshape(-1).view(np.uint8)
        digest = xxhash.xxh3_64()
        fd = os.open(self.tmp, os.O_WRONLY)
        try:
            for start in range(0, data.size, WRITE_BLOCK):
                block = data[start:start + WRITE_BLOCK]
                view = memoryview(block)
                while view:
                    view = view[os.pwrite(fd, view, offset + start + block.size - len(view)):]
                digest.update(block)
        finally:
            os.close(fd)
        return digest.hexdigest()

    def write_weights(self, weights: dict[str, np.ndarray], ties: dict[str, str] | None = None) -> None:
        """Weights under their HF names; tied parameters (lm_head = wte) become hard links.

        Their content hashes give `weights_xxh3` (and so `golden_id`) without hashing them twice.
        """
        for name, array in weights.items():
            self._weight_hashes[name] = self._dataset("weights", name, array)[1]
        if self._weight_hashes:  # called once per weight too: the digest covers every weight written so far
            self._attrs["weights_xxh3"] = weights_digest(self._weight_hashes)
        for alias, target in (ties or {}).items():
            self._h5["weights"][alias] = self._h5["weights"][target]

    def begin_case(self, case: str, input_ids: np.ndarray, attention_mask: np.ndarray,
                   prompts: list[str] | None = None) -> None:
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int8)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [B,T]")
        g = self._h5.require_group(f"cases/{case}")
        ds, _ = self._dataset(f"cases/{case}", "input_ids", ids)
        if prompts is not None:
            ds.attrs["prompt"] = json.dumps(prompts)
        self._dataset(f"cases/{case}", "attention_mask", mask)
        self._input_hashes[case] = content_hash(ids) + content_hash(mask)
        self._orders[case] = {}
        g.require_group("stages")

    def write_stage(self, case: str, stage: str, array: np.ndarray, order: int,
                    hf_module: str = "", group: str = "stages", **attrs: Any) -> None:
        positions = None
        if self.options.tokens is not None and split_stage(stage)[1] not in WHOLE_UNDER_SUBSET:
            t_axis = layout_of(stage).index("T")
            positions = token_positions(self.options.tokens, array.shape[t_axis])
            array = np.take(array, positions, axis=t_axis)
        storage = self.options.storage_dtype
        narrowed = storage is not None and array.dtype.kind == "f" and array.dtype != np.dtype(
            {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[storage])
        if narrowed:
            array = narrow(array, storage, f"stage {stage} of case {case!r}")
        ds, _ = self._dataset(f"cases/{case}/{group}", stage, array, layout_of(stage))
        extra = {"storage_dtype": storage} if narrowed else {}
        if positions is not None:
            extra["tokens"] = positions
        _set_attrs(ds, {"order": order, "hf_module": hf_module, "layout": layout_of(stage), **extra, **attrs})

    def link_module(self, case: str, hf_path: str, stage: str) -> None:
        """`/cases/<case>/modules/<hf path>` as a soft link to the stage dataset (no second copy)."""
        if stage in self._h5[f"cases/{case}/stages"]:
            self._h5.require_group(f"cases/{case}/modules")[hf_path] = h5py.SoftLink(f"/cases/{case}/stages/{stage}")


def _spans(positions: np.ndarray) -> str:
    """`0-3,7,9-12` for a sorted position list."""
    spans, start = [], 0
    for k in range(1, len(positions) + 1):
        if k == len(positions) or positions[k] != positions[k - 1] + 1:
            a, b = positions[start], positions[k - 1]
            spans.append(f"{a}" if a == b else f"{a}-{b}")
            start = k
    return ",".join(spans)


class CaseView:
    """One case of an open file: inputs and stages, read lazily."""

    def __init__(self, file: StageFile, name: str):
        self.file = file
        self.name = name
        self._group = file.h5[f"cases/{name}"]

    @property
    def input_ids(self) -> np.ndarray:
        return self._verified(self._group["input_ids"], "input_ids")

    @property
    def attention_mask(self) -> np.ndarray:
        if "attention_mask" not in self._group:
            return np.ones(self.input_ids.shape, dtype=np.int8)
        return self._verified(self._group["attention_mask"], "attention_mask")

    @property
    def prompts(self) -> list[str] | None:
        raw = self._group["input_ids"].attrs.get("prompt")
        return json.loads(raw) if raw else None

    def stages(self, group: str = "stages") -> list[str]:
        """Stage names present, in execution order."""
        if group not in self._group:
            return []
        g = self._group[group]
        order = self.file.stage_order
        return sorted(g.keys(), key=lambda n: (order.get(n, g[n].attrs.get("order", 1 << 30)), n))

    def has(self, stage: str, group: str = "stages") -> bool:
        return group in self._group and stage in self._group[group]

    @property
    def has_inputs(self) -> bool:
        return "input_ids" in self._group

    def is_partial(self, stage: str) -> bool:
        """A stage of which only some values are known (imported logs): NaN elsewhere, mask in /present."""
        return "present" in self._group and stage in self._group["present"]

    def present(self, stage: str) -> np.ndarray:
        return self._group["present"][stage][()].astype(bool)

    def resolve(self, name: str) -> str:
        """A canonical stage name, or an HF module path (`transformer.h.0.ln_1`) mapped to its stage."""
        if self.has(name):
            return name
        return self.modules().get(name, name)

    def dataset(self, stage: str, group: str = "stages") -> h5py.Dataset:
        stage = self.resolve(stage) if group == "stages" else stage
        if not self.has(stage, group):
            raise TracerError(f"{self.file.path}: case {self.name!r} has no {group[:-1]} {stage!r}")
        return self._group[group][stage]

    def modules(self) -> dict[str, str]:
        """HF module path -> canonical stage it links to."""
        if "modules" not in self._group:
            return {}
        g = self._group["modules"]
        return {path: g.get(path, getlink=True).path.rsplit("/", 1)[-1] for path in g}

    def read(self, stage: str, group: str = "stages") -> np.ndarray:
        """The whole stage, checksum verified."""
        return self._verified(self.dataset(stage, group), f"{group}/{stage}")

    def read_token(self, stage: str, token: int, batch: int = 0, group: str = "stages") -> np.ndarray:
        """One token's slice (query row for attention stages) without loading the dataset.

        Slices are not checksum-verified: the hash covers the whole dataset.
        """
        ds = self.dataset(stage, group)
        b = min(batch, ds.shape[0] - 1)  # embed.pos is stored once for the batch
        layout = ds.attrs.get("layout", "BTC")
        t_axis = layout.index("T")
        kept = self.positions(stage, group)
        T = self.input_ids.shape[1] if kept is not None else ds.shape[t_axis]
        if not 0 <= token < T:
            raise TracerError(f"token {token} out of range for {stage}: valid tokens are 0..{T - 1}")
        if kept is not None:
            if token not in kept:
                raise TracerError(f"token {token} of {stage} was not recorded (--tokens kept {_spans(kept)})")
            token = int(np.searchsorted(kept, token))
        try:
            return widen(ds, ds[b, :, token] if t_axis == 2 else ds[b, token])
        except (OSError, RuntimeError, ValueError):
            raise TracerError(f"{self.file.path}: cannot read case {self.name!r} {group}/{stage}: the file is "
                              "corrupt or truncated") from None

    def full_shape(self, stage: str, group: str = "stages") -> tuple[int, ...]:
        """The stage's shape as the model computed it: every token, even where --tokens kept fewer."""
        ds = self.dataset(stage, group)
        shape = list(ds.shape)
        if ds.attrs.get("tokens") is not None:
            shape[layout_of(stage).index("T")] = self.input_ids.shape[1]
        return tuple(shape)

    def positions(self, stage: str, group: str = "stages") -> np.ndarray | None:
        """The token positions a stage holds along its T axis when recorded with a subset (`tokens`
        option), in order; None when it holds every token."""
        kept = self.dataset(stage, group).attrs.get("tokens")
        return None if kept is None else np.asarray(kept, dtype=np.int64)

    def _verified(self, ds: h5py.Dataset, what: str) -> np.ndarray:
        data = self.file.read_dataset(ds, f"case {self.name!r} {what}")
        expected = ds.attrs.get("xxh3")
        if expected is not None and content_hash(data) != expected:
            raise TracerError(f"{self.file.path}: checksum mismatch in case {self.name!r} {what}: the file is corrupt")
        return widen(ds, data)


class StageFile:
    """Reader for golden and trace files. `Golden.open` / `Trace.open` also check the kind."""

    expected_kind: str | None = None

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self.h5 = h5
        self.attrs: dict[str, Any] = {}
        for key, value in h5.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if key in JSON_ATTRS and isinstance(value, str) and value:
                value = json.loads(value)
            self.attrs[key] = value.item() if isinstance(value, np.generic) else value
        self.stage_order = {n: k for k, n in enumerate(canonical_stages(self.n_layer))}

    @classmethod
    def open(cls, path: str | os.PathLike) -> StageFile:
        p = Path(path)
        if not p.exists():
            raise TracerError(f"no such file: {p}")
        if p.is_dir():
            raise TracerError(f"{p} is a directory, not a gpt2-tracer file")
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise io_error("read", p, exc) from None
        try:
            h5 = h5py.File(p, "r")
        except OSError:
            raise TracerError(f"{p} is not a readable HDF5 file (corrupt or truncated?)") from None
        try:
            return cls._checked(p, h5)
        except BaseException:
            h5.close()
            raise

    @classmethod
    def _checked(cls, p: Path, h5: h5py.File) -> StageFile:
        try:
            fmt = h5.attrs.get("format")
            version = int(h5.attrs.get("format_version", -1))
            f = cls(p, h5)
        except (OSError, RuntimeError, ValueError, KeyError):
            raise TracerError(f"{p}: cannot read its metadata: the file is corrupt or truncated") from None
        if fmt != FORMAT:
            raise TracerError(f"{p} is not a gpt2-tracer file (format attribute {fmt!r})")
        if version != FORMAT_VERSION:
            newer = " (written by a newer gpt2-tracer: upgrade it to read this file)" \
                if version > FORMAT_VERSION else ""
            raise TracerError(f"{p} has format_version {version}; this tracer reads version {FORMAT_VERSION}{newer}")
        if cls.expected_kind and f.kind != cls.expected_kind:
            raise TracerError(f"{p} is a {f.kind} file, expected a {cls.expected_kind}")
        return f

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> StageFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def kind(self) -> str:
        return self.attrs.get("kind", "")

    @property
    def model_config(self) -> dict:
        return self.attrs.get("model_config") or {}

    @property
    def n_layer(self) -> int:
        return int(self.model_config.get("n_layer", 0))

    @property
    def golden_id(self) -> str:
        return self.attrs.get("golden_id", "")

    def read_dataset(self, ds: h5py.Dataset, what: str) -> np.ndarray:
        """All of `ds`; a damaged file is a one-line TracerError naming `what`, not an HDF5 traceback."""
        try:
            return ds[()]
        except (OSError, RuntimeError, ValueError):
            raise TracerError(f"{self.path}: cannot read {what}: the file is corrupt or truncated") from None

    @property
    def storage_dtype(self) -> str:
        """What stage values were stored as (fp32, fp16, bf16, fp64); files before the option: as computed."""
        return self.attrs.get("storage_dtype") or natural_storage(self.attrs.get("dtype") or "fp32")

    @property
    def storage_rounding(self) -> tuple[float, float]:
        """(relative, absolute) bound on the error storage alone put into every stored stage value:
        |stored - computed| <= rel * |computed| + abs elementwise; (0, 0) when stored exactly."""
        return storage_rounding(self.attrs.get("dtype") or "fp32", self.storage_dtype)

    def case_names(self) -> list[str]:
        return list(self.h5["cases"].keys()) if "cases" in self.h5 else []

    def has_case(self, name: str) -> bool:
        return "cases" in self.h5 and name in self.h5["cases"]

    def case(self, name: str) -> CaseView:
        if name not in self.case_names():
            raise TracerError(f"{self.path} has no case {name!r} (cases: {', '.join(self.case_names())})")
        return CaseView(self, name)

    def cases(self) -> Iterator[CaseView]:
        for name in self.case_names():
            yield CaseView(self, name)

    @property
    def has_weights(self) -> bool:
        return "weights" in self.h5 and len(self.h5["weights"]) > 0

    def weights(self) -> dict[str, np.ndarray]:
        """All weights by HF name, checksum verified; a tied name (lm_head.weight -> wte) is one array."""
        reader = self.weights_on_demand(keep=0)
        return {name: reader[name] for name in reader}

    def weights_on_demand(self, keep: int = 32) -> WeightsOnDemand:
        """The weights as a mapping that reads each when asked for (see `WeightsOnDemand`)."""
        if not self.has_weights:
            raise TracerError(f"{self.path} has no weights (recorded with --no-weights); replay needs them")
        return WeightsOnDemand(self, keep)


class WeightsOnDemand(Mapping):
    """A golden's weights by HF name, each read and checksum-verified when asked for, the `keep`
    most recently used kept. Comparing walks the model block by block, so it holds the weights of
    about two blocks instead of all of them (gpt2-xl: 6 GB). Tied names share one array, and so does
    a weight someone still holds (the oracle's wte, asked for again at the logits): never read twice."""

    def __init__(self, golden: StageFile, keep: int):
        self.golden, self.keep = golden, keep
        self._group = golden.h5["weights"]
        self._names = list(self._group.keys())
        self._recent: OrderedDict = OrderedDict()  # dataset id -> array, least recently used first
        self._alive: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # dataset id -> array

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._group:
            raise KeyError(name)
        ds = self._group[name]
        if ds.id in self._recent:
            self._recent.move_to_end(ds.id)
            return self._recent[ds.id]
        data = self._alive.get(ds.id)
        if data is None:
            data = self._read(name, ds)
        if self.keep:
            self._recent[ds.id] = data
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        return data

    def _read(self, name: str, ds: h5py.Dataset) -> np.ndarray:
        data = np.asarray(self.golden.read_dataset(ds, f"weight {name!r}"))  # 0-d: an array, not a scalar
        if content_hash(data) != ds.attrs.get("xxh3"):
            raise TracerError(f"{self.golden.path}: checksum mismatch in weight {name!r}: the file is corrupt")
        self._alive[ds.id] = data
        return data

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._group[name].shape)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._group

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Golden(StageFile):
    expected_kind = "golden"


class Trace(StageFile):
    expected_kind = "trace"
