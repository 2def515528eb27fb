"""The audit: every golden parameter found (or not) in the checkpoint, and every leftover tensor.

Per parameter: locate it by content (`match`), compare with what the names say (`names`), and
decide: `ok` (found, values within what its storage explains, where the names put it),
`misplaced` (found, but not where or not how the names or the rest of the checkpoint say:
transposed, q/k/v in the wrong order, another tensor), `mismatch` (no tensor holds its values
within tolerance; metrics of the named tensor when there is one) or `missing`. Forms say how it
was found: as-is, transposed, split, fused, tied, padded, dtype-changed, quantized.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from tracer.store import Golden, StageFile
from tracer.weights.checkpoint import Checkpoint
from tracer.weights.fingerprint import squeezed
from tracer.weights.golden import GoldenWeights, is_conv1d
from tracer.weights.match import Matcher
from tracer.weights.names import Expect, Scheme, WeightMap, choose_scheme, expectations, named_source, names_for
from tracer.weights.readers import open_checkpoint
from tracer.weights.verify import Check, describe_values
from tracer.weights.views import Piece, Source, describe_source, source_tensors
from tracer.weights.words import (FIX_QKV_ORDER, FIX_TIE, PARTS, inconsistent_orientation, orientation_problem,
                                  parts_problem)

Progress = Callable[[Iterable, str], Iterable]


@dataclass
class Finding:
    """What the audit found for one golden parameter."""

    param: str
    shape: tuple[int, ...]
    status: str = "missing"                 # ok | misplaced | mismatch | missing
    forms: list[str] = field(default_factory=list)
    source: Source | None = None
    check: Check | None = None
    found_by: str | None = None             # name | content
    named: list[Expect] = field(default_factory=list)
    problem: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Leftover:
    """A checkpoint tensor that holds no golden parameter."""

    tensor: str
    shape: tuple[int, ...]
    storage: str
    note: str
    problem: str | None = None             # set when it looks like a weight that should hold one


@dataclass
class AuditResult:
    golden: str
    checkpoint: str
    format: str
    names: str
    findings: list[Finding]
    leftovers: list[Leftover]
    skipped: dict[str, str]
    storage: dict[str, str]                 # tensor -> storage in words
    quant: dict[str, dict]                  # tensor -> quantization (scheme, bits, block, grouping)
    checkpoint_bytes: int
    ties: dict[str, str] = field(default_factory=dict)   # golden parameter -> the one it is tied to
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(f.ok for f in self.findings) and not any(x.problem for x in self.leftovers)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def audit(golden_path: str | os.PathLike, ckpt_path: str | os.PathLike, name_map: WeightMap | None = None,
          progress: Progress | None = None) -> AuditResult:
    with Golden.open(golden_path) as golden, open_checkpoint(ckpt_path) as ckpt:
        return audit_open(golden, ckpt, name_map, progress)


def audit_open(golden: StageFile, ckpt: Checkpoint, name_map: WeightMap | None = None,
               progress: Progress | None = None, on_found: Callable[[Finding, np.ndarray, Matcher], None] | None = None,
               ) -> AuditResult:
    """The audit of an open golden and checkpoint. `on_found(finding, golden_value, matcher)` is
    called for each parameter while its golden value is in memory (port_weights uses it)."""
    start = time.perf_counter()
    gw = GoldenWeights(golden)
    params = frozenset(gw.names)
    tensors = list(ckpt.candidates)
    scheme = choose_scheme(tensors, params, gw.n_layer, name_map)
    named = expectations(scheme, tensors + list(ckpt.skipped), params, gw.n_layer)
    track = (lambda items, what: progress(items, what)) if progress else (lambda items, what: items)
    extents = {d for s in gw.shapes.values() for d in s}
    matcher = Matcher(ckpt, gw.n_layer, extents, lambda items: track(items, "fingerprinting"))
    ctx = _Names({n: c.shape for n, c in ckpt.candidates.items()}, ckpt.skipped, scheme, gw.n_layer, gw.tied_to)
    findings = []
    for name in track(gw.names, "auditing"):
        g = gw.read(name)
        finding = _find(name, g, named.get(name, []), ctx, matcher)
        findings.append(finding)
        if on_found is not None:
            on_found(finding, g, matcher)
    for f in findings:
        if f.found_by is not None:
            f.forms = _forms(f, gw, matcher, ckpt)
    _check_orientation(findings)
    _explain(findings, matcher)
    label = f"{scheme.label}" + ("" if name_map is not None else " (recognised)") if scheme else \
        "none recognised: found by content"
    result = AuditResult(str(gw.path), str(ckpt.path), ckpt.format, label, findings,
                         _leftovers(ckpt, matcher, named, set(gw.shapes.values())), dict(ckpt.skipped),
                         {n: c.storage for n, c in ckpt.candidates.items()},
                         {n: c.quant.to_dict() for n, c in ckpt.candidates.items() if c.quant}, ckpt.nbytes,
                         dict(gw.tied_to))
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class _Names:
    """What the names say, shared by every parameter's verdict."""

    shapes: dict[str, tuple[int, ...]]
    skipped: dict[str, str]
    scheme: Scheme | None
    n_layer: int
    ties: dict[str, str]


def _find(name: str, g: np.ndarray, named: list[Expect], ctx: _Names, matcher: Matcher) -> Finding:
    expects = [e for e in named if e.tensor in ctx.shapes]
    unusable = [f"named {e.tensor}, which cannot be read as weights: {ctx.skipped[e.tensor]}"
                for e in named if e.tensor in ctx.skipped]
    f = Finding(name, tuple(g.shape), named=expects)
    source, why = named_source(expects, g.shape, ctx.shapes) if expects else (None, None)
    absent = [] if named else [n for n in names_for(ctx.scheme, name, ctx.n_layer) if n not in ctx.shapes]
    found = matcher.locate(name, g, source)
    if found is not None:
        matcher.claim(name, found.source)
        f.source, f.check = found.source, found.check
        _judge_found(f, source, why, absent, ctx, matcher)
    elif source is not None:
        matcher.claim(name, source)  # accounted for here, not again as an unused tensor
        f.status, f.source, f.check = "mismatch", source, matcher.check_source(g, source)
        f.problem = f"{describe_source(source)} does not hold it (rel. error {f.check.rel_l2:.3g}): " + \
            _looks(g, source, matcher)
        f.fix = FIX_QKV_ORDER if any(e.part is not None for e in expects) else None
    else:
        f.status = "mismatch" if expects or unusable else "missing"
        f.problem = why or "; ".join(unusable) or "no tensor holds it, by name or by content" + \
            (f" (the map names it {', '.join(absent)})" if absent else "")
    return f


def _looks(g: np.ndarray, source: Source, matcher: Matcher) -> str:
    """What the named tensor(s) hold instead: for the pieces of a split, which piece each matches."""
    if len(source) == 1:
        view = source[0].view
        return describe_values(view.apply(matcher.values(view.tensor)[0]))
    texts = []
    for k, p in enumerate(source):
        values = p.view.apply(matcher.values(p.view.tensor)[0])
        holds = [j for j, q in enumerate(source) if q.of(g).shape == values.shape
                 and matcher.check_piece(g, Piece(p.view, q.axis, q.start, q.stop)).identified]
        what = ", ".join(PARTS[j] if len(source) == len(PARTS) else f"piece {j}" for j in holds) or \
            describe_values(values)
        texts.append(f"{p.view.tensor} holds {what}")
    return "; ".join(texts)


def _judge_found(f: Finding, named: Source | None, why: str | None, absent: list[str], ctx: _Names,
                 matcher: Matcher) -> None:
    agrees = named is not None and _agrees(f.source, named, f.named)
    f.found_by = "name" if agrees else "content"
    tied = ctx.ties.get(f.param) in {c for t in source_tensors(f.source) for c in matcher.claims.get(t, [])}
    if named is not None and not agrees:
        f.status = "misplaced"
        f.problem, f.fix = _disagreement(f.param, f.source, named, f.named, tied)
    elif why is not None:
        f.status = "misplaced"
        f.problem = f"{why}; its values are in {describe_source(f.source)}"
        f.fix = FIX_QKV_ORDER if any(e.part is not None for e in f.named) else None
    elif absent and not tied:
        f.status = "misplaced"
        f.problem = f"the map names it {', '.join(absent)}, not in the checkpoint; it is in {describe_source(f.source)}"
        f.fix = FIX_QKV_ORDER if len(absent) == len(PARTS) and ".attn.c_attn." in f.param else \
            f"save it as {absent[0]}"
    elif not f.check.within:
        f.status = "mismatch"
        f.problem = (f"{describe_source(f.source)} holds something close to it, beyond what its storage explains "
                     f"(rel. error {f.check.rel_l2:.3g})")
        if len(f.source) == 1:
            view = f.source[0].view
            f.problem += f": {describe_values(view.apply(matcher.values(view.tensor)[0]))}"
    else:
        f.status = "ok"


def _position(piece: Piece) -> tuple:
    return (piece.axis, piece.start, piece.stop)


def _misoriented(found: Source, expects: list[Expect]) -> Piece | None:
    """A found piece lying the other way round from what the names say."""
    oriented = {e.tensor: e.transpose for e in expects}
    return next((p for p in found if oriented.get(p.view.tensor) not in (None, p.view.transpose)), None)


def _agrees(found: Source, named: Source, expects: list[Expect]) -> bool:
    """Same tensors at the same places, oriented as the names say (when they say)."""
    by_place = {_position(p): p.view for p in found}
    for p in named:
        v = by_place.get(_position(p))
        if v is None or (v.tensor, v.layer, v.axis, v.start, v.stop) != \
                (p.view.tensor, p.view.layer, p.view.axis, p.view.start, p.view.stop):
            return False
    return len(found) == len(named) and _misoriented(found, expects) is None


def _disagreement(param: str, found: Source, named: Source, expects: list[Expect],
                  tied: bool) -> tuple[str, str | None]:
    found_tensors, named_tensors = source_tensors(found), source_tensors(named)
    if set(found_tensors) == set(named_tensors):
        by_place = {_position(p): p.view for p in found}
        if len(named) > 1 and any(by_place.get(_position(p), p.view).tensor != p.view.tensor for p in named):
            held = {v.tensor: PARTS[k] if len(found) == len(PARTS) else f"piece {k}"
                    for k, v in enumerate(p.view for p in found)}
            return parts_problem(held)
        wrong = _misoriented(found, expects)
        if wrong is not None:
            return orientation_problem(wrong.view.tensor, wrong.view.transpose, is_conv1d(param))
    problem = f"named {', '.join(named_tensors)}, but its values are in {describe_source(found)}"
    fix = FIX_TIE if tied and param == "lm_head.weight" else \
        f"load {param} from {', '.join(found_tensors)} (or fix the name map)"
    return problem, fix


def _forms(f: Finding, gw: GoldenWeights, matcher: Matcher, ckpt: Checkpoint) -> list[str]:
    source = f.source
    forms = []
    if len(source) > 1:
        forms.append("split")
    if any(p.view.transpose for p in source):
        forms.append("transposed")
    for p in source:
        v = p.view
        others = [c for c in matcher.claims.get(v.tensor, []) if c != f.param and gw.tied_to.get(c) != f.param
                  and gw.tied_to.get(f.param) != c]
        if v.layer is not None or (v.axis is not None and (v.start > 0 or others)):
            forms.append("fused")
        elif v.axis is not None:
            forms.append("padded")
    tie = gw.tied_to.get(f.param)
    if tie is not None and any(tie in matcher.claims.get(t, []) for t in source_tensors(source)):
        forms.append("tied")
    cands = [ckpt.candidates[t] for t in source_tensors(source)]
    if any(c.quant is not None for c in cands):
        forms.append("quantized")
    elif any(c.dtype != _golden_dtype(gw, f.param) for c in cands):
        forms.append("dtype-changed")
    return list(dict.fromkeys(forms)) or ["as-is"]


def _golden_dtype(gw: GoldenWeights, name: str) -> str:
    from tracer.weights.checkpoint import dtype_name

    return dtype_name(np.dtype(gw.dtypes[name]))


def _check_orientation(findings: list[Finding]) -> None:
    """Conv1D weights the names do not orient must all lie the same way: the minority is flagged."""
    free = [f for f in findings if f.status == "ok" and is_conv1d(f.param) and len(f.shape) == 2
            and all(e.transpose is None for e in f.named)]
    transposed = [f for f in free if all(p.view.transpose for p in f.source)]
    upright = [f for f in free if not any(p.view.transpose for p in f.source)]
    if not transposed or not upright or len(transposed) == len(upright):
        return
    minority, majority = (transposed, upright) if len(transposed) < len(upright) else (upright, transposed)
    for f in minority:
        f.status = "misplaced"
        f.problem, f.fix = inconsistent_orientation(f in transposed, len(majority))


def _explain(findings: list[Finding], matcher: Matcher) -> None:
    """Say what a wrongly named tensor holds instead, once every parameter has been located."""
    for f in findings:
        if f.status not in ("misplaced", "mismatch"):
            continue
        held = {e.tensor: matcher.claims.get(e.tensor, []) for e in f.named}
        extra = [f"{t} holds {', '.join(h)}" for t, h in held.items() if h and f.param not in h]
        if extra:
            f.problem = f"{f.problem}; {'; '.join(extra)}"


def _leftovers(ckpt: Checkpoint, matcher: Matcher, named: dict[str, list[Expect]],
               golden_shapes: set[tuple[int, ...]]) -> list[Leftover]:
    shapes = {squeezed(s) for s in golden_shapes}
    named_tensors: dict[str, list[str]] = {}
    for param, expects in named.items():
        for e in expects:
            named_tensors.setdefault(e.tensor, []).append(param)
    out = []
    for name, cand in ckpt.candidates.items():
        if matcher.claims.get(name):
            continue
        shape = squeezed(cand.shape)
        problem = None
        if name in named_tensors:
            problem = f"named for {', '.join(dict.fromkeys(named_tensors[name]))} but holds none of it"
        elif shape in shapes or shape[::-1] in shapes:
            problem = "shaped like a parameter but holds none: left at its init, or loaded from elsewhere?"
        out.append(Leftover(name, cand.shape, cand.storage, describe_values(cand.values()), problem))
    return out
