"""Triton kernels of GPT-2's forward, and the small launch wrappers the Triton backend calls.

Why a separate module: the backend file stays the readable forward (one stage, one tap), and
every number in it comes from a kernel below. torch only allocates output buffers and makes
strided views (head split, transposed weights); no torch arithmetic touches an activation.

Each kernel computes in float32 whatever its inputs' dtype (fp16 activations are widened on
load, matrix products accumulate in float32) and stores in its output buffer's dtype. Divisions
and square roots use the correctly rounded `div_rn` / `sqrt_rn`: Triton's plain `/` and
`sqrt` are approximate on NVIDIA GPUs, which would show as noise above a plain fp32 port.

Fault injections (`backends.inject.CATALOG`) are constexpr switches or alternative arguments
(a scale, a stride, a position offset) of these kernels, never Python-side arithmetic.

Block sizes are powers of two, every load and store is masked, strides are passed explicitly
and `tl.dot` tiles are at least 16 wide, so the kernels run the same compiled on a GPU and on
CPU tensors under `TRITON_INTERPRET=1` (which Triton reads when this module is imported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ELEMENTWISE_BLOCK = 1024
MATMUL_BLOCK_M, MATMUL_BLOCK_N, MATMUL_BLOCK_K = 32, 64, 32
ATTN_MIN_BLOCK, ATTN_MAX_BLOCK = 16, 64  # query/key tile sizes: tl.dot needs >= 16


def _pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(n, 1)))
    return min(p, hi) if hi is not None else p


def _check_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"expected a contiguous tensor, got shape {tuple(t.shape)} strides {t.stride()}")


# -- embeddings -----------------------------------------------------------------------------
@triton.jit
def _gather_rows_kernel(table_ptr, idx_ptr, out_ptr, C, n_table, offset, scale,
                        stride_table, stride_out,
                        FROM_IDX: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r] = table[i] * scale, i = idx[r] (token ids) or (r + offset) mod n_table (positions)."""
    r = tl.program_id(0)
    if FROM_IDX:
        i = tl.load(idx_ptr + r).to(tl.int64)
    else:
        i = ((r + offset) % n_table).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    row = tl.load(table_ptr + i * stride_table + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * stride_out + cols, (row * scale).to(out_ptr.dtype.element_ty), mask=ok)


def embedding(wte: torch.Tensor, ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """embed.tok [B,T,C] = wte[ids] (times `scale`: 1 in GPT-2)."""
    _check_contiguous(wte, ids)
    B, T = ids.shape
    C = wte.shape[1]
    out = torch.empty((B, T, C), dtype=wte.dtype, device=wte.device)
    _gather_rows_kernel[(B * T,)](wte, ids, out, C, wte.shape[0], 0, scale, wte.stride(0), C,
                                  FROM_IDX=True, BLOCK_C=_pow2(C))
    return out


def positions(wpe: torch.Tensor, T: int, offset: int = 0) -> torch.Tensor:
    """embed.pos [1,T,C] = wpe[offset : offset+T] (positions wrap at n_positions)."""
    _check_contiguous(wpe)
    C = wpe.shape[1]
    out = torch.empty((1, T, C), dtype=wpe.dtype, device=wpe.device)
    _gather_rows_kernel[(T,)](wpe, wpe, out, C, wpe.shape[0], offset, 1.0, wpe.stride(0), C,
                              FROM_IDX=False, BLOCK_C=_pow2(C))
    return out


# -- elementwise ----------------------------------------------------------------------------
@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, n_y, USE_X: tl.constexpr, USE_Y: tl.constexpr, BLOCK: tl.constexpr):
    """out = x + y over flat buffers, y repeated every n_y elements (embed.pos over the batch)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if USE_X:
        acc += tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if USE_Y:
        acc += tl.load(y_ptr + offs % n_y, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def add(x: torch.Tensor, y: torch.Tensor, use_x: bool = True, use_y: bool = True) -> torch.Tensor:
    """x + y with x's shape; y may be a leading-1 broadcast ([1,T,C] onto [B,T,C]).

    `use_x=False` / `use_y=False` drop one operand (a forgotten residual, a skipped wpe).
    """
    _check_contiguous(x, y)
    if y.shape != x.shape and (y.shape[0] != 1 or y.shape[1:] != x.shape[1:]):
        raise ValueError(f"cannot broadcast {tuple(y.shape)} onto {tuple(x.shape)}")
    out = torch.empty_like(x)
    n = x.numel()
    _add_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](x, y, out, n, y.numel(), USE_X=use_x, USE_Y=use_y,
                                                      BLOCK=ELEMENTWISE_BLOCK)
    return out


@triton.jit
def _gelu_kernel(x_ptr, out_ptr, n, APPROX: tl.constexpr, BLOCK: tl.constexpr):
    """GELU. tanh: 0.5·x·(1 + tanh(u)), u = √(2/π)(x + 0.044715x³), evaluated as x·sigmoid(2u)
    (the same function, without the cancellation of 1 + tanh for negative x, and with no libdevice
    call, which the interpreter lacks); below x = -9 it is under 1e-36 either way. erf: 0.5·x·(1 + erf(x/√2))."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if APPROX == "tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = tl.math.div_rn(x, 1.0 + tl.exp(tl.minimum(-2.0 * u, 88.0)))  # exp(88) < float32 max
    else:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """mlp.act: GPT-2's tanh-approximation GELU (`approximate="erf"`: the exact one)."""
    _check_contiguous(x)
    out = torch.empty_like(x)
    n = x.numel()
    _gelu_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](x, out, n, APPROX=approximate, BLOCK=ELEMENTWISE_BLOCK)
    return out


# -- LayerNorm ------------------------------------------------------------------------------
@triton.jit
def _layernorm_kernel(x_ptr, g_ptr, b_ptr, out_ptr, C, stride_x, stride_out, eps,
                      VARIANT: tl.constexpr, BLOCK_C: tl.constexpr):
    """One row per program: mean, then the variance of the centred row (two passes over registers,
    float32), y = (x - mean) / sqrt(var + eps) · g + b.

    VARIANT: "standard"; "unbiased" (var divides by C-1); "eps-outside" ((x-mean)/(sqrt(var)+eps));
    "skip" (y = x: a LayerNorm that was never called)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(x_ptr + r * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if VARIANT == "skip":
        y = x
    else:
        mean = tl.math.div_rn(tl.sum(x, axis=0), C * 1.0)
        xc = tl.where(ok, x - mean, 0.0)
        ss = tl.sum(xc * xc, axis=0)
        if VARIANT == "unbiased":
            var = tl.math.div_rn(ss, C - 1.0)
        else:
            var = tl.math.div_rn(ss, C * 1.0)
        if VARIANT == "eps-outside":
            denom = tl.math.sqrt_rn(var) + eps
        else:
            denom = tl.math.sqrt_rn(var + eps)
        g = tl.load(g_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.math.div_rn(xc, denom) * g + b
    tl.store(out_ptr + r * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


LN_VARIANTS = ("standard", "unbiased", "eps-outside", "skip")


def layernorm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float, variant: str = "standard") -> torch.Tensor:
    """LayerNorm over the last axis of a contiguous [..., C] tensor."""
    if variant not in LN_VARIANTS:
        raise ValueError(f"unknown LayerNorm variant {variant!r}")
    _check_contiguous(x, g, b)
    C = x.shape[-1]
    rows = x.numel() // C
    out = torch.empty_like(x)
    _layernorm_kernel[(rows,)](x, g, b, out, C, C, C, eps, VARIANT=variant, BLOCK_C=_pow2(C))
    return out


# -- matrix product -------------------------------------------------------------------------
@triton.jit
def _linear_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, M, N, K,
                   stride_am, stride_ak, stride_wk, stride_wn, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M,N] = a[M,K] @ w[K,N] (+ bias[N]): one BLOCK_M×BLOCK_N tile per program, K walked in
    BLOCK_K steps with tl.dot into a float32 accumulator; the bias is added to the accumulator before
    the single store (fused). Any strides: w may be a transposed view (tied lm_head, nn.Linear layout)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


DOT_PRECISIONS = ("ieee", "tf32")


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dot_precision: str = "ieee") -> torch.Tensor:
    """Conv1D: x[..., K] @ w[K, N] + bias, all tokens in one product. `dot_precision` "tf32" lets
    float32 products use TF32 tensor cores (ignored for fp16 inputs and by the interpreter)."""
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"unknown dot precision {dot_precision!r}")
    _check_contiguous(x)
    K, N = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"linear: x has {x.shape[-1]} features, w is {tuple(w.shape)}")
    a = x.reshape(-1, K)
    M = a.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, MATMUL_BLOCK_M), triton.cdiv(N, MATMUL_BLOCK_N))
    _linear_kernel[grid](a, w, bias if bias is not None else w, out, M, N, K,
                         a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
                         HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision,
                         BLOCK_M=MATMUL_BLOCK_M, BLOCK_N=MATMUL_BLOCK_N, BLOCK_K=MATMUL_BLOCK_K)
    return out.view(*x.shape[:-1], N)


# -- attention ------------------------------------------------------------------------------
@triton.jit
def _score_tile(q, k_base, s_base, keep_base, offs_m, offs_n, T, scale,
                stride_kt, stride_kd, stride_st, stride_ss, offs_d, D,
                SOURCE: tl.constexpr, CAUSAL: tl.constexpr, CAUSAL_SHIFT: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Scores of one [BLOCK_M, BLOCK_N] tile, -inf where masked: q·kᵀ·scale (SOURCE 0), or loaded
    from a scores tensor (SOURCE 1: the scores the tap handed back)."""
    row_ok = offs_m < T
    col_ok = offs_n < T
    if SOURCE == 0:
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale
        real_key = tl.load(keep_base + offs_n, mask=col_ok, other=0) != 0
        keep = row_ok[:, None] & (col_ok & real_key)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + CAUSAL_SHIFT)
        s = tl.where(keep, s, float("-inf"))
    else:
        s = tl.load(s_base + offs_m[:, None] * stride_st + offs_n[None, :] * stride_ss,
                    mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    return s


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, scores_ptr, probs_ptr, ctx_ptr, T, H, D, scale,
                      sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                      skeep_b, ss_b, ss_h, ss_t, ss_s, sc_b, sc_t, sc_h, sc_d,
                      SOURCE: tl.constexpr, WRITE: tl.constexpr, CAUSAL: tl.constexpr,
                      CAUSAL_SHIFT: tl.constexpr, FP16_NO_MAX: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Causal self-attention of one (batch, head, query block), fused.

    SOURCE 0: scores = q·kᵀ·scale with the causal and key-padding masks (-inf), probs = softmax
    (max subtracted), ctx = probs·v, written with heads merged into [B,T,C] through the ctx
    strides. SOURCE 1 starts from a given scores tensor, SOURCE 2 from given probs (teacher
    forcing: the tap handed back other values than the kernel wrote). With WRITE, the scores
    (SOURCE 0) and probs (SOURCE 0 and 1) are stored in [B,H,T,T] for the tracer.

    Pass 1 walks the key tiles for the row max and the sum of exponentials (online rescaling);
    pass 2 recomputes each tile's scores, normalises them exactly once (probs are the softmax,
    not a rescaled running value), stores them and accumulates probs·v. Key tiles past the
    causal limit are skipped unless their -inf / 0 entries must be written.
    FP16_NO_MAX (an injected bug): exp(scores) without the max, rounded to float16.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    s_base = scores_ptr + b * ss_b + h * ss_h
    p_base = probs_ptr + b * ss_b + h * ss_h
    keep_base = keep_ptr + b * skeep_b

    hi = T
    if CAUSAL and SOURCE == 0:
        hi = tl.minimum((pid_m + 1) * BLOCK_M + CAUSAL_SHIFT, T)
    hi_write = hi
    if WRITE:
        hi_write = T

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SOURCE < 2:
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s = _score_tile(q, k_base, s_base, keep_base, offs_m, offs_n, T, scale, sk_t, sk_d, ss_t, ss_s,
                            offs_d, D, SOURCE, CAUSAL, CAUSAL_SHIFT, DOT_PRECISION)
            if FP16_NO_MAX:
                l_i += tl.sum(tl.exp(s.to(tl.float16).to(tl.float32)).to(tl.float16).to(tl.float32), axis=1)
            else:
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: exp(-inf) = 0
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
                m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi_write, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T
        tile_ok = row_ok[:, None] & col_ok[None, :]
        tile_off = offs_m[:, None] * ss_t + offs_n[None, :] * ss_s
        if SOURCE == 2:
            p = tl.load(p_base + tile_off, mask=tile_ok, other=0.0).to(tl.float32)
        else:
            s = _score_tile(q, k_base, s_base, keep_base, offs_m, offs_n, T, scale, sk_t, sk_d, ss_t, ss_s,
                            offs_d, D, SOURCE, CAUSAL, CAUSAL_SHIFT, DOT_PRECISION)
            if FP16_NO_MAX:
                e = tl.exp(s.to(tl.float16).to(tl.float32)).to(tl.float16).to(tl.float32)
                p = tl.math.div_rn(e, l_safe[:, None]).to(tl.float16).to(tl.float32)
            else:
                p = tl.math.div_rn(tl.exp(s - m_safe[:, None]), l_safe[:, None])
            if WRITE:
                if SOURCE == 0:
                    tl.store(s_base + tile_off, s.to(scores_ptr.dtype.element_ty), mask=tile_ok)
                tl.store(p_base + tile_off, p.to(probs_ptr.dtype.element_ty), mask=tile_ok)
        v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    c_ptrs = ctx_ptr + b * sc_b + h * sc_h + offs_m[:, None] * sc_t + offs_d[None, :] * sc_d
    tl.store(c_ptrs, acc.to(ctx_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class AttentionOptions:
    """How the attention kernel runs; every field but `dot_precision` exists for a fault injection.

    scale: "sqrt" (1/√D, GPT-2), "none", "d" (1/D). causal_shift: a query also sees this many
    keys after itself. merge: "hd" (ctx feature = h·D + d, GPT-2) or "dh" (d·H + h).
    """

    dot_precision: str = "ieee"
    scale: str = "sqrt"
    causal: bool = True
    causal_shift: int = 0
    qk_swapped: bool = False
    fp16_no_max: bool = False
    merge: str = "hd"

    def scale_for(self, D: int) -> float:
        return {"sqrt": 1.0 / math.sqrt(D), "none": 1.0, "d": 1.0 / D}[self.scale]


@dataclass
class Attention:
    """The fused kernel's outputs for one layer, and what they were computed from.

    `given_scores` / `given_probs` return self when handed the very tensors the kernel wrote
    (chained mode), and otherwise relaunch the kernel from the handed-back values, so what
    follows scores and probs is always computed from the values the tap returned.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor
    options: AttentionOptions
    scores: torch.Tensor | None
    probs: torch.Tensor | None
    ctx: torch.Tensor

    def given_scores(self, scores: torch.Tensor) -> Attention:
        if scores is self.scores:
            return self
        return _launch_attention(self.q, self.k, self.v, self.keep, self.options, source=1, scores=scores)

    def given_probs(self, probs: torch.Tensor) -> Attention:
        if probs is self.probs:
            return self
        return _launch_attention(self.q, self.k, self.v, self.keep, self.options, source=2, probs=probs)


def split_heads(qkv: torch.Tensor, n_head: int, order: str = "3hd") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [B,H,T,D] strided views of qkv [B,T,3C] (no copy: the kernel reads by strides).

    order "3hd": the fused projection is [q | k | v], each [H, D] (GPT-2); "h3d": [H, 3, D]."""
    B, T, C3 = qkv.shape
    D = C3 // (3 * n_head)
    if order == "3hd":
        heads = qkv.view(B, T, 3, n_head, D).permute(2, 0, 3, 1, 4)
    elif order == "h3d":
        heads = qkv.view(B, T, n_head, 3, D).permute(3, 0, 2, 1, 4)
    else:
        raise ValueError(f"unknown qkv order {order!r}")
    return heads[0], heads[1], heads[2]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
              options: AttentionOptions = AttentionOptions(), write: bool = True) -> Attention:
    """Scores, probs and ctx of q, k, v [B,H,T,D] (any strides) in one launch.

    `keep` [B,T] int8: 1 for real tokens (key-padding mask). Without `write`, only ctx is produced."""
    return _launch_attention(q, k, v, keep, options, source=0, write=write)


def _launch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      options: AttentionOptions, source: int, write: bool = True,
                      scores: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> Attention:
    B, H, T, D = v.shape
    _check_contiguous(keep, *(t for t in (scores, probs) if t is not None))
    dtype, device = v.dtype, v.device
    if scores is None:
        scores = torch.empty((B, H, T, T), dtype=dtype, device=device) if write and source == 0 else None
    if probs is None:
        probs = torch.empty((B, H, T, T), dtype=dtype, device=device) if write and source < 2 else None
    if source == 1 or source == 2:
        given = scores if source == 1 else probs
        if tuple(given.shape) != (B, H, T, T):
            raise ValueError(f"attention: given {'scores' if source == 1 else 'probs'} of shape "
                             f"{tuple(given.shape)}, expected {(B, H, T, T)}")
    ctx = torch.empty((B, T, H * D), dtype=dtype, device=device)
    qs, ks = (k, q) if options.qk_swapped else (q, k)
    ss = (H * T * T, T * T, T, 1)  # scores and probs: contiguous [B,H,T,T]
    if options.merge == "hd":
        sc = (ctx.stride(0), ctx.stride(1), D, 1)
    elif options.merge == "dh":
        sc = (ctx.stride(0), ctx.stride(1), 1, H)
    else:
        raise ValueError(f"unknown head merge {options.merge!r}")
    block = _pow2(T, ATTN_MIN_BLOCK, ATTN_MAX_BLOCK)
    grid = (triton.cdiv(T, block), B * H)
    _attention_kernel[grid](
        qs, ks, v, keep, scores if scores is not None else ctx, probs if probs is not None else ctx, ctx,
        T, H, D, options.scale_for(D),
        *qs.stride(), *ks.stride(), *v.stride(), keep.stride(0), *ss, *sc,
        SOURCE=source, WRITE=write, CAUSAL=options.causal, CAUSAL_SHIFT=options.causal_shift,
        FP16_NO_MAX=options.fp16_no_max, DOT_PRECISION=options.dot_precision,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=_pow2(D, 16), num_warps=4 if block <= 32 else 8)
    return Attention(q, k, v, keep, options, scores, probs, ctx)
