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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import xxhash

from tracer.atomic import OutputFile, check_output_path
from tracer.errors import TracerError, io_error
from tracer.interrupts import Deferred
from tracer.stages import canonical_stages, layout_of

FORMAT = "gpt2-tracer"
FORMAT_VERSION = 1
JSON_ATTRS = ("model_config", "versions")
ROOM_MARGIN = 1 << 20  # free space a writer keeps: HDF5 must be able to flush its metadata and close
METADATA_PER_DATASET = 4 << 10  # measured ~0.8 KiB (object header, attributes, links)


def content_hash(array: np.ndarray) -> str:
    """xxh3-64 of the array's C-order bytes (hex): cheap enough to hash every stage."""
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(array).view(np.uint8).data)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StageWriter:
    """Writes a golden or trace file by the output rule of `tracer.atomic`. Use as a context manager.

    Entering reserves the path (a second writer of it fails there) and opens a temporary file;
    a clean exit renames it onto `path`. On any exception (a full disk, Ctrl-C, SIGTERM) it is
    deleted and `path` is untouched. Signals are deferred to the next write (see
    `tracer.interrupts`), so they cannot be lost inside h5py.
    """

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
        """Content hash of weights + inputs, so a trace can name the golden it replayed."""
        h = hashlib.sha256()
        h.update(str(self._attrs.get("weights_sha256", "")).encode())
        for name in sorted(self._input_hashes):
            h.update(f"{name}:{self._input_hashes[name]}".encode())
        return h.hexdigest()[:16]

    # -- content ---------------------------------------------------------------------------
    def _dataset(self, group: str, name: str, array: np.ndarray) -> h5py.Dataset:
        self._check_interrupt()
        self._check_room(array.nbytes)
        ds = self._h5.require_group(group).create_dataset(name, data=array)
        ds.attrs["xxh3"] = content_hash(array)
        return ds

    def write_weights(self, weights: dict[str, np.ndarray], ties: dict[str, str] | None = None) -> None:
        """Weights under their HF names; tied parameters (lm_head = wte) become hard links."""
        for name, array in weights.items():
            self._dataset("weights", name, array)
        for alias, target in (ties or {}).items():
            self._h5["weights"][alias] = self._h5["weights"][target]

    def begin_case(self, case: str, input_ids: np.ndarray, attention_mask: np.ndarray,
                   prompts: list[str] | None = None) -> None:
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int8)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [B,T]")
        g = self._h5.require_group(f"cases/{case}")
        ds = self._dataset(f"cases/{case}", "input_ids", ids)
        if prompts is not None:
            ds.attrs["prompt"] = json.dumps(prompts)
        self._dataset(f"cases/{case}", "attention_mask", mask)
        self._input_hashes[case] = content_hash(ids) + content_hash(mask)
        self._orders[case] = {}
        g.require_group("stages")

    def write_stage(self, case: str, stage: str, array: np.ndarray, order: int,
                    hf_module: str = "", group: str = "stages", **attrs: Any) -> None:
        ds = self._dataset(f"cases/{case}/{group}", stage, array)
        ds.attrs["order"] = order
        ds.attrs["hf_module"] = hf_module
        ds.attrs["layout"] = layout_of(stage)
        for key, value in attrs.items():
            ds.attrs[key] = value

    def link_module(self, case: str, hf_path: str, stage: str) -> None:
        """`/cases/<case>/modules/<hf path>` as a soft link to the stage dataset (no second copy)."""
        if stage in self._h5[f"cases/{case}/stages"]:
            self._h5.require_group(f"cases/{case}/modules")[hf_path] = h5py.SoftLink(f"/cases/{case}/stages/{stage}")


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
        if not 0 <= token < ds.shape[t_axis]:
            raise TracerError(f"token {token} out of range for {stage}: valid tokens are 0..{ds.shape[t_axis] - 1}")
        try:
            return ds[b, :, token] if t_axis == 2 else ds[b, token]
        except (OSError, RuntimeError, ValueError):
            raise TracerError(f"{self.file.path}: cannot read case {self.name!r} {group}/{stage}: the file is "
                              "corrupt or truncated") from None

    def _verified(self, ds: h5py.Dataset, what: str) -> np.ndarray:
        data = self.file.read_dataset(ds, f"case {self.name!r} {what}")
        expected = ds.attrs.get("xxh3")
        if expected is not None and content_hash(data) != expected:
            raise TracerError(f"{self.file.path}: checksum mismatch in case {self.name!r} {what}: the file is corrupt")
        return data


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
        """All weights by HF name, checksum verified."""
        if not self.has_weights:
            raise TracerError(f"{self.path} has no weights (recorded with --no-weights); replay needs them")
        out = {}
        for name, ds in self.h5["weights"].items():
            data = self.read_dataset(ds, f"weight {name!r}")
            if content_hash(data) != ds.attrs.get("xxh3"):
                raise TracerError(f"{self.path}: checksum mismatch in weight {name!r}: the file is corrupt")
            out[name] = data
        return out


class Golden(StageFile):
    expected_kind = "golden"


class Trace(StageFile):
    expected_kind = "trace"
