"""The models the harness is tuned on must look trained (docs/MODELS.md).

Attention statistics are measured with ``tracer.synth.attention_stats`` at
T = STATS_T (64).  Targets: per layer mean max attention prob 0.35-0.65 (the
trained tiny may go up to 0.8) and unmasked pre-softmax score std 2-4.5.
HF's default init is checked to *fail* them, so these tests can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from tracer import synth
from tracer.synth import STATS_T, attention_stats, random_config, realistic_init_

TINY_DIR = Path(synth.__file__).parent / "data" / "tiny"
CORPUS = Path(synth.__file__).parent / "data" / "corpus.txt"
GPT2_VOCAB = 50257


def meets_targets(stats: list[dict], max_prob: tuple[float, float] = (0.35, 0.65),
                  score_std: tuple[float, float] = (2.0, 4.5)) -> bool:
    return all(
        max_prob[0] <= s["mean_max_prob"] <= max_prob[1] and score_std[0] <= s["score_std"] <= score_std[1]
        for s in stats
    )


def random_ids(high: int, seed: int, batch: int = 4, low: int = 0) -> torch.Tensor:
    return torch.randint(low, high, (batch, STATS_T), generator=torch.Generator().manual_seed(seed))


def state_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def check_trained_like_weights(model: GPT2LMHeadModel) -> None:
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert p.std() >= 0.1, f"{name}: LayerNorm gains look like identity (std {p.std():.3f})"
        elif name.endswith(".bias"):  # LayerNorm and every Conv1D bias
            assert (p != 0).float().mean() > 0.99 and p.abs().mean() > 1e-3, f"{name}: bias ~ zero"


# ---------------------------------------------------------------------------- tiny


@pytest.fixture(scope="module")
def tiny() -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(str(TINY_DIR), attn_implementation="eager").eval()


def test_tiny_files_and_config(tiny: GPT2LMHeadModel) -> None:
    assert (TINY_DIR / "model.safetensors").stat().st_size < 1_000_000
    c = tiny.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions, c.vocab_size) == (2, 64, 4, 128, 256)
    assert c.activation_function == "gelu_new"
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)
    assert tiny.lm_head.weight.data_ptr() == tiny.transformer.wte.weight.data_ptr()  # tied, as GPT-2


def test_tiny_weights_look_trained(tiny: GPT2LMHeadModel) -> None:
    check_trained_like_weights(tiny)
    wte, wpe = tiny.transformer.wte.weight, tiny.transformer.wpe.weight
    assert 0.1 <= wte.std() <= 0.3
    assert wpe.std() < wte.std()


def test_tiny_attention_on_text(tiny: GPT2LMHeadModel) -> None:
    data = torch.tensor(list(CORPUS.read_bytes()))
    held_out = data[int(data.numel() * 0.9):]  # the split train_tiny.py never trains on
    stats = attention_stats(tiny, held_out[: 8 * STATS_T].view(8, STATS_T))
    assert meets_targets(stats, max_prob=(0.35, 0.8)), stats


def test_tiny_attention_on_random_ascii(tiny: GPT2LMHeadModel) -> None:
    stats = attention_stats(tiny, random_ids(127, seed=2, batch=8, low=32))
    assert meets_targets(stats, max_prob=(0.35, 0.8)), stats


def test_tiny_attention_on_random_bytes_is_sane(tiny: GPT2LMHeadModel) -> None:
    # bytes >= 128 never occur in the corpus: out of distribution, so looser bounds (see docs)
    stats = attention_stats(tiny, random_ids(256, seed=1, batch=8))
    assert meets_targets(stats, max_prob=(0.25, 0.8), score_std=(2.0, 6.0)), stats


def test_tiny_greedy_generation_is_text_like(tiny: GPT2LMHeadModel) -> None:
    prompt = "The engineer "
    ids = torch.tensor([list(prompt.encode())])
    out = tiny.generate(ids, max_new_tokens=80, do_sample=False, pad_token_id=0)
    text = bytes(out[0, ids.shape[1]:].tolist()).decode("utf-8", errors="replace")
    assert sum(ch.isalpha() or ch == " " for ch in text) >= 0.9 * len(text), text
    assert text.count(" ") >= 8 and max(len(w) for w in text.split()) <= 15, text


def test_attention_stats_excludes_padding(tiny: GPT2LMHeadModel) -> None:
    ids = random_ids(127, seed=3, batch=1, low=32)
    mask = torch.zeros_like(ids)
    mask[:, :40] = 1  # right padding: the 40 valid rows must see exactly the unpadded input
    padded = attention_stats(tiny, ids, attention_mask=mask)
    alone = attention_stats(tiny, ids[:, :40])
    for a, b in zip(padded, alone):
        assert a["mean_max_prob"] == pytest.approx(b["mean_max_prob"], abs=1e-5)
        assert a["score_std"] == pytest.approx(b["score_std"], rel=1e-4)


# ----------------------------------------------------------------- realistic init


@pytest.fixture(scope="module")
def gpt2_2l() -> GPT2LMHeadModel:
    model = GPT2LMHeadModel(random_config("gpt2", n_layer=2))
    realistic_init_(model, seed=0)
    return model.eval()


@pytest.mark.parametrize("high", [256, GPT2_VOCAB], ids=["bytes", "full-vocab"])
def test_realistic_init_meets_targets(gpt2_2l: GPT2LMHeadModel, high: int) -> None:
    stats = attention_stats(gpt2_2l, random_ids(high, seed=11))
    assert meets_targets(stats), stats
    for s in stats:  # calibrated to 0.5 / 3.0: a fresh input lands close
        assert abs(s["mean_max_prob"] - 0.5) < 0.06 and abs(s["score_std"] - 3.0) < 0.4, stats


def test_realistic_init_weight_statistics(gpt2_2l: GPT2LMHeadModel) -> None:
    check_trained_like_weights(gpt2_2l)
    wte, wpe = gpt2_2l.transformer.wte.weight, gpt2_2l.transformer.wpe.weight
    assert 0.1 <= wte.std() <= 0.15
    assert 0.01 <= wpe.std() < wte.std()
    # structured positions: neighbours alike (random rows would have cosine ~0)
    cos = torch.nn.functional.cosine_similarity(wpe[1:-1], wpe[2:], dim=-1)
    assert cos.mean() > 0.5
    # residual stream grows with depth: embeddings, after block 0, after block 1
    ids = random_ids(256, seed=12)
    tr = gpt2_2l.transformer
    with torch.no_grad():
        resid = [tr.wte(ids) + tr.wpe(torch.arange(STATS_T))]
    hooks = [b.register_forward_hook(lambda _m, _i, out: resid.append(out)) for b in tr.h]
    try:
        with torch.no_grad():
            gpt2_2l(ids)
    finally:
        for h in hooks:
            h.remove()
    rms = [float((h[0] if isinstance(h, tuple) else h).pow(2).mean().sqrt()) for h in resid]
    assert rms[0] < rms[1] < rms[2] and rms[2] > 2 * rms[0], rms


def test_hf_default_init_fails_targets() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(random_config("gpt2", n_layer=2)).eval()
    stats = attention_stats(model, random_ids(GPT2_VOCAB, seed=11))
    assert not meets_targets(stats)
    assert all(s["score_std"] < 0.5 for s in stats), stats  # far below 2: near-uniform attention


def test_realistic_init_is_deterministic(gpt2_2l: GPT2LMHeadModel) -> None:
    ref = state_bytes(gpt2_2l)
    threads = torch.get_num_threads()
    torch.manual_seed(123)  # the global RNG must not matter
    try:
        torch.set_num_threads(1)  # nor the number of threads
        again = GPT2LMHeadModel(random_config("gpt2", n_layer=2))
        realistic_init_(again, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert state_bytes(again) == ref

    # per-layer streams: a 1-layer model is the first layer of the 2-layer one
    one = GPT2LMHeadModel(random_config("gpt2", n_layer=1))
    realistic_init_(one, seed=0)
    assert all(ref[k] == v for k, v in state_bytes(one).items())

    other = GPT2LMHeadModel(random_config("gpt2", n_layer=1))
    realistic_init_(other, seed=1)
    for k, v in state_bytes(other).items():
        if not k.endswith("attn.bias"):  # HF's causal-mask buffer, if present, is not a weight
            assert v != ref[k], f"{k} identical for seeds 0 and 1"


def test_random_config() -> None:
    for name, shape in synth.RANDOM_SHAPES.items():
        c = random_config(name)
        assert (c.n_layer, c.n_embd, c.n_head) == (shape["n_layer"], shape["n_embd"], shape["n_head"])
        assert (c.n_positions, c.vocab_size) == (1024, GPT2_VOCAB)
        assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)
    assert random_config("gpt2-xl")
    assert random_config("gpt2", n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="gpt2-medium"):
        random_config("gpt3")
