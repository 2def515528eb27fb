"""Shared fixtures: small models, recorded goldens and CLI runners.

Models are loaded and goldens recorded once per test session: every test that only reads a
golden reuses the same file, so the suite stays fast on a 2-core machine. Tests must treat
the shared models and files as read-only (copy a golden before corrupting it).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tracer.models import LoadedModel, byte_decode, byte_encode, load_model, parse_dtype, tiny_dir
from tracer.record import build_cases, record_golden

TINY_PROMPTS = ("Hello, world", "The quick brown fox")
TINY_BATCH_PROMPTS = ("Hi", "Padded batch prompt")  # different lengths: row 0 gets right padding
GPT2_SHAPE_IDS = (464, 2068, 7586, 21831, 18045, 625, 262, 16931)  # T=8, ids beyond the byte range

CLIResult = tuple[int, str, str]


def have_tiny() -> bool:
    """True once the embedded tiny model has been shipped in the package."""
    return (tiny_dir() / "model.safetensors").is_file()


def have_synth() -> bool:
    """True once `tracer.synth` (realistic random init of real GPT-2 shapes) exists."""
    try:
        import tracer.synth  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)
def load_tiny(attn: str = "eager", dtype: str = "fp32") -> LoadedModel:
    """The tiny model (2 layers, n_embd 64, 4 heads, n_positions 128, byte vocab 256), cached per (attn, dtype).

    Before `tracer/data/tiny/model.safetensors` exists, a seeded stand-in of the same shape.
    """
    if have_tiny():
        return load_model("tiny", attn=attn, dtype=dtype)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=256,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    model = GPT2LMHeadModel(config)
    model.to(parse_dtype(dtype)).eval()
    return LoadedModel(model, "tiny-standin", "bytes", byte_encode, byte_decode)


@lru_cache(maxsize=None)
def load_gpt2_shape(attn: str = "eager") -> LoadedModel:
    """A random model with real gpt2 widths (n_embd 768, 12 heads, vocab 50257) but only 2 layers.

    Two layers keep it cheap (the full 12-layer model takes ~10 s to initialise and writes 500 MB
    of weights); the widths are what matter for shape bugs. Uses the realistic init of
    `tracer.synth` when present, HF's default init otherwise.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if have_synth():
        from tracer.synth import random_config, realistic_init_

        config = random_config("gpt2", n_layer=2)
        config._attn_implementation = attn
        model = GPT2LMHeadModel(config)
        realistic_init_(model, 0)
    else:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
        config._attn_implementation = attn
        model = GPT2LMHeadModel(config)
    return LoadedModel(model.eval(), "random:gpt2(n_layer=2)", "bytes", byte_encode, byte_decode)


@pytest.fixture(scope="session")
def tiny_loader() -> Callable[..., LoadedModel]:
    """`tiny_loader(attn="eager", dtype="fp32")` -> the cached tiny LoadedModel for that setting."""
    return load_tiny


@pytest.fixture(scope="session")
def tiny_loaded() -> LoadedModel:
    """The tiny model, fp32, eager attention (shared: do not modify it)."""
    return load_tiny()


@pytest.fixture(scope="session")
def tiny_golden(tmp_path_factory, tiny_loaded) -> Path:
    """Golden of the tiny model (fp32, eager, with weights): cases `case0`, `case1` (one prompt each,
    TINY_PROMPTS) and `batch` (the two TINY_BATCH_PROMPTS right-padded to one [2,T] batch)."""
    out = tmp_path_factory.mktemp("tiny_golden") / "tiny.h5"
    cases = build_cases(tiny_loaded, list(TINY_PROMPTS), [], batch=False)
    cases += build_cases(tiny_loaded, list(TINY_BATCH_PROMPTS), [], batch=True)
    record_golden(tiny_loaded, cases, str(out), dtype="fp32", attn="eager")
    return out


@pytest.fixture(scope="session")
def gpt2_shape_loaded() -> LoadedModel:
    """Random model of gpt2 widths with 2 layers (see `load_gpt2_shape`), fp32, eager."""
    return load_gpt2_shape()


@pytest.fixture(scope="session")
def gpt2_shape_golden(tmp_path_factory, gpt2_shape_loaded) -> Path:
    """Golden of the gpt2-shape model: one case `case0` of the 8 ids GPT2_SHAPE_IDS, with weights."""
    out = tmp_path_factory.mktemp("gpt2_shape_golden") / "gpt2_shape.h5"
    cases = build_cases(gpt2_shape_loaded, [], [list(GPT2_SHAPE_IDS)], batch=False)
    record_golden(gpt2_shape_loaded, cases, str(out), dtype="fp32", attn="eager")
    return out


@pytest.fixture(scope="session")
def c_port(tmp_path_factory) -> Path:
    """The independent C port of tests/ports/c, compiled once (skips without a C compiler)."""
    from tests.ports.real_ports import build_c_port

    binary = build_c_port(tmp_path_factory.mktemp("c_port"))
    if binary is None:
        pytest.skip("no C compiler")
    return binary


@pytest.fixture
def run_cli(monkeypatch) -> Callable[..., CLIResult]:
    """`run_cli(*args)` -> (exit code, stdout, stderr) of `tracer ARGS`, run in-process through `tracer.cli.main`."""
    from tracer.cli import main

    def run(*args: str) -> CLIResult:
        out, err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "argv", ["tracer", *map(str, args)])
        code = 0
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main() takes them over
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            finally:
                for s, handler in handlers.items():
                    signal.signal(s, handler)
        return code, out.getvalue(), err.getvalue()

    return run


def cli_command(*args: str) -> list[str]:
    """argv of the installed `tracer` console script (or `python -m tracer.cli` without one)."""
    script = Path(sys.executable).with_name("tracer")
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "tracer.cli"]
    return head + [str(a) for a in args]


@pytest.fixture
def run_cli_subprocess() -> Callable[..., CLIResult]:
    """`run_cli_subprocess(*args, timeout=120)` -> (exit code, stdout, stderr) of the console script in a
    fresh process: what a user sees, including library warnings printed at import or load time."""

    def run(*args: str, timeout: float = 120) -> CLIResult:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
        proc = subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=env)
        return proc.returncode, proc.stdout, proc.stderr

    return run
