"""`tracer demo`: the whole flow on the embedded tiny model, offline, in seconds.

record a golden -> replay a correct NumPy port (passes) -> replay one with an injected
porting bug -> compare: first divergence, origin, diagnosis, first-8 tables -> HTML report.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tracer.compare.run import CompareRequest, run_compare
from tracer.models import load_model
from tracer.record import build_cases, record_golden
from tracer.reports import write_report
from tracer.reports.terminal import render_terminal

DEMO_PROMPTS = ["Hello, world", "The engineer printed every tensor"]
DEFAULT_BUG = "mask-off-by-one"


def run_demo(out_dir: Path, console: Console, inject: str = DEFAULT_BUG) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    golden = out_dir / "tiny.h5"
    html = out_dir / "report.html"
    console.rule("[bold]1. record golden activations of the embedded tiny GPT-2")
    loaded = load_model("tiny")
    cases = build_cases(loaded, DEMO_PROMPTS, [], batch=False)
    record_golden(loaded, cases, str(golden), dtype="fp32", attn="eager", force=True)
    console.print(f"$ tracer record --model tiny --prompt {DEMO_PROMPTS[0]!r} --prompt {DEMO_PROMPTS[1]!r} "
                  f"-o {golden}", highlight=False)

    console.rule("[bold]2. a correct, independent NumPy port")
    console.print(f"$ tracer compare {golden} --backend numpy", highlight=False)
    clean = run_compare(CompareRequest(golden, backend="numpy", quiet=True))
    n = sum(len(c.stages) for c in clean.cases)
    verdict = "[green]all stages within tolerance[/]" if clean.passed else "[red]unexpected divergence[/]"
    console.print(f"{n} stages compared over {len(clean.cases)} cases: {verdict} (exit {clean.exit_code})")

    console.rule(f"[bold]3. the same port with a classic bug: --inject {inject}")
    console.print(f"$ tracer compare {golden} --backend numpy --inject {inject} --html {html}", highlight=False)
    buggy = run_compare(CompareRequest(golden, backend="numpy", inject=inject, quiet=True))
    render_terminal(buggy, console)
    write_report(buggy, "html", html, console, force=True)  # the demo's own directory: rerunning it refreshes it
    console.rule("[bold]4. the report")
    console.print(f"open {html} in a browser: error per stage, the divergence, tables and metadata in one file.")
    return 0
