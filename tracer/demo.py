"""`tracer demo`: the whole flow on the embedded tiny model, offline."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tracer.inspection import inspect_file, render_inspection
from tracer.models import load_model
from tracer.record import build_cases, record_golden
from tracer.stages import StageSelector
from tracer.store import Golden

DEMO_PROMPTS = ["Hello, world", "The engineer printed every tensor"]


def run_demo(out_dir: Path, console: Console) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    golden = out_dir / "tiny.h5"
    console.rule("[bold]1. record golden activations of the embedded tiny GPT-2")
    loaded = load_model("tiny")
    cases = build_cases(loaded, DEMO_PROMPTS, [], batch=False)
    record_golden(loaded, cases, str(golden), dtype="fp32", attn="eager", force=True)
    console.print(f"$ tracer record --model tiny --prompt {DEMO_PROMPTS[0]!r} ... -o {golden}")
    console.rule("[bold]2. inspect the first block's attention at token 0")
    with Golden.open(golden) as g:
        render_inspection(inspect_file(g, StageSelector.parse("blocks.0.attn.*"), token=0), console)
    return 0
