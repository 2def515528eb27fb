"""Model sources (SPEC §2): the embedded `tiny` model, local directories, hub ids, random shapes.

All of them end in the same place: a `GPT2LMHeadModel` in eval mode plus a tokenizer.
`tiny` is just a directory shipped inside the package, loaded by the very code path a
user's `save_pretrained` directory or a hub id takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from tracer.errors import TracerError
from tracer.hub import check_hub_reachable, hub_cached
from tracer.progress import step, track

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
RANDOM_PREFIX = "random:"


def tiny_dir() -> Path:
    return Path(str(resources.files("tracer") / "data" / "tiny"))


@dataclass
class LoadedModel:
    """A model ready to record, with what the golden's metadata says about where it came from."""

    model: torch.nn.Module
    source: str
    tokenizer_kind: str  # "bytes" or "hf"
    _encode: Callable[[str], list[int]]
    _decode: Callable[[list[int]], str]

    @property
    def config(self):
        return self.model.config

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def byte_decode(ids: list[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TracerError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TracerError("--device cuda asked for, but CUDA is not available on this machine")
    elif name != "cpu":
        raise TracerError(f"unknown device {name!r} (cpu or cuda)")
    return torch.device(name)


def load_model(source: str = "tiny", *, dtype: str = "fp32", device: str = "cpu", attn: str = "eager",
               seed: int = 0) -> LoadedModel:
    """Load `source`: 'tiny', a directory, a hub id, or 'random:NAME' (realistic random init)."""
    if attn not in ATTN_IMPLEMENTATIONS:
        raise TracerError(f"unknown attention implementation {attn!r} (eager or sdpa)")
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    if source.startswith(RANDOM_PREFIX):
        loaded = _load_random(source[len(RANDOM_PREFIX):], seed, attn)
    elif source == "tiny":
        loaded = _load_pretrained(tiny_dir(), attn, "tiny")  # ships no tokenizer: byte-level ids
    else:
        loaded = _load_pretrained(source, attn, source)
    loaded.model.to(device=dev, dtype=torch_dtype).eval()
    return loaded


def _load_random(name: str, seed: int, attn: str) -> LoadedModel:
    from transformers import GPT2LMHeadModel

    from tracer.synth import random_config, realistic_init_

    try:
        config = random_config(name)
    except ValueError as exc:
        raise TracerError(str(exc)) from None
    config._attn_implementation = attn
    with step(f"building {name} ({config.n_layer} layers)", 1) as advance:
        with _no_default_init():  # realistic_init_ overwrites every parameter: HF's own init would be wasted
            model = GPT2LMHeadModel(config)
        model.tie_weights()  # skipped along with the init; lm_head must stay wte, as in any GPT-2
        advance()
    realistic_init_(model, seed, progress=partial(track, description="initialising weights (per layer)"))
    return LoadedModel(model, f"{RANDOM_PREFIX}{name}?seed={seed}", "bytes", byte_encode, byte_decode)


def _no_default_init():
    """transformers' switch that skips the random init of a model being built."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or Path(source).exists()


def _load_pretrained(source: str | Path, attn: str, description: str) -> LoadedModel:
    from transformers import AutoConfig, GPT2LMHeadModel
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # its "Loading weights" bar would precede any error line the CLI prints
    path = Path(source).expanduser()
    if _looks_like_path(str(source)) and not path.is_dir():
        raise TracerError(f"model directory {source} does not exist")
    where = str(path if path.is_dir() else source)
    local_only = path.is_dir() or hub_cached(where)
    if not local_only:
        check_hub_reachable(where)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TracerError(
            f"cannot load model {str(source)!r}: not 'tiny', not a local directory, and not available "
            f"from the hub ({reason})") from None
    if config.model_type != "gpt2":
        raise TracerError(f"model {str(source)!r} is a {config.model_type!r} model; only GPT-2 is supported")
    try:
        with step(f"loading {description} ({config.n_layer} layers)", 1) as advance:
            model = GPT2LMHeadModel.from_pretrained(where, attn_implementation=attn, local_files_only=local_only)
            advance()
    except (OSError, ValueError) as exc:
        raise TracerError(f"cannot load weights of {str(source)!r}: {str(exc).splitlines()[0]}") from None
    has_tokenizer = not path.is_dir() or any((path / f).exists() for f in ("tokenizer.json", "vocab.json"))
    encode, decode, kind = _hf_tokenizer(where, local_only) if has_tokenizer else (
        byte_encode, byte_decode, "bytes")
    return LoadedModel(model, description, kind, encode, decode)


def _hf_tokenizer(where: str, local_only: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except (OSError, ValueError):
        return byte_encode, byte_decode, "bytes"
    return (lambda text: tok.encode(text)), (lambda ids: tok.decode(ids)), "hf"


def weights_of(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters by HF name, plus ties (alias -> first name) for shared tensors like lm_head."""
    unique: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in seen:
            ties[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = param
    return unique, ties


def to_numpy(t: torch.Tensor):
    """Host copy in a dtype h5py stores (bf16 widens exactly to fp32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()
