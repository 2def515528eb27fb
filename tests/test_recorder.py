"""The recorder: every canonical stage, with the right shape and the right value, without perturbing the model."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from tracer.models import LoadedModel
from tracer.recorder import CaseInput, Recorder
from tracer.record import build_cases
from tracer.stages import StageSelector, canonical_stages, hf_sources, resid_pre, split_stage
from tracer.store import CaseView, Golden


def expected_shape(stage: str, B: int, T: int, config) -> tuple[int, ...]:
    """SPEC §3 shape table, written out independently of the LAYOUTS table."""
    C, H, V = config.n_embd, config.n_head, config.vocab_size
    D = C // H
    local = split_stage(stage)[1]
    return {
        "embed.pos": (1, T, C),
        "attn.qkv": (B, T, 3 * C),
        "attn.q": (B, H, T, D), "attn.k": (B, H, T, D), "attn.v": (B, H, T, D),
        "attn.scores": (B, H, T, T), "attn.probs": (B, H, T, T),
        "mlp.fc": (B, T, 4 * C), "mlp.act": (B, T, 4 * C),
        "logits": (B, T, V),
    }.get(local, (B, T, C))


def allowed(mask: np.ndarray) -> np.ndarray:
    """[B,1,T,T]: query t sees key s iff s <= t and key s is a real token."""
    T = mask.shape[1]
    causal = np.tril(np.ones((T, T), dtype=bool))
    return causal[None, None] & mask.astype(bool)[:, None, None, :]


def record_in_memory(loaded: LoadedModel, case: CaseInput, selector: StageSelector = StageSelector()):
    """Run the recorder with a sink that keeps copies: (logits, {stage: tensor}, [stage names in call order])."""
    values: dict[str, torch.Tensor] = {}
    calls: list[str] = []

    def sink(stage: str, value: torch.Tensor, hf_module: str) -> None:
        calls.append(stage)
        values[stage] = value.detach().clone()

    with Recorder(loaded.model, sink, selector) as rec:
        logits = rec.run(torch.from_numpy(case.input_ids), torch.from_numpy(case.attention_mask))
    return logits, values, calls


def plain_logits(loaded: LoadedModel, case: CaseInput) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=torch.from_numpy(case.input_ids),
                            attention_mask=torch.from_numpy(case.attention_mask)).logits


def tiny_cases(loaded: LoadedModel) -> dict[str, CaseInput]:
    single = build_cases(loaded, ["Hello, world"], [], batch=False)[0]
    batch = build_cases(loaded, ["Hi", "Padded batch prompt"], [], batch=True)[0]
    return {"single": single, "batch": batch}


# -- presence, shapes, order ----------------------------------------------------------------

def check_case_shapes(case: CaseView, config) -> None:
    ids = case.input_ids
    B, T = ids.shape
    assert ids.dtype == np.int64
    assert case.attention_mask.shape == (B, T) and case.attention_mask.dtype == np.int8
    n = config.n_layer
    assert case.stages() == canonical_stages(n)
    for stage in canonical_stages(n):
        ds = case.dataset(stage)
        assert ds.shape == expected_shape(stage, B, T, config), stage
        assert ds.dtype == np.float32, stage
        assert ds.attrs["order"] == canonical_stages(n).index(stage)
    for path, stage in hf_sources(n).items():
        assert case.dataset(stage).attrs["hf_module"] == path


def test_tiny_golden_has_every_stage_with_its_shape(tiny_golden, tiny_loaded) -> None:
    with Golden.open(tiny_golden) as g:
        assert g.case_names() == ["case0", "case1", "batch"]  # recording order
        assert g.n_layer == tiny_loaded.config.n_layer
        for name in g.case_names():
            check_case_shapes(g.case(name), tiny_loaded.config)


def test_gpt2_shape_golden_has_every_stage_with_its_shape(gpt2_shape_golden, gpt2_shape_loaded) -> None:
    with Golden.open(gpt2_shape_golden) as g:
        case = g.case("case0")
        check_case_shapes(case, gpt2_shape_loaded.config)
        assert case.dataset("logits").shape[-1] == 50257
        assert case.dataset("blocks.1.attn.q").shape[1:] == (12, 8, 64)


def test_inputs_are_stored_under_the_case(tiny_golden, tiny_loaded) -> None:
    with Golden.open(tiny_golden) as g:
        one = g.case("case1")
        assert one.prompts == ["The quick brown fox"]
        assert one.input_ids.tolist() == [tiny_loaded.encode("The quick brown fox")]
        assert one.attention_mask.tolist() == [[1] * one.input_ids.shape[1]]
        batch = g.case("batch")
        assert batch.prompts == ["Hi", "Padded batch prompt"]
        short, long = (tiny_loaded.encode(p) for p in batch.prompts)
        assert batch.input_ids.shape == (2, len(long))
        assert batch.input_ids[0, :len(short)].tolist() == short
        assert batch.input_ids[1].tolist() == long
        assert batch.attention_mask.tolist() == [[1] * len(short) + [0] * (len(long) - len(short)), [1] * len(long)]
        assert "inputs.ids" not in g.h5["cases/batch/stages"]


def test_stages_are_emitted_in_execution_order(tiny_loaded) -> None:
    case = tiny_cases(tiny_loaded)["batch"]
    _, _, calls = record_in_memory(tiny_loaded, case)
    assert calls == canonical_stages(tiny_loaded.config.n_layer)


def test_selector_limits_what_reaches_the_sink(tiny_loaded) -> None:
    case = tiny_cases(tiny_loaded)["single"]
    _, _, calls = record_in_memory(tiny_loaded, case, StageSelector.parse("blocks.1.attn.probs,logits"))
    assert calls == ["blocks.1.attn.probs", "logits"]


# -- ★ stages equal their definitions --------------------------------------------------------

@pytest.fixture(scope="module", params=["case0", "batch"])
def case_arrays(request, tiny_golden):
    """All stages of one tiny golden case as numpy arrays (plus its mask and config)."""
    with Golden.open(tiny_golden) as g:
        case = g.case(request.param)
        arrays = {s: case.read(s) for s in case.stages()}
        return arrays, case.attention_mask, g.model_config


def test_embed_sum_is_tok_plus_pos(case_arrays) -> None:
    a, _, _ = case_arrays
    np.testing.assert_array_equal(a["embed.sum"], a["embed.tok"] + a["embed.pos"])


def test_residuals_are_sums_of_their_branches(case_arrays) -> None:
    a, _, cfg = case_arrays
    for i in range(cfg["n_layer"]):
        np.testing.assert_array_equal(a[f"blocks.{i}.resid_mid"], a[resid_pre(i)] + a[f"blocks.{i}.attn.out"])
        np.testing.assert_array_equal(a[f"blocks.{i}.resid_post"], a[f"blocks.{i}.resid_mid"] + a[f"blocks.{i}.mlp.out"])
    last = a[f"blocks.{cfg['n_layer'] - 1}.resid_post"]
    assert not np.array_equal(last, a["embed.sum"])


def test_q_k_v_are_the_split_heads_of_qkv(case_arrays) -> None:
    a, _, cfg = case_arrays
    C, H = cfg["n_embd"], cfg["n_head"]
    for i in range(cfg["n_layer"]):
        qkv = a[f"blocks.{i}.attn.qkv"]
        B, T, _ = qkv.shape
        for k, name in enumerate(("q", "k", "v")):
            part = qkv[..., k * C:(k + 1) * C].reshape(B, T, H, C // H).transpose(0, 2, 1, 3)
            np.testing.assert_array_equal(a[f"blocks.{i}.attn.{name}"], part, err_msg=name)


def test_scores_are_scaled_qk_with_minus_inf_exactly_where_masked(case_arrays) -> None:
    a, mask, cfg = case_arrays
    ok = np.broadcast_to(allowed(mask), a["blocks.0.attn.scores"].shape)
    for i in range(cfg["n_layer"]):
        q, k = (torch.from_numpy(a[f"blocks.{i}.attn.{n}"]) for n in "qk")
        expect = (torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))).numpy()
        scores = a[f"blocks.{i}.attn.scores"]
        np.testing.assert_array_equal(np.isneginf(scores), ~ok)
        np.testing.assert_allclose(scores[ok], expect[ok], rtol=1e-6, atol=1e-6)


def test_probs_are_softmax_of_scores_with_exact_zeros(case_arrays) -> None:
    a, mask, cfg = case_arrays
    ok = np.broadcast_to(allowed(mask), a["blocks.0.attn.probs"].shape)
    for i in range(cfg["n_layer"]):
        scores = a[f"blocks.{i}.attn.scores"].astype(np.float64)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        expect = e / e.sum(axis=-1, keepdims=True)
        probs = a[f"blocks.{i}.attn.probs"]
        assert np.all(probs[~ok] == 0.0)
        np.testing.assert_allclose(probs, expect, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(probs.astype(np.float64).sum(-1), 1.0, atol=1e-6)


def test_ctx_is_probs_times_v_with_heads_merged(case_arrays) -> None:
    a, _, cfg = case_arrays
    for i in range(cfg["n_layer"]):
        probs, v = (torch.from_numpy(a[f"blocks.{i}.attn.{n}"]) for n in ("probs", "v"))
        B, H, T, D = v.shape
        expect = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, H * D).numpy()
        ctx = a[f"blocks.{i}.attn.ctx"]
        np.testing.assert_allclose(ctx, expect, rtol=1e-6, atol=1e-6 * float(np.abs(expect).max()))


# -- non-perturbation -----------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("which", ["single", "batch"])
def test_recording_does_not_change_the_logits(tiny_loader, attn: str, which: str) -> None:
    loaded = tiny_loader(attn=attn)
    assert loaded.model.config._attn_implementation == attn
    case = tiny_cases(loaded)[which]
    plain = plain_logits(loaded, case)
    logits, values, _ = record_in_memory(loaded, case)
    assert torch.equal(logits, plain)
    assert torch.equal(values["logits"], plain)
    assert torch.equal(plain_logits(loaded, case), plain), "hooks were left attached"


def test_stored_logits_are_bitwise_the_plain_forward(tiny_golden, tiny_loaded) -> None:
    with Golden.open(tiny_golden) as g:
        for name in g.case_names():
            case = g.case(name)
            c = CaseInput(name, case.input_ids, case.attention_mask)
            np.testing.assert_array_equal(case.read("logits"), plain_logits(tiny_loaded, c).numpy())


@pytest.mark.parametrize("which", ["single", "batch"])
def test_eager_probs_equal_hf_attention_weights_bitwise(tiny_loader, which: str) -> None:
    loaded = tiny_loader(attn="eager")
    case = tiny_cases(loaded)[which]
    _, values, _ = record_in_memory(loaded, case)
    with torch.no_grad():
        out = loaded.model(input_ids=torch.from_numpy(case.input_ids),
                           attention_mask=torch.from_numpy(case.attention_mask), output_attentions=True)
    assert len(out.attentions) == loaded.config.n_layer
    for i, hf_probs in enumerate(out.attentions):
        assert torch.equal(values[f"blocks.{i}.attn.probs"], hf_probs), i


@pytest.mark.parametrize("which", ["single", "batch"])
def test_eager_records_attention_without_computing_it_again(tiny_loader, monkeypatch, which: str) -> None:
    """Under eager, scores and probs are eager's own tensors (kept by the tap), not a second computation,
    and bitwise what the side channel computes."""
    from tracer import recorder

    loaded = tiny_loader(attn="eager")
    case = tiny_cases(loaded)[which]
    with monkeypatch.context() as blind:  # a tap that keeps nothing: the side channel does the work
        blind.setattr(recorder._AttentionTap, "__torch_function__",
                      lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})))
        _, side, _ = record_in_memory(loaded, case)

    def no_side_channel(*args, **kwargs):
        raise AssertionError("attention computed a second time")

    monkeypatch.setattr(Recorder, "_side_scores", no_side_channel)
    with pytest.raises(AssertionError, match="second time"):  # the patch bites where nothing is kept
        record_in_memory(tiny_loader(attn="sdpa"), case)
    logits, kept, calls = record_in_memory(loaded, case)
    assert torch.equal(logits, plain_logits(loaded, case))
    assert calls == canonical_stages(loaded.config.n_layer)
    for stage in calls:
        assert torch.equal(kept[stage], side[stage]), stage


def test_sdpa_side_channel_matches_eager(tiny_loader) -> None:
    """sdpa exposes no scores; the side channel must still produce the eager ones, bitwise (same qkv, same ops)."""
    eager = tiny_loader(attn="eager")
    sdpa = tiny_loader(attn="sdpa")
    case = tiny_cases(eager)["batch"]
    _, ve, _ = record_in_memory(eager, case)
    _, vs, _ = record_in_memory(sdpa, case)
    for stage in ("blocks.0.attn.qkv", "blocks.0.attn.scores", "blocks.0.attn.probs"):
        assert torch.equal(ve[stage], vs[stage]), stage
    for stage in canonical_stages(eager.config.n_layer):
        torch.testing.assert_close(vs[stage], ve[stage], rtol=1e-4, atol=1e-4)


# -- HF module aliases ----------------------------------------------------------------------

def first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        items = output.to_tuple() if hasattr(output, "to_tuple") else output
        return items[0] if items and isinstance(items[0], torch.Tensor) else None
    return None


def executed_module_outputs(loaded: LoadedModel, case: CaseView) -> dict[str, torch.Tensor]:
    """Every submodule that runs in a plain forward, with its (first) output tensor."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for path, module in loaded.model.named_modules():
        if path:
            handles.append(module.register_forward_hook(
                lambda m, args, out, _p=path: outputs.__setitem__(_p, first_tensor(out))))
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.from_numpy(case.input_ids),
                         attention_mask=torch.from_numpy(case.attention_mask))
    finally:
        for h in handles:
            h.remove()
    return {p: t for p, t in outputs.items() if t is not None}


def test_every_executed_module_holding_a_stage_is_addressable(tiny_golden, tiny_loaded) -> None:
    with Golden.open(tiny_golden) as g:
        case = g.case("case0")
        modules = case.modules()
        stored = {s: case.read(s) for s in case.stages()}
        for path, out in executed_module_outputs(tiny_loaded, case).items():
            out = out.numpy()
            holders = [s for s, arr in stored.items() if arr.shape == out.shape and np.array_equal(arr, out)]
            if holders:
                assert path in modules, f"{path} (= {holders[0]}) has no /modules link"
                assert modules[path] in holders, f"{path} links to {modules[path]}, holds {holders}"
        n = tiny_loaded.config.n_layer
        for path in ["transformer.h.0.ln_1", "transformer.h.0.attn", "transformer.h.0.mlp", f"transformer.h.{n - 1}",
                     "lm_head", "transformer.drop"]:
            assert path in modules, path


def test_module_paths_resolve_to_their_stage_without_a_copy(tiny_golden) -> None:
    with Golden.open(tiny_golden) as g:
        case = g.case("batch")
        np.testing.assert_array_equal(case.read("transformer.h.0.ln_1"), case.read("blocks.0.ln1"))
        np.testing.assert_array_equal(case.read("transformer.h.1"), case.read("blocks.1.resid_post"))
        group = g.h5["cases/batch/modules"]
        assert len(group) == len(case.modules()) > 0
        for path, stage in case.modules().items():
            np.testing.assert_array_equal(case.read(path), case.read(stage))
            link = group.get(path, getlink=True)
            target = f"/cases/batch/stages/{stage}"
            if isinstance(link, h5py.SoftLink):
                assert link.path == target, path
            else:
                assert isinstance(link, h5py.HardLink) and group[path] == g.h5[target], f"{path} is a second copy"
