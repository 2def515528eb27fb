"""Per-stage reference: each canonical stage as a pure function of the stages it reads.

The comparator uses it twice. Localization: evaluating stage s in float64 on the very
inputs the candidate tapped gives what a correct stage would have produced from them, so
the difference is the error introduced *at* s, whatever was inherited (SPEC §6 origin).
Diagnosis: the functions take knobs (eps placement, variance, scale, mask shift...) so a
hypothesis re-applies a suspected bug with the same code and measures the residual.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from tracer.stages import resid_pre, split_stage, stage_inputs

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
VOCAB_BLOCK = 8192  # vocabulary rows per block of the logits


@dataclass
class ModelSpec:
    """What the reference needs to know about the model, from the golden's config."""

    n_layer: int
    n_head: int
    n_embd: int
    eps: float
    activation: str
    scale_attn_weights: bool = True
    scale_by_inverse_layer_idx: bool = False

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        return cls(
            n_layer=int(config["n_layer"]), n_head=int(config["n_head"]), n_embd=int(config["n_embd"]),
            eps=float(config.get("layer_norm_epsilon", 1e-5)),
            activation=str(config.get("activation_function", "gelu_new")),
            scale_attn_weights=bool(config.get("scale_attn_weights", True)),
            scale_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attn_scale(self, layer: int) -> float:
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_by_inverse_layer_idx else scale


# -- stage functions (knobs default to the correct GPT-2 behaviour) ------------------------
def layer_norm(x, w, b, eps, *, unbiased=False, eps_outside=False, center=True, affine=True):
    mean = x.mean(-1, keepdims=True) if center else 0.0
    xc = x - mean
    var = (xc * xc).sum(-1, keepdims=True) / (x.shape[-1] - (1 if unbiased else 0))
    y = xc / (np.sqrt(var) + eps) if eps_outside else xc / np.sqrt(var + eps)
    return y * w + b if affine else y


def linear(x, w, b=None, *, transpose=False, round_product: str | None = None):
    y = x @ (w.T if transpose else w)
    if round_product:  # the matmul's result stored in a lower precision before the bias is added
        from tracer.compare.tolerance import round_to

        y = round_to(y, round_product)
    return y + b if b is not None else y


def split_heads(qkv, n_head, which: int, *, order=(0, 1, 2), dh_swapped=False, interleaved=False):
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    if interleaved:  # Megatron-style fused layout [H, 3, D]
        return qkv.reshape(B, T, n_head, 3, D)[:, :, :, order[which], :].transpose(0, 2, 1, 3)
    part = qkv[..., order[which] * C:(order[which] + 1) * C]
    if dh_swapped:
        return part.reshape(B, T, D, n_head).transpose(0, 3, 1, 2)
    return part.reshape(B, T, n_head, D).transpose(0, 2, 1, 3)


def allowed_mask(attention_mask: np.ndarray, shift: int = 0, causal: bool = True) -> np.ndarray:
    """[B,1,T,T] bool: key s visible from query t (s <= t + shift, s not padding)."""
    T = attention_mask.shape[-1]
    base = np.tril(np.ones((T, T), dtype=bool), k=shift) if causal else np.ones((T, T), dtype=bool)
    return base[None, None] & attention_mask.astype(bool)[:, None, None, :]


def _matmul(a, b):
    """a @ b on contiguous copies: a strided operand (a head view, a transpose) makes NumPy's batched
    matmul skip BLAS, 3-500× slower."""
    return np.ascontiguousarray(a) @ np.ascontiguousarray(b)


def scores(q, k, scale, allowed, *, swap_qk=False):
    a, b = (k, q) if swap_qk else (q, k)
    s = _matmul(a, np.swapaxes(b, -1, -2))  # a fresh array: scaled and masked in place
    s *= scale
    np.copyto(s, -np.inf, where=~np.broadcast_to(allowed, s.shape))
    return s


def softmax(s, axis=-1, *, subtract_max=True, allowed=None):
    """Softmax along `axis`; with `allowed` (broadcastable bool) the other entries are masked out,
    whatever `s` holds there."""
    m = np.max(s, axis=axis, keepdims=True, where=True if allowed is None else allowed,
               initial=-np.inf) if subtract_max else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.subtract(s, m)  # one new array, masked, exponentiated and normalized in place
        if allowed is not None:
            np.copyto(e, -np.inf, where=~np.broadcast_to(allowed, e.shape))
        np.exp(e, out=e)
        e /= e.sum(axis=axis, keepdims=True)
        return e


MERGE_ORDER = (2, 1, 3)  # [B,H,T,D] -> memory order [T, H, D], read as [T, C]


def merge_heads(a, *, order=MERGE_ORDER):
    """Heads merged: [B,H,T,D] laid out in memory in axis `order` (a permutation of 1, 2, 3),
    then read as [B,T,C] — GPT-2's is [T, H, D]; a port's layout slip is another order."""
    B, H, T, D = a.shape
    return a.transpose((0, *order)).reshape(B, T, H * D)


GELU_CUBIC = 0.044715
GELU_SCALE = math.sqrt(2.0 / math.pi)


def gelu(x, kind: str, *, cubic: float = GELU_CUBIC, scale: float = GELU_SCALE):
    if kind in GELU_TANH:
        # x³: in float32 NumPy's pow, as the noise twin has always computed it. It is most of the stage's
        # cost, but its rounding is the twin's: a cube rounded once instead (float64, then float32: 6x
        # faster) moved mlp.act tolerances by up to 6%. (torch's pow(x, 3) is x*x*x, rounded twice.)
        # In float64 two products round far below anything compared.
        cube = x * x * x if x.dtype == np.float64 else x ** 3
        return 0.5 * x * (1.0 + np.tanh(scale * (x + cubic * cube)))
    if kind == "gelu":
        return gelu_erf(x)
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    raise ValueError(f"unsupported activation {kind!r}")


def gelu_erf(x):
    """Exact GELU; erf from torch (a runtime dependency) since NumPy has none."""
    import torch

    return 0.5 * x * (1.0 + torch.erf(torch.from_numpy(np.asarray(x) / math.sqrt(2.0))).numpy())


class Lookup(dict):
    """Read-only mapping over a function name -> array, so `evaluate` can read inputs lazily."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __getitem__(self, name: str) -> np.ndarray:
        return self.fn(name)

    def __call__(self, name: str) -> np.ndarray:
        return self.fn(name)


# -- evaluation of a canonical stage -------------------------------------------------------
class Reference:
    """Evaluates canonical stages from their input stages, weights and the case's inputs."""

    def __init__(self, weights: dict[str, np.ndarray], config: dict, jitter: float = 0.0, seed: int = 0):
        self.w = weights
        self.spec = ModelSpec.from_config(config)
        self.jitter = jitter
        self.weight_precision: str | None = None
        self._rng = np.random.default_rng(seed)
        self._params: OrderedDict = OrderedDict()  # (name, dtype, weight precision) -> array, shared by copies

    def jittered(self, unit: float, weight_precision: str | None = None) -> Reference:
        """The same reference with every input activation perturbed by ±`unit` relative (uniform)
        and weights rounded to `weight_precision`: a correct implementation that knows its
        activations only to its storage precision and computes with weights of that precision."""
        clone = copy.copy(self)
        clone.jitter, clone._rng = unit, np.random.default_rng(0)
        clone.weight_precision = weight_precision
        return clone

    def _cast(self, array: np.ndarray, dtype) -> np.ndarray:
        a = np.asarray(array, dtype=dtype)
        if self.jitter and a.dtype.kind == "f":  # a·(1 + noise): ±inf and NaN stay what they are
            noise = self._rng.uniform(-self.jitter, self.jitter, size=a.shape).astype(a.dtype)
            noise += 1
            a = np.multiply(a, noise, out=noise)
        return a

    def perturb(self, array: np.ndarray, dtype=np.float64) -> np.ndarray:
        """`array` in `dtype` with this reference's input jitter applied (drawn from its stream)."""
        return self._cast(array, dtype)

    def steady(self) -> Reference:
        """The same reference (weights precision included) without input jitter: evaluates inputs
        that `perturb` already jittered, e.g. once for a stage evaluated in blocks."""
        clone = copy.copy(self)
        clone.jitter = 0.0
        return clone

    def param(self, name: str, dtype) -> np.ndarray:
        """A parameter in `dtype` (rounded to `weight_precision`). The last two are kept: a stage checked
        in blocks of tokens reads its weight and bias once per block, and gpt2's c_fc is 19 MB as float64."""
        key = (name, np.dtype(dtype).str, self.weight_precision)
        if key in self._params:
            self._params.move_to_end(key)
            return self._params[key]
        value = self._params[key] = np.asarray(self._rounded(name, self.w[name]), dtype=dtype)
        while len(self._params) > 2:
            self._params.popitem(last=False)
        return value

    def param_shape(self, name: str) -> tuple[int, ...]:
        """A parameter's shape, without reading it where the weights are read on demand."""
        shape_of = getattr(self.w, "shape_of", None)
        return shape_of(name) if shape_of is not None else tuple(np.shape(self.w[name]))

    def _rounded(self, name: str, w: np.ndarray) -> np.ndarray:
        """A parameter (or rows of it) in `weight_precision`. A block format quantizes matrices only,
        along the product's reduction axis: `in` of HF's Conv1D [in, out], C of wte [V, C]."""
        if not self.weight_precision:
            return w
        from tracer.compare.tolerance import BLOCK_FORMATS, quantize_blocks, round_to

        if self.weight_precision in BLOCK_FORMATS:
            if np.ndim(w) != 2 or name == "transformer.wpe.weight":
                return w
            return quantize_blocks(w, self.weight_precision, axis=-1 if name.endswith(("wte.weight", "lm_head.weight"))
                                   else 0)
        return round_to(w, self.weight_precision)

    def needs_weights(self, stage: str) -> bool:
        return bool(self.params_of(stage))

    def params_of(self, stage: str) -> dict[str, str]:
        """The HF parameters a stage reads, by role ("weight", "bias")."""
        i, local = split_stage(stage)
        h = f"transformer.h.{i}"
        prefix = {"ln1": f"{h}.ln_1", "ln2": f"{h}.ln_2", "final.ln": "transformer.ln_f",
                  "attn.qkv": f"{h}.attn.c_attn", "attn.out": f"{h}.attn.c_proj", "mlp.fc": f"{h}.mlp.c_fc",
                  "mlp.out": f"{h}.mlp.c_proj"}.get(local)
        if prefix:
            return {"weight": f"{prefix}.weight", "bias": f"{prefix}.bias"}
        return {"embed.tok": {"weight": "transformer.wte.weight"}, "embed.pos": {"weight": "transformer.wpe.weight"},
                "logits": {"weight": "transformer.wte.weight"}}.get(local, {})

    def _param_rows(self, name: str, rows, dtype, knobs: dict) -> np.ndarray:
        """param[rows] in `dtype`, casting only those rows: wte has 38 M values, and a float64 copy
        of all of it (300 MB) to read 256 of its rows was most of the comparison's peak memory."""
        if name in knobs.get("params", {}):
            return self._knob_param(name, dtype, knobs)[rows]
        return np.asarray(self._rounded(name, self.w[name][rows]), dtype=dtype)

    def _knob_param(self, name: str, dtype, knobs: dict) -> np.ndarray:
        """A parameter, or what a hypothesis puts in its place: another parameter's name, or a
        function of the parameter (dropped, doubled, negated, transposed, rounded)."""
        swap = knobs.get("params", {}).get(name)
        if isinstance(swap, str):
            return self.param(swap, dtype)
        value = self.param(name, dtype)
        return np.asarray(swap(value), dtype=dtype) if swap is not None else value

    def inputs_of(self, stage: str) -> tuple[str, ...]:
        return stage_inputs(stage, self.spec.n_layer)

    def evaluate(self, stage: str, x: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
                 dtype=np.float64, **knobs) -> np.ndarray:
        """Stage `stage` computed in `dtype` from input stages `x` (keyed by canonical name)."""
        i, local = split_stage(stage)
        s = self.spec
        p = lambda name: self._knob_param(name, dtype, knobs)  # noqa: E731
        rename, low = knobs.get("inputs", {}), knobs.get("round_inputs")

        def get(name: str) -> np.ndarray:
            value = self._cast(x[rename.get(name, name)], dtype)
            if low:
                from tracer.compare.tolerance import round_to

                value = round_to(value, low).astype(dtype)
            return value

        h = f"transformer.h.{i}"
        T = ids.shape[1]
        if local == "embed.tok":
            return self._param_rows("transformer.wte.weight", ids + knobs.get("id_offset", 0), dtype, knobs)
        if local == "embed.pos":
            pos = np.arange(T) + knobs.get("pos_offset", 0)
            return self._param_rows("transformer.wpe.weight", pos, dtype, knobs)[None]
        if local == "embed.sum":
            return get("embed.tok") * knobs.get("tok_scale", 1.0) + get("embed.pos") * knobs.get("pos_scale", 1.0)
        if local in ("ln1", "ln2", "final.ln"):
            src, prefix = {
                "ln1": (resid_pre(i) if i is not None else "", f"{h}.ln_1"),
                "ln2": (f"blocks.{i}.resid_mid", f"{h}.ln_2"),
                "final.ln": (f"blocks.{s.n_layer - 1}.resid_post", "transformer.ln_f"),
            }[local]
            return layer_norm(get(src), p(f"{prefix}.weight"), p(f"{prefix}.bias"), knobs.get("eps", s.eps),
                              unbiased=knobs.get("unbiased", False), eps_outside=knobs.get("eps_outside", False),
                              center=knobs.get("center", True), affine=knobs.get("affine", True))
        if local in ("attn.qkv", "attn.out", "mlp.fc", "mlp.out"):
            src, prefix = {
                "attn.qkv": (f"blocks.{i}.ln1", f"{h}.attn.c_attn"),
                "attn.out": (f"blocks.{i}.attn.ctx", f"{h}.attn.c_proj"),
                "mlp.fc": (f"blocks.{i}.ln2", f"{h}.mlp.c_fc"),
                "mlp.out": (f"blocks.{i}.mlp.act", f"{h}.mlp.c_proj"),
            }[local]
            bias = None if knobs.get("drop_bias") else p(f"{prefix}.bias")
            return linear(get(src), p(f"{prefix}.weight"), bias, transpose=knobs.get("transpose", False),
                          round_product=knobs.get("round_product"))
        if local in ("attn.q", "attn.k", "attn.v"):
            which = "qkv".index(local[-1])
            return split_heads(get(f"blocks.{i}.attn.qkv"), s.n_head, which,
                               order=knobs.get("order", (0, 1, 2)), dh_swapped=knobs.get("dh_swapped", False),
                               interleaved=knobs.get("interleaved", False))
        if local == "attn.scores":  # knob allowed: the visible keys of a block of query rows (blocked check)
            allowed = knobs["allowed"] if "allowed" in knobs else \
                allowed_mask(mask, knobs.get("mask_shift", 0), knobs.get("causal", True))
            return scores(get(f"blocks.{i}.attn.q"), get(f"blocks.{i}.attn.k"),
                          knobs.get("scale", s.attn_scale(i)), allowed, swap_qk=knobs.get("swap_qk", False))
        if local == "attn.probs":
            # masked by position, whatever fill the port used
            return softmax(get(f"blocks.{i}.attn.scores"), axis=knobs.get("axis", -1),
                           allowed=knobs["allowed"] if "allowed" in knobs else allowed_mask(mask))
        if local == "attn.ctx":
            probs = get(f"blocks.{i}.attn.probs")
            if knobs.get("transpose_probs"):
                probs = np.swapaxes(probs, -1, -2)
            return merge_heads(_matmul(probs, get(f"blocks.{i}.attn.v")), order=knobs.get("merge_order", MERGE_ORDER))
        if local == "resid_mid":
            base = get(knobs["residual_from"]) if "residual_from" in knobs else get(resid_pre(i))
            return base + get(f"blocks.{i}.attn.out")
        if local == "mlp.act":
            kind = knobs.get("activation", s.activation)
            fc = get(f"blocks.{i}.mlp.fc")
            return gelu(fc, kind, cubic=knobs.get("gelu_cubic", GELU_CUBIC), scale=knobs.get("gelu_scale", GELU_SCALE))
        if local == "resid_post":
            base = get(knobs["residual_from"]) if "residual_from" in knobs else get(f"blocks.{i}.resid_mid")
            return base + get(f"blocks.{i}.mlp.out")
        if local == "logits":  # one block of the vocabulary at a time: no whole-wte copy in `dtype`
            x = get("final.ln")  # knob vocab=slice: only those logits
            lo, hi, _ = knobs.get("vocab", slice(None)).indices(self.param_shape("transformer.wte.weight")[0])
            out = np.empty((*x.shape[:-1], hi - lo), dtype=np.result_type(x, dtype))
            for a in range(lo, hi, VOCAB_BLOCK):
                b = min(a + VOCAB_BLOCK, hi)
                out[..., a - lo:b - lo] = x @ self._param_rows("transformer.wte.weight", slice(a, b), dtype, knobs).T
            return out
        raise KeyError(stage)
