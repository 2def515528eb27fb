"""The independent ports of tests/ports are what the comparator is judged on, so they are checked
first on their own: the correct C and NumPy-style ports reproduce the golden at every stage they
dump (through the NumPy port's name map and layouts), the C port's dump options change only the
form of its files, and every catalog bug changes its port's dump exactly from the stage the
catalog names: earlier stages bitwise equal to the correct run, that stage clearly off.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.ports.catalog import CATALOG, CAUSES, LAYERS, PortBug
from tests.ports.real_ports import NAME_MAP, build_c_port, run_c_port, run_numpy_style_port
from tracer.stages import canonical_stages
from tracer.store import Golden

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "tiny.h5"
CASE = "case0"
FILL = 1e9  # the NumPy port's additive mask is -1e10: anything this large is a masked entry
GOLDEN_RTOL = 1e-4  # fp32 port vs fp32 golden, max |diff| / max |golden|, on the tiny model
BUG_MIN = {"precision": 1e-4}  # fp16 rounding moves a value by at most 2^-11 (4.9e-4) of itself
BUG_MIN_DEFAULT = 1e-3


def _values(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """a and b as float64 over the entries both hold a value for (masked scores left out); None
    when one masks what the other does not (an extra or a missing masked score)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fill_a = ~np.isfinite(a) | (np.abs(a) >= FILL)
    fill_b = ~np.isfinite(b) | (np.abs(b) >= FILL)
    if a.shape != b.shape or (fill_a != fill_b).any():
        return None
    return a[~fill_b], b[~fill_b]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a-b| / max |b|: how far a port is from the golden, or one port's runs from each other."""
    pair = _values(a, b)
    if pair is None:
        return float("inf")
    a, b = pair
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def bug_effect(buggy: np.ndarray, correct: np.ndarray) -> float:
    """The largest relative change of one element, |a-b| / (|b| + 1e-3 max |b|): a bug that moves
    some values of a stage by 0.1 % is clear, however small they are next to the stage's largest."""
    pair = _values(buggy, correct)
    if pair is None:
        return float("inf")
    a, b = pair
    return float((np.abs(a - b) / (np.abs(b) + 1e-3 * np.abs(b).max())).max())


def load_name_map(path: Path) -> dict[str, dict]:
    """[names] of a name map as {foreign name: {"stage": ..., "layout": ...}}."""
    table = tomllib.loads(path.read_text())["names"]
    return {name: entry if isinstance(entry, dict) else {"stage": entry} for name, entry in table.items()}


def resolve(name: str, name_map: dict[str, dict], n_layer: int) -> dict | None:
    """The map entry of one dump name, `{i}` filled in (exact names first, then patterns)."""
    if name in name_map:
        return name_map[name]
    for pattern, entry in name_map.items():
        for i in range(n_layer):
            if pattern.replace("{i}", str(i)) == name:
                return {**entry, "stage": entry["stage"].replace("{i}", str(i))}
    return None


def canonical_numpy_dump(npz: Path, n_layer: int) -> dict[str, np.ndarray]:
    """The NumPy-style dump by canonical stage, in the golden's layout without the batch axis."""
    name_map = load_name_map(NAME_MAP)
    out = {}
    with np.load(npz, allow_pickle=False) as dump:
        for name in dump.files:
            entry = resolve(name, name_map, n_layer)
            assert entry is not None, f"dump name {name!r} is not in the name map"
            if not entry["stage"]:
                continue
            value = dump[name]
            if entry.get("layout") == "THD":
                value = value.transpose(1, 0, 2)
            out[entry["stage"]] = value
    return out


def c_dump(out_dir: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, allow_pickle=False) for p in out_dir.glob("*.npy")}


@pytest.fixture(scope="module")
def golden():
    with Golden.open(GOLDEN) as g:
        case = g.case(CASE)
        yield {"n_layer": g.n_layer, "n_head": g.model_config["n_head"], "vocab": g.model_config["vocab_size"],
               "stages": {name: case.read(name) for name in case.stages()}}


@pytest.fixture(scope="module")
def c_binary(tmp_path_factory):
    binary = build_c_port(tmp_path_factory.mktemp("c_port"))
    if binary is None:
        pytest.skip("no C compiler")
    return binary


@pytest.fixture(scope="module")
def c_correct(c_binary, tmp_path_factory):
    """Correct C runs: default dump ("c") and with q/k/v and embed.pos ("c-full")."""
    tmp = tmp_path_factory.mktemp("c_correct")
    return {"c": c_dump(run_c_port(GOLDEN, tmp / "c", case=CASE)),
            "c-full": c_dump(run_c_port(GOLDEN, tmp / "c-full", case=CASE, with_qkv=True, with_pos=True))}


@pytest.fixture(scope="module")
def numpy_correct(golden, tmp_path_factory):
    npz, _ = run_numpy_style_port(GOLDEN, tmp_path_factory.mktemp("numpy_correct"), case=CASE)
    return canonical_numpy_dump(npz, golden["n_layer"])


def assert_matches_golden(dump: dict[str, np.ndarray], golden_stages: dict[str, np.ndarray], masked_value,
                          batch: bool):
    for stage, value in dump.items():
        want = golden_stages[stage] if batch else golden_stages[stage][0]
        assert value.shape == want.shape, stage
        if stage.endswith("attn.scores"):
            masked = ~np.isfinite(want)
            assert masked_value(value[masked]).all(), f"{stage}: masked entries"
            value, want = value[~masked], want[~masked]
        assert rel_diff(value, want) < GOLDEN_RTOL, f"{stage}: {rel_diff(value, want):.2e}"


def test_c_port_reproduces_the_golden(golden, c_correct):
    full, default = c_correct["c-full"], c_correct["c"]
    expected = set(canonical_stages(golden["n_layer"]))
    assert set(full) == expected
    assert set(default) == {s for s in expected if not s.endswith(("attn.q", "attn.k", "attn.v", "embed.pos"))}
    assert all(v.dtype == np.float32 for v in full.values())
    assert_matches_golden(full, golden["stages"], lambda v: v == 0, batch=True)
    logits = full["logits"]
    assert np.abs(logits - golden["stages"]["logits"]).max() / np.abs(golden["stages"]["logits"]).max() < 1e-5


def test_c_port_options_change_only_the_form(golden, c_correct, tmp_path):
    full, H, V = c_correct["c-full"], golden["n_head"], golden["vocab"]
    dumped = c_dump(run_c_port(GOLDEN, tmp_path / "a", case=CASE, with_qkv=True, f64=True, no_batch=True,
                               scores_tth=True, pad_vocab=V + 44))
    for stage, value in dumped.items():
        assert value.dtype == np.float64, stage
        ref = full[stage][0]
        if stage.endswith(("attn.scores", "attn.probs")):
            assert value.shape == ref.shape[1:] + (H,)
            value = value.transpose(2, 0, 1)
        if stage == "logits":
            assert value.shape == (ref.shape[0], V + 44) and not value[:, V:].any()
            value = value[:, :V]
        np.testing.assert_array_equal(value, ref, err_msg=stage)


def test_numpy_style_port_reproduces_the_golden(golden, numpy_correct, tmp_path):
    dump = numpy_correct
    expected = set(canonical_stages(golden["n_layer"]))
    assert set(dump) == expected
    assert all(v.dtype == np.float32 for v in dump.values())
    assert_matches_golden(dump, golden["stages"], lambda v: v <= -FILL, batch=False)

    npz, _ = run_numpy_style_port(GOLDEN, tmp_path, case=CASE, f64=True)
    dump64 = canonical_numpy_dump(npz, golden["n_layer"])
    assert all(v.dtype == np.float64 for v in dump64.values())
    assert 0 < rel_diff(dump64["logits"], dump["logits"]) < GOLDEN_RTOL


def test_catalog_entries_are_well_formed():
    assert len({bug.name for bug in CATALOG}) == len(CATALOG) >= 16
    stages = set(canonical_stages(4))
    for bug in CATALOG:
        assert bug.cause in CAUSES and bug.layer in LAYERS and bug.ports, bug.name
        assert all(template.format(i=3) in stages for template in bug.stages), bug.name
    assert {bug.cause for bug in CATALOG} == set(CAUSES)


def test_unknown_bug_names_are_refused(c_binary, tmp_path):
    """A misspelt bug must never give a silently correct run."""
    typo = PortBug("gelu-coeff", "misspelt", "constant", "all", ("blocks.{i}.mlp.act",))
    with pytest.raises(RuntimeError, match="unknown bug: gelu-coeff"):
        run_c_port(GOLDEN, tmp_path / "c", case=CASE, bug=typo)
    with pytest.raises(ValueError, match="unknown bug"):
        run_numpy_style_port(GOLDEN, tmp_path / "numpy", case=CASE, bug=typo)
    with pytest.raises(KeyError, match="unknown port bug"):
        run_c_port(GOLDEN, tmp_path / "c2", case=CASE, bug="gelu-coeff")


def bug_cases():
    for bug in CATALOG:
        for kind in ("c", "c-full", "numpy"):
            if kind.split("-")[0] in bug.ports:
                yield pytest.param(kind, bug, id=f"{kind}-{bug.name}")


@pytest.mark.parametrize("kind,bug", list(bug_cases()))
def test_bug_is_introduced_where_the_catalog_says(kind: str, bug: PortBug, golden, request, tmp_path):
    n_layer = golden["n_layer"]
    if kind == "numpy":
        correct = request.getfixturevalue("numpy_correct")
        buggy = canonical_numpy_dump(run_numpy_style_port(GOLDEN, tmp_path, case=CASE, bug=bug.name)[0], n_layer)
    else:
        correct = request.getfixturevalue("c_correct")[kind]
        full = kind == "c-full"
        buggy = c_dump(run_c_port(GOLDEN, tmp_path, case=CASE, bug=bug.name, with_qkv=full, with_pos=full))
    assert set(buggy) == set(correct)
    stage = bug.introduced_at(n_layer, correct)
    if set(correct) == set(canonical_stages(n_layer)):
        assert stage == bug.stage(n_layer)
    order = canonical_stages(n_layer)
    for earlier in order[: order.index(stage)]:
        if earlier in correct:
            np.testing.assert_array_equal(buggy[earlier], correct[earlier], err_msg=earlier)
    assert bug_effect(buggy[stage], correct[stage]) > BUG_MIN.get(bug.cause, BUG_MIN_DEFAULT)
