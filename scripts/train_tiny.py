"""Train the embedded ``tiny`` GPT-2 (tracer/data/tiny) on tracer/data/corpus.txt.

Why: calibrated random models (tracer.synth) have trained-like statistics, but
one model whose statistics come from real learning keeps the harness honest.
Byte-level (token id = UTF-8 byte), 2 layers, n_embd 64, 4 heads, 128 positions,
starting from ``realistic_init_`` so training begins with sharp attention.

    python scripts/train_tiny.py            # ~1-3 min on 2 CPU cores

Deterministic recipe (seeds, 1 thread, deterministic algorithms).  The saved
bytes are reproducible on the same torch build and CPU; elsewhere expect the
same statistics, not the same bits.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tracer.synth import STATS_T, attention_stats, realistic_init_  # noqa: E402 (after sys.path)

CORPUS = ROOT / "tracer" / "data" / "corpus.txt"
OUT_DIR = ROOT / "tracer" / "data" / "tiny"


def tiny_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=256,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=0,  # NUL byte: never in the corpus, so generation never stops early
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


def batches(data: torch.Tensor, batch: int, T: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - T - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + T + 1] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model: GPT2LMHeadModel, data: torch.Tensor, T: int) -> float:
    n = (data.numel() - 1) // T
    x = data[: n * T + 1]
    ids = torch.stack([x[i * T : (i + 1) * T + 1] for i in range(n)])
    return float(model(ids[:, :-1], labels=ids[:, :-1].clone(), use_cache=False).loss) if n else math.nan


def greedy(model: GPT2LMHeadModel, prompt: str, n: int) -> str:
    ids = torch.tensor([list(prompt.encode("utf-8"))])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


@torch.no_grad()
def centre_keys_(model: GPT2LMHeadModel, data: torch.Tensor, T: int) -> None:
    """Re-choose each key bias to minimise the unmasked score variance on ``data``.

    Exact symmetry: a key-bias change dk adds q_i.dk to every score of query
    row i, which the softmax ignores, so logits are unchanged (up to rounding).
    The key bias gets no gradient, so training leaves these per-row offsets
    wherever init put them.  Per head, the dk that minimises the pooled score
    variance solves a weighted least-squares problem on the row means (row i
    has i+1 unmasked entries); after it, the score std measures the spread
    that shapes attention rather than an arbitrary offset.
    """
    n = (data.numel() - 1) // T
    ids = data[: n * T].view(n, T)
    outs: list[torch.Tensor] = []
    hooks = [
        b.attn.c_attn.register_forward_hook(lambda _m, _i, o: outs.append(o)) for b in model.transformer.h
    ]
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    d, H = model.config.n_embd, model.config.n_head
    D = d // H
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    w = causal.sum(-1).double().sqrt()  # sqrt of entries per row: LS weights
    for blk, o in zip(model.transformer.h, outs):
        q, k = o.double()[..., :d], o.double()[..., d : 2 * d]
        scale = float(blk.attn.scaling)
        # unknowns: dk (all heads, d values) and one common mean m
        rows, rhs = [], []
        for h in range(H):
            qh, kh = q[..., h * D : (h + 1) * D], k[..., h * D : (h + 1) * D]
            s = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~causal, 0.0)
            row_mean = s.sum(-1) / causal.sum(-1)  # (n, T)
            A = torch.zeros(*qh.shape[:-1], d + 1, dtype=torch.float64)
            A[..., h * D : (h + 1) * D] = qh * scale
            A[..., d] = -1.0
            rows.append((A * w[:, None]).reshape(-1, d + 1))
            rhs.append((-row_mean * w).reshape(-1, 1))
        sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)).solution
        blk.attn.c_attn.bias[d : 2 * d] += sol[:d, 0].to(torch.float32)


def fmt_stats(stats: list[dict]) -> str:
    return "  ".join(
        f"L{s['layer']}: max_p={s['mean_max_prob']:.3f} std={s['score_std']:.2f}" for s in stats
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)  # ~ best held-out loss; later it memorises
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    split = int(data.numel() * 0.9)
    train, val = data[:split], data[split:]
    cfg = tiny_config()
    T = cfg.n_positions

    model = GPT2LMHeadModel(cfg)
    model.set_attn_implementation("eager")
    realistic_init_(model, seed=args.seed)
    probe = torch.randint(0, 256, (8, STATS_T), generator=torch.Generator().manual_seed(1))
    print(f"corpus {data.numel()} bytes, params {sum(p.numel() for p in model.parameters())}")
    print("init  :", fmt_stats(attention_stats(model, probe)))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm)
        * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    running = 0.0
    for step in range(1, args.steps + 1):
        xb = batches(train, args.batch, T, gen)
        loss = model(xb[:, :-1], labels=xb[:, :-1].clone(), use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % 50 == 0 or step == args.steps:
            model.eval()
            k = 50 if step % 50 == 0 else step % 50
            print(
                f"step {step:5d}  train {running / k:.3f}  val {eval_loss(model, val, T):.3f}"
                f"  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.1f}s",
                flush=True,
            )
            running = 0.0
            model.train()
    model.eval()
    before = model(probe, use_cache=False).logits
    centre_keys_(model, train, STATS_T)
    drift = (model(probe, use_cache=False).logits - before).abs().max().item()
    print(f"re-chose key biases on the training text (max logit change {drift:.2e})")

    ascii_probe = torch.randint(32, 127, (8, STATS_T), generator=torch.Generator().manual_seed(2))
    text = data[split : split + 8 * STATS_T].view(8, STATS_T)
    print("final (random bytes):", fmt_stats(attention_stats(model, probe)))
    print("final (random ASCII):", fmt_stats(attention_stats(model, ascii_probe)))
    print("final (corpus text) :", fmt_stats(attention_stats(model, text)))
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            print(f"  {name}: gain mean {p.mean():.3f} std {p.std():.3f}")
    print(
        f"  wte std {model.transformer.wte.weight.std():.4f}  "
        f"wpe std {model.transformer.wpe.weight.std():.4f}"
    )
    for prompt in ("The engineer ", "A numerical program "):
        print(f"greedy {prompt!r}: {greedy(model, prompt, cfg.n_positions - len(prompt))!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "generation_config.json").unlink(missing_ok=True)  # not needed by the harness
    size = (args.out / "model.safetensors").stat().st_size
    print(f"saved {args.out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
