"""What `tracer weights` does: audit, print, write the JSON and the inferred map, exit code."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from tracer.atomic import Reservation
from tracer.progress import track
from tracer.weights.audit import audit
from tracer.weights.mapwrite import write_map
from tracer.weights.names import load_weight_map
from tracer.weights.report import render, write_json


def weights_command(golden: Path, checkpoint: Path, name_map: Path | None, map_out: Path | None,
                    json_out: Path | None, force: bool, verbose: bool, quiet: bool, console: Console) -> int:
    """Exit 0 when every parameter is found right and no tensor looks mis-loaded, 1 otherwise."""
    with ExitStack() as outputs:  # reserved before the audit: refused, unwritable or contended outputs fail first
        for out in (json_out, map_out):
            if out is not None:
                outputs.enter_context(Reservation(out, force))
        wmap = load_weight_map(name_map) if name_map is not None else None
        result = audit(golden, checkpoint, wmap, progress=lambda items, what: track(items, what, quiet=quiet))
        if json_out is not None:
            write_json(result, json_out, force)
        entries = write_map(result, map_out, force) if map_out is not None else None
    if not quiet:
        render(result, console, verbose=verbose)
        if json_out is not None:
            console.print(f"wrote audit JSON -> {json_out}")
        if map_out is not None:
            console.print(f"wrote inferred weight map ({entries} entries) -> {map_out}")
    return result.exit_code
