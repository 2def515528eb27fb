"""`tracer compare` / `report` / `replay` / `demo` through the console entry point: exit codes,
report files, and one clear line for bad input."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import h5py
import numpy as np


def test_compare_exit_codes_and_reports(run_cli, tiny_golden, tmp_path):
    trace = tmp_path / "numpy.h5"
    assert run_cli("replay", tiny_golden, "--backend", "numpy", "--mode", "both", "-o", trace)[0] == 0
    code, out, _ = run_cli("compare", tiny_golden, trace)
    assert code == 0, out
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "html", "md", "xml")}
    code, out, err = run_cli("compare", tiny_golden, "--backend", "numpy", "--inject", "no-attn-scale",
                             "--json", paths["json"], "--html", paths["html"], "--md", paths["md"],
                             "--junit", paths["xml"], "--log-format")
    assert code == 1, err
    assert "blocks.0.attn.scores" in out and "1/√D" in out
    assert "[AFTER_SCORES] Layer 0, Head 0, Token 0:" in out
    result = json.loads(paths["json"].read_text())
    assert result["origin"]["stage"] == "blocks.0.attn.scores" and result["passed"] is False
    failures = ET.parse(paths["xml"]).getroot().findall(".//failure")
    assert failures
    assert "<svg" in paths["html"].read_text()
    assert "blocks.0.attn.scores" in paths["md"].read_text()
    code, out, _ = run_cli("report", paths["json"], "--format", "md", "-o", tmp_path / "again.md")
    assert code == 0 and (tmp_path / "again.md").read_text() == paths["md"].read_text()


def test_compare_a_foreign_npz(run_cli, tiny_golden, tmp_path):
    with h5py.File(tiny_golden) as f:
        arrays = {name: f[f"cases/case0/stages/{name}"][()] for name in f["cases/case0/stages"]}
    arrays["blocks.1.mlp.act"] = arrays["blocks.1.mlp.act"] * np.float32(1.01)
    npz = tmp_path / "port.npz"
    np.savez(npz, **arrays)
    code, out, err = run_cli("compare", tiny_golden, npz, "--case", "case0")
    assert code == 1, err
    assert "blocks.1.mlp.act" in out


def test_bad_input_is_one_line_and_exit_2(run_cli, tiny_golden, tiny_loaded, tmp_path):
    from tracer.record import build_cases, record_golden

    other = tmp_path / "other.h5"
    record_golden(tiny_loaded, build_cases(tiny_loaded, ["other"], [], batch=False), str(other), dtype="fp32",
                  attn="eager")
    trace = tmp_path / "other-trace.h5"
    assert run_cli("replay", other, "--backend", "numpy", "-o", trace)[0] == 0
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    empty = tmp_path / "empty.npz"
    np.savez(empty, unrelated=np.zeros(3))
    cases = [
        ("compare", tiny_golden, trace),                                    # golden_id mismatch
        ("compare", tiny_golden, corrupt),                                  # corrupt file
        ("compare", tiny_golden, tmp_path / "missing.h5"),                  # missing file
        ("compare", tiny_golden, empty, "--case", "case0"),                 # no stage
        ("compare", tiny_golden, "--backend", "numpy", "--stage", "blocks.9.*"),  # unknown stage glob
        ("compare", tiny_golden, "--backend", "nope"),                      # unknown backend
        ("compare", tiny_golden, "--backend", "numpy", "--tolerance", "fp33"),
        ("compare", tiny_golden),                                           # neither trace nor backend
        ("report", tmp_path / "missing.json"),
    ]
    for args in cases:
        code, out, err = run_cli(*args)
        assert code == 2, (args, out, err)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, (args, err)


def test_demo_runs_offline_and_points_at_the_report(run_cli, tmp_path):
    code, out, err = run_cli("demo", "--out-dir", tmp_path)
    assert code == 0, err
    assert "all stages within tolerance" in out
    assert "blocks.0.attn.scores" in out  # mask-off-by-one: origin at the scores
    assert (tmp_path / "report.html").is_file()
