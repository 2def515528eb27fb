"""`tracer import-manifest`: what PyCandle's GoldenRecorder records, as a golden or as a trace.

PyCandle (PyTorch -> Candle porting with layer-wise parity checks) records a PyTorch model with
forward hooks on every named module and saves, in its output directory:

    <project>_manifest.json      {trace_key: {"name", "module_type", "input_shapes", "output_shapes",
                                  "parameters", "buffers", "is_leaf", "config"}, ...}; keys starting with
                                  "_" are extras (_graph_nodes, _graph_code, _symbolic_hints, _auto_stateful)
    <project>_trace.safetensors  "<trace_key>.out.<k>", "<trace_key>.in.<k>", "model_input.<k>"

trace_key is the module path for a module's first call and "<path>.<n>" for call n > 0; tensors are
float32 unless the recorder kept dtypes (the ids too). `config` holds the module's hyperparameters
(LayerNorm eps, Embedding sizes, the GPT-2 config of modules that carry one). Names go through the
shipped `pycandle` name map (tracer/data/maps/pycandle.toml), so `transformer.h.0.ln_1.out.0` is
`blocks.0.ln1` and `transformer.h.0.attn.c_proj.in.0` is `blocks.0.attn.ctx`.

Without --golden the recording becomes a golden (kind "golden": its model config read from the
manifest, its weights from --weights when given), so a reference written in plain PyTorch and
recorded by PyCandle can stand in for the HF recorder. With --golden it becomes a trace lined up
with that golden's case, like any foreign dump.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tracer.atomic import check_output_path
from tracer.errors import TracerError, read_parsed
from tracer.foreign import (
    Warn,
    _plan,
    default_warn,
    dtype_name,
    import_foreign,
    load_name_map,
)
from tracer.provenance import PRODUCER, versions
from tracer.stages import canonical_stages, hf_aliases, stage_order
from tracer.store import Golden, StageWriter

SUFFIX = "_manifest.json"
GPT2_KEYS = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
ACTIVATIONS = {"NewGELUActivation": "gelu_new", "GELUActivation": "gelu", "GELUTanh": "gelu_pytorch_tanh",
               "FastGELUActivation": "gelu_fast", "QuickGELUActivation": "quick_gelu"}
BLOCK = re.compile(r"(?:^|\.)h\.(\d+)$")
TIED = ("lm_head.weight", "transformer.wte.weight")


@dataclass
class Recording:
    manifest: Path
    tensors: Path
    entries: dict[str, dict]  # trace_key -> layer metadata (extras left out)

    def first_calls(self) -> set[str]:
        """trace_keys of each module's first call: later calls are further forwards (e.g. generation)."""
        return {key for key, e in self.entries.items() if key == e.get("name", key)}


def read_recording(manifest: Path, tensors: Path | None = None) -> Recording:
    data = read_parsed(manifest, json.loads, lambda exc: f"{manifest} is not valid JSON ({exc})",
                       missing=f"no such manifest: {manifest}")
    if not isinstance(data, dict):
        raise TracerError(f"{manifest} is not a PyCandle manifest (expected an object of module records)")
    entries = {k: v for k, v in data.items() if not k.startswith("_")}
    if not entries or not all(isinstance(v, dict) and "module_type" in v for v in entries.values()):
        raise TracerError(f"{manifest} is not a PyCandle manifest (records need 'name' and 'module_type')")
    if tensors is None:
        stem = manifest.name[: -len(SUFFIX)] if manifest.name.endswith(SUFFIX) else manifest.stem
        tensors = manifest.with_name(f"{stem}_trace.safetensors")
    if not tensors.is_file():
        raise TracerError(f"no recorded tensors at {tensors} (pass --tensors FILE)")
    return Recording(manifest, tensors, entries)


def model_config(rec: Recording) -> dict:
    """GPT-2 config from the module records: a GPT-2 config carried by a module, else the module sizes."""
    cfg: dict = {}
    by_name = {e.get("name", k): e for k, e in rec.entries.items()}
    for e in rec.entries.values():
        c = e.get("config") or {}
        if all(k in c for k in GPT2_KEYS):
            cfg.update({k: int(c[k]) for k in GPT2_KEYS})
            break
    blocks = [int(m.group(1)) for name in by_name if (m := BLOCK.search(name))]
    if blocks:
        cfg.setdefault("n_layer", max(blocks) + 1)
    for name, e in by_name.items():
        c, kind = e.get("config") or {}, e.get("module_type")
        if kind == "Embedding" and name.endswith("wte"):
            cfg.setdefault("vocab_size", c.get("num_embeddings"))
            cfg.setdefault("n_embd", c.get("embedding_dim"))
        elif kind == "Embedding" and name.endswith("wpe"):
            cfg.setdefault("n_positions", c.get("num_embeddings"))
        elif kind == "LayerNorm" and "eps" in c:
            cfg.setdefault("layer_norm_epsilon", float(c["eps"]))
        elif name.endswith("h.0.attn"):
            cfg.setdefault("n_head", c.get("num_heads"))
            for key in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
                if isinstance(c.get(key), bool):
                    cfg[key] = c[key]
        elif name.endswith("h.0.mlp.act") and kind in ACTIVATIONS:
            cfg["activation_function"] = ACTIVATIONS[kind]
    missing = [k for k in GPT2_KEYS if not cfg.get(k)]
    if missing:
        raise TracerError(f"{rec.manifest}: cannot tell the model's {', '.join(missing)} from its module records")
    cfg.setdefault("layer_norm_epsilon", 1e-5)
    cfg.setdefault("activation_function", "gelu_new")
    return {"model_type": "gpt2", **cfg}


def _ids(handle, names: set[str], rec: Recording) -> np.ndarray:
    """The recorded token ids [B,T]: the model's first input, else the token embedding's input."""
    for name in ("model_input.0", "transformer.wte.in.0", "wte.in.0"):
        if name in names:
            ids = np.asarray(handle.get_tensor(name))
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2 or not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
                raise TracerError(f"{rec.tensors.name}: {name} is not a [B,T] array of token ids")
            return ids.astype(np.int64)
    raise TracerError(f"{rec.tensors.name} holds no token ids (model_input.0 or wte's input)")


def load_weights(path: Path, n_layer: int) -> dict[str, np.ndarray]:
    """HF GPT-2 weights from a safetensors file, under GPT2LMHeadModel names (hub files lack 'transformer.')."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # any parse failure of the weights file is bad input
        raise TracerError(f"{path} is not a readable safetensors file ({exc})") from None
    weights = {}
    for name, array in raw.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older checkpoints, not parameters
        full = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        weights[full] = np.asarray(array, dtype=np.float32)
    expected = {f"transformer.h.{i}.{m}.{p}" for i in range(n_layer) for m in
                ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")}
    expected |= {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    missing = sorted(expected - set(weights))
    if missing:
        raise TracerError(f"{path} lacks {len(missing)} GPT-2 weight(s): {', '.join(missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}")
    return weights


def derive_missing(arrays: dict[str, np.ndarray], cfg: dict, ids: np.ndarray) -> dict[str, tuple[str, ...]]:
    """Add the weightless stages the recording lacks but its stages determine (HF's GPT-2 has no module
    whose output is q, k, v or the masked scores): evaluated in float64 by the comparator's own reference,
    stored in the recording's dtype. Returns stage -> the stages it was derived from."""
    from tracer.compare.reference import Reference

    ref, mask = Reference({}, cfg), np.ones(ids.shape, dtype=np.int8)
    derived = {}
    for stage in canonical_stages(cfg["n_layer"]):
        inputs = ref.inputs_of(stage)
        if stage in arrays or ref.needs_weights(stage) or not inputs or not all(i in arrays for i in inputs):
            continue
        dtype = arrays[inputs[0]].dtype
        arrays[stage] = ref.evaluate(stage, arrays, ids, mask, np.float64).astype(dtype)
        derived[stage] = inputs
    return derived


def write_golden(rec: Recording, out: Path, *, weights_path: Path | None, case: str, name_map: str | os.PathLike,
                 force: bool, warn: Warn) -> dict[str, str]:
    """The recording as a golden file; returns stage -> recorded tensor name."""
    from safetensors import safe_open

    cfg = model_config(rec)
    n_layer = cfg["n_layer"]
    weights = load_weights(weights_path, n_layer) if weights_path is not None else None
    check_output_path(out, force)
    first = rec.first_calls()
    with safe_open(str(rec.tensors), framework="numpy") as handle:
        names = list(handle.keys())
        ours = [n for n in names if n.startswith("model_input.") or n.rsplit(".", 2)[0] in first]
        if len(ours) < len(names):
            warn(f"{rec.tensors.name}: {len(names) - len(ours)} tensor(s) of repeated module calls left out "
                 f"(only the first forward is the golden's)")
        plan, _ = _plan(ours, load_name_map(name_map), n_layer, case, warn)
        if not plan.stages:
            raise TracerError(f"{rec.tensors.name} has no tensor the name map turns into a stage")
        ids = _ids(handle, set(names), rec)
        order = stage_order(n_layer)
        stages = sorted(plan.stages, key=order.__getitem__)
        arrays = {s: np.asarray(handle.get_tensor(plan.stages[s])) for s in stages}
        derived = derive_missing(arrays, cfg, ids)
        stages = sorted(arrays, key=order.__getitem__)
        attrs = {"producer": PRODUCER, "model_source": f"pycandle:{rec.manifest.name}", "model_config": cfg,
                 "versions": versions(), "device": "",
                 "dtype": dtype_name([a.dtype for a in arrays.values()]),
                 "attn_implementation": "eager" if any(s.endswith("attn.probs") for s in stages) else "",
                 "tf32": "", "seed": 0, "tokenizer": ""}
        with StageWriter(out, "golden", attrs, force=force) as writer:
            if weights:
                ties = {TIED[0]: TIED[1]} if TIED[0] not in weights else {}
                writer.write_weights(weights, ties)
            writer.begin_case(case, ids, np.ones(ids.shape, dtype=np.int8))
            for stage in stages:
                note = {"derived_from": ", ".join(derived[stage])} if stage in derived else \
                    {"foreign_name": plan.stages[stage]}
                writer.write_stage(case, stage, arrays[stage], order[stage], **note)
            for path, stage in hf_aliases(n_layer).items():
                writer.link_module(case, path, stage)
    return plan.stages


def import_manifest(manifest: str | os.PathLike, out: str | os.PathLike, *, tensors: str | os.PathLike | None = None,
                    weights: str | os.PathLike | None = None, golden: str | os.PathLike | None = None,
                    case: str | None = None, name_map: str | os.PathLike | None = None, force: bool = False,
                    warn: Warn = default_warn) -> tuple[str, dict[str, str]]:
    """Write a golden (or, with `golden`, a trace of it); returns (kind, stage -> recorded tensor name)."""
    rec = read_recording(Path(manifest), Path(tensors) if tensors is not None else None)
    name_map = name_map if name_map is not None else "pycandle"
    if golden is None:
        return "golden", write_golden(rec, Path(out), weights_path=Path(weights) if weights else None,
                                      case=case or "case0", name_map=name_map, force=force, warn=warn)
    if weights is not None:
        raise TracerError("--weights goes with a golden; a trace takes its weights from --golden")
    with Golden.open(golden) as g:
        summary = import_foreign(rec.tensors, g, out, case=case, name_map=name_map, force=force, warn=warn)
    return "trace", summary.stages


def import_manifest_command(manifest: Path, out: Path, tensors: Path | None, weights: Path | None,
                            golden: Path | None, case: str | None, name_map: Path | None, force: bool,
                            quiet: bool) -> None:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True)
    kind, stages = import_manifest(manifest, out, tensors=tensors, weights=weights, golden=golden, case=case,
                                   name_map=name_map, force=force,
                                   warn=lambda m: err.print(f"[yellow]warning:[/] {escape(m)}", highlight=False,
                                                            soft_wrap=True))
    if not quiet:
        Console().print(f"imported {len(stages)} stage(s) from {manifest} as a {kind} -> {out}", markup=False,
                        highlight=False, soft_wrap=True)
