"""CuPy backend: GPT-2 on the GPU with cuBLAS matmuls and this project's own CUDA kernels.

Why a second independent port: NumPy's kernels and torch's are not the only ways to round. Here
every non-matmul stage is a kernel written below — LayerNorm and masked softmax as RawKernels
(one thread block per row, fp32 block reductions in shared memory), GELU, bias, residual add,
embedding gather and score masking as ElementwiseKernels — so a comparison against the golden
exercises the tolerances on a real GPU port, in fp32 and in fp16 (fp16 storage, fp32
arithmetic inside the kernels, fp32 accumulation in cuBLAS). `forward` is the whole model top
to bottom with `x = tap(stage, x)` after each canonical stage (SPEC §3).

Fault injection turns kernel parameters (`Knobs`: the mask shift, the score scale, the
LayerNorm ddof, ...) or picks the alternative erf GELU kernel; the forward has no branches.

cupy is imported only in `availability`, `prepare` and the conversion methods, so this module
imports (and `tracer backends` explains why it cannot run) on machines without cupy or CUDA.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from backends.numpy_backend import BlockWeights, Weights, load_weights
from backends.protocol import Backend, Tap
from tracer.errors import TracerError

PRECISIONS = {"fp32": np.float32, "fp16": np.float16}
NO_CAUSAL_MASK = 1 << 30  # a mask shift no sequence reaches: every real key is visible


# -- what a fault injection changes ----------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    """Kernel parameters and operand choices of the forward; the defaults are GPT-2."""

    scale_tokens: bool = False        # embed-scale: wte rows times sqrt(C)
    pos_offset: int = 0               # position-offset: positions start at 1
    pos_weight: float = 1.0           # skip-wpe: 0, embed.sum = tok
    ln_ddof: int = 0                  # ln-unbiased-var: 1
    ln_eps_outside: bool = False      # ln-eps: (x - mean) / (sqrt(var) + eps)
    qkv_interleaved: bool = False     # qkv-interleaved: [H,3,D] instead of [3,H,D]
    score_scale: str = "1/sqrt(D)"    # no-attn-scale: "1"; attn-scale-by-d: "1/D"
    qk_swapped: bool = False          # qk-swapped: k·qᵀ
    mask_shift: int = 0               # key s visible from query t when s <= t + shift (1: off by one)
    softmax_fp16_no_max: bool = False  # softmax-no-max-subtraction, exp in float16
    merge_d_major: bool = False       # heads-merged-wrong: [D,H] order
    c_proj_transposed: bool = False   # c-proj-untransposed: W.T
    resid_from_ln1: bool = False      # residual-from-normalized
    fc_bias: bool = True              # drop-fc-bias: False
    gelu: str = "tanh"                # gelu-erf: "erf"
    mlp_skip_weight: float = 1.0      # mlp-residual-dropped: 0, resid_post = mlp.out
    final_ln: bool = True             # skip-ln-f: False


KNOBS: dict[str, dict[str, Any]] = {
    "embed-scale": {"scale_tokens": True},
    "position-offset": {"pos_offset": 1},
    "skip-wpe": {"pos_weight": 0.0},
    "ln-unbiased-var": {"ln_ddof": 1},
    "ln-eps": {"ln_eps_outside": True},
    "qkv-interleaved": {"qkv_interleaved": True},
    "no-attn-scale": {"score_scale": "1"},
    "attn-scale-by-d": {"score_scale": "1/D"},
    "qk-swapped": {"qk_swapped": True},
    "mask-off-by-one": {"mask_shift": 1},
    "no-causal-mask": {"mask_shift": NO_CAUSAL_MASK},
    "softmax-no-max-subtraction": {"softmax_fp16_no_max": True},
    "heads-merged-wrong": {"merge_d_major": True},
    "c-proj-untransposed": {"c_proj_transposed": True},
    "residual-from-normalized": {"resid_from_ln1": True},
    "drop-fc-bias": {"fc_bias": False},
    "gelu-erf": {"gelu": "erf"},
    "mlp-residual-dropped": {"mlp_skip_weight": 0.0},
    "skip-ln-f": {"final_ln": False},
}


def knobs_for(inject: str | None) -> Knobs:
    return replace(Knobs(), **KNOBS.get(inject or "", {}))


# -- CUDA sources ------------------------------------------------------------------------------
# Shared by the RawKernels. fp16 is stored as its raw 16 bits and converted with PTX `cvt`, so
# the kernels need no CUDA header (a pip-installed cupy may not find cuda_fp16.h).
_DEVICE_COMMON = r"""
typedef unsigned short half_bits;
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(half_bits x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f;
}
__device__ __forceinline__ half_bits f2h(float x) {
    half_bits h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h;
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(half_bits* p, float v) { *p = f2h(v); }
__device__ __forceinline__ float round_half(float v) { return to_f(f2h(v)); }
__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

struct Sum { __device__ float operator()(float a, float b) const { return a + b; } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// Reduce one float per thread over the block (blockDim.x a power of two) in shared memory `red`
// of blockDim.x floats; every thread gets the result.
template <typename Op>
__device__ float block_reduce(float v, float* red, Op op) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) red[threadIdx.x] = op(red[threadIdx.x], red[threadIdx.x + stride]);
        __syncthreads();
    }
    const float total = red[0];
    __syncthreads();  // `red` is reused by the next reduction
    return total;
}
"""

# One block per row of `width` values: mean, then the variance of the centred values (two
# passes, fp32), then the affine output. ddof=1 and eps_outside are the injected bugs.
_LAYERNORM = r"""
extern "C" __global__ void layernorm(const T* x, const T* gamma, const T* beta, T* y,
                                     int width, float eps, int ddof, int eps_outside) {
    extern __shared__ float red[];
    const T* xr = x + (long long)blockIdx.x * width;
    T* yr = y + (long long)blockIdx.x * width;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) acc += to_f(xr[c]);
    const float mean = block_reduce(acc, red, Sum()) / width;
    acc = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float d = to_f(xr[c]) - mean;
        acc += d * d;
    }
    const float var = block_reduce(acc, red, Sum()) / (width - ddof);
    const float inv = eps_outside ? 1.0f / (sqrtf(var) + eps) : 1.0f / sqrtf(var + eps);
    for (int c = threadIdx.x; c < width; c += blockDim.x)
        store(yr + c, (to_f(xr[c]) - mean) * inv * to_f(gamma[c]) + to_f(beta[c]));
}
"""

# One block per row (batch, head, query) of [B,H,n,n] scores. Keys after query + shift, or
# padding keys (keep == 0), get probability 0 whatever the score holds (-inf, finfo.min, -1e4).
# fp16_no_max is the injected bug: no max subtraction and exp evaluated in float16.
_SOFTMAX = r"""
__device__ __forceinline__ float exp_of(float v, int fp16) {
    return fp16 ? round_half(expf(round_half(v))) : expf(v);
}

extern "C" __global__ void masked_softmax(const T* scores, const signed char* keep, T* probs,
                                          int n, int n_head, int shift, int fp16_no_max) {
    extern __shared__ float red[];
    const long long row = blockIdx.x;
    const int query = (int)(row % n);
    const signed char* keep_row = keep + (row / ((long long)n * n_head)) * n;
    const T* s = scores + row * n;
    T* p = probs + row * n;
    float m = neg_inf();
    for (int key = threadIdx.x; key < n; key += blockDim.x)
        if (key <= query + shift && keep_row[key]) m = fmaxf(m, to_f(s[key]));
    m = block_reduce(m, red, Max());
    if (m == neg_inf()) {  // no visible key (block-uniform branch)
        for (int key = threadIdx.x; key < n; key += blockDim.x) store(p + key, 0.0f);
        return;
    }
    if (fp16_no_max) m = 0.0f;
    float z = 0.0f;
    for (int key = threadIdx.x; key < n; key += blockDim.x)
        if (key <= query + shift && keep_row[key]) z += exp_of(to_f(s[key]) - m, fp16_no_max);
    z = block_reduce(z, red, Sum());
    if (fp16_no_max) z = round_half(z);
    for (int key = threadIdx.x; key < n; key += blockDim.x) {
        const bool visible = key <= query + shift && keep_row[key];
        store(p + key, visible ? exp_of(to_f(s[key]) - m, fp16_no_max) / z : 0.0f);
    }
}
"""

# ElementwiseKernels: (in_params, out_params, operation, name). T is float or float16; the
# arithmetic is fp32 and the result is rounded once to T.
_ELEMENTWISE = {
    "gather_rows": (
        "raw T table, raw int64 rows, int32 width, float32 scale", "T y",
        "const long long k = i; y = (T)((float)table[rows[k / width] * width + k % width] * scale);"),
    "bias": ("T acc, T bias", "T y", "y = (T)((float)acc + (float)bias);"),
    "add": ("T x, T r, float32 wx, float32 wr", "T y", "y = (T)(wx * (float)x + wr * (float)r);"),
    "scores": (
        "T qk, raw int8 keep, float32 scale, int32 n_tok, int32 n_head, int32 shift", "T s",
        """const long long k = i;
        const int key = (int)(k % n_tok), query = (int)((k / n_tok) % n_tok);
        const long long b = k / ((long long)n_tok * n_tok * n_head);
        s = (key <= query + shift && keep[b * n_tok + key] != 0)
            ? (T)((float)qk * scale) : (T)-__int_as_float(0x7f800000);"""),
    "gelu_tanh": (
        "T x", "T y",
        "const float v = (float)x;"
        " y = (T)(0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))));"),
    "gelu_erf": ("T x", "T y", "const float v = (float)x; y = (T)(0.5f * v * (1.0f + erff(v * 0.7071067811865476f)));"),
}


def block_threads(width: int) -> int:
    """Threads per row block: a power of two (the reduction needs one), 32 to 256."""
    return min(256, max(32, 1 << (width - 1).bit_length()))


class Kernels:
    """The compiled kernels for one storage dtype (cupy compiles each on first launch)."""

    def __init__(self, cp: Any, dtype: type):
        source = _DEVICE_COMMON + f"typedef {'float' if dtype == np.float32 else 'half_bits'} T;\n"
        self.cp = cp
        self.layernorm_kernel = cp.RawKernel(source + _LAYERNORM, "layernorm")
        self.softmax_kernel = cp.RawKernel(source + _SOFTMAX, "masked_softmax")
        for name, (params_in, params_out, body) in _ELEMENTWISE.items():
            setattr(self, name, cp.ElementwiseKernel(params_in, params_out, body, f"gpt2_{name}"))

    def layernorm(self, x: Any, gamma: Any, beta: Any, eps: float, ddof: int, eps_outside: bool) -> Any:
        x = self.cp.ascontiguousarray(x)
        y = self.cp.empty_like(x)
        width = x.shape[-1]
        threads = block_threads(width)
        self.layernorm_kernel((x.size // width,), (threads,),
                              (x, gamma, beta, y, np.int32(width), np.float32(eps), np.int32(ddof),
                               np.int32(eps_outside)), shared_mem=threads * 4)
        return y

    def softmax(self, scores: Any, keep: Any, shift: int, fp16_no_max: bool) -> Any:
        scores = self.cp.ascontiguousarray(scores)
        probs = self.cp.empty_like(scores)
        _, n_head, _, n = scores.shape
        threads = block_threads(n)
        self.softmax_kernel((scores.size // n,), (threads,),
                            (scores, keep, probs, np.int32(n), np.int32(n_head), np.int32(shift),
                             np.int32(fp16_no_max)), shared_mem=threads * 4)
        return probs


# -- the backend -------------------------------------------------------------------------------
class CupyBackend(Backend):
    """GPT-2 on CUDA through CuPy: `fp32` (default) or `fp16` (fp16 storage, fp32 arithmetic)."""

    name = "cupy"
    precisions = tuple(PRECISIONS)
    supported_injections = frozenset(KNOBS)

    def __init__(self, precision: str = "fp32", inject: str | None = None):
        super().__init__(precision, inject)
        self.dtype = PRECISIONS[precision]
        self.knobs = knobs_for(inject)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import cupy
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] == "cupy":
                return False, "cupy not installed"
            return False, f"cupy does not import: {_one_line(exc)}"
        except Exception as exc:  # a broken install (missing CUDA libraries) raises all sorts
            return False, f"cupy does not import: {_one_line(exc)}"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:
            return False, "no CUDA device"
        return (True, "") if count > 0 else (False, "no CUDA device")

    def prepare(self, weights: dict[str, np.ndarray], config: dict) -> None:
        import cupy as cp

        self.check_gpt2_config(config)
        if self.precision == "fp32" and os.environ.get("CUPY_TF32", "0") != "0":
            raise TracerError("CUPY_TF32 is set: cuBLAS would run the fp32 matmuls in TF32; unset it")
        self.cp = cp
        self.n_head = int(config["n_head"])
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.w = _to_device(cp, load_weights(weights, int(config["n_layer"]), self.dtype))
        self.kernels = Kernels(cp, self.dtype)
        self.gelu = self.kernels.gelu_erf if self.knobs.gelu == "erf" else self.kernels.gelu_tanh

    def forward(self, input_ids: np.ndarray, tap: Tap, attention_mask: np.ndarray | None = None) -> Any:
        cp, w = self.cp, self.w
        ids = cp.asarray(input_ids, dtype=cp.int64)
        B, T = ids.shape
        mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask) != 0
        keep = cp.asarray(mask, dtype=cp.int8)  # [B,T]: 1 = real token

        tok = tap("embed.tok", self.embed_tok(ids))
        pos = tap("embed.pos", self.embed_pos(T))
        x = tap("embed.sum", self.add(tok, pos, 1.0, self.knobs.pos_weight))
        for i, blk in enumerate(w.blocks):
            s = f"blocks.{i}."
            h = tap(s + "ln1", self.layernorm(x, blk.ln1_g, blk.ln1_b))
            qkv = tap(s + "attn.qkv", self.linear(h, blk.qkv_w, blk.qkv_b))
            q, k, v = self.split_heads(qkv)
            q = tap(s + "attn.q", q)
            k = tap(s + "attn.k", k)
            v = tap(s + "attn.v", v)
            scores = tap(s + "attn.scores", self.scores(q, k, keep))
            probs = tap(s + "attn.probs", self.softmax(scores, keep))
            ctx = tap(s + "attn.ctx", self.merge_heads(cp.matmul(probs, v)))
            a = tap(s + "attn.out", self.attn_out(ctx, blk))
            x = tap(s + "resid_mid", self.resid_mid(x, h, a))
            h = tap(s + "ln2", self.layernorm(x, blk.ln2_g, blk.ln2_b))
            f = tap(s + "mlp.fc", self.mlp_fc(h, blk))
            f = tap(s + "mlp.act", self.gelu(f))
            m = tap(s + "mlp.out", self.linear(f, blk.mlp_proj_w, blk.mlp_proj_b))
            x = tap(s + "resid_post", self.add(x, m, self.knobs.mlp_skip_weight, 1.0))
        x = tap("final.ln", self.final_ln(x))
        return tap("logits", self.linear(x, w.lm_head.T, None))

    # -- stages ----------------------------------------------------------------------------
    def gather_rows(self, table: Any, rows: Any, shape: tuple[int, ...], scale: float = 1.0) -> Any:
        """out[..., c] = table[rows[...], c] * scale, for `table` [N, C] and `rows` flattening `shape[:-1]`."""
        out = self.cp.empty(shape, dtype=table.dtype)
        return self.kernels.gather_rows(table.ravel(), rows.ravel(), np.int32(table.shape[1]), np.float32(scale), out)

    def embed_tok(self, ids: Any) -> Any:
        C = self.w.wte.shape[1]
        scale = math.sqrt(C) if self.knobs.scale_tokens else 1.0
        return self.gather_rows(self.w.wte, ids, (*ids.shape, C), scale)

    def embed_pos(self, T: int) -> Any:
        n_pos, C = self.w.wpe.shape
        rows = (self.cp.arange(T, dtype=self.cp.int64) + self.knobs.pos_offset) % n_pos
        return self.gather_rows(self.w.wpe, rows, (1, T, C))

    def add(self, x: Any, r: Any, wx: float = 1.0, wr: float = 1.0) -> Any:
        """wx·x + wr·r (both weights 1 in GPT-2), broadcasting; fp32 arithmetic, one rounding."""
        return self.kernels.add(x, r, np.float32(wx), np.float32(wr))

    def layernorm(self, x: Any, g: Any, b: Any) -> Any:
        return self.kernels.layernorm(x, g, b, self.eps, self.knobs.ln_ddof, self.knobs.ln_eps_outside)

    def linear(self, x: Any, w: Any, b: Any | None) -> Any:
        """Conv1D: one cuBLAS matmul over all tokens (x @ w, w is [in, out]), then the bias kernel."""
        y = self.cp.matmul(x.reshape(-1, x.shape[-1]), w)
        if b is not None:
            y = self.kernels.bias(y, b)
        return y.reshape(*x.shape[:-1], w.shape[1])

    def split_heads(self, qkv: Any) -> tuple[Any, Any, Any]:
        """[B,T,3C] -> q, k, v as contiguous [B,H,T,D]."""
        B, T, C3 = qkv.shape
        H, D = self.n_head, C3 // (3 * self.n_head)
        if self.knobs.qkv_interleaved:
            heads = qkv.reshape(B, T, H, 3, D).transpose(3, 0, 2, 1, 4)
        else:
            heads = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
        return tuple(self.cp.ascontiguousarray(t) for t in heads)

    def scores(self, q: Any, k: Any, keep: Any) -> Any:
        """q·kᵀ (batched cuBLAS) scaled by 1/√D, masked entries written as -inf, [B,H,T,T]."""
        a, b = (k, q) if self.knobs.qk_swapped else (q, k)
        qk = self.cp.matmul(a, b.transpose(0, 1, 3, 2))
        D = q.shape[-1]
        scale = {"1/sqrt(D)": D ** -0.5, "1/D": 1.0 / D, "1": 1.0}[self.knobs.score_scale]
        out = self.cp.empty(qk.shape, dtype=qk.dtype)
        return self.kernels.scores(qk, keep.ravel(), np.float32(scale), np.int32(qk.shape[-1]), np.int32(qk.shape[1]),
                             np.int32(self.knobs.mask_shift), out)

    def softmax(self, scores: Any, keep: Any) -> Any:
        return self.kernels.softmax(scores, keep, self.knobs.mask_shift, self.knobs.softmax_fp16_no_max)

    def merge_heads(self, ctx: Any) -> Any:
        """[B,H,T,D] -> [B,T,H*D] (heads-merged-wrong: [B,T,D*H])."""
        B, H, T, D = ctx.shape
        order = (0, 2, 3, 1) if self.knobs.merge_d_major else (0, 2, 1, 3)
        return self.cp.ascontiguousarray(ctx.transpose(*order)).reshape(B, T, H * D)

    def attn_out(self, ctx: Any, blk: BlockWeights) -> Any:
        return self.linear(ctx, blk.proj_w.T if self.knobs.c_proj_transposed else blk.proj_w, blk.proj_b)

    def resid_mid(self, x: Any, h: Any, a: Any) -> Any:
        """Block input + attention output (`h`, the ln1 output, is only read by a bug)."""
        return self.add(h if self.knobs.resid_from_ln1 else x, a)

    def mlp_fc(self, h: Any, blk: BlockWeights) -> Any:
        return self.linear(h, blk.fc_w, blk.fc_b if self.knobs.fc_bias else None)

    def final_ln(self, x: Any) -> Any:
        return self.layernorm(x, self.w.lnf_g, self.w.lnf_b) if self.knobs.final_ln else x

    # -- host <-> device ---------------------------------------------------------------------
    def to_numpy(self, value: Any) -> np.ndarray:
        import cupy

        return cupy.asnumpy(value)

    def from_numpy(self, array: np.ndarray, like: Any) -> Any:
        import cupy

        return cupy.asarray(array, dtype=like.dtype)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _to_device(cp: Any, w: Weights) -> Weights:
    """The same weights as contiguous device arrays; a tied lm_head stays one array."""
    blocks = [BlockWeights(**{f.name: cp.asarray(getattr(b, f.name)) for f in fields(b)}) for b in w.blocks]
    wte = cp.asarray(w.wte)
    lm_head = wte if w.lm_head is w.wte else cp.asarray(w.lm_head)
    return Weights(wte, cp.asarray(w.wpe), blocks, cp.asarray(w.lnf_g), cp.asarray(w.lnf_b), lm_head)
