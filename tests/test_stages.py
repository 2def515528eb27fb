"""The stage vocabulary (SPEC §3): names, order, layouts, data-flow graph, HF aliases, globs."""

from __future__ import annotations

import pytest

from tracer.errors import TracerError
from tracer.stages import (
    BLOCK_STAGES,
    LAYOUTS,
    STARRED,
    StageSelector,
    block_stage,
    canonical_stages,
    hf_aliases,
    hf_sources,
    layout_of,
    split_stage,
    stage_inputs,
    stage_order,
)

SPEC_BLOCK = ["ln1", "attn.qkv", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.probs", "attn.ctx",
              "attn.out", "resid_mid", "ln2", "mlp.fc", "mlp.act", "mlp.out", "resid_post"]


@pytest.mark.parametrize("n_layer", [1, 2, 12])
def test_canonical_stages_follow_the_spec_table(n_layer: int) -> None:
    expected = ["embed.tok", "embed.pos", "embed.sum"]
    for i in range(n_layer):
        expected += [f"blocks.{i}.{s}" for s in SPEC_BLOCK]
    expected += ["final.ln", "logits"]
    assert canonical_stages(n_layer) == expected
    assert stage_order(n_layer) == {name: k for k, name in enumerate(expected)}


def test_split_and_layout() -> None:
    assert split_stage("blocks.11.attn.probs") == (11, "attn.probs")
    assert split_stage("embed.tok") == (None, "embed.tok")
    assert block_stage(3, "mlp.fc") == "blocks.3.mlp.fc"
    assert layout_of("blocks.0.attn.q") == "BHTD"
    assert layout_of("blocks.5.attn.scores") == "BHTT"
    assert layout_of("logits") == "BTC"
    assert set(LAYOUTS) == set(BLOCK_STAGES) | {"embed.tok", "embed.pos", "embed.sum", "final.ln", "logits"}


def test_stage_inputs_point_backwards_to_existing_stages() -> None:
    """The data-flow graph drives origin localization: every input must be an earlier stage."""
    n = 3
    order = stage_order(n)
    for name in canonical_stages(n):
        for src in stage_inputs(name, n):
            assert src in order, f"{name} depends on unknown stage {src}"
            assert order[src] < order[name], f"{name} depends on later stage {src}"
    assert stage_inputs("blocks.0.resid_mid", n) == ("embed.sum", "blocks.0.attn.out")
    assert stage_inputs("blocks.2.ln1", n) == ("blocks.1.resid_post",)
    assert stage_inputs("final.ln", n) == ("blocks.2.resid_post",)


def test_every_module_stage_has_exactly_one_hf_source() -> None:
    """Stages that are not ★ are recorded from a module output; without a source they are never recorded."""
    n = 2
    sources = hf_sources(n)
    for name in canonical_stages(n):
        if split_stage(name)[1] in STARRED:
            assert name not in sources.values(), f"★ stage {name} must not claim a module source"
        else:
            owners = [path for path, stage in sources.items() if stage == name]
            assert len(owners) == 1, f"{name} has HF sources {owners}"


def test_aliases_cover_the_executed_containers() -> None:
    aliases = hf_aliases(2)
    assert aliases["transformer.h.1"] == "blocks.1.resid_post"
    assert aliases["transformer.h.0.attn"] == "blocks.0.attn.out"
    assert aliases["transformer.h.0.mlp"] == "blocks.0.mlp.out"
    assert aliases["transformer.drop"] == "embed.sum"
    assert aliases["lm_head"] == "logits"
    assert set(aliases.values()) <= set(canonical_stages(2))


def test_selector_globs() -> None:
    names = canonical_stages(2)
    sel = StageSelector.parse("blocks.0.*, logits")
    assert sel.patterns == ("blocks.0.*", "logits")
    assert sel.select(names) == [n for n in names if n.startswith("blocks.0.")] + ["logits"]
    assert StageSelector.parse(None).select(names) == names
    assert StageSelector.parse("").matches("anything")


def test_selector_unknown_glob_is_a_one_line_error() -> None:
    with pytest.raises(TracerError) as info:
        StageSelector.parse("blocks.0.*,blocks.9.*").select(canonical_stages(2))
    assert "blocks.9.*" in str(info.value)
    assert "\n" not in str(info.value)
