"""`tracer weights`: each classic weight-loading mistake, built into a checkpoint of the tiny golden,
is reported as what it is; correct checkpoints in every supported layout and format pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.weights_ckpts import (golden_weights, hf_names, int8_port, linear_layout, pycandle, quantize_4bit_blocks,
                                 save, write_gguf, write_llmc)
from tracer.weights.audit import AuditResult, audit
from tracer.weights.names import load_weight_map
from tracer.weights.words import CONV1D_LAYOUT, FIX_QKV_ORDER, FIX_TIE

C_ATTN0 = "transformer.h.0.attn.c_attn.weight"


@pytest.fixture(scope="module")
def weights(tiny_golden) -> tuple[dict[str, np.ndarray], dict]:
    return golden_weights(tiny_golden)


def finding(result: AuditResult, param: str):
    return next(f for f in result.findings if f.param == param)


def problems(result: AuditResult) -> dict[str, str]:
    return {f.param: f.status for f in result.findings if not f.ok}


def shuffled(tensors: dict[str, np.ndarray], seed: int = 3) -> dict[str, np.ndarray]:
    """The same tensors under meaningless names in a random order: only content can find them."""
    order = np.random.default_rng(seed).permutation(len(tensors))
    return {f"t{order[k]:03d}": v for k, v in enumerate(tensors.values())}


# -- correct checkpoints pass --------------------------------------------------------------------
def test_hf_checkpoint_passes_with_lm_head_tied(run_cli, tiny_golden, weights, tmp_path):
    ckpt = save(hf_names(weights[0]), tmp_path / "model.safetensors")
    code, out, err = run_cli("weights", tiny_golden, ckpt, "--json", tmp_path / "audit.json")
    assert code == 0, out + err
    data = json.loads((tmp_path / "audit.json").read_text())
    assert data["schema_version"] == 1 and data["passed"] and data["summary"]["ok"] == 29
    lm_head = next(p for p in data["parameters"] if p["name"] == "lm_head.weight")
    assert lm_head["forms"] == ["tied"] and lm_head["source"] == "wte.weight"
    assert "PASS" in out and "HF GPT-2 names" in out


@pytest.mark.parametrize("layout", ["linear-qkv-parts", "conv1d-qkv-parts"])
def test_renamed_checkpoint_found_by_content_and_inferred_map_round_trips(run_cli, tiny_golden, weights, tmp_path,
                                                                         layout):
    w, config = weights
    parts = pycandle(w, config["n_layer"])
    if layout == "conv1d-qkv-parts":  # q/k/v cut out of c_attn along its other axis: Conv1D layout kept
        parts = {k: np.ascontiguousarray(v.T) if v.ndim == 2 and "emb" not in k and "out_head" not in k else v
                 for k, v in parts.items()}
    ckpt = save(shuffled(parts), tmp_path / "port.safetensors")
    result = audit(tiny_golden, ckpt)
    assert result.passed, problems(result)
    assert result.names.startswith("none recognised")
    c_attn = finding(result, C_ATTN0)
    assert c_attn.found_by == "content" and "split" in c_attn.forms
    assert ("transposed" in c_attn.forms) == (layout == "linear-qkv-parts")
    inferred = tmp_path / "inferred.toml"
    assert run_cli("weights", tiny_golden, ckpt, "--write-map", inferred)[0] == 0
    again = audit(tiny_golden, ckpt, load_weight_map(inferred))
    assert again.passed and {f.found_by for f in again.findings} == {"name"}
    assert [f.source for f in again.findings] == [f.source for f in result.findings]


def test_shipped_maps_recognise_their_layouts(tiny_golden, weights, tmp_path):
    w, config = weights
    files = {
        "pycandle": save(pycandle(w, config["n_layer"]), tmp_path / "candle.safetensors"),
        "llmc": write_llmc(w, config, tmp_path / "gpt2_tiny.bin", padded_vocab=320),
        "gguf": write_gguf(w, config, tmp_path / "tiny-f32.gguf", "F32"),
        "max": save(linear_layout(w), tmp_path / "max.safetensors"),
    }
    for name, path in files.items():
        result = audit(tiny_golden, path, load_weight_map(name))
        assert result.passed, (name, problems(result))
        assert {f.found_by for f in result.findings if f.param != "lm_head.weight"} == {"name"}, name
    llmc = audit(tiny_golden, files["llmc"])
    assert llmc.names == "llmc (recognised)"
    assert finding(llmc, "transformer.wte.weight").forms == ["padded"]
    assert finding(llmc, C_ATTN0).forms == ["transposed", "fused"]
    assert "tied" in finding(llmc, "lm_head.weight").forms
    assert audit(tiny_golden, files["gguf"]).names == "gguf (recognised)"


@pytest.mark.parametrize("qtype, bits, steps", [("F16", None, None), ("Q8_0", 8.5, 0.6), ("Q4_0", 4.5, 1.0)])
def test_gguf_types_are_read_and_dequantized(run_cli, tiny_golden, weights, tmp_path, qtype, bits, steps):
    path = write_gguf(*weights, tmp_path / f"tiny-{qtype}.gguf", qtype)
    assert run_cli("weights", tiny_golden, path, "--json", tmp_path / "a.json")[0] == 0
    c_attn = next(p for p in json.loads((tmp_path / "a.json").read_text())["parameters"] if p["name"] == C_ATTN0)
    if bits is None:
        assert c_attn["forms"] == ["transposed", "dtype-changed"] and c_attn["storage"] == "fp16"
        return
    assert c_attn["forms"] == ["transposed", "quantized"]
    assert c_attn["quant"] == {"scheme": qtype, "bits": bits, "block": 32, "grouping": "blocks of 32"}
    assert 0.3 * steps < c_attn["metrics"]["max_steps"] <= steps * 1.01


def test_int8_per_channel_and_packed_4bit_are_dequantized(tiny_golden, weights, tmp_path):
    w = weights[0]
    int8 = audit(tiny_golden, save(int8_port(w)[0], tmp_path / "int8.safetensors"))
    assert int8.passed, problems(int8)
    assert int8.quant["h.0.attn.c_attn.weight"] == {"scheme": "int8", "bits": 8, "block": 64,
                                                    "grouping": "per-channel"}
    f = finding(int8, C_ATTN0)
    assert f.forms == ["transposed", "quantized"] and 1e-3 < f.check.rel_l2 < 2e-2 and f.check.max_steps <= 0.51
    packed = {}
    for k, v in hf_names(w).items():
        if v.ndim == 2:
            packed[k], packed[k + ".scales"] = quantize_4bit_blocks(v)
        else:
            packed[k] = v
    q4 = audit(tiny_golden, save(packed, tmp_path / "q4.safetensors"))
    assert q4.passed, problems(q4)
    assert q4.quant["h.0.mlp.c_fc.weight"]["grouping"] == "blocks of 32"
    assert finding(q4, "transformer.h.0.mlp.c_fc.weight").forms == ["quantized"]


def test_npz_npy_directory_and_bf16_checkpoints(tiny_golden, weights, tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = hf_names(weights[0])
    np.savez(tmp_path / "w.npz", **tensors)
    (tmp_path / "npy").mkdir()
    for k, v in tensors.items():
        np.save(tmp_path / "npy" / f"{k}.npy", v)
    for path in (tmp_path / "w.npz", tmp_path / "npy"):
        assert audit(tiny_golden, path).passed, path
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}, tmp_path / "bf16.safetensors")
    bf16 = audit(tiny_golden, tmp_path / "bf16.safetensors")
    assert bf16.passed and finding(bf16, C_ATTN0).forms == ["dtype-changed"]
    assert bf16.storage["h.0.attn.c_attn.weight"] == "bf16"


# -- each mistake, reported as what it is ---------------------------------------------------------
def apply_mistake(c: dict[str, np.ndarray], name: str, w: dict[str, np.ndarray], n_layer: int) -> None:
    """Make one classic loading mistake in a PyCandle-layout checkpoint `c` (in place)."""
    rng = np.random.default_rng(7)
    if name == "wpe-missing":
        del c["pos_emb.weight"]
    elif name == "wpe-left-at-init":
        c["pos_emb.weight"] = rng.normal(0, 0.02, c["pos_emb.weight"].shape).astype(np.float32)
    elif name == "conv1d-not-transposed":
        c["transformer_block_0.mha.out_proj.weight"] = w["transformer.h.0.attn.c_proj.weight"]
    elif name == "qkv-wrong-order":
        swapped = pycandle(w, n_layer, qkv_order=(1, 0, 2))
        for k in ("w_query", "w_key"):
            c[f"transformer_block_1.mha.{k}.weight"] = swapped[f"transformer_block_1.mha.{k}.weight"]
    elif name == "qkv-not-split":
        for k in ("w_query", "w_key", "w_value"):
            del c[f"transformer_block_0.mha.{k}.weight"]
        c["transformer_block_0.mha.qkv.weight"] = np.ascontiguousarray(w[C_ATTN0].T)
    elif name == "lm-head-not-tied":
        c["out_head.weight"] = rng.normal(0, 0.02, c["out_head.weight"].shape).astype(np.float32)
    elif name == "ln-left-at-init":
        c["transformer_block_1.layer_norm2.weight"] = np.ones_like(c["transformer_block_1.layer_norm2.weight"])
    elif name == "dtype-slip":
        c["transformer_block_1.ff.ff_bottom.weight"] = c["transformer_block_1.ff.ff_bottom.weight"].astype(np.int8)
    elif name == "fp16":
        c["transformer_block_0.ff.ff_top.weight"] = c["transformer_block_0.ff.ff_top.weight"].astype(np.float16)
    else:
        raise ValueError(name)


def port_with(mistakes: list[str], weights: tuple[dict[str, np.ndarray], dict]) -> dict[str, np.ndarray]:
    w, config = weights
    c = pycandle(w, config["n_layer"])
    for name in mistakes:
        apply_mistake(c, name, w, config["n_layer"])
    return c


MISTAKES = {  # name -> (parameter, status, words the problem or fix must contain)
    "wpe-missing": ("transformer.wpe.weight", "missing", "no tensor holds it"),
    "wpe-left-at-init": ("transformer.wpe.weight", "mismatch", "untrained N(0, 0.02) init"),
    "conv1d-not-transposed": ("transformer.h.0.attn.c_proj.weight", "misplaced", f"transpose: {CONV1D_LAYOUT}"),
    "qkv-wrong-order": ("transformer.h.1.attn.c_attn.weight", "misplaced", "w_query.weight holds k"),
    "qkv-not-split": (C_ATTN0, "misplaced", FIX_QKV_ORDER),
    "lm-head-not-tied": ("lm_head.weight", "misplaced", FIX_TIE),
    "ln-left-at-init": ("transformer.h.1.ln_2.weight", "mismatch", "constant 1"),
    "dtype-slip": ("transformer.h.1.mlp.c_proj.weight", "mismatch", "int8 codes with no scale tensor"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_mistake_is_reported_as_what_it_is(run_cli, tiny_golden, weights, tmp_path, mistake):
    ckpt = save(port_with([mistake], weights), tmp_path / "port.safetensors")
    code, out, err = run_cli("weights", tiny_golden, ckpt, "--name-map", "pycandle", "--json", tmp_path / "a.json")
    assert code == 1, out + err
    data = json.loads((tmp_path / "a.json").read_text())
    param, status, words = MISTAKES[mistake]
    bad = {p["name"]: p for p in data["parameters"] if not p["ok"]}
    assert list(bad) == [param], bad
    assert bad[param]["status"] == status
    assert words in f"{bad[param]['problem']} {bad[param]['fix']}"
    assert param.removeprefix("transformer.") in out and "FAIL" in out


def test_fp16_weight_is_dtype_changed_not_wrong(tiny_golden, weights, tmp_path):
    result = audit(tiny_golden, save(port_with(["fp16"], weights), tmp_path / "p.safetensors"))
    assert result.passed
    f = finding(result, "transformer.h.0.mlp.c_fc.weight")
    assert f.forms == ["transposed", "dtype-changed"] and 0 < f.check.rel_l2 < 2 ** -10


def test_untransposed_conv1d_is_flagged_without_a_map(tiny_golden, weights, tmp_path):
    """No map says the orientation: the one Conv1D weight lying unlike the others is the mistake."""
    tensors = linear_layout(weights[0])
    tensors["h.1.mlp.c_fc.weight"] = weights[0]["transformer.h.1.mlp.c_fc.weight"]
    result = audit(tiny_golden, save(tensors, tmp_path / "p.safetensors"))
    assert problems(result) == {"transformer.h.1.mlp.c_fc.weight": "misplaced"}
    assert finding(result, "transformer.h.1.mlp.c_fc.weight").fix.startswith(f"transpose: {CONV1D_LAYOUT}")


def test_quantized_with_wrong_scale_is_a_value_mismatch(tiny_golden, weights, tmp_path):
    tensors = int8_port(weights[0])[0]
    tensors["h.0.mlp.c_fc.weight.scale"] = tensors["h.0.mlp.c_fc.weight.scale"] * 1.1
    result = audit(tiny_golden, save(tensors, tmp_path / "p.safetensors"))
    assert problems(result) == {"transformer.h.0.mlp.c_fc.weight": "mismatch"}
    f = finding(result, "transformer.h.0.mlp.c_fc.weight")
    assert f.check.max_steps > 1 and "beyond what its storage explains" in f.problem


def test_all_mistakes_at_once(run_cli, tiny_golden, weights, tmp_path):
    mistakes = [m for m in MISTAKES if m != "wpe-left-at-init"] + ["fp16"]  # wpe missing, so not at init
    ckpt = save(port_with(mistakes, weights), tmp_path / "all.safetensors")
    result = audit(tiny_golden, ckpt, load_weight_map("pycandle"))
    assert problems(result) == {MISTAKES[m][0]: MISTAKES[m][1] for m in mistakes if m in MISTAKES}
    assert "dtype-changed" in finding(result, "transformer.h.0.mlp.c_fc.weight").forms
    leftovers = {x.tensor: x.problem for x in result.leftovers}
    assert "named for lm_head.weight" in leftovers["out_head.weight"]
    assert run_cli("weights", tiny_golden, ckpt, "--name-map", "pycandle")[0] == 1


def test_compare_diagnosis_uses_the_audit_words_for_an_untransposed_conv1d(run_cli, tiny_golden, tmp_path):
    code, _, _ = run_cli("compare", tiny_golden, "--backend", "numpy", "--inject", "c-proj-untransposed",
                         "--case", "case0", "--json", tmp_path / "r.json", "--quiet")
    assert code == 1
    stage = next(s for c in json.loads((tmp_path / "r.json").read_text())["cases"] for s in c["stages"]
                 if s["stage"] == "blocks.0.attn.out")
    assert any(CONV1D_LAYOUT in d["bug"] for d in stage["diagnoses"])


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------
def test_bad_inputs_exit_2_with_one_line(run_cli, tiny_golden, weights, tmp_path):
    good = save(hf_names(weights[0]), tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "w.pt").write_bytes(b"x")
    (tmp_path / "nomap.toml").write_text('[names]\n"a" = "logits"\n')
    (tmp_path / "badmap.toml").write_text('[weights]\n"a" = "transformer.h.{i}.attn.c_attn.wieght"\n')
    (tmp_path / "exists.json").write_text("{}")
    cases = [
        (("weights", tiny_golden, tmp_path / "absent.safetensors"), "no such checkpoint"),
        (("weights", tiny_golden, tmp_path / "bad.safetensors"), "not a valid safetensors file"),
        (("weights", tiny_golden, tmp_path / "w.pt"), "unknown checkpoint format"),
        (("weights", tiny_golden, good, "--name-map", tmp_path / "nomap.toml"), "has no weights table"),
        (("weights", tiny_golden, good, "--name-map", tmp_path / "badmap.toml"), "is not a GPT-2 parameter name"),
        (("weights", tiny_golden, good, "--json", tmp_path / "exists.json"), "already exists"),
    ]
    for args, words in cases:
        code, out, err = run_cli(*args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
    assert (tmp_path / "exists.json").read_text() == "{}"


def test_identical_tensors_of_an_untrained_model_are_each_used_once(tmp_path):
    """HF's default init gives dozens of identical zero biases and unit LayerNorm weights: content
    cannot tell them apart, so each must still go to its own tensor (none left over, none shared)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tracer.models import LoadedModel, byte_decode, byte_encode
    from tracer.record import build_cases, record_golden

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=256, bos_token_id=0,
                        eos_token_id=0)
    loaded = LoadedModel(GPT2LMHeadModel(config).eval(), "untrained", "bytes", byte_encode, byte_decode)
    golden = tmp_path / "untrained.h5"
    record_golden(loaded, build_cases(loaded, ["hi"], [], batch=False), str(golden), dtype="fp32", attn="eager")
    weights = golden_weights(golden)
    result = audit(golden, save(shuffled(port_with([], weights)), tmp_path / "port.safetensors"))
    assert result.passed and not result.leftovers
    c_attn_bias = finding(result, "transformer.h.0.attn.c_attn.bias")
    assert c_attn_bias.forms == ["split"] and len({p.view.tensor for p in c_attn_bias.source}) == 3
