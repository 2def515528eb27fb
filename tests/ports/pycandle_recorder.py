"""A stand-in for PyCandle's GoldenRecorder (py/spy.py), writing the same two files.

PyCandle is not a PyPI package, so the tests record with this: forward hooks on every named module,
each call's inputs and outputs saved as float32 under `<trace_key>.in.<k>` / `<trace_key>.out.<k>`
(trace_key = module path, `<path>.<n>` for call n > 0), the positional model inputs as
`model_input.<k>`, and per call a record {name, module_type, input_shapes, output_shapes,
parameters, buffers, is_leaf, config} in `<project>_manifest.json`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file


def _config(module: torch.nn.Module) -> dict:
    cfg: dict = {}
    if isinstance(module, torch.nn.LayerNorm):
        cfg = {"normalized_shape": list(module.normalized_shape), "eps": module.eps}
    elif isinstance(module, torch.nn.Embedding):
        cfg = {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim}
    elif type(module).__name__ == "Conv1D":
        cfg = {"in_features": module.weight.shape[0], "out_features": module.weight.shape[1], "bias": True,
               "weight_shape": list(module.weight.shape)}
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "n_embd"):
        cfg.update({k: getattr(config, k) for k in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer",
                                                     "resid_pdrop")})
    for key, value in vars(module).items():  # PyCandle's "universal fallback": plain scalar attributes
        if not key.startswith("_") and isinstance(value, (int, float, bool, str)):
            cfg.setdefault(key, value)
    return cfg


def _shapes(x) -> list[list[int]]:
    if isinstance(x, torch.Tensor):
        return [list(x.shape)]
    if isinstance(x, (tuple, list)):
        return [s for item in x for s in _shapes(item)]
    return []


def record(model: torch.nn.Module, ids: torch.Tensor, out_dir: Path, project: str, calls: int = 1) -> Path:
    """Record `calls` forwards of `model(ids)`; returns the manifest path."""
    records: dict[str, torch.Tensor] = {"model_input.0": ids.detach().float().clone()}
    manifest: dict[str, dict] = {}
    counts: dict[str, int] = defaultdict(int)

    def hook_for(name: str):
        def hook(module, inputs, output):
            key = f"{name}.{counts[name]}" if counts[name] else name
            counts[name] += 1
            for k, x in enumerate(inputs):
                if isinstance(x, torch.Tensor):
                    records[f"{key}.in.{k}"] = x.detach().float().contiguous().clone()
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for k, x in enumerate(outs):
                if isinstance(x, torch.Tensor):
                    records[f"{key}.out.{k}"] = x.detach().float().contiguous().clone()
            manifest[key] = {
                "name": name, "module_type": type(module).__name__, "input_shapes": _shapes(inputs),
                "output_shapes": _shapes(output), "parameters": [n for n, _ in module.named_parameters(recurse=False)],
                "buffers": [n for n, _ in module.named_buffers(recurse=False)],
                "is_leaf": not any(True for _ in module.children()), "config": _config(module)}
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            for _ in range(calls):
                model(ids)
    finally:
        for h in handles:
            h.remove()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(records, str(out_dir / f"{project}_trace.safetensors"))
    path = out_dir / f"{project}_manifest.json"
    path.write_text(json.dumps(manifest, indent=4))
    return path
