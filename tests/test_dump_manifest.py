"""The manifest tracer_dump.h / .rs write next to a dump: bf16 source dtype and layout notes reach the comparator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tracer.compare.run import CompareRequest, run_compare
from tracer.store import Golden

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "goldens" / "tiny.h5"


def bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), kept widened in float32 as the helpers store it."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


@pytest.fixture(scope="module")
def case0() -> dict[str, np.ndarray]:
    with Golden.open(GOLDEN) as g:
        view = g.case("case0")
        return {s: view.read(s) for s in view.stages()}


def write_dump(d: Path, arrays: dict[str, np.ndarray], notes: dict[str, dict] | None) -> Path:
    d.mkdir()
    for stage, a in arrays.items():
        np.save(d / f"{stage}.npy", a)
    if notes is not None:
        lines = [json.dumps({"stage": s, "file": f"{s}.npy", "shape": list(arrays[s].shape), **notes.get(s, {})})
                 for s in arrays]
        (d / "tracer_manifest.jsonl").write_text("\n".join(lines) + "\n")
    return d


def compare(dump: Path):
    return run_compare(CompareRequest(GOLDEN, dump, case="case0", quiet=True))


def test_bf16_note_sets_the_precision(case0, tmp_path):
    """A port run in bf16 differs from the fp32 golden by bf16 rounding: fine in bf16, a failure in fp32."""
    rounded = {s: bf16(a) for s, a in case0.items()}
    noted = compare(write_dump(tmp_path / "noted", rounded, {s: {"dtype": "bf16"} for s in rounded}))
    assert noted.trace_meta["dtype"] == "bf16" and noted.exit_code == 0
    plain = compare(write_dump(tmp_path / "plain", rounded, None))
    assert plain.trace_meta["dtype"] == "fp32" and plain.exit_code == 1


def test_layout_note_rearranges_the_port_layout(case0, tmp_path):
    stage = "blocks.0.attn.q"
    arrays = {stage: case0[stage][0].transpose(1, 0, 2).copy(), "blocks.0.ln1": case0["blocks.0.ln1"]}  # [T,H,D]
    noted = compare(write_dump(tmp_path / "noted", arrays, {stage: {"dtype": "f32", "layout": "THD"}}))
    statuses = {s.stage: s.status for s in noted.cases[0].stages}
    assert statuses[stage] == "pass" and statuses["blocks.0.ln1"] == "pass"
    plain = compare(write_dump(tmp_path / "plain", arrays, None))
    # without the note the comparator has to infer the layout from the values, and says so
    inferred = plain.cases[0].stage(stage)
    assert inferred.status == "pass" and "axes permuted" in inferred.note
    assert "axes permuted" not in (noted.cases[0].stage(stage).note or "")


def test_broken_manifest_is_one_line(run_cli, case0, tmp_path):
    d = write_dump(tmp_path / "d", {"embed.sum": case0["embed.sum"]}, {})
    (d / "tracer_manifest.jsonl").write_text('{"stage": "embed.sum", "file": "embed.sum.npy"}\nnot json\n')
    code, _, err = run_cli("compare", GOLDEN, d, "--case", "case0")
    assert code == 2 and "tracer_manifest.jsonl:2" in err and "Traceback" not in err
