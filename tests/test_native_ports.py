"""The C and Rust example ports and the dump helpers they use, built with the compilers present.

Each port loads `tracer export --format llmc` output of goldens/tiny.h5, runs case0, dumps every stage
with tracer_dump.h / tracer_dump.rs and prints debug lines; the comparator must pass the correct port
and put the origin of its one-line bug (`--bug`) at the bug's stage. Without cc or cargo the tests
skip; cargo builds offline, once per session, into a temporary directory.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tracer.compare.run import CompareRequest, run_compare
from tracer.export import export_golden, include_path
from tracer.importlog import import_log

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "goldens" / "tiny.h5"
INCLUDE = include_path()
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
CARGO = shutil.which("cargo")
LOG_LINE = re.compile(r"\[(?P<tag>\w+)\] (?:Layer (?P<layer>\d+), )?Token (?P<token>\d+): \[(?P<values>[^\]]*)\]")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("port_inputs") / "llmc"
    export_golden(GOLDEN, "llmc", out, case="case0")
    return out


def compile_c(source: Path, out: Path, *extra: str) -> Path:
    cmd = [CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I", str(INCLUDE), str(source),
           "-lm", "-o", str(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def c_port(tmp_path_factory) -> Path:
    if CC is None:
        pytest.skip("no C compiler")
    return compile_c(ROOT / "examples" / "c" / "gpt2.c", tmp_path_factory.mktemp("c_port") / "gpt2")


@pytest.fixture(scope="session")
def rust_port(tmp_path_factory) -> Path:
    if CARGO is None:
        pytest.skip("no cargo")
    target = tmp_path_factory.mktemp("rust_target")
    proc = subprocess.run([CARGO, "build", "--release", "--offline", "--locked", "--quiet", "--manifest-path",
                           str(ROOT / "examples" / "rust" / "Cargo.toml"), "--target-dir", str(target)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return target / "release" / "gpt2"


def run_port(binary: Path, export_dir: Path, dump: Path, bug: bool = False) -> str:
    proc = subprocess.run([str(binary), str(export_dir), "case0", str(dump)] + (["--bug"] if bug else []),
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def compare(trace: Path):
    return run_compare(CompareRequest(GOLDEN, trace, case="case0", quiet=True))


def check_port(binary: Path, export_dir: Path, tmp_path: Path, bug_stage: str) -> None:
    clean = tmp_path / "clean"
    run_port(binary, export_dir, clean)
    result = compare(clean)
    statuses = {s.stage: s.status for s in result.cases[0].stages}
    assert result.exit_code == 0 and set(statuses.values()) == {"pass"}, statuses
    assert len(statuses) == 35  # every canonical stage of the 2-layer model came from the dump
    buggy = tmp_path / "bug"
    run_port(binary, export_dir, buggy, bug=True)
    result = compare(buggy)
    assert result.exit_code == 1
    assert result.cases[0].origin == bug_stage
    assert result.cases[0].first_divergence == bug_stage


def printed(log: str, tag: str, layer: int | None, token: int) -> str:
    for m in LOG_LINE.finditer(log):
        if m["tag"] == tag and m["token"] == str(token) and (m["layer"] == (None if layer is None else str(layer))):
            return m.group(0)
    raise AssertionError(f"no {tag} line for layer {layer}, token {token}")


def expected_line(dump: Path, stage: str, tag: str, layer: int | None, token: int) -> str:
    """What C's %.7g makes of the port's own float32 values (Python's format is C's)."""
    row = np.load(dump / f"{stage}.npy")[0, token, :8]
    where = f"Layer {layer}, " if layer is not None else ""
    return f"[{tag}] {where}Token {token}: [{', '.join(f'{float(v):.7g}' for v in row)}]"


# -- C ------------------------------------------------------------------------------------------
def test_c_port_passes_and_localizes_its_bug(c_port, export_dir, tmp_path):
    check_port(c_port, export_dir, tmp_path, "blocks.0.mlp.act")


def test_c_port_debug_prints_round_trip_through_import_log(c_port, export_dir, tmp_path):
    """The printed lines localize the bug too, and the report's first-8 table holds the printed numbers."""
    dump = tmp_path / "dump"
    log = run_port(c_port, export_dir, dump, bug=True)
    line = printed(log, "AFTER_GELU", 0, 0)
    assert line == expected_line(dump, "blocks.0.mlp.act", "AFTER_GELU", 0, 0)
    (tmp_path / "port.log").write_text(log)
    from tracer.store import Golden

    with Golden.open(GOLDEN) as g:
        summary = import_log(tmp_path / "port.log", g, tmp_path / "log.h5", case="case0")
    assert summary.tokens == [0, 11] and summary.lines == 50
    result = compare(tmp_path / "log.h5")
    case = result.cases[0]
    assert result.exit_code == 1 and case.origin == "blocks.0.mlp.act"
    stage = next(s for s in case.stages if s.stage == "blocks.0.mlp.act")
    table = next(t for t in stage.tables if t.token == 0)
    values = [float(v) for v in LOG_LINE.fullmatch(line)["values"].split(", ")]
    assert table.candidate == [float(np.float32(v)) for v in values]
    assert [f"{v:.7g}" for v in table.candidate] == [f"{v:.7g}" for v in values]


def test_header_compiles_as_cpp(tmp_path):
    if CXX is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "use.cpp"
    src.write_text('#include "tracer_dump.h"\nint main() { float x[2] = {1, 2}; long long s[1] = {2};\n'
                   f'  return tracer_dump("{tmp_path / "d"}", "embed.sum", x, "f32", 1, s); }}\n')
    subprocess.run([CXX, "-std=c++11", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE), str(src), "-o",
                    str(tmp_path / "use")], check=True, capture_output=True)
    subprocess.run([str(tmp_path / "use")], check=True)
    assert np.load(tmp_path / "d" / "embed.sum.npy").tolist() == [1.0, 2.0]


HALF_BITS = {"1.5": (0x3E00, 0x3FC0), "-2": (0xC000, 0xC000), "0.1": (0x2E66, 0x3DCD)}  # f16, bf16 bits

DTYPE_PROGRAM = r"""
#include <stdint.h>
#include "tracer_dump.h"
int main(int argc, char **argv) {
    const char *d = argc > 1 ? argv[1] : "dump";
    float f[8] = {1.5f, -2.0f, 0.1f, 1e-30f, 3.0e38f, -0.0f, NAN, -INFINITY};
    double g[6] = {1.5, -2.0, 0.1, 1e-300, 1e300, -0.0};
    uint16_t h[3] = {0x3E00, 0xC000, 0x2E66}, b[3] = {0x3FC0, 0xC000, 0x3DCD};
    long long s23[2] = {2, 3}, s3[1] = {3}, s4[4] = {1, 2, 1, 3};
    int rc = tracer_dump(d, "a.f32", f, "f32", 2, s23) | tracer_dump(d, "a.f64", g, "f64", 2, s23)
           | tracer_dump(d, "a.f16", h, "f16", 1, s3) | tracer_dump(d, "a.bf16", b, "bf16", 1, s3)
           | tracer_dump(d, "a.scalar", f, "f32", 0, s3)
           | tracer_dump_layout(d, "blocks.0.attn.q", f, "f32", 4, s4, "BTHD");
    if (rc) return 10;
    if (tracer_dump(d, "x", f, "i32", 1, s3) == 0 || tracer_dump(d, "a/b", f, "f32", 1, s3) == 0) return 11;
    return tracer_log_first8(stdout, "AFTER_LN1", 0, 3, f) | tracer_log_values(stdout, "LOGITS", -1, 0, f, 2);
}
"""


def test_header_writes_every_dtype_exactly(tmp_path):
    if CC is None:
        pytest.skip("no C compiler")
    src = tmp_path / "dtypes.c"
    src.write_text(DTYPE_PROGRAM)
    binary = compile_c(src, tmp_path / "dtypes")
    dump = tmp_path / "dump"
    proc = subprocess.run([str(binary), str(dump)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tracer_dump:") == 2  # one line per rejected call: unknown dtype, bad stage name
    f32 = np.array([1.5, -2.0, 0.1, 1e-30, 3.0e38, -0.0], dtype=np.float32)
    a = np.load(dump / "a.f32.npy", allow_pickle=False)
    assert a.dtype == np.dtype("<f4") and a.shape == (2, 3) and np.array_equal(a.reshape(-1), f32)
    assert np.signbit(a.reshape(-1)[5])
    d = np.load(dump / "a.f64.npy")
    assert d.dtype == np.dtype("<f8") and d.reshape(-1).tolist() == [1.5, -2.0, 0.1, 1e-300, 1e300, -0.0]
    h = np.load(dump / "a.f16.npy")
    assert h.dtype == np.dtype("<f2") and h.tolist() == [1.5, -2.0, float(np.float16(0.1))]
    b = np.load(dump / "a.bf16.npy")  # bf16 widened exactly: the top 16 bits of each float32
    assert b.dtype == np.dtype("<f4") and (b.view(np.uint32) >> 16).tolist() == [0x3FC0, 0xC000, 0x3DCD]
    assert np.load(dump / "a.scalar.npy").shape == ()
    for name in ("a.f32", "a.scalar", "blocks.0.attn.q"):  # data starts 64-byte aligned, as NumPy writes it
        raw = (dump / f"{name}.npy").read_bytes()
        assert (10 + int.from_bytes(raw[8:10], "little")) % 64 == 0
    manifest = [json.loads(x) for x in (dump / "tracer_manifest.jsonl").read_text().splitlines()]
    assert [m["dtype"] for m in manifest] == ["f32", "f64", "f16", "bf16", "f32", "f32"]
    assert manifest[5] == {"stage": "blocks.0.attn.q", "file": "blocks.0.attn.q.npy", "dtype": "f32",
                           "shape": [1, 2, 1, 3], "layout": "BTHD"}
    assert not list(dump.glob("*.tmp")) and not (dump / "x.npy").exists()
    assert proc.stdout.splitlines() == ["[AFTER_LN1] Layer 0, Token 3: [1.5, -2, 0.1, 1e-30, 3e+38, -0, nan, -inf]",
                                        "[LOGITS] Token 0: [1.5, -2]"]


# -- Rust ---------------------------------------------------------------------------------------
def test_rust_port_passes_and_localizes_its_bug(rust_port, export_dir, tmp_path):
    check_port(rust_port, export_dir, tmp_path, "blocks.0.attn.scores")


def test_rust_prints_what_c_prints_for_the_same_floats(rust_port, export_dir, tmp_path):
    """fmt_g7 is C's %.7g: the Rust port's lines equal Python's (= C's) formatting of its dumped values."""
    dump = tmp_path / "dump"
    log = run_port(rust_port, export_dir, dump)
    for stage, tag, layer, token in (("embed.sum", "AFTER_EMBED", None, 0), ("blocks.0.ln1", "AFTER_LN1", 0, 11),
                                     ("blocks.1.resid_post", "AFTER_RESIDUAL2", 1, 0), ("logits", "LOGITS", None, 11)):
        assert printed(log, tag, layer, token) == expected_line(dump, stage, tag, layer, token)
