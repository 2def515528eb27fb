"""`tracer export`: the golden's weights and input ids in the layouts ports load.

A port in C, Rust or an inference engine must run on exactly the weights and ids the golden used.
Rather than each port writing its own conversion from HDF5, the golden is exported once into the
format the port already reads. Every export is a directory:

    OUT/manifest.json                     format, golden_id, model config, every file and tensor
    OUT/README.txt                        the byte layout of this format, for whoever writes the loader
    OUT/inputs/<case>.input_ids.npy       int64 [B,T]; <case>.attention_mask.npy int8 [B,T]
    OUT/<the weights>                     weights/<name>.npy | model.safetensors | model.bin | model.gguf

llmc exports also write inputs/<case>.tokens.bin (llm.c's token-file format). Byte layouts:
docs/PORTS.md. The directory is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tracer.atomic import check_parent_writable
from tracer.errors import TracerError
from tracer.store import Golden

FORMATS = ("npy-dir", "safetensors", "llmc", "gguf")
WEIGHT_FILES = {"npy-dir": "weights/", "safetensors": "model.safetensors", "llmc": "model.bin", "gguf": "model.gguf"}
CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon",
               "activation_function", "n_inner", "bos_token_id", "eos_token_id")

LAYOUT_NOTES = {
    "npy-dir": "weights/<name>.npy: one NumPy .npy (format 1.0) per weight, little-endian float32, C order, "
               "names and layouts as the golden holds them (HF GPT2LMHeadModel: Conv1D weights are [in, out], "
               "y = x @ W + b) unless a weight map renamed or transposed them (see manifest.json 'weights').",
    "safetensors": "model.safetensors: one safetensors file, float32 tensors, names and layouts as in the npy-dir "
                   "format (HF names, Conv1D weights [in, out]) unless a weight map changed them.",
    "llmc": "model.bin: llm.c's GPT-2 checkpoint, version 3 (float32): int32 header[256] = {20240326, 3, maxT, V, "
            "L, NH, C, Vp, 0...}, then float32 wte[Vp,C] (rows >= V zero), wpe[maxT,C], ln1w[L,C], ln1b[L,C], "
            "qkvw[L,3C,C], qkvb[L,3C], attprojw[L,C,C], attprojb[L,C], ln2w[L,C], ln2b[L,C], fcw[L,4C,C], "
            "fcb[L,4C], fcprojw[L,C,4C], fcprojb[L,C], lnfw[C], lnfb[C]; matrices [out, in] (y = x @ W^T + b). "
            "inputs/<case>.tokens.bin: int32 header[256] = {20240520, 1, n, 0...}, then n uint16 ids "
            "(version 2: uint32), the [B,T] ids row-major.",
    "gguf": "model.gguf: GGUF v3, general.architecture gpt2, llama.cpp's tensor names (token_embd, position_embd, "
            "blk.N.attn_norm/attn_qkv/attn_output/ffn_norm/ffn_up/ffn_down, output_norm, output), all float32 "
            "(with --gguf-type f16 or q8_0 the matrices in that type, LayerNorms and biases float32); "
            "matrices stored [out, in] in NumPy order, i.e. GGUF ne = [in, out].",
}


@dataclass
class ExportSummary:
    out: Path
    format: str
    cases: list[str]
    tensors: int
    notes: list[str] = field(default_factory=list)


def export_config(golden: Golden) -> dict:
    cfg = golden.model_config
    missing = [k for k in CONFIG_KEYS[:5] if k not in cfg]
    if missing:
        raise TracerError(f"{golden.path}: model_config lacks {', '.join(missing)}")
    out = {k: cfg[k] for k in CONFIG_KEYS if cfg.get(k) is not None}
    out.setdefault("layer_norm_epsilon", 1e-5)
    return out


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TracerError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TracerError(f"{out} already exists and is not empty (use --force to replace it)")
    check_parent_writable(out)


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling directory that replaces `out` only when the block completes."""
    check_output_dir(out, force)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TracerError(f"could not write {out}: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_inputs(golden: Golden, cases: list[str], tmp: Path, fmt: str) -> dict:
    from tracer.export_llmc import write_tokens

    (tmp / "inputs").mkdir()
    out = {}
    for name in cases:
        view = golden.case(name)
        ids, mask = view.input_ids.astype(np.int64), view.attention_mask.astype(np.int8)
        entry = {"shape": list(ids.shape), "input_ids": f"inputs/{name}.input_ids.npy",
                 "attention_mask": f"inputs/{name}.attention_mask.npy"}
        np.save(tmp / entry["input_ids"], ids)
        np.save(tmp / entry["attention_mask"], mask)
        if fmt == "llmc":
            entry["tokens"] = f"inputs/{name}.tokens.bin"
            write_tokens(tmp / entry["tokens"], ids)
        if view.prompts:
            entry["prompts"] = view.prompts
        out[name] = entry
    return out


def _write_weights(golden: Golden, fmt: str, config: dict, tmp: Path, weight_map: str | None,
                   gguf_type: str = "f32") -> tuple[list, str]:
    """Write the format's weight file(s); (tensor entries for the manifest, a note or "")."""
    weights = golden.weights()
    if fmt in ("npy-dir", "safetensors"):
        from tracer.weightmap import load_weight_map

        exported = load_weight_map(weight_map).apply(weights)
        arrays = {e.name: np.ascontiguousarray(e.array) for e in exported}
        if fmt == "npy-dir":
            (tmp / "weights").mkdir()
            for name, array in arrays.items():
                if "/" in name or name.startswith("."):
                    raise TracerError(f"weight name {name!r} cannot be a file name")
                np.save(tmp / "weights" / f"{name}.npy", array)
        else:
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp / WEIGHT_FILES[fmt]), metadata={"format": "pt"})
        entries = [{"name": e.name, "from": e.source, "shape": list(e.array.shape), "dtype": str(e.array.dtype),
                    "transposed": e.transposed} for e in exported]
        return entries, f"weight map {weight_map}" if weight_map else ""
    if weight_map is not None:
        raise TracerError(f"--weight-map applies to npy-dir and safetensors; {fmt} fixes its own names")
    if fmt == "llmc":
        from tracer.export_llmc import write_checkpoint

        return write_checkpoint(tmp / WEIGHT_FILES[fmt], weights, config), ""
    from tracer.export_gguf import write_gguf

    return write_gguf(tmp / WEIGHT_FILES[fmt], weights, config, str(golden.attrs.get("tokenizer", "")),
                      str(golden.attrs.get("model_source", "")), gguf_type)


def export_golden(golden_path: str | os.PathLike, fmt: str, out: str | os.PathLike, *, case: str | None = None,
                  weight_map: str | None = None, force: bool = False, gguf_type: str = "f32") -> ExportSummary:
    """Write the export directory `out` for `golden_path` in format `fmt`."""
    if fmt not in FORMATS:
        raise TracerError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if gguf_type != "f32" and fmt != "gguf":
        raise TracerError(f"--gguf-type applies to --format gguf, not {fmt}")
    out = Path(out)
    check_output_dir(out, force)  # fail before reading the golden
    with Golden.open(golden_path) as golden:
        if not golden.has_weights:
            raise TracerError(f"{golden.path} has no weights (recorded with --no-weights): nothing to export")
        config = export_config(golden)
        cases = [golden.case(case).name] if case is not None else golden.case_names()
        with atomic_dir(out, force) as tmp:
            inputs = _write_inputs(golden, cases, tmp, fmt)
            tensors, note = _write_weights(golden, fmt, config, tmp, weight_map, gguf_type)
            manifest = {"schema_version": 1, "format": fmt, "golden": str(golden_path),
                        "golden_id": golden.golden_id, "model_source": golden.attrs.get("model_source", ""),
                        "config": config, "weights_file": WEIGHT_FILES[fmt], "layout": LAYOUT_NOTES[fmt],
                        "cases": inputs, "tensors": tensors}
            if note:
                manifest["note"] = note
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            (tmp / "README.txt").write_text(_readme(fmt, golden_path, config, cases), encoding="utf-8")
    return ExportSummary(out, fmt, cases, len(tensors), [note] if note else [])


def _readme(fmt: str, golden_path: str | os.PathLike, config: dict, cases: list[str]) -> str:
    dims = ", ".join(f"{k}={v}" for k, v in config.items())
    return (f"Exported by `tracer export {golden_path} --format {fmt}`.\n\n"
            f"Model: {dims}.\nCases: {', '.join(cases)}.\n\n"
            f"Weights: {LAYOUT_NOTES[fmt]}\n\n"
            "Inputs: inputs/<case>.input_ids.npy (int64 [B,T]) and inputs/<case>.attention_mask.npy (int8 [B,T], "
            "1 = real token, 0 = right padding).\n\n"
            "Run the port on these ids, dump its stages with tracer_dump.h / tracer_dump.rs "
            "(`tracer include-dir`), then: tracer compare GOLDEN DUMP_DIR --case CASE\n")


def export_command(golden: Path, fmt: str, out: Path, case: str | None, weight_map: str | None, force: bool,
                   quiet: bool, gguf_type: str = "f32") -> None:
    from rich.console import Console

    summary = export_golden(golden, fmt, out, case=case, weight_map=weight_map, force=force, gguf_type=gguf_type)
    if not quiet:
        Console().print(f"exported {summary.tensors} tensors and the ids of {len(summary.cases)} case(s) "
                        f"({', '.join(summary.cases)}) as {fmt} -> {summary.out}", markup=False, highlight=False,
                        soft_wrap=True)


def include_path() -> Path:
    """Where tracer_dump.h and tracer_dump.rs ship inside the package."""
    from importlib import resources

    return Path(str(resources.files("tracer") / "data" / "include"))
