"""Triton backend: GPT-2's forward with every stage computed by a Triton kernel of this project.

Why: a GPU port usually differs from the reference in its kernels (tiling, accumulation order,
fused masking, approximate exp), and that is where its bugs hide. Here every number comes from
`backends/triton_kernels.py`; torch only holds the buffers. `forward` below is the whole model,
top to bottom, with `x = tap(stage, x)` after each canonical stage (SPEC §3), like the NumPy
reference backend it mirrors.

Precisions: `fp32` (default; IEEE float32 products), `tf32` (float32 storage, matrix products on
TF32 tensor cores), `fp16` (weights and activations float16, float32 accumulation). On a
machine without CUDA it runs on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`),
slowly but with the same kernels.

Fault injection flips one field of `Knobs` (`VARIANTS`, keyed by `backends.inject.CATALOG`);
each field is a kernel switch or an alternative kernel argument, so the forward stays one path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from backends.protocol import Backend, Tap
from tracer.errors import TracerError

# precision -> (storage dtype, tl.dot input precision for float32 operands)
PRECISIONS = {"fp32": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32"), "fp16": (torch.float16, "ieee")}


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (read like Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def interpreter_loaded() -> bool:
    """Whether Triton's own library (tl.zeros, tl.sum...) was decorated for the interpreter. Triton
    does that once, when `triton.language` is first imported, so TRITON_INTERPRET=1 set later in
    the same process leaves kernels that cannot run on CPU."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


# -- what a fault injection changes ---------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    """The kernel switches of one forward; the defaults are GPT-2, a fault injection flips one."""

    tok_scale_by_sqrt_c: bool = False  # embedding kernel: scale argument
    pos_offset: int = 0                # position gather: first position
    add_pos: bool = True               # add kernel: use the second operand
    ln: str = "standard"               # LayerNorm kernel variant (every block LayerNorm)
    final_ln: str = "standard"         # LayerNorm kernel variant of ln_f
    qkv_order: str = "3hd"             # head-split strides
    scale: str = "sqrt"                # attention kernel: scale argument
    qk_swapped: bool = False           # attention kernel: q and k pointers swapped
    causal: bool = True                # attention kernel: causal mask on/off
    causal_shift: int = 0              # attention kernel: keys a query may see past itself
    fp16_no_max: bool = False          # attention kernel: softmax without the max, exp in float16
    merge: str = "hd"                  # attention kernel: ctx strides of the head merge
    proj_transposed: bool = False      # c_proj matmul: weight strides swapped
    resid_from_ln1: bool = False       # first residual reads the ln1 output
    fc_bias: bool = True               # c_fc matmul: bias on/off
    gelu: str = "tanh"                 # GELU kernel: tanh approximation or erf
    mlp_residual: bool = True          # second residual: add kernel uses the block input


VARIANTS: dict[str, dict[str, Any]] = {
    "embed-scale": {"tok_scale_by_sqrt_c": True},
    "position-offset": {"pos_offset": 1},
    "skip-wpe": {"add_pos": False},
    "ln-unbiased-var": {"ln": "unbiased", "final_ln": "unbiased"},
    "ln-eps": {"ln": "eps-outside", "final_ln": "eps-outside"},
    "qkv-interleaved": {"qkv_order": "h3d"},
    "no-attn-scale": {"scale": "none"},
    "attn-scale-by-d": {"scale": "d"},
    "qk-swapped": {"qk_swapped": True},
    "mask-off-by-one": {"causal_shift": 1},
    "no-causal-mask": {"causal": False},
    "softmax-no-max-subtraction": {"fp16_no_max": True},
    "heads-merged-wrong": {"merge": "dh"},
    "c-proj-untransposed": {"proj_transposed": True},
    "residual-from-normalized": {"resid_from_ln1": True},
    "drop-fc-bias": {"fc_bias": False},
    "gelu-erf": {"gelu": "erf"},
    "mlp-residual-dropped": {"mlp_residual": False},
    "skip-ln-f": {"final_ln": "skip"},
}


# -- weights --------------------------------------------------------------------------------
@dataclass
class BlockWeights:
    """One transformer block on the device, Conv1D layout: y = x @ w + b (w is [in, out])."""

    ln1_g: torch.Tensor
    ln1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln2_g: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    mlp_proj_w: torch.Tensor
    mlp_proj_b: torch.Tensor


@dataclass
class Weights:
    wte: torch.Tensor
    wpe: torch.Tensor
    blocks: list[BlockWeights]
    lnf_g: torch.Tensor
    lnf_b: torch.Tensor
    lm_head_t: torch.Tensor  # [C, V]: a transposed view of lm_head.weight (tied to wte in GPT-2)


HF_BLOCK_NAMES = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias")


def load_weights(weights: dict[str, np.ndarray], n_layer: int, dtype: torch.dtype, device: str) -> Weights:
    """Copy GPT-2's parameters out of an HF-named dict onto the device, once, as `dtype`."""

    def get(name: str) -> torch.Tensor:
        if name not in weights:
            raise TracerError(f"triton backend: the golden's weights have no {name!r}")
        return torch.from_numpy(np.ascontiguousarray(weights[name])).to(device=device, dtype=dtype)

    wte = get("transformer.wte.weight")
    lm_head = get("lm_head.weight") if "lm_head.weight" in weights else wte
    blocks = [BlockWeights(*(get(f"transformer.h.{i}.{n}") for n in HF_BLOCK_NAMES)) for i in range(n_layer)]
    return Weights(wte, get("transformer.wpe.weight"), blocks, get("transformer.ln_f.weight"),
                   get("transformer.ln_f.bias"), lm_head.T)


# -- the backend ----------------------------------------------------------------------------
class TritonBackend(Backend):
    """GPT-2 in Triton kernels: `fp32` (default), `tf32` or `fp16`; CUDA, or CPU under TRITON_INTERPRET=1."""

    name = "triton"
    precisions = tuple(PRECISIONS)
    supported_injections = frozenset(VARIANTS)

    def __init__(self, precision: str = "fp32", inject: str | None = None):
        available, why = self.availability()
        if not available:
            raise TracerError(f"triton backend is not available here: {why}")
        super().__init__(precision, inject)
        from backends import triton_kernels  # imported here: without triton the backend still lists and says why

        self.k = triton_kernels
        self.dtype, self.dot_precision = PRECISIONS[precision]
        self.knobs = replace(Knobs(), **VARIANTS.get(inject or "", {}))
        self.attn = triton_kernels.AttentionOptions(
            dot_precision=self.dot_precision, scale=self.knobs.scale, causal=self.knobs.causal,
            causal_shift=self.knobs.causal_shift, qk_swapped=self.knobs.qk_swapped,
            fp16_no_max=self.knobs.fp16_no_max, merge=self.knobs.merge)
        self.device = "cpu" if interpreting() else "cuda"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return False, f"triton is not installed ({exc}); pip install 'gpt2-tracer[triton]'"
        if interpreting():
            if not interpreter_loaded():
                return False, ("TRITON_INTERPRET=1 was set after triton was imported in this process; "
                               "set it in the environment before starting")
            return True, ""
        if torch.cuda.is_available():
            return True, ""
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run its kernels on CPU, slowly)"

    def prepare(self, weights: dict[str, np.ndarray], config: dict) -> None:
        self.check_gpt2_config(config)
        self.n_head = int(config["n_head"])
        self.n_positions = int(config.get("n_positions", 1024))
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.w = load_weights(weights, int(config["n_layer"]), self.dtype, self.device)
        self.tok_scale = float(self.w.wte.shape[1]) ** 0.5 if self.knobs.tok_scale_by_sqrt_c else 1.0

    def inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B,T] int64 and the key-padding mask [B,T] int8 on the device, checked on the host
        (a gather kernel would read out of bounds without a word)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        vocab = self.w.wte.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise TracerError(f"triton backend: input ids outside the vocabulary [0, {vocab})")
        if ids.shape[1] > self.n_positions:
            raise TracerError(f"triton backend: {ids.shape[1]} tokens exceed n_positions={self.n_positions}")
        mask = np.ones(ids.shape, np.int8) if attention_mask is None else np.asarray(attention_mask)
        keep = np.ascontiguousarray(mask != 0, dtype=np.int8)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(keep).to(self.device)

    def forward(self, input_ids: np.ndarray, tap: Tap, attention_mask: np.ndarray | None = None) -> torch.Tensor:
        K, kn, w, eps, H, dot = self.k, self.knobs, self.w, self.eps, self.n_head, self.dot_precision
        ids, keep = self.inputs(input_ids, attention_mask)
        T = ids.shape[1]

        tok = tap("embed.tok", K.embedding(w.wte, ids, scale=self.tok_scale))
        pos = tap("embed.pos", K.positions(w.wpe, T, offset=kn.pos_offset))
        x = tap("embed.sum", K.add(tok, pos, use_y=kn.add_pos))
        for i, blk in enumerate(w.blocks):
            s = f"blocks.{i}."
            h = tap(s + "ln1", K.layernorm(x, blk.ln1_g, blk.ln1_b, eps, kn.ln))
            qkv = tap(s + "attn.qkv", K.linear(h, blk.qkv_w, blk.qkv_b, dot))
            q, k, v = K.split_heads(qkv, H, kn.qkv_order)  # strided views: the kernel reads the heads in place
            q = tap(s + "attn.q", q)
            k = tap(s + "attn.k", k)
            v = tap(s + "attn.v", v)
            att = K.attention(q, k, v, keep, self.attn)  # one fused launch: scores, probs and ctx
            scores = tap(s + "attn.scores", att.scores)
            att = att.given_scores(scores)  # relaunched from the scores the tap returned, if they differ
            probs = tap(s + "attn.probs", att.probs)
            att = att.given_probs(probs)
            ctx = tap(s + "attn.ctx", att.ctx)
            a = tap(s + "attn.out", K.linear(ctx, blk.proj_w.T if kn.proj_transposed else blk.proj_w, blk.proj_b, dot))
            x = tap(s + "resid_mid", K.add(h if kn.resid_from_ln1 else x, a))
            h = tap(s + "ln2", K.layernorm(x, blk.ln2_g, blk.ln2_b, eps, kn.ln))
            f = tap(s + "mlp.fc", K.linear(h, blk.fc_w, blk.fc_b if kn.fc_bias else None, dot))
            f = tap(s + "mlp.act", K.gelu(f, kn.gelu))
            m = tap(s + "mlp.out", K.linear(f, blk.mlp_proj_w, blk.mlp_proj_b, dot))
            x = tap(s + "resid_post", K.add(x, m, use_x=kn.mlp_residual))
        x = tap("final.ln", K.layernorm(x, w.lnf_g, w.lnf_b, eps, kn.final_ln))
        return tap("logits", K.linear(x, w.lm_head_t, None, dot))

    # -- host <-> device for the tap ----------------------------------------------------------
    def to_numpy(self, value: Any) -> np.ndarray:
        """A host copy in the value's own dtype (fp16 stays fp16)."""
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu").contiguous().numpy().copy()
        return np.asarray(value)

    def from_numpy(self, array: np.ndarray, like: Any) -> Any:
        """A golden value as a contiguous tensor on the device, in the dtype of the value it replaces."""
        if not isinstance(like, torch.Tensor):
            return np.asarray(array)
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=like.device, dtype=like.dtype)
