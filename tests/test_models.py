"""Model sources (SPEC §2): save_pretrained directories, hub ids, random shapes, dtypes; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tracer.errors import TracerError
from tracer.models import load_model
from tracer.record import build_cases, record_golden
from tracer.stages import canonical_stages
from tracer.store import Golden


def small_gpt2(vocab_size: int = 300):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"  # what load_model uses by default: logits compare bitwise
    return GPT2LMHeadModel(config).eval()


def byte_bpe_tokenizer():
    """A GPT-2 byte-level BPE tokenizer built offline: the 256 byte symbols plus one merge, 'He' -> 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"He": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("H", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return GPT2TokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    d = tmp_path_factory.mktemp("saved")
    model = small_gpt2()
    model.save_pretrained(d)
    return d, model


def test_save_pretrained_dir_loads_and_records(saved_dir, tmp_path: Path) -> None:
    d, original = saved_dir
    loaded = load_model(str(d))
    assert loaded.tokenizer_kind == "bytes"
    assert loaded.source == str(d)
    assert not loaded.model.training
    ids = torch.tensor([[72, 105, 33, 299]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    out = tmp_path / "g.h5"
    record_golden(loaded, build_cases(loaded, ["Hi!"], [], False), str(out), dtype="fp32", attn="eager")
    with Golden.open(out) as g:
        case = g.case("case0")
        assert case.input_ids.tolist() == [[72, 105, 33]]
        assert case.stages() == canonical_stages(1)
        assert g.attrs["model_source"] == str(d) and g.attrs["tokenizer"] == "bytes"
        np.testing.assert_array_equal(g.weights()["transformer.h.0.attn.c_attn.weight"],
                                      original.transformer.h[0].attn.c_attn.weight.detach().numpy())


def test_save_pretrained_dir_with_tokenizer_uses_it(tmp_path: Path) -> None:
    model, tok = small_gpt2(), byte_bpe_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer_kind == "hf"
    ids = loaded.encode("Hello")
    assert ids == tok.encode("Hello")
    assert len(ids) == 4 and ids[0] == 256  # the 'He' merge, not one id per byte
    assert loaded.decode(loaded.encode("Hello, world")) == "Hello, world"


@pytest.mark.parametrize("where", ["./no/such/model_dir", "/no/such/model_dir"])
def test_missing_directory(where: str) -> None:
    with pytest.raises(TracerError, match="does not exist"):
        load_model(where)


def test_unknown_hub_id_fails_fast_offline(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(TracerError, match="no-such-org/no-such-gpt2") as info:
        load_model("no-such-org/no-such-gpt2")
    assert "\n" not in str(info.value)


def test_non_gpt2_directory(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(TracerError, match="only GPT-2"):
        load_model(str(tmp_path))


def test_directory_without_weights(tmp_path: Path) -> None:
    small_gpt2().config.save_pretrained(tmp_path)
    with pytest.raises(TracerError) as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(TracerError):
        load_model(str(tmp_path))


@pytest.mark.parametrize("source, message", [
    ("random:gpt3", "gpt2-medium"),  # names the known shapes
    ("random:", "unknown"),
])
def test_unknown_random_shape(source: str, message: str) -> None:
    with pytest.raises(TracerError, match=message):
        load_model(source)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "fp8"}, "unknown dtype"),
    ({"attn": "flash"}, "unknown attention"),
    ({"device": "tpu"}, "unknown device"),
])
def test_bad_options(saved_dir, kwargs: dict, message: str) -> None:
    with pytest.raises(TracerError, match=message):
        load_model(str(saved_dir[0]), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda(saved_dir) -> None:
    with pytest.raises(TracerError, match="CUDA is not available"):
        load_model(str(saved_dir[0]), device="cuda")


@pytest.mark.parametrize("dtype, stored", [("fp16", np.float16), ("bf16", np.float32)])
def test_half_precision_records_finite_stages(tiny_loader, tmp_path: Path, dtype: str, stored) -> None:
    loaded = tiny_loader(dtype=dtype)
    assert next(loaded.model.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    out = tmp_path / f"{dtype}.h5"
    cases = build_cases(loaded, ["Hi", "Half precision"], [], batch=True)
    record_golden(loaded, cases, str(out), dtype=dtype, attn="eager")
    with Golden.open(out) as g:
        assert g.attrs["dtype"] == dtype
        case = g.case("batch")
        assert case.stages() == canonical_stages(loaded.config.n_layer)
        for stage in case.stages():
            data = case.read(stage)
            assert data.dtype == stored, stage
            finite = ~np.isneginf(data) if stage.endswith("attn.scores") else np.ones(data.shape, bool)
            assert np.all(np.isfinite(data[finite])), stage
            if dtype == "bf16":  # widened exactly: the low 16 bits of every float32 are zero
                assert not np.any(data.view(np.uint32) & 0xFFFF), stage
        w = g.weights()["transformer.h.0.ln_1.weight"]
        assert w.dtype == stored


@pytest.mark.slow
def test_random_gpt2_shape_loads_and_records(tmp_path: Path) -> None:
    loaded = load_model("random:gpt2")
    cfg = loaded.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (12, 768, 12, 1024, 50257)
    out = tmp_path / "g.h5"
    record_golden(loaded, build_cases(loaded, [], [[1, 50256, 3]], False), str(out), dtype="fp32", attn="eager",
                  with_weights=False)
    with Golden.open(out) as g:
        assert g.case("case0").stages() == canonical_stages(12)
        assert g.attrs["model_source"].startswith("random:gpt2")
