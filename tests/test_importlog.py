"""`tracer import-log`: debug-print lines turned into partial traces (SPEC §4)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from test_foreign import golden_stages, record_tiny_golden
from tracer.errors import TracerError
from tracer.importlog import import_log, import_log_command, load_tag_map, normalize_tag
from tracer.store import Golden, Trace

PROMPT = "Seed logs!"  # T = 10
FIRST = 8  # values per line, as a port's debug prints show them


def token_slice(array: np.ndarray, b: int, t: int, head: int = 0) -> np.ndarray:
    """The values a C-style port prints for token t: its row, or for [B,H,T,X] its [H,X] slice flattened."""
    if array.ndim == 3:
        return array[min(b, array.shape[0] - 1), t].copy()
    return array[b, :, t, :].reshape(-1)[head * array.shape[3]:].copy()


def put(expected: np.ndarray, b: int, t: int, values: np.ndarray, head: int = 0) -> None:
    """Write `values` where `token_slice` reads them (on a copy, then back), for the expected trace."""
    if expected.ndim == 3:
        expected[min(b, expected.shape[0] - 1), t, : values.size] = values
        return
    flat = expected[b, :, t, :].reshape(-1)
    start = head * expected.shape[3]
    flat[start:start + values.size] = values
    expected[b, :, t, :] = flat.reshape(expected.shape[1], expected.shape[3])


def line(tag: str, values: np.ndarray, token: int, layer: int | None = None, extra: str = "") -> str:
    where = (f"Layer {layer}, " if layer is not None else "") + extra + f"Token {token}"
    return f"[{tag}] {where}: [{', '.join(f'{v:.9g}' for v in values)}]"


@pytest.fixture(scope="module")
def golden(tmp_path_factory, tiny_loaded) -> Path:
    return record_tiny_golden(tiny_loaded, tmp_path_factory.mktemp("importlog") / "one.h5", [PROMPT])


@pytest.fixture(scope="module")
def stages(golden) -> dict[str, np.ndarray]:
    return golden_stages(golden)


def read_trace(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, dict]]:
    """(stages, present masks, stage dataset attrs) of a one-case trace."""
    with Trace.open(path) as t:
        view = t.case(t.case_names()[0])
        data = {s: view.read(s) for s in view.stages()}
        present = {s: view.read(s, "present") for s in view.stages("present")}
        attrs = {s: dict(view.dataset(s).attrs) for s in data}
    return data, present, attrs


def test_log_becomes_a_partial_trace_with_present_mask(tmp_path, golden, stages) -> None:
    plan = [("AFTER_LN1", "ln1"), ("AFTER_Q", "attn.q"), ("AFTER_ATTN", "attn.probs"), ("AFTER_GELU", "mlp.act"),
            ("residual 2", "resid_post")]  # the last one is a seed label of tracer.stages
    bad = ("blocks.1.mlp.act", 2, 3)  # the port's bug: one value of one token
    expected = {s: np.full(a.shape, np.nan, np.float32) for s, a in stages.items()}
    lines = ["loading weights from port.bin", "[INFO] model ready, 2 layers"]
    for t in (0, 2):
        v = token_slice(stages["embed.sum"], 0, t)[:FIRST]
        lines.append(line("AFTER_EMBED", v, t, layer=0))  # "Layer" means nothing outside the blocks
        put(expected["embed.sum"], 0, t, v)
        for i in (0, 1):
            for tag, local in plan:
                stage = f"blocks.{i}.{local}"
                v = token_slice(stages[stage], 0, t)[:FIRST]
                if (stage, t) == bad[:2]:
                    v[bad[2]] += np.float32(0.25)
                lines.append(line(tag, v, t, layer=i))
                put(expected[stage], 0, t, v)
    v = token_slice(stages["logits"], 0, 9)[:FIRST]
    lines += [line("LOGITS", v, 9), "done."]
    put(expected["logits"], 0, 9, v)
    log = tmp_path / "port.log"
    log.write_text("\n".join(lines) + "\n")

    warned: list[str] = []
    with Golden.open(golden) as g:
        summary = import_log(log, g, tmp_path / "t.h5", warn=warned.append)
    data, present, attrs = read_trace(tmp_path / "t.h5")
    imported = [s for s in stages if not np.isnan(expected[s]).all()]
    assert list(data) == imported == list(summary.values) == list(present)
    for s in imported:
        mask = ~np.isnan(expected[s])
        assert np.array_equal(present[s], mask), s
        assert np.array_equal(data[s], expected[s], equal_nan=True), s
        assert np.array_equal(data[s][mask], np.where(mask, stages[s], 0)[mask]) == (s != bad[0]), s
        assert attrs[s]["partial"] == 1 and summary.values[s] == mask.sum()
    assert data[bad[0]][0, bad[1], bad[2]] - stages[bad[0]][0, bad[1], bad[2]] == np.float32(0.25)
    assert summary.tokens == [0, 2, 9] and summary.unknown_tags == {} and warned == []
    with Golden.open(golden) as g, Trace.open(tmp_path / "t.h5") as t:
        assert t.golden_id == g.golden_id and t.attrs["backend"] == "log:port.log"


def test_attention_values_follow_the_head_convention(tmp_path, golden, stages) -> None:
    q, probs = stages["blocks.0.attn.q"], stages["blocks.0.attn.probs"]
    D, T = q.shape[3], probs.shape[3]
    lines = [line("AFTER_Q", token_slice(q, 0, 4, head=2)[:FIRST], 4, layer=0, extra="Head 2, "),
             line("AFTER_ATTENTION", token_slice(probs, 0, 5)[: T + 3], 5, layer=0)]  # runs into head 1's row
    (tmp_path / "a.log").write_text("\n".join(lines))
    with Golden.open(golden) as g:
        import_log(tmp_path / "a.log", g, tmp_path / "t.h5")
    data, present, _ = read_trace(tmp_path / "t.h5")
    assert np.array_equal(data["blocks.0.attn.q"][0, 2, 4, :FIRST], q[0, 2, 4, :FIRST])
    assert present["blocks.0.attn.q"].sum() == FIRST and D >= FIRST
    assert np.array_equal(data["blocks.0.attn.probs"][0, 0, 5], probs[0, 0, 5])
    assert np.array_equal(data["blocks.0.attn.probs"][0, 1, 5, :3], probs[0, 1, 5, :3])
    assert present["blocks.0.attn.probs"].sum() == T + 3


def test_batch_rows_nan_inf_and_print_precision(tmp_path, tiny_golden) -> None:
    (tmp_path / "b.log").write_text(
        "[AFTER_LN1] Batch 1, Layer 0, Token 1: [0.1234, nan, -inf, 1.5e-3, -2.000E+1, ...]\n"
        "  [after-ln1] layer 1 token 0: 0.5 0.25\n")  # indented, other spelling, no brackets or commas
    with Golden.open(tiny_golden) as g:
        summary = import_log(tmp_path / "b.log", g, tmp_path / "t.h5", case="batch")
    data, present, attrs = read_trace(tmp_path / "t.h5")
    got = data["blocks.0.ln1"][1, 1, :5]
    assert got[0] == np.float32(0.1234) and np.isnan(got[1]) and got[2] == -np.inf and got[4] == -20.0
    assert present["blocks.0.ln1"][1, 1, :5].all() and present["blocks.0.ln1"].sum() == 5
    assert np.isnan(data["blocks.0.ln1"][0]).all()
    assert attrs["blocks.0.ln1"]["print_atol"] == pytest.approx(5e-3)  # -2.000E+1: the coarsest print
    assert attrs["blocks.1.ln1"]["print_atol"] == pytest.approx(0.05)  # "0.5": one decimal
    assert summary.case == "batch" and summary.values == {"blocks.0.ln1": 5, "blocks.1.ln1": 2}


@pytest.mark.parametrize("bad_line, message", [
    ("[AFTER_LN1] Layer 0, Token 0: [0.1, abc]", "'abc' is not a number"),
    ("[AFTER_LN1] Layer 0, Tokn 0: [0.1]", "cannot parse location"),
    ("[AFTER_LN1] Layer 0, Token 0", "cannot parse values"),
    ("[AFTER_LN1] Layer 0, Token 0: []", "the list is empty"),
    ("[AFTER_LN1] Token 0: [0.1]", "needs 'Layer N'"),
    ("[AFTER_LN1] Layer 7, Token 0: [0.1]", "layer 7 out of range"),
    ("[AFTER_LN1] Layer 0, Token 99: [0.1]", "token 99 out of range"),
    ("[AFTER_LN1] Layer 0, Head 1, Token 0: [0.1]", "only meaningful for attention"),
    ("[LOGITS] Token 0: [" + ", ".join(["1"] * 300) + "]", "300 values"),
])
def test_malformed_line_names_its_line_number(tmp_path, golden, bad_line, message) -> None:
    log = tmp_path / "port.log"
    log.write_text(f"starting\n[AFTER_LN1] Layer 0, Token 1: [0.5]\n{bad_line}\n")
    with Golden.open(golden) as g, pytest.raises(TracerError, match=message) as exc:
        import_log(log, g, tmp_path / "t.h5")
    assert str(exc.value).startswith(f"{log}:3: ")
    assert sorted(os.listdir(tmp_path)) == ["port.log"]


def test_unknown_tags_are_reported_and_only_fatal_when_nothing_maps(tmp_path, golden) -> None:
    log = tmp_path / "u.log"
    log.write_text("[AFTER_MYSTERY] Layer 0, Token 0: [1.0]\n[AFTER_MYSTERY] Layer 1, Token 0: [1.0]\n"
                   "[AFTER_LN2] Layer 0, Token 0: [1.0]\n")
    warned: list[str] = []
    with Golden.open(golden) as g:
        summary = import_log(log, g, tmp_path / "t.h5", warn=warned.append)
    assert summary.unknown_tags == {"AFTER_MYSTERY": 2} and list(summary.values) == ["blocks.0.ln2"]
    assert len(warned) == 1 and "AFTER_MYSTERY" in warned[0]
    log.write_text("[AFTER_MYSTERY] Layer 0, Token 0: [1.0]\n")
    with Golden.open(golden) as g, pytest.raises(TracerError, match="no tag .* maps to a stage.*AFTER_MYSTERY"):
        import_log(log, g, tmp_path / "t2.h5")
    log.write_text("nothing to see\n")
    with Golden.open(golden) as g, pytest.raises(TracerError, match="no debug-print lines"):
        import_log(log, g, tmp_path / "t2.h5")


def test_user_tag_map_is_merged_over_the_shipped_tags(tmp_path, golden, stages) -> None:
    (tmp_path / "tags.toml").write_text('[tags]\n"my ln two" = "ln2"\nAFTER_LN1 = ""\n')
    tags = load_tag_map(tmp_path / "tags.toml")
    assert tags[normalize_tag("My_LN-two")] == "ln2" and tags["AFTER_LN1"] == "" and tags["LOGITS"] == "logits"
    v = token_slice(stages["blocks.1.ln2"], 0, 3)[:FIRST]
    (tmp_path / "m.log").write_text(line("MY_LN_TWO", v, 3, layer=1) + "\n[AFTER_LN1] Layer 0, Token 0: [1]\n")
    with Golden.open(golden) as g:
        summary = import_log(tmp_path / "m.log", g, tmp_path / "t.h5", tag_map=tmp_path / "tags.toml")
    assert summary.values == {"blocks.1.ln2": FIRST}
    (tmp_path / "bad.toml").write_text('[tags]\nX = "attn.qq"\n')
    with pytest.raises(TracerError, match="not a stage name"):
        load_tag_map(tmp_path / "bad.toml")


def test_import_log_command_prints_a_summary(tmp_path, golden, capsys) -> None:
    (tmp_path / "p.log").write_text("[FINAL_LN] Token 1: [0.5, 0.25]\n")
    import_log_command(tmp_path / "p.log", golden, None, None, tmp_path / "t.h5", False, False)
    assert "imported 2 values of 1 stage(s) at token(s) 1" in capsys.readouterr().out
    with pytest.raises(TracerError, match="already exists"):
        import_log_command(tmp_path / "p.log", golden, None, None, tmp_path / "t.h5", False, True)
