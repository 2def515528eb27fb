"""Open a port's checkpoint: safetensors, npz, a directory of .npy, llm.c's .bin, or GGUF.

Every reader lists names, shapes and dtypes without reading values, and hands out arrays that
are memory-mapped where the format allows (safetensors, .npy, llm.c, GGUF), so an audit of a
multi-GB file reads each tensor once and holds only what it is looking at. Anything that cannot
be parsed is one `TracerError` line naming the file.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from math import prod
from pathlib import Path

import numpy as np

from tracer.errors import TracerError
from tracer.weights.checkpoint import Checkpoint, RawEntry, dtype_name
from tracer.weights.quant import build_candidates

SAFETENSORS_DTYPES = {"F64": ("fp64", np.float64), "F32": ("fp32", np.float32), "F16": ("fp16", np.float16),
                      "BF16": ("bf16", np.uint16), "I8": ("int8", np.int8), "U8": ("uint8", np.uint8),
                      "I16": ("int16", np.int16), "I32": ("int32", np.int32), "I64": ("int64", np.int64),
                      "BOOL": ("bool", np.bool_)}
LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: ("fp32", np.float32), 5: ("bf16", np.uint16)}
SUFFIXES = (".safetensors", ".npz", ".bin", ".gguf")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path`, by its suffix (a directory: its .npy files, or its one .safetensors)."""
    p = Path(path)
    if not p.exists():
        raise TracerError(f"no such checkpoint: {p}")
    if p.is_dir():
        if any(p.glob("*.npy")):
            return _checkpoint(p, "npy directory", _npy_dir(p))
        shards = sorted(p.glob("*.safetensors"))
        if len(shards) != 1:
            raise TracerError(f"{p} holds no .npy files and {len(shards)} .safetensors files (expected one)")
        p = shards[0]
    suffix = p.suffix.lower()
    if suffix == ".gguf":
        from tracer.weights.gguf_reader import read_gguf

        return read_gguf(p)
    readers: dict[str, tuple[str, Callable[[Path], tuple[dict[str, RawEntry], Callable[[], None]]]]] = {
        ".safetensors": ("safetensors", _safetensors), ".npz": ("npz", _npz), ".bin": ("llm.c", _llmc)}
    if suffix not in readers:
        raise TracerError(f"{p}: unknown checkpoint format (expected {', '.join(SUFFIXES)} or a directory of .npy)")
    fmt, reader = readers[suffix]
    try:
        entries, close = reader(p)
    except TracerError:
        raise
    except Exception as exc:  # any parse failure of a third-party format is bad input
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TracerError(f"{p.name} is not a valid {fmt} file ({reason})") from None
    return _checkpoint(p, fmt, (entries, close))


def _checkpoint(path: Path, fmt: str, opened: tuple[dict[str, RawEntry], Callable[[], None]]) -> Checkpoint:
    entries, close = opened
    candidates, skipped = build_candidates(entries)
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.npy"))
    return Checkpoint(path, fmt, candidates, skipped, size, close)


def _memmap(path: Path, offset: int, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(length,))


def _safetensors(path: Path) -> tuple[dict[str, RawEntry], Callable[[], None]]:
    """Parsed here rather than through `safetensors.safe_open`: its NumPy API copies each tensor and
    has no bfloat16, while a memory map of the data block gives zero-copy views of any dtype."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError("bad header length")
        header = json.loads(fh.read(n))
    data = _memmap(path, 8 + n, size - 8 - n)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind, np_dtype = SAFETENSORS_DTYPES.get(info["dtype"], (info["dtype"].lower(), None))
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if np_dtype is None:
            entries[name] = RawEntry(name, shape, kind, lambda: np.zeros(0))
            continue
        if end > data.size or end - begin != prod(shape) * np.dtype(np_dtype).itemsize:
            raise ValueError(f"tensor {name!r} lies outside the file or does not fit its shape")
        entries[name] = RawEntry(name, shape, kind,
                                 lambda b=begin, e=end, t=np_dtype, s=shape: data[b:e].view(t).reshape(s))
    return entries, lambda: None


def _npz(path: Path) -> tuple[dict[str, RawEntry], Callable[[], None]]:
    """Shapes from each member's .npy header; values loaded on demand (npz cannot be mapped)."""
    archive = zipfile.ZipFile(path)
    npz = np.load(path, allow_pickle=False)
    entries = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        name = info.filename[:-4]
        with archive.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
        entries[name] = RawEntry(name, tuple(shape), dtype_name(dtype), lambda n=name: npz[n])

    def close() -> None:
        npz.close()
        archive.close()

    return entries, close


def _npy_dir(path: Path) -> tuple[dict[str, RawEntry], Callable[[], None]]:
    entries = {}
    for f in sorted(path.glob("*.npy")):
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # a corrupt member is bad input, named
            raise TracerError(f"{f.name} is not a valid .npy file ({str(exc).strip() or type(exc).__name__})") from None
        entries[f.stem] = RawEntry(f.stem, tuple(arr.shape), dtype_name(arr.dtype), lambda a=arr: a)
    return entries, lambda: None


def llmc_shapes(header: np.ndarray) -> list[tuple[str, tuple[int, ...]]]:
    """llm.c's parameter tensors in file order, from its checkpoint header (train_gpt2.c)."""
    max_t, _, L, _, C, Vp = (int(x) for x in header[2:8])
    return [("wte", (Vp, C)), ("wpe", (max_t, C)), ("ln1w", (L, C)), ("ln1b", (L, C)), ("qkvw", (L, 3 * C, C)),
            ("qkvb", (L, 3 * C)), ("attprojw", (L, C, C)), ("attprojb", (L, C)), ("ln2w", (L, C)), ("ln2b", (L, C)),
            ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)), ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
            ("lnfw", (C,)), ("lnfb", (C,))]


def _llmc(path: Path) -> tuple[dict[str, RawEntry], Callable[[], None]]:
    """llm.c's `gpt2_*.bin`: 256 int32 header (magic, version, maxT, V, L, NH, C, padded V), then
    every parameter, fp32 (version 3) or bf16 (version 5), layers stacked in one tensor each."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.size < 256 or int(header[0]) != LLMC_MAGIC:
        raise ValueError(f"no llm.c header (magic {LLMC_MAGIC})")
    version = int(header[1])
    if version not in LLMC_VERSIONS:
        raise ValueError(f"llm.c checkpoint version {version} (readable: 3 fp32, 5 bf16)")
    kind, np_dtype = LLMC_VERSIONS[version]
    item = np.dtype(np_dtype).itemsize
    shapes = llmc_shapes(header)
    total = sum(prod(s) for _, s in shapes) * item
    if path.stat().st_size != 1024 + total:
        raise ValueError(f"size {path.stat().st_size} bytes, the header describes {1024 + total}")
    data = _memmap(path, 1024, total)
    entries, offset = {}, 0
    for name, shape in shapes:
        n = prod(shape) * item
        entries[name] = RawEntry(name, shape, kind, lambda b=offset, e=offset + n, s=shape: data[b:e].view(np_dtype).reshape(s))
        offset += n
    return entries, lambda: None
