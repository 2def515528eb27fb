"""Hypotheses about a failing stage, generated from the stage's definition (SPEC §6).

A stage is a function of input stages, parameters and constants (`reference.Reference.evaluate`).
Each way a port can get that function wrong is one family, enumerated for whatever stage fails —
not a list of known bugs:

* operand — an input replaced by another tensor of the same shape that exists at that point of
  the forward (v read from the k slice, logits from the residual, ln2 fed the block input), or a
  term of a sum dropped, or the step skipped (the stage equals its input);
* parameter — each parameter dropped, doubled, negated, transposed, or all of the stage's
  parameters taken from another module of the same shapes (ln_1's in ln_2, layer j's in layer i);
* constant — each constant of the formula fitted to the candidate (`fits_for`: attention scale,
  GELU coefficients, LayerNorm eps, position and id offsets) and reported with its fitted value;
* precision — the stage's inputs and weights, or its output, rounded to fp16 / bf16 / tf32;
* formula and layout variants — the discrete alternatives of the definition (unbiased variance,
  eps outside the root, mask shifted, softmax axis, erf GELU, qkv split orders, head merge orders).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from tracer.compare.reference import GELU_CUBIC, GELU_SCALE, MERGE_ORDER, Reference
from tracer.stages import BLOCK_STAGES, resid_pre, split_stage, stage_inputs
from tracer.weights.words import FIX_TRANSPOSE

# What a stage's last axis holds, so only tensors of the same shape stand in for one another.
WIDTH = {"embed.tok": "C", "embed.sum": "C", "ln1": "C", "attn.ctx": "C", "attn.out": "C", "resid_mid": "C",
         "ln2": "C", "mlp.out": "C", "resid_post": "C", "final.ln": "C", "attn.qkv": "3C", "mlp.fc": "4C",
         "mlp.act": "4C", "attn.q": "heads", "attn.k": "heads", "attn.v": "heads", "attn.scores": "TT",
         "attn.probs": "TT", "embed.pos": "pos", "logits": "V"}
SUMS = {"embed.sum", "resid_mid", "resid_post"}
LINEARS = {"attn.qkv", "attn.out", "mlp.fc", "mlp.out"}
MATMULS = {"attn.qkv", "attn.out", "mlp.fc", "mlp.out", "logits", "attn.scores", "attn.ctx"}


@dataclass(frozen=True)
class Hypothesis:
    rule: str
    bug: str
    knobs: dict = field(default_factory=dict)
    same_as: str | None = None          # the stage's value is simply this other stage
    round_output: str | None = None     # the stage's output rounded to this precision
    family: str = "formula"


@dataclass(frozen=True)
class ConstantFit:
    """A constant of the stage's formula, fitted to the candidate over `grid` then refined."""

    rule: str
    what: str                    # "attention scale", "GELU cubic coefficient", ...
    knob: str
    default: float
    grid: tuple[float, ...]      # candidate values (integers for offsets; refined for continuous)
    integer: bool = False
    log: bool = False            # refine in log space (eps)


def _name(stage: str) -> str:
    return split_stage(stage)[1]


def _neighbours(stage: str, n_layer: int) -> list[str]:
    """Stages computed before `stage` that a port could mistakenly read instead of an input."""
    i, local = split_stage(stage)
    if i is None:
        last = n_layer - 1
        pool = ["embed.tok", "embed.sum"] if local.startswith("embed") else \
            [resid_pre(last)] + [f"blocks.{last}.{s}" for s in BLOCK_STAGES] + ["final.ln"]
    else:
        pool = [resid_pre(i)] + [f"blocks.{i}.{s}" for s in BLOCK_STAGES]
    return pool[:pool.index(stage)] if stage in pool else pool


def _operands(stage: str, ref: Reference) -> list[Hypothesis]:
    n_layer = ref.spec.n_layer
    inputs = stage_inputs(stage, n_layer)
    local = _name(stage)
    out = []
    for x in inputs:
        for other in _neighbours(stage, n_layer):
            if other != x and other not in inputs and WIDTH.get(_name(other)) == WIDTH.get(_name(x)):
                out.append(Hypothesis("operand", f"{local} computed from {other} in place of {x} (the wrong operand)",
                                      {"inputs": {x: other}}, family="operand"))
        if len(inputs) == 1 and WIDTH.get(_name(x)) == WIDTH.get(local) and WIDTH.get(local) != "heads":
            out.append(Hypothesis("step.skipped", f"{local} not computed: the stage equals its input {x}",
                                  same_as=x, family="operand"))
    if local in SUMS:
        for x in inputs:
            kept = next(y for y in inputs if y != x)
            out.append(Hypothesis("sum.term-dropped", f"{_name(x)} not added: {local} equals {_name(kept)} alone",
                                  same_as=kept, family="operand"))
    if local in ("attn.scores", "attn.ctx") and len(inputs) == 2:
        a, b = inputs
        out.append(Hypothesis("operand.swapped", f"{_name(a)} and {_name(b)} swapped in {local}",
                              {"inputs": {a: b, b: a}}, family="operand"))
    return out


def _modules(ref: Reference) -> dict[str, dict[str, tuple[int, ...]]]:
    """HF module prefix -> {role: shape} for every weight/bias pair in the weights."""
    mods: dict[str, dict[str, tuple[int, ...]]] = {}
    for name in ref.w:
        prefix, _, role = name.rpartition(".")
        if role in ("weight", "bias"):
            mods.setdefault(prefix, {})[role] = ref.param_shape(name)
    return mods


def _parameters(stage: str, ref: Reference) -> list[Hypothesis]:
    params = ref.params_of(stage)
    if not params or not ref.w:
        return []
    local = _name(stage)
    is_ln = local in ("ln1", "ln2", "final.ln")
    out = []
    for role, name in params.items():
        if name not in ref.w:
            continue
        shape = ref.param_shape(name)
        what = f"{local} {'gain' if is_ln and role == 'weight' else role} ({name})"
        if role == "bias" or is_ln:
            out.append(Hypothesis(f"param.{role}.dropped", f"{what} not applied",
                                  {"params": {name: (np.ones_like if is_ln and role == "weight" else np.zeros_like)}},
                                  family="parameter"))
            out.append(Hypothesis(f"param.{role}.doubled", f"{what} applied twice",
                                  {"params": {name: lambda a: 2 * a}}, family="parameter"))
        out.append(Hypothesis(f"param.{role}.negated", f"{what} negated", {"params": {name: np.negative}},
                              family="parameter"))
        if role == "weight" and len(shape) == 2 and shape[0] == shape[1] and local not in ("logits", "embed.tok",
                                                                                          "embed.pos"):
            out.append(Hypothesis("param.weight.transposed", f"{local} weight used transposed ({FIX_TRANSPOSE})",
                                  {"params": {name: np.transpose}}, family="parameter"))
    own = next(iter(params.values())).rpartition(".")[0]
    mods = _modules(ref)
    if own in mods:
        for other, shapes in mods.items():
            if other != own and shapes == mods[own]:
                swap = {params[r]: f"{other}.{r}" for r in params if f"{other}.{r}" in ref.w}
                out.append(Hypothesis("param.other-module", f"{local} uses the parameters of {other} instead of {own}",
                                      {"params": swap}, family="parameter"))
    return out


def _precision(stage: str, ref: Reference, precision: str) -> list[Hypothesis]:
    if precision not in ("fp32", "fp64") or not stage_inputs(stage, ref.spec.n_layer) and not ref.params_of(stage):
        return []
    local = _name(stage)
    lows = ("fp16", "bf16", "tf32") if local in MATMULS else ("fp16", "bf16")
    out = []
    for low in lows:
        rounded = {name: _rounder(low) for name in ref.params_of(stage).values() if name in ref.w}
        knobs = {"round_inputs": low, "params": rounded}
        out.append(Hypothesis(f"precision.inputs-{low}", f"{local} computed from {low}-rounded inputs"
                              f"{' and weights' if rounded else ''} ({low} {'matmul' if local in MATMULS else 'op'})",
                              knobs, family="precision"))
        if low != "tf32":
            out.append(Hypothesis(f"precision.all-{low}", f"{local} computed and stored in {low}", knobs,
                                  round_output=low, family="precision"))
        weight = ref.params_of(stage).get("weight")
        if local in LINEARS and low != "tf32" and weight in ref.w:
            out.append(Hypothesis(f"precision.matmul-{low}", f"{local} matmul in {low} (inputs, weight and product "
                                  f"rounded to {low}; bias added in full precision)",
                                  {"round_inputs": low, "params": {weight: _rounder(low)}, "round_product": low},
                                  family="precision"))
    weight = ref.params_of(stage).get("weight")
    if (local in LINEARS or local == "logits") and weight in ref.w:
        axis = -1 if local == "logits" else 0  # the product's reduction axis of the weight
        out.append(Hypothesis("precision.inputs-q8_0", f"{local} computed from inputs and weight quantized to "
                              "8-bit blocks of 32 along the product (a ggml q8_0 matmul)",
                              {"round_inputs": "q8_0", "params": {weight: _block_rounder("q8_0", axis)}},
                              family="precision"))
    return out


def _block_rounder(fmt: str, axis: int):
    from tracer.compare.tolerance import quantize_blocks

    return lambda a: quantize_blocks(a, fmt, axis)


def _rounder(low: str):
    from tracer.compare.tolerance import round_to

    return lambda a: round_to(a, low)


def _formula(stage: str, ref: Reference) -> list[Hypothesis]:
    """The discrete alternatives of each definition (what varies between written formulas)."""
    i, local = split_stage(stage)
    if local in ("ln1", "ln2", "final.ln"):
        return [Hypothesis("ln.eps-outside-sqrt", "LayerNorm adds eps outside the square root: (x-μ)/(σ+eps)",
                           {"eps_outside": True}),
                Hypothesis("ln.unbiased-variance", "LayerNorm uses the unbiased (N-1) variance instead of the "
                           "biased (N) one", {"unbiased": True}),
                Hypothesis("ln.no-mean", "LayerNorm without mean subtraction (RMSNorm)", {"center": False})]
    if local in ("attn.q", "attn.k", "attn.v"):
        which = "qkv".index(local[-1])
        rules = [Hypothesis("qkv.split-order", f"{local} taken from the {'qkv'[j]} slice of c_attn (split order)",
                            {"order": tuple(j if n == which else n for n in range(3))}, family="layout")
                 for j in range(3) if j != which]
        return rules + [Hypothesis("heads.split-layout", "heads split as [T, D, H] instead of [T, H, D]",
                                   {"dh_swapped": True}, family="layout"),
                        Hypothesis("qkv.interleaved", "fused qkv read per head as [H, 3, D] (interleaved) instead of "
                                   "GPT-2's [3, H, D]", {"interleaved": True}, family="layout")]
    if local == "attn.scores":
        return [Hypothesis("scores.qk-swapped", "q and k swapped: k·qᵀ (scores transposed before masking)",
                           {"swap_qk": True}),
                Hypothesis("mask.off-by-one", "causal mask off by one: query t also sees key t+1", {"mask_shift": 1}),
                Hypothesis("mask.hides-diagonal", "causal mask off by one: query t cannot see itself",
                           {"mask_shift": -1}),
                Hypothesis("mask.missing", "no causal mask: queries attend to future tokens", {"causal": False})]
    if local == "attn.probs":
        return [Hypothesis("softmax.wrong-axis", "softmax over the query axis instead of the key axis", {"axis": -2})]
    if local == "attn.ctx":
        axes = {1: "H", 2: "T", 3: "D"}
        rules = [Hypothesis("heads.merge-layout", f"heads merged from memory laid out as "
                            f"[{', '.join(axes[a] for a in order)}] instead of [T, H, D], then read as [T, C]",
                            {"merge_order": order}, family="layout")
                 for order in itertools.permutations((1, 2, 3)) if order != MERGE_ORDER]
        return rules + [Hypothesis("ctx.probs-transposed", "attention probs transposed before ·v",
                                   {"transpose_probs": True}, family="layout")]
    if local == "mlp.act":
        return [Hypothesis("gelu.erf", "exact erf GELU instead of the tanh approximation (gelu_new)",
                           {"activation": "gelu"}),
                Hypothesis("gelu.sigmoid", "sigmoid approximation x·σ(1.702x) instead of tanh GELU",
                           {"activation": "quick_gelu"}),
                Hypothesis("gelu.relu", "ReLU instead of GELU", {"activation": "relu"})]
    return []


def _upstream(stage: str, ref: Reference, derived: frozenset[str]) -> list[Hypothesis]:
    """Hypotheses of inputs the dump does not hold (derived from it, e.g. q/k from qkv): a bug there first
    shows here. Each input's own formula variants, alone and — for the variants they share — together."""
    inputs = [x for x in stage_inputs(stage, ref.spec.n_layer) if x in derived]
    out, shared = [], {}
    for x in inputs:
        for h in _formula(x, ref):
            out.append(Hypothesis(f"upstream.{h.rule}", f"{h.bug} (in {_name(x)}, which the dump does not hold)",
                                  {"upstream": {x: h.knobs}}, family=h.family))
            if "order" not in h.knobs:
                shared.setdefault(h.rule, (h, []))[1].append(x)
    for rule, (h, xs) in shared.items():
        if len(xs) > 1:
            names = " and ".join(_name(x) for x in xs)
            out.append(Hypothesis(f"upstream.{rule}", f"{h.bug} (in {names}, which the dump does not hold)",
                                  {"upstream": {x: h.knobs for x in xs}}, family=h.family))
    return out


def hypotheses_for(stage: str, ref: Reference, precision: str = "fp32",
                   derived: frozenset[str] = frozenset()) -> list[Hypothesis]:
    """Every discrete hypothesis of a stage, generated from its definition (and from the definitions of
    the `derived` inputs the dump lacks)."""
    return (_formula(stage, ref) + _operands(stage, ref) + _parameters(stage, ref) + _precision(stage, ref, precision)
            + _upstream(stage, ref, derived))


def fits_for(stage: str, ref: Reference) -> list[ConstantFit]:
    """The constants of a stage's formula that a port may have got wrong, to be fitted."""
    i, local = split_stage(stage)
    s = ref.spec
    if local == "attn.scores":
        return [ConstantFit("constant.attn-scale", "attention scale", "scale", s.attn_scale(i or 0), ())]
    if local == "mlp.act" and s.activation in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return [ConstantFit("constant.gelu-cubic", "GELU cubic coefficient", "gelu_cubic", GELU_CUBIC,
                            tuple(np.linspace(0.0, 0.1, 21))),
                ConstantFit("constant.gelu-scale", "GELU tanh scale √(2/π)", "gelu_scale", GELU_SCALE,
                            tuple(np.linspace(0.5, 1.1, 25)))]
    if local in ("ln1", "ln2", "final.ln"):
        return [ConstantFit("constant.ln-eps", "LayerNorm eps", "eps", s.eps, tuple(10.0 ** np.arange(-12, 0.5, 0.5)),
                            log=True)]
    if local == "embed.pos":
        return [ConstantFit("constant.pos-offset", "position offset", "pos_offset", 0,
                            tuple(k for k in range(-4, 5) if k), integer=True)]
    if local == "embed.tok":
        return [ConstantFit("constant.id-offset", "token id offset", "id_offset", 0, (-2, -1, 1, 2), integer=True)]
    return []


def describe_value(value: float, fit: ConstantFit, ref: Reference) -> str:
    """A fitted constant in words, naming a recognisable value (1/√D, 1/D, 1, ...)."""
    if fit.integer:
        return f"{int(value):+d}"
    D = ref.spec.head_dim
    known = {"1": 1.0, "1/√D": 1 / math.sqrt(D), "1/D": 1 / D, "√D": math.sqrt(D), "1/√C": 1 / math.sqrt(ref.spec.n_embd)}
    for name, v in known.items():
        if abs(value - v) <= 1e-3 * abs(v):
            return f"{value:.4g}" if name == f"{value:.4g}" else f"{value:.4g} = {name}"
    return f"{value:.4g}"
