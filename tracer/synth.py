"""Synthetic GPT-2 weights with trained-like statistics.

Why: HF's default init (N(0, 0.02), zero biases, identity LayerNorm) gives
near-uniform attention and tiny activations, so a correct fp32 port and a
buggy one (wrong mask, wrong scale, swapped q/k, missing bias ...) produce
almost the same numbers.  ``realistic_init_`` draws weights that look like a
trained GPT-2 and then *calibrates* every layer on a fixed input so that
attention is peaked (mean max prob ~0.5) with pre-softmax score std ~3.

Determinism: every number comes from ``torch.randint`` on a private CPU
``torch.Generator`` (integer output, independent of SIMD level and thread
count), mapped to a Gaussian by a piecewise-linear inverse-CDF table using
only IEEE-exact float32 ops.  Calibration runs in float64; every scale it
picks is rounded to 8 significant bits and every centring bias to a 2**-12
grid, so thread- or BLAS-dependent float64 rounding cannot change the stored
float32 weights.  Step by step in docs/MODELS.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import GPT2Config
from transformers.activations import ACT2FN

_log = logging.getLogger(__name__)

__all__ = [
    "RANDOM_SHAPES",
    "STATS_T",
    "TARGET_MEAN_MAX_PROB",
    "TARGET_SCORE_STD",
    "attention_stats",
    "random_config",
    "realistic_init_",
]

#: Real GPT-2 shapes (OpenAI checkpoints).
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25, "n_positions": 1024, "vocab_size": 50257},
}

#: Sequence length the targets are defined (and calibrated) at.  Mean max
#: probability depends on length: longer rows spread attention thinner.
STATS_T = 64
TARGET_MEAN_MAX_PROB = 0.5
TARGET_SCORE_STD = 3.0

# Residual stream rms after block i is rms(embeddings) * (1 + _RESID_GROWTH*(i+1)):
# roughly linear growth with depth, x10 over the 12 layers of gpt2.
_RESID_GROWTH = 0.75
# Share of each layer's residual variance increase written by attention (the
# rest by the MLP).  Attention output mixes tokens of a sequence; a large share
# makes the stream drift towards per-sequence means over depth.
_ATTN_SHARE = 0.25
_WTE_STD = 0.11
_WPE_STD = 0.04
_CAL_BATCH = 8


def random_config(name: str, **overrides: Any) -> GPT2Config:
    """GPT2Config with a real GPT-2 shape, dropouts 0, ``overrides`` applied last."""
    if name not in RANDOM_SHAPES:
        raise ValueError(f"unknown GPT-2 shape {name!r}; known: {', '.join(RANDOM_SHAPES)}")
    kw: dict[str, Any] = dict(RANDOM_SHAPES[name])
    kw.update(
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        activation_function="gelu_new",
    )
    kw.update(overrides)
    return GPT2Config(**kw)


# --------------------------------------------------------------------------- RNG


class _Rng:
    """Gaussian draws from integer randomness only (same bits on any CPU, any thread count).

    ``torch.randn`` is avoided on purpose: its float32 CPU kernel has an AVX2
    path using vectorized log/cos, so bits differ between CPUs.
    """

    _BITS = 16  # table resolution: 2**16 bins in probability
    _table: torch.Tensor | None = None

    def __init__(self, seed: int, stream: int) -> None:
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed((seed * 1_000_003 + stream * 7919 + 17) % (2**63))

    @classmethod
    def _tab(cls) -> torch.Tensor:
        if cls._table is None:
            n = 1 << cls._BITS
            p = torch.arange(n + 1, dtype=torch.float64) / n
            p[0], p[n] = 2.0**-26, 1.0 - 2.0**-26
            z = torch.special.ndtri(p).to(torch.float32)
            cls._table = torch.stack([z[:-1], z[1:] - z[:-1]], dim=1).contiguous()  # (n, 2)
        return cls._table

    def normal(self, shape: tuple[int, ...], std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=torch.float32)
        tab = self._tab()
        z0, dz = tab[:, 0].contiguous(), tab[:, 1].contiguous()
        lo_bits = 24 - self._BITS
        # chunks below torch's parallel grain size run serially: no thread wake-ups
        chunk = min(1 << 15, max(numel, 1))
        r = torch.empty(chunk, dtype=torch.int32)
        idx = torch.empty(chunk, dtype=torch.int32)
        frac = torch.empty(chunk, dtype=torch.float32)
        base = torch.empty(chunk, dtype=torch.float32)
        for s in range(0, numel, chunk):  # preallocated buffers: allocation dominates otherwise
            n = min(chunk, numel - s)
            rv, iv, fv, bv = r[:n], idx[:n], frac[:n], base[:n]
            rv.random_(0, 1 << 24, generator=self.gen)
            torch.bitwise_right_shift(rv, lo_bits, out=iv)
            torch.index_select(z0, 0, iv, out=bv)
            torch.bitwise_and(rv, (1 << lo_bits) - 1, out=iv)
            fv.copy_(iv)
            fv.add_(0.5).mul_(1.0 / (1 << lo_bits))  # exact: position inside the bin
            torch.bitwise_right_shift(rv, lo_bits, out=iv)
            fv.mul_(torch.index_select(dz, 0, iv))
            torch.add(bv, fv, out=out[s : s + n])
        out = out.view(*shape)
        if std != 1.0:
            out.mul_(std)
        if mean != 0.0:
            out.add_(mean)
        return out

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Float32 uniform in [0, 1), multiples of 2**-24 (exact)."""
        r = torch.randint(0, 1 << 24, tuple(shape), generator=self.gen, dtype=torch.int32)
        return r.to(torch.float32) * (1.0 / (1 << 24))

    def ints(self, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.gen, dtype=torch.int64)


def _q8(x: float) -> float:
    """Round to 8 significant bits: calibration decisions become thread-independent."""
    m, e = math.frexp(x)
    return math.ldexp(round(m * 256) / 256, e)


# ------------------------------------------------------------------ float64 model


def _ln(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * g.double() + b.double()


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def _score_stats(s: torch.Tensor, causal: torch.Tensor) -> tuple[float, float]:
    """(std of unmasked scores, mean max prob) for scores (B,H,T,T)."""
    mask = causal.to(s.dtype)
    n = float(mask.sum()) * s.shape[0] * s.shape[1]
    mean = float((s * mask).sum()) / n
    std = math.sqrt(float(((s - mean).pow(2) * mask).sum()) / n)
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    return std, float(p.amax(-1).mean())


def _fixed(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 on a 2**-12 grid (thread-independent, see _q8)."""
    return (torch.round(x * 4096) / 4096).to(torch.float32)


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def _attn_target(rms0: float, i: int) -> float:
    v0 = (rms0 * (1 + _RESID_GROWTH * i)) ** 2
    v1 = (rms0 * (1 + _RESID_GROWTH * (i + 1))) ** 2
    return math.sqrt(v0 + _ATTN_SHARE * (v1 - v0))


def _solve_gain(h: torch.Tensor, a: torch.Tensor, target_rms: float) -> float:
    """c >= 0 with rms(h + c*a) == target_rms (quadratic in c)."""
    A = float(a.pow(2).mean())
    Bc = float((h * a).mean())
    C = float(h.pow(2).mean()) - target_rms**2
    disc = max(Bc * Bc - A * C, 0.0)
    return max((-Bc + math.sqrt(disc)) / A, 1e-3)


def _calibrate_qk(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    u: torch.Tensor,
    e_k: torch.Tensor,
    n_head: int,
    scaling: float,
    causal: torch.Tensor,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, float, float, float]:
    """Set one layer's q/k so attention on ``x`` (LN output, float64) hits the targets.

    Returns ((wq, bq, wk, bk) float32, masked float64 scores, knob, raw std, q/k scale).
    """
    xbar = x.mean((0, 1))
    xq, xk = x @ wq.double(), x @ wk.double()
    qh = _heads(xq + bq.double(), n_head)
    krms = _q8(_rms(xk - xk.mean((0, 1))))
    u64, bk64, ek64 = u.double(), bk.double(), e_k.double()

    def qk(knob: float) -> tuple[torch.Tensor, torch.Tensor]:
        """k weight/bias for a knob in [-1, 1].  knob > 0: share q into k (peaks
        attention on similar tokens); knob < 0: extra key bias, i.e. per-row
        score offsets that the softmax ignores (flattens at fixed score std)."""
        wk_t = wk
        if knob > 0:
            w = u * knob
            wk_t = wk * (1.0 - w) + wq * w
        # keys centred on the calibration input (trained GPT-2 has ~0 key
        # bias: it gets no gradient), plus the knob's offset
        return wk_t, bk - _fixed(xbar @ wk_t.double()) + e_k * (max(-knob, 0.0) * krms)

    def scores(knob: float) -> torch.Tensor:
        """Scores (B,H,T,T) of qk(knob), float64 shortcut (no matmul with new weights)."""
        k = xk
        if knob > 0:
            w = u64 * knob
            k = xk * (1.0 - w) + xq * w
        k = k - k.mean((0, 1)) + (bk64 + ek64 * (max(-knob, 0.0) * krms))
        return (qh @ _heads(k, n_head).transpose(-1, -2)) * scaling

    def measure(knob: float) -> float:
        """Mean max prob at score std 3."""
        sc = scores(knob)
        return _score_stats(sc * (TARGET_SCORE_STD / _score_stats(sc, causal)[0]), causal)[1]

    lo, hi = -1.0, 1.0  # bisection over dyadic knob values (exact in float32)
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(mid) < TARGET_MEAN_MAX_PROB else (lo, mid)
    knob = (lo + hi) / 2
    wk, bk = qk(knob)
    sc = scores(knob)
    std = _score_stats(sc, causal)[0]
    a = _q8(math.sqrt(TARGET_SCORE_STD / std))
    sc = (sc * (a * a)).masked_fill(~causal, float("-inf"))  # = scores of the scaled q, k
    return (wq * a, bq * a, wk * a, bk * a), sc, knob, std, a


# ----------------------------------------------------------------------- embeddings


def _wpe(rng: _Rng, n_pos: int, d: int) -> torch.Tensor:
    """Smooth helical position embeddings (like real GPT-2's) plus small noise.

    A sum of 2-D rotations at geometric frequencies, embedded through random
    directions, built with an exact-arithmetic rotation recurrence (no cos).
    Position 0 gets a larger norm, as in GPT-2.
    """
    n_pairs = 8
    dirs = rng.normal((n_pairs, 2, d), 1.0 / math.sqrt(d)).double()
    amp = rng.uniform((n_pairs,)).double() * 0.5 + 0.75
    state = rng.normal((n_pairs, 2)).double()
    t, ts = 0.5, []
    for _ in range(n_pairs):  # tan(omega/2), geometric: periods ~6 .. ~1000 positions
        ts.append(t)
        t *= 0.45
    tt = torch.tensor(ts, dtype=torch.float64)
    c, s = (1 - tt * tt) / (1 + tt * tt), 2 * tt / (1 + tt * tt)
    traj = torch.empty(n_pos, n_pairs, 2, dtype=torch.float64)
    x, y = state[:, 0].clone(), state[:, 1].clone()
    for p in range(n_pos):
        traj[p, :, 0], traj[p, :, 1] = x, y
        x, y = c * x - s * y, s * x + c * y
    helix = torch.einsum("pjk,jkd->pd", traj * amp[None, :, None], dirs).to(torch.float32)
    helix = helix * (_WPE_STD / _rms(helix.double()) * 0.9)
    wpe = helix + rng.normal((n_pos, d), _WPE_STD * 0.4)
    wpe[0] = wpe[0] * 3.0
    return wpe


# ------------------------------------------------------------------------- main


@torch.no_grad()
def realistic_init_(model: torch.nn.Module, seed: int,
                    progress: Callable[[Iterable], Iterable] | None = None) -> None:
    """Overwrite all weights of a GPT-2 (``GPT2LMHeadModel`` or ``GPT2Model``) in place.

    Weights are drawn with trained-like statistics, then, layer by layer on a
    fixed float64 forward (8 x STATS_T ids), one knob (q shared into k, or
    softmax-neutral key-bias offsets) is bisected so mean max prob is 0.5 at
    score std 3 and q/k are rescaled to std 3; each residual branch is centred
    and scaled so the stream grows linearly with depth.  Layer i's draws
    depend only on (seed, i): fewer layers = the first layers of the deeper
    model.  Uses no global RNG state; the result does not depend on threads.
    ``progress`` wraps the iterator over layers (a progress bar; calibration is per layer).
    """
    tr = getattr(model, "transformer", model)
    cfg = model.config
    d, H = cfg.n_embd, cfg.n_head
    V, P = cfg.vocab_size, cfg.n_positions
    D = d // H
    inner = cfg.n_inner if cfg.n_inner is not None else 4 * d
    eps = cfg.layer_norm_epsilon
    act = ACT2FN[cfg.activation_function]

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value.to(device=param.device, dtype=param.dtype))

    # -- embeddings: iid tokens + a shared mean direction (real GPT-2 wte is not centered)
    rng = _Rng(seed, 0)
    wte = rng.normal((V, d), _WTE_STD) + rng.normal((1, d), 0.3 * _WTE_STD)
    wpe = _wpe(rng, P, d)
    put(tr.wte.weight, wte)
    put(tr.wpe.weight, wpe)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and lm_head.weight is not tr.wte.weight:
        put(lm_head.weight, wte)

    # -- calibration input: half byte-level ids, half full vocab
    T = min(STATS_T, P)
    crng = _Rng(seed, 1)
    ids = torch.cat(
        [crng.ints(min(V, 256), (_CAL_BATCH // 2, T)), crng.ints(V, (_CAL_BATCH - _CAL_BATCH // 2, T))]
    )
    h = (wte[ids] + wpe[:T]).double()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rms0 = _rms(h)

    for i, blk in enumerate(progress(tr.h) if progress else tr.h):
        r = _Rng(seed, 10 + i)
        attn = blk.attn
        ln1_g = (1.0 + r.normal((d,), 0.25)).clamp_min(0.05)
        ln1_b = r.normal((d,), 0.05)
        wq, wk = r.normal((d, d), d**-0.5), r.normal((d, d), d**-0.5)
        bq, bk = r.normal((d,), 0.2), r.normal((d,), 0.02)
        u = r.uniform((H,)).repeat_interleave(D)  # per-head share of q in k
        wv, bv = r.normal((d, d), d**-0.5), r.normal((d,), 0.05)
        wo, bo = r.normal((d, d), d**-0.5), r.normal((d,), 0.05)
        ln2_g = (1.0 + r.normal((d,), 0.25)).clamp_min(0.05)
        ln2_b = r.normal((d,), 0.05)
        wfc, bfc = r.normal((d, inner), d**-0.5), r.normal((inner,), 0.1, mean=-0.05)
        wp, bp = r.normal((inner, d), inner**-0.5), r.normal((d,), 0.05)
        e_k = r.normal((d,))  # direction of the extra key bias (knob < 0)

        # ---- attention: pick the knob, then the q/k scale
        x = _ln(h, ln1_g, ln1_b, eps)
        (wq, bq, wk, bk), sc, knob, std, a = _calibrate_qk(
            x, wq, bq, wk, bk, u, e_k, H, float(attn.scaling), causal
        )

        # ---- attention output: centre over tokens, scale to the residual target
        v = _heads(x @ wv.double() + bv.double(), H)
        o = (torch.softmax(sc, -1) @ v).transpose(1, 2).reshape(h.shape) @ wo.double()
        # branch outputs centred over tokens so the residual keeps token identity
        bo = bo - _fixed(o.mean((0, 1)))
        c = _q8(_solve_gain(h, o + bo.double(), _attn_target(rms0, i)))
        wo, bo = wo * c, bo * c
        h = h + o * c + bo.double()

        # ---- MLP: same treatment
        x2 = _ln(h, ln2_g, ln2_b, eps)
        m = act(x2 @ wfc.double() + bfc.double()) @ wp.double()
        bp = bp - _fixed(m.mean((0, 1)))
        c2 = _q8(_solve_gain(h, m + bp.double(), rms0 * (1 + _RESID_GROWTH * (i + 1))))
        wp, bp = wp * c2, bp * c2
        h = h + m * c2 + bp.double()
        _log.debug("layer %d: knob %.4f raw std %.3f qk %.4f attn %.4f mlp %.4f", i, knob, std, a, c, c2)

        put(blk.ln_1.weight, ln1_g)
        put(blk.ln_1.bias, ln1_b)
        put(attn.c_attn.weight, torch.cat([wq, wk, wv], 1))
        put(attn.c_attn.bias, torch.cat([bq, bk, bv]))
        put(attn.c_proj.weight, wo)
        put(attn.c_proj.bias, bo)
        put(blk.ln_2.weight, ln2_g)
        put(blk.ln_2.bias, ln2_b)
        put(blk.mlp.c_fc.weight, wfc)
        put(blk.mlp.c_fc.bias, bfc)
        put(blk.mlp.c_proj.weight, wp)
        put(blk.mlp.c_proj.bias, bp)

    r = _Rng(seed, 9)
    put(tr.ln_f.weight, (1.0 + r.normal((d,), 0.25)).clamp_min(0.05))
    put(tr.ln_f.bias, r.normal((d,), 0.05))


# ----------------------------------------------------------------------- stats


@torch.no_grad()
def attention_stats(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[dict[str, float | int]]:
    """Per layer ``{"layer", "mean_max_prob", "score_std"}`` measured on the model itself.

    Probabilities come from ``output_attentions=True`` under eager attention;
    scores are recomputed from each ``c_attn`` output (captured by a forward
    hook) as q.k^T * scaling.  Both are taken over unmasked entries only:
    causal, key not padded, query row not padded.
    """
    tr = getattr(model, "transformer", model)
    prev_impl = model.config._attn_implementation
    captured: list[torch.Tensor] = []
    hooks = [
        blk.attn.c_attn.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        for blk in tr.h
    ]
    was_training = model.training
    model.eval()
    try:
        if prev_impl != "eager":
            model.set_attn_implementation("eager")
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False
        )
    finally:
        for hk in hooks:
            hk.remove()
        if prev_impl != "eager":
            model.set_attn_implementation(prev_impl)
        model.train(was_training)

    B, T = input_ids.shape
    dev = out.attentions[0].device
    valid = (
        torch.ones(B, T, dtype=torch.bool, device=dev)
        if attention_mask is None
        else attention_mask.to(dev).bool()
    )
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    keep = causal[None] & valid[:, None, :] & valid[:, :, None]  # (B, Tq, Tk)
    rows = valid  # (B, Tq)

    stats: list[dict[str, float | int]] = []
    for i, (blk, qkv, probs) in enumerate(zip(tr.h, captured, out.attentions)):
        attn = blk.attn
        H = attn.num_heads
        q, k, _ = qkv.double().split(attn.split_size, dim=2)
        s = (_heads(q, H) @ _heads(k, H).transpose(-1, -2)) * float(attn.scaling)
        vals = s.masked_select(keep[:, None])
        pmax = probs.double().amax(-1)  # (B, H, Tq)
        mmp = pmax.masked_select(rows[:, None].expand_as(pmax)).mean()
        stats.append(
            {"layer": i, "mean_max_prob": float(mmp), "score_std": float(vals.std(unbiased=False))}
        )
    return stats
