"""The `tracer` command line (SPEC §7). Exit codes: 0 pass, 1 divergence/regression, 2 usage or input error."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tracer.errors import TracerError, io_error

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
    compression: str = typer.Option("none", "--compression", help="Lossless compression of every dataset: none, "
                                    "lzf (fast) or gzip[:LEVEL] (smaller, slower); readers need nothing extra."),
    storage_dtype: Optional[str] = typer.Option(None, "--storage-dtype", help="Store stages as fp32, fp16 or bf16 "
                                                "(default: as computed). Narrower is lossy: the file records "
                                                "it (storage_dtype) and how much rounding it put in."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Keep only these token positions of every stage "
                                         "but attn.k/attn.v (which every query reads), e.g. '0:16,-1' (indices and "
                                         "start:stop slices; negative from the end). compare checks those rows."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Record golden activations of every GPT-2 stage into an HDF5 file."""
    from tracer.atomic import Reservation
    from tracer.hub import preflight
    from tracer.progress import session

    with Reservation(output, force), session(quiet):  # an unwritable or busy output fails before the model loads
        texts = list(prompt) + (read_prompts_file(prompts_file) if prompts_file is not None else [])
        id_lists = [parse_ids(x) for x in ids]  # fail on bad ids before loading a model
        from tracer.store import DatasetOptions

        options = DatasetOptions.parse(compression, storage_dtype, tokens)
        preflight(model if random is None else "random:")  # an unreachable hub fails before the slow imports
        from tracer.models import RANDOM_PREFIX, load_model
        from tracer.progress import track
        from tracer.record import build_cases, record_golden
        from tracer.stages import StageSelector

        source = f"{RANDOM_PREFIX}{random}" if random else model
        loaded = load_model(source, dtype=dtype, device=device, attn=attn, seed=seed)
        cases = build_cases(loaded, texts, id_lists, batch)
        record_golden(loaded, cases, str(output), dtype=dtype, attn=attn, selector=StageSelector.parse(stages),
                      with_weights=not no_weights, force=force, seed=seed,
                      progress=partial(track, description="recording", quiet=quiet), options=options)
    if not quiet:
        console.print(f"recorded {len(cases)} case(s) of {loaded.source} ({dtype}, {attn}, {device}) -> {output}")


def read_prompts_file(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TracerError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise TracerError(f"prompts file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise io_error("read", path, exc) from None
    return [line for line in text.splitlines() if line.strip()]


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


TIMEOUT_OPT = typer.Option(None, "--timeout", help="Seconds an exec: backend may run before it is stopped "
                           "(default: one hour).")


@app.command()
def replay(
    golden: Optional[Path] = typer.Argument(None, help="Golden file to replay (weights and inputs come from it)."),
    backend: str = typer.Option("numpy", "--backend", "-b", help="Backend: numpy, cupy, triton, an entry-point "
                                "name, package.module:Class, or exec:\"CMD {golden} {out}\"."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Trace file to write (.h5)."),
    mode: str = typer.Option("chained", "--mode", help="chained (the candidate runs on its own numbers), isolated "
                             "(each stage fed the golden inputs), or both."),
    precision: str = typer.Option("fp32", "--precision", help="Backend precision: fp32, or fp64 (NumPy oracle)."),
    inject: Optional[str] = typer.Option(None, "--inject", help="Inject a classic porting bug; 'list' shows the "
                                         "catalog."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    timeout: Optional[float] = TIMEOUT_OPT,
) -> None:
    """Replay a golden's inputs through a candidate backend and record its trace."""
    from tracer.replay import replay_command

    replay_command(golden, backend, output, mode, precision, inject, force, quiet, console, timeout)


@app.command()
def backends() -> None:
    """List installed backends and whether each can run on this machine."""
    from backends.registry import backends_command

    backends_command(console)


@app.command("import-log")
def import_log(
    log: Path = typer.Argument(..., help="Text log with debug-print lines: [AFTER_LN1] Layer 0, Token 0: [...]"),
    golden: Path = typer.Option(..., "--golden", "-g", help="The golden the logged run corresponds to."),
    map: Optional[Path] = typer.Option(None, "--map", help="TOML tag map (default: the shipped print_tags.toml)."),
    case: Optional[str] = typer.Option(None, "--case", help="Golden case the log belongs to (when it has several)."),
    output: Path = typer.Option(..., "-o", "--output", help="Trace file to write (.h5)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
) -> None:
    """Turn a port's printed first-N-values log into a (partial) trace."""
    from tracer.importlog import import_log_command

    import_log_command(log, golden, map, case, output, force, quiet)


# Arguments shared by `compare` and `diff`.
GOLDEN_ARG = typer.Argument(..., help="Golden file.")
TRACE_ARG = typer.Argument(None, help="Trace: .h5, or a foreign .npz / .safetensors / directory of .npy named by stage.")
BACKEND_OPT = typer.Option(None, "--backend", "-b", help="Replay this backend instead of reading a TRACE.")
INJECT_OPT = typer.Option(None, "--inject", help="With --backend: inject a catalog bug.")


@app.command("compare")
def compare_cmd(
    golden: Path = GOLDEN_ARG,
    trace: Optional[Path] = TRACE_ARG,
    backend: Optional[str] = BACKEND_OPT,
    inject: Optional[str] = INJECT_OPT,
    precision: str = typer.Option("fp32", "--precision", help="With --backend: fp32 or fp64."),
    mode: Optional[str] = typer.Option(None, "--mode", help="With --backend: chained, isolated or both (default: "
                                       "both; chained for a golden recorded with --tokens)."),
    tolerance: Optional[str] = typer.Option(None, "--tolerance", help="auto (default: from the measured noise), "
                                            "a preset (fp64, fp32, tf32, fp16, bf16), or a TOML file."),
    stage: Optional[str] = typer.Option(None, "--stage", "-s", help="Only stages matching these globs."),
    token: Optional[int] = typer.Option(None, "--token", "-t", help="Also show the first-8 table at this token."),
    case: Optional[str] = typer.Option(None, "--case", help="Only this case (and the case a foreign dump is)."),
    name_map: Optional[Path] = typer.Option(None, "--name-map", help="TOML map of foreign names to stage names."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report."),
    md_out: Optional[Path] = typer.Option(None, "--md", help="Write a Markdown report."),
    junit_out: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per stage)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Fail on regression against this baseline."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Write the baseline from this run."),
    require: Optional[str] = typer.Option(None, "--require", help="Stages the trace must hold: 'all' or globs "
                                          "(comma-separated); a missing one fails instead of being listed."),
    log_format: bool = typer.Option(False, "--log-format", help="Also print debug-print lines ([TAG] Layer L, "
                                    "Token T: [...]) to set beside a port's own."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every stage, not runs of passing ones."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No terminal report (exit code and files only)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite existing report files."),
    timeout: Optional[float] = TIMEOUT_OPT,
    weights: Optional[Path] = typer.Option(None, "--weights", help="The port's own weights (any format `tracer "
                                           "weights` reads): reference and oracle use them, dequantized."),
) -> None:
    """Compare a trace (or a backend's replay) with the golden: exit 0 pass, 1 divergence, 2 bad input."""
    from tracer.compare.run import CompareRequest, compare_command

    reports = {k: v for k, v in (("json", json_out), ("html", html_out), ("md", md_out), ("junit", junit_out)) if v}
    req = CompareRequest(golden, trace, backend, inject, precision, mode, tolerance, stage, token, case, name_map,
                         reports, baseline, update_baseline, require, log_format, verbose, quiet,
                         weights=weights, force=force, timeout=timeout)
    raise typer.Exit(compare_command(req, console))


@app.command()
def diff(
    golden: Path = GOLDEN_ARG,
    trace: Optional[Path] = TRACE_ARG,
    backend: Optional[str] = BACKEND_OPT,
    inject: Optional[str] = INJECT_OPT,
    case: Optional[str] = typer.Option(None, "--case", help="Case to browse (default: the one that diverges "
                                       "first)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Print the static report of `compare` instead (also "
                                "when stdout is not a terminal)."),
) -> None:
    """Browse a comparison interactively: stages, tokens, heads, channels (needs textual: the tui extra)."""
    from tracer.tui.command import diff_command

    raise typer.Exit(diff_command(golden, trace, backend, inject, case, no_tui, console))


@app.command()
def report(
    result: Path = typer.Argument(..., help="Result JSON written by compare --json."),
    fmt: str = typer.Option("terminal", "--format", help="terminal, html, md, junit or json."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file (terminal prints)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
) -> None:
    """Render a saved comparison result in another format."""
    from tracer.reports import report_command

    report_command(result, fmt, output, console, force)


@app.command("weights")
def weights_cmd(
    golden: Path = typer.Argument(..., help="Golden file: its /weights are the reference."),
    checkpoint: Path = typer.Argument(..., help="The port's weights: .safetensors, .npz, a directory of .npy, "
                                      "llm.c .bin or .gguf."),
    name_map: Optional[Path] = typer.Option(None, "--name-map", help="Weight map: a TOML file with a weights "
                                            "table, or a shipped one (pycandle, llmc, gguf, max)."),
    write_map: Optional[Path] = typer.Option(None, "--write-map", help="Write the inferred weight map (TOML)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the audit as JSON."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite existing output files."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One row per parameter (not grouped by kind)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No terminal report (exit code and files only)."),
) -> None:
    """Audit a port's weights: missing, transposed, split, renamed, quantized, mis-loaded. Exit 1 on a problem."""
    from tracer.weights.command import weights_command

    raise typer.Exit(weights_command(golden, checkpoint, name_map, write_map, json_out, force, verbose, quiet,
                                     console))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("reports/demo"), "--out-dir", help="Where the demo writes its files."),
    inject: str = typer.Option("mask-off-by-one", "--inject", help="The porting bug the demo injects "
                               "(see tracer replay --inject list)."),
) -> None:
    """The whole flow on the embedded tiny model, offline, in seconds."""
    from tracer.demo import run_demo

    run_demo(out_dir, console, inject)


@app.command("export")
def export_cmd(
    golden: Path = typer.Argument(..., help="Golden file whose weights and input ids a port should load."),
    fmt: str = typer.Option(..., "--format", help="npy-dir, safetensors, llmc (llm.c checkpoint) or gguf."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory to write (replaced only with --force)."),
    case: Optional[str] = typer.Option(None, "--case", help="Only this case's ids (default: every case)."),
    weight_map: Optional[str] = typer.Option(None, "--weight-map", help="npy-dir / safetensors: rename or "
                                             "transpose weights (shipped: hub, nanogpt; or a TOML file)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing output directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
    gguf_type: str = typer.Option("f32", "--gguf-type", help="gguf: weight matrices as f32, f16 or q8_0."),
) -> None:
    """Write the golden's weights and input ids in the layout a port loads (byte layouts: docs/PORTS.md)."""
    from tracer.export import export_command

    export_command(golden, fmt, output, case, weight_map, force, quiet, gguf_type)


@app.command("include-dir")
def include_dir() -> None:
    """Print the directory holding tracer_dump.h (C/C++/CUDA) and tracer_dump.rs (Rust)."""
    from tracer.export import include_path

    print(include_path())


@app.command("import-manifest")
def import_manifest(
    manifest: Path = typer.Argument(..., help="PyCandle GoldenRecorder manifest (<name>_manifest.json)."),
    output: Path = typer.Option(..., "-o", "--output", help="Golden (or, with --golden, trace) file to write."),
    tensors: Optional[Path] = typer.Option(None, "--tensors", help="Recorded tensors (default: "
                                           "<name>_trace.safetensors next to the manifest)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Model weights (.safetensors, HF GPT-2 names) "
                                           "to store in the golden."),
    golden: Optional[Path] = typer.Option(None, "--golden", "-g", help="Write a trace lined up with this golden "
                                          "instead of a golden."),
    case: Optional[str] = typer.Option(None, "--case", help="With --golden: the case the recording belongs to."),
    map: Optional[Path] = typer.Option(None, "--map", help="Name map (default: the shipped pycandle map)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line."),
) -> None:
    """Turn PyCandle recorder output (manifest + tensors) into a golden, or into a trace of a golden."""
    from tracer.manifest import import_manifest_command

    import_manifest_command(manifest, output, tensors, weights, golden, case, map, force, quiet)


def main() -> None:
    """Console entry point; `tracer.boundary` turns every failure into one line and exit code 2."""
    from tracer.boundary import run_console

    sys.exit(run_console(app, err_console, sys.argv[1:]))


if __name__ == "__main__":
    main()
