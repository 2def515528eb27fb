"""`tracer diff`: the interactive viewer (textual pilot), its lazy data layer and the static fallback.

Navigation and numbers are checked on real comparisons of the tiny golden against NumPy
replays with injected bugs. Screen snapshots use a hand-made golden/trace pair and result
instead, whose every number is exact in float32: replayed numbers carry platform-dependent
rounding noise that would show in the error bars and the last digits on screen.

Regenerate the SVGs under tests/snapshots/ with `TRACER_UPDATE_SNAPSHOTS=1 pytest tests/test_tui.py`.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import shutil
import sys
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

pytest.importorskip("textual")

from backends.inject import CATALOG  # noqa: E402
from backends.registry import resolve_backend  # noqa: E402
from tracer.compare.localize import first8_tables  # noqa: E402
from tracer.compare.metrics import ChainedPass, valid_mask  # noqa: E402
from tracer.compare.result import CaseResult, CompareResult, Diagnosis, StageResult  # noqa: E402
from tracer.compare.run import CompareRequest, run_compare  # noqa: E402
from tracer.errors import TracerError  # noqa: E402
from tracer.replay import replay  # noqa: E402
from tracer.stages import canonical_stages, layout_of, split_stage  # noqa: E402
from tracer.store import Golden, StageFile, StageWriter  # noqa: E402
from tracer.tui import command  # noqa: E402
from tracer.tui.app import DiffApp, HeatMap  # noqa: E402
from tracer.tui.data import StageData  # noqa: E402
from tracer.tui.heatmap import CELL, MASKED  # noqa: E402

SNAPSHOTS = Path(__file__).parent / "snapshots"
MADE_WITH = SNAPSHOTS / "textual-version.txt"  # SVG output is textual's: other versions draw differently
UPDATE = os.environ.get("TRACER_UPDATE_SNAPSHOTS") == "1"
SCORES = "blocks.0.attn.scores"


# -- real comparisons ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bug_run(tiny_golden, tmp_path_factory):
    """`bug_run(inject)` -> (result, trace path) of a NumPy replay of the tiny golden with that bug."""
    runs = {}

    def get(inject: str | None):
        if inject not in runs:
            out = tmp_path_factory.mktemp("tui") / f"{inject or 'clean'}.h5"
            replay(tiny_golden, resolve_backend("numpy", "fp32", inject), out, "both")
            runs[inject] = (run_compare(CompareRequest(tiny_golden, out, quiet=True)), out)
        return runs[inject]

    return get


def shown(widget) -> str:
    """The plain text a Static shows."""
    console = Console(file=io.StringIO(), width=200)
    console.print(widget.content)
    return console.file.getvalue()


def pilot_run(result: CompareResult, golden: Path, trace: Path, check, size=(80, 24), case: str | None = None):
    """Open the viewer headless on `result` and run `async check(app, pilot)` inside it."""

    async def main():
        with Golden.open(golden) as g, StageFile.open(trace) as t:
            chosen = command.pick_case(result, case)
            app = DiffApp(result, StageData(g, t, chosen.case), chosen)
            async with app.run_test(size=size) as pilot:
                await pilot.pause()
                await check(app, pilot)
            return app

    return asyncio.run(main())


@pytest.mark.parametrize("inject", ["mask-off-by-one", "qk-swapped"])
def test_opens_on_the_origin(bug_run, tiny_golden, inject):
    result, trace = bug_run(inject)
    assert result.origin["stage"] == CATALOG[inject].origin

    async def check(app, pilot):
        assert app.stage == CATALOG[inject].origin
        assert app.query_one("#stages").highlighted_option.id == CATALOG[inject].origin
        assert CATALOG[inject].origin in shown(app.query_one("#info"))

    pilot_run(result, tiny_golden, trace, check)


def test_keys_move_between_stages_as_documented(bug_run, tiny_golden):
    result, trace = bug_run("mask-off-by-one")
    case = command.pick_case(result, None)
    names = [s.stage for s in sorted(case.stages, key=lambda s: s.order)]
    failing = [s.stage for s in sorted(case.stages, key=lambda s: s.order) if s.failed]
    at = failing.index(case.origin)

    async def check(app, pilot):
        await pilot.press("n")
        assert app.stage == failing[at + 1]
        await pilot.press("n", "n")
        assert app.stage == failing[at + 3]
        await pilot.press("p")
        assert app.stage == failing[at + 2]
        await pilot.press("o")
        assert app.stage == case.origin
        await pilot.press("j")
        assert app.stage == names[names.index(case.origin) + 1]
        await pilot.press("k", "k")
        assert app.stage == names[names.index(case.origin) - 1]
        await pilot.press("f")
        assert app.stage == case.first_divergence
        for _ in range(at + 1):  # past the first failing stage there is nothing earlier: it stays put
            await pilot.press("p")
        assert app.stage == failing[0]
        await pilot.press("home", "down")  # the block headers are not stages: the cursor skips them
        assert app.stage == names[1]
        await pilot.press("slash", *"mlp.fc", "enter")
        assert app.stage == "blocks.0.mlp.fc"
        await pilot.press("slash", *"1.attn.pr", "escape")
        assert app.stage == "blocks.0.mlp.fc"  # Esc goes back to where the search started

    pilot_run(result, tiny_golden, trace, check)


def test_f_and_o_go_to_their_own_stages(bug_run, tiny_golden):
    """With a first divergence ahead of the origin (an inherited failure), f and o part ways."""
    result, trace = bug_run("mask-off-by-one")
    case = command.pick_case(result, None)
    earlier = "blocks.0.attn.k"
    moved = replace(case, first_divergence=earlier)
    result = replace(result, cases=[moved])

    async def check(app, pilot):
        assert app.stage == case.origin  # the origin wins over the first divergence
        await pilot.press("f")
        assert app.stage == earlier
        await pilot.press("o")
        assert app.stage == case.origin

    pilot_run(result, tiny_golden, trace, check)


def test_heat_map_cells_are_the_files_values(bug_run, tiny_golden):
    """no-attn-scale: every unmasked score is √D times the golden one; masked ones are masked on both sides."""
    result, trace = bug_run("no-attn-scale")
    with Golden.open(tiny_golden) as g:
        cfg = g.model_config
    sqrt_d = math.sqrt(cfg["n_embd"] / cfg["n_head"])

    async def check(app, pilot):
        assert app.stage == SCORES
        first, n_heads = app.piece.head, app.piece.n_heads
        for head in [(first + k) % n_heads for k in range(3)]:
            await pilot.pause()
            heatmap = app.query_one(HeatMap)
            w, piece = heatmap.window, app.piece
            assert piece.head == head and w.width > 1 and w.t1 - w.t0 > 1
            with h5py.File(tiny_golden) as fg, h5py.File(trace) as ft:
                gold = fg[f"cases/{app.data.case}/stages/{SCORES}"][0, head, w.t0:w.t1, w.c0:w.c1]
                cand = ft[f"cases/{app.data.case}/stages/{SCORES}"][0, head, w.t0:w.t1, w.c0:w.c1]
            shown_g, shown_c = piece.golden[w.t0:w.t1, w.c0:w.c1], piece.candidate[w.t0:w.t1, w.c0:w.c1]
            np.testing.assert_array_equal(shown_g, gold)
            np.testing.assert_array_equal(shown_c, cand)
            live = np.isfinite(gold)
            assert live.any() and (~live).any()
            np.testing.assert_allclose(shown_c[live] / shown_g[live], sqrt_d, rtol=1e-4)
            np.testing.assert_allclose(piece.errors("abs")[w.t0:w.t1, w.c0:w.c1][live],
                                       np.abs(cand[live].astype(np.float64) - gold[live]))
            # the drawn grid: a masked marker exactly where both sides are -inf, a coloured cell elsewhere
            lines = ["".join(seg.text for seg in line) for line in heatmap.lines()][2:2 + w.t1 - w.t0]
            label = len(str(piece.shape[0] - 1)) + 1
            grid = np.array([list(line[label:label + w.width]) for line in lines])
            expect = np.where(live, CELL, MASKED)
            token, column = app.cursor.token, app.cursor.column("BHTT")[0]
            expect[token - w.t0, column - w.c0] = grid[token - w.t0, column - w.c0]  # the cursor's own mark
            np.testing.assert_array_equal(grid, expect)
            await pilot.press("plus")

    pilot_run(result, tiny_golden, trace, check)


def test_cursor_moves_and_reads_only_the_slices_it_shows(bug_run, tiny_golden, monkeypatch):
    """Every stage read is one batch row (and one head): never a whole dataset; neighbours are cached."""
    result, trace = bug_run("mask-off-by-one")
    reads: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def spy(self, index):
        if "/stages/" in (self.name or ""):
            reads.append((self.name.rsplit("/", 1)[-1], index))
        return original(self, index)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)

    async def check(app, pilot):
        n_tokens, c, head = app.piece.shape[0], app.cursor.column("BHTT")[0], app.piece.head
        await pilot.press(*["left"] * (n_tokens + 1))
        assert app.cursor.token == 0  # clamped at the first token
        await pilot.press("right", "l", "l", "full_stop", "plus", "b", "m")
        assert (app.cursor.token, app.cursor.column("BHTT")[0]) == (3, c + 1)
        assert app.piece.head == (head + 1) % app.piece.n_heads
        assert app.cursor.metric == "abs"
        await pilot.press("h")
        assert app.cursor.token == 2
        g, cand = app.piece.cell(2, c + 1)
        cell = shown(app.query_one("#cell"))
        assert f"golden {g:.7g}  cand. {cand:.7g}" in cell
        before = app.data.reads
        await pilot.press("n", "p")  # back to a slice in the LRU: no new read
        assert app.data.reads == before + 1
        assert app.piece.shape == (app.piece.golden.shape[0],) * 2
        await pilot.press("w")  # the worst cell: a key the candidate forgot to mask (infinite error)
        errors = app.piece.errors(app.cursor.metric)
        assert errors[app.cursor.token, app.cursor.column("BHTT")[0]] == np.nanmax(errors) == np.inf

    pilot_run(result, tiny_golden, trace, check)
    assert reads, "the spy saw no reads"
    for name, index in reads:  # one batch row (and head): never () or ... (the whole dataset)
        assert isinstance(index, tuple) and 1 <= len(index) <= 2 and all(isinstance(i, int) for i in index), \
            (name, index)


def test_wide_stages_are_read_a_block_of_columns_at_a_time(bug_run, tiny_golden, monkeypatch):
    """The logits (50257 wide in gpt2) are read in blocks: here blocks of 100 of the tiny model's 256."""
    from tracer.tui import data as data_module

    monkeypatch.setattr(data_module, "COLUMN_BLOCK", 100)
    result, trace = bug_run("mask-off-by-one")
    with h5py.File(tiny_golden) as fg, h5py.File(trace) as ft:
        gold, cand = (f["cases/case0/stages/logits"][0] for f in (fg, ft))

    async def check(app, pilot):
        await pilot.press("slash", *"logits", "enter")
        seen = []
        for _ in range(8):  # page right through all 256 columns
            await pilot.pause()
            w, piece = app.query_one(HeatMap).window, app.piece
            assert piece.x0 <= w.c0 < w.c1 <= piece.x0 + piece.shape[1] <= 256 and piece.shape[1] <= 100
            np.testing.assert_array_equal(piece.golden, gold[:, piece.x0:piece.x0 + piece.shape[1]])
            np.testing.assert_array_equal(piece.candidate, cand[:, piece.x0:piece.x0 + piece.shape[1]])
            column = app.cursor.column("BTC")[0]
            assert piece.cell(app.cursor.token, column) == (gold[app.cursor.token, column],
                                                            cand[app.cursor.token, column])
            seen.append((w.c0, w.c1))
            await pilot.press("right_square_bracket")
        assert seen[0][0] == 0 and seen[-1][1] == 256  # every block visited, to the last column
        assert {c0 // 100 for c0, _ in seen} == {0, 1, 2}
        table = app.data.get("logits", 0, 0, 0).first8(app.cursor.token, 1.0)  # always the first 8 columns
        np.testing.assert_array_equal(table.golden, gold[app.cursor.token, :8])

    pilot_run(result, tiny_golden, trace, check, size=(80, 24))


def test_y_keeps_seed_lines_of_the_current_row(bug_run, tiny_golden):
    result, trace = bug_run("mask-off-by-one")

    async def check(app, pilot):
        await pilot.press("plus", "y")

    app = pilot_run(result, tiny_golden, trace, check)
    head, token = app.piece.head, app.cursor.token
    assert len(app.yanked) == 2
    with h5py.File(tiny_golden) as fg, h5py.File(trace) as ft:
        rows = [f[f"cases/{app.data.case}/stages/{SCORES}"][0, head, token, :8] for f in (fg, ft)]
    for line, row in zip(app.yanked, rows):
        prefix = f"[AFTER_SCORES] Layer 0, Head {head}, Token {token}: ["
        assert line.startswith(prefix) and line.endswith("]")
        values = [float(v) for v in line[len(prefix):-1].split(", ")]
        np.testing.assert_allclose(values, row.astype(np.float64), rtol=1e-6)
    assert app.yanked[0] != app.yanked[1]  # the off-by-one key is unmasked on the candidate side only


def test_a_passing_run_opens_on_the_first_stage_and_has_nowhere_to_jump(bug_run, tiny_golden):
    result, trace = bug_run(None)
    assert result.passed

    async def check(app, pilot):
        first = app.stages[0].stage
        assert app.stage == first
        await pilot.press("n", "o", "f")
        assert app.stage == first

    pilot_run(result, tiny_golden, trace, check)


def test_a_stage_missing_from_the_trace_shows_golden_only(bug_run, tiny_golden, tmp_path):
    result, trace = bug_run("mask-off-by-one")
    partial = tmp_path / "partial.h5"
    shutil.copyfile(trace, partial)
    with h5py.File(partial, "a") as f:
        del f["cases/case0/stages/blocks.0.mlp.fc"]

    async def check(app, pilot):
        await pilot.press("slash", *"0.mlp.fc", "enter")
        assert app.stage == "blocks.0.mlp.fc" and app.piece.candidate is None
        text = ["".join(seg.text for seg in line) for line in app.query_one(HeatMap).lines()]
        assert text == ["no heat map: missing in the trace"]
        cell = shown(app.query_one("#cell"))
        assert "golden" in cell and "cand." not in cell
        await pilot.press("l", "full_stop", "right_square_bracket", "w", "m", "y", "j")  # nothing to do, no crash
        assert app.stage == "blocks.0.mlp.act" and not app.yanked

    pilot_run(result, tiny_golden, partial, check)


# -- diff_command: static report, missing textual, kept trace ---------------------------------------

def test_no_tui_prints_the_static_report(tiny_golden, bug_run):
    out = io.StringIO()
    code = command.diff_command(tiny_golden, None, "numpy", "mask-off-by-one", None, True,
                                Console(file=out, width=80))
    assert code == 1
    text = " ".join(out.getvalue().split())  # the report wraps at 80 columns
    assert "first divergence and origin blocks.0.attn.scores" in text
    assert "divergence · case" in text
    _, clean = bug_run(None)
    out = io.StringIO()  # not a terminal: the static report too, without --no-tui
    assert command.diff_command(tiny_golden, clean, None, None, None, False, Console(file=out, width=80)) == 0
    assert "PASS" in out.getvalue()


def test_without_textual_it_says_so_before_any_work(tiny_golden, monkeypatch):
    monkeypatch.setitem(sys.modules, "textual", None)
    monkeypatch.setattr(command, "run_compare", lambda *a, **k: pytest.fail("compared before checking textual"))
    with pytest.raises(TracerError) as err:
        command.diff_command(tiny_golden, None, "numpy", None, None, False, Console(file=io.StringIO(),
                                                                                     force_terminal=True))
    assert str(err.value) == command.INSTALL_HINT and "\n" not in str(err.value)


def test_interactive_path_keeps_the_replay_until_the_viewer_closes(tiny_golden, monkeypatch):
    seen = {}

    def fake_run(app):
        path = Path(app.data.t.file.path)
        seen["path"] = path
        seen["slice"] = app.data.get(app.stage).candidate.shape
        app.yanked = ["[AFTER_SCORES] Layer 0, Token 1: [1, 2]"]

    monkeypatch.setattr(DiffApp, "run", fake_run)
    out = io.StringIO()
    code = command.diff_command(tiny_golden, None, "numpy", "qk-swapped", None, False,
                                Console(file=out, force_terminal=True, width=80))
    assert code == 1
    assert seen["slice"][0] > 1
    assert out.getvalue().strip() == "[AFTER_SCORES] Layer 0, Token 1: [1, 2]"
    assert not seen["path"].exists()  # the temporary replay is gone once the viewer is closed
    with pytest.raises(TracerError):
        command.diff_command(tiny_golden, None, None, None, None, False, Console(file=out, force_terminal=True))


# -- snapshots ------------------------------------------------------------------------------------

CONFIG = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16, "vocab_size": 32,
          "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
T = 12


def _exact_values(stage: str, shape: tuple[int, ...], k: int) -> np.ndarray:
    """Multiples of 1/8 (attention: causal rows of 1/(t+1) and masked scores): exact, the same everywhere."""
    local = split_stage(stage)[1]
    n = int(np.prod(shape))
    x = (((np.arange(n) * (2 * k + 3)) % 23) - 11).astype(np.float32).reshape(shape) / 8
    if local in ("attn.scores", "attn.probs"):
        causal = np.tril(np.ones((T, T), dtype=bool))
        rows = (1 / np.arange(1, T + 1, dtype=np.float32))[:, None]
        inside = x if local == "attn.scores" else np.broadcast_to(rows, shape)
        x = np.where(causal, inside, -np.inf if local == "attn.scores" else 0.0).astype(np.float32)
    return x


def _shape(stage: str) -> tuple[int, ...]:
    C, H = CONFIG["n_embd"], CONFIG["n_head"]
    local = split_stage(stage)[1]
    width = {"attn.qkv": 3 * C, "mlp.fc": 4 * C, "mlp.act": 4 * C, "logits": CONFIG["vocab_size"]}.get(local, C)
    return {"BTC": (1, T, width), "BHTD": (1, H, T, C // H), "BHTT": (1, H, T, T)}[layout_of(stage)]


@pytest.fixture(scope="module")
def exact_pair(tmp_path_factory):
    """A golden, a trace with unscaled scores (×√D = ×4, exact) and values nudged by k/64 after them,
    and the result a comparison of them reads as (one bug, inherited failures downstream)."""
    root = tmp_path_factory.mktemp("exact")
    golden, trace = root / "golden.h5", root / "trace.h5"
    ids, mask = (np.arange(T, dtype=np.int64) * 5 % 32)[None], np.ones((1, T), dtype=np.int8)
    names = canonical_stages(CONFIG["n_layer"])
    after = names.index(SCORES)
    stages = []
    with StageWriter(golden, "golden", {"model_config": CONFIG, "dtype": "fp32"}) as gw, \
            StageWriter(trace, "trace", {"model_config": CONFIG, "dtype": "fp32", "backend": "numpy"}) as tw:
        for w in (gw, tw):
            w.begin_case("case0", ids, mask)
        for k, name in enumerate(names):
            g = _exact_values(name, _shape(name), k)
            c = g.copy()
            if name == SCORES:
                c = np.where(np.isfinite(g), g * 4, g).astype(np.float32)
            elif k > after:
                nudge = ((np.arange(g.size) % 5) - 2).reshape(g.shape).astype(np.float32) / 64
                c = np.where(g != 0, g + nudge, g).astype(np.float32) if split_stage(name)[1] == "attn.probs" \
                    else g + nudge
            gw.write_stage("case0", name, g, k)
            tw.write_stage("case0", name, c, k)
            stages.append(_exact_result(name, k, g, c, mask, after))
    case = CaseResult("case0", stages, first_divergence=SCORES, origin=SCORES,
                      origin_reasoning=f"{SCORES} introduces error; every earlier stage's is within its tolerance")
    result = CompareResult(golden=str(golden), trace=str(trace), golden_meta={"dtype": "fp32"},
                           trace_meta={"dtype": "fp32", "backend": "numpy"}, tolerance="fp32 preset",
                           cases=[case], first_divergence={"case": "case0", "stage": SCORES},
                           origin={"case": "case0", "stage": SCORES})
    return result, golden, trace


def _exact_result(name: str, k: int, g: np.ndarray, c: np.ndarray, mask: np.ndarray, after: int) -> StageResult:
    layout = layout_of(name)
    valid = valid_mask(layout, g.shape, mask, np.isfinite(g) if layout == "BHTT" else None)
    chained = ChainedPass(np.where(valid, c, 0.0), np.where(valid, g, 0.0), valid)
    error, per_row, golden_sq = chained.error, chained.per_row, chained.golden_sq
    tol = 1e-5
    s = StageResult(name, k, "fail" if error > tol else "pass", list(g.shape), list(c.shape), "float32",
                    error=error, tolerance=tol, local_error=error if name == SCORES else 0.0, local_tolerance=tol,
                    fails_chained=error > tol, fails_local=name == SCORES, min_passing_tolerance=error)
    if name == SCORES:
        s.where = "every token; all heads"
        s.diagnoses = [Diagnosis("scores.no-scale", "missing 1/√D scaling", "confirmed", error, 0.0,
                                 "re-applying 'missing 1/√D scaling' reproduces the candidate: error → 0")]
    s.tables = first8_tables(name, g, c, valid, per_row, tol, float(np.sqrt(golden_sq / valid.sum())), None)
    return s


SCREENS = {  # name -> (size, keys pressed after opening)
    "origin": ((80, 24), ()),
    "origin_wide": ((120, 40), ()),
    "probs_head1": ((80, 24), ("n", "l", "l", "full_stop", "plus")),
    "mlp_fc_log": ((80, 24), ("slash", *"mlp.fc", "enter", "m", "m", "right_square_bracket")),
    "help": ((80, 24), ("question_mark",)),
}


@pytest.mark.parametrize("screen", sorted(SCREENS))
def test_snapshot(exact_pair, screen):
    result, golden, trace = exact_pair
    size, keys = SCREENS[screen]
    shots = []

    async def check(app, pilot):
        for key in keys:
            await pilot.press(key)
        await pilot.pause()
        shots.append(app.export_screenshot(title="tracer diff"))
        shots.append(app.export_screenshot(title="tracer diff"))

    pilot_run(result, golden, trace, check, size=size)
    assert shots[0] == shots[1]
    assert "golden.h5" in shots[0] and str(golden.parent) not in shots[0]  # file names only: no temp dirs
    path = SNAPSHOTS / f"{screen}.svg"
    textual = version("textual")
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(shots[0], encoding="utf-8")
        MADE_WITH.write_text(textual + "\n", encoding="utf-8")
    made_with = MADE_WITH.read_text(encoding="utf-8").strip()
    if made_with != textual:
        pytest.skip(f"snapshots were drawn by textual {made_with}, this is {textual}: regenerate them with "
                    f"TRACER_UPDATE_SNAPSHOTS=1")
    assert path.exists(), f"no snapshot {path.name}: run with TRACER_UPDATE_SNAPSHOTS=1 to create it"
    if path.read_text(encoding="utf-8") != shots[0]:
        failed = Path(os.environ.get("TMPDIR", "/tmp")) / f"tracer-snapshot-{screen}.svg"
        shutil.copyfile(path, failed.with_suffix(".expected.svg"))
        failed.write_text(shots[0], encoding="utf-8")
        pytest.fail(f"screen {screen!r} differs from {path}: got {failed} (regenerate with "
                    f"TRACER_UPDATE_SNAPSHOTS=1 if the change is intended)")
