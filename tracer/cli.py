"""The `tracer` command line (SPEC §7). Exit codes: 0 pass, 1 divergence/regression, 2 usage or input error."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tracer.errors import TracerError

app = typer.Typer(
    help="Layer-by-layer differential debugging of GPT-2 ports: record golden activations of a Hugging Face "
    "GPT-2, replay them through a candidate backend, find the first stage that diverges and why.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise TracerError(f"--ids expects comma-separated integers, got {text!r}") from None


@app.command()
def record(
    output: Path = typer.Option(..., "-o", "--output", help="Golden file to write (.h5)."),
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny' (embedded, offline), a save_pretrained "
                              "directory, or a hub id such as gpt2 (needs network)."),
    random: Optional[str] = typer.Option(None, "--random", help="Random-init real shape instead of --model: "
                                         "gpt2, gpt2-medium, gpt2-large, gpt2-xl (trained-like statistics)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeat for several cases."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt per line."),
    ids: list[str] = typer.Option([], "--ids", help="Raw token ids, comma-separated; repeat for several cases."),
    batch: bool = typer.Option(False, "--batch", help="Put all prompts in one right-padded batch case "
                               "(with attention mask) instead of one case per prompt."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    attn: str = typer.Option("eager", "--attn", help="Attention implementation: eager or sdpa."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Record only stages matching these globs "
                                         "(comma-separated), e.g. 'blocks.0.*,logits'."),
    no_weights: bool = typer.Option(False, "--no-weights", help="Leave weights out (replay then needs them "
                                    "from elsewhere)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Record golden activations of every GPT-2 stage into an HDF5 file."""
    from tracer.models import RANDOM_PREFIX, load_model
    from tracer.progress import track
    from tracer.record import build_cases, record_golden
    from tracer.stages import StageSelector
    from tracer.store import check_output_path

    check_output_path(output, force)  # fail before loading a model
    texts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise TracerError(f"prompts file {prompts_file} does not exist")
        texts += [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    source = f"{RANDOM_PREFIX}{random}" if random else model
    loaded = load_model(source, dtype=dtype, device=device, attn=attn, seed=seed)
    cases = build_cases(loaded, texts, [parse_ids(x) for x in ids], batch)
    record_golden(loaded, cases, str(output), dtype=dtype, attn=attn, selector=StageSelector.parse(stages),
                  with_weights=not no_weights, force=force, seed=seed,
                  progress=partial(track, description="recording", quiet=quiet))
    if not quiet:
        console.print(f"recorded {len(cases)} case(s) of {loaded.source} ({dtype}, {attn}, {device}) -> {output}")


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="Golden or trace file."),
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="Only stages matching these globs."),
    token: int = typer.Option(0, "--token", "-t", help="Token whose first 8 values are shown."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
) -> None:
    """Show cases, stages (shape, dtype, statistics, first 8 values) and metadata of a file."""
    from tracer.inspection import inspect_file, render_inspection
    from tracer.stages import StageSelector
    from tracer.store import StageFile

    with StageFile.open(file) as f:
        info = inspect_file(f, StageSelector.parse(stage), token)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        render_inspection(info, console)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("reports/demo"), "--out-dir", help="Where the demo writes its files."),
) -> None:
    """The whole flow on the embedded tiny model, offline, in seconds."""
    from tracer.demo import run_demo

    run_demo(out_dir, console)


def main() -> None:
    """Console entry point: one clear line and exit 2 for input errors and Ctrl-C."""
    try:
        rc = app(standalone_mode=False)
    except TracerError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: nothing was written", highlight=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, EOFError):
        sys.exit(2)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
