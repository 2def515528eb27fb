"""Where the error is: the origin stage, and where inside a stage (tokens, heads, channels)."""

from __future__ import annotations

import numpy as np

from tracer.compare.result import First8, StageResult
from tracer.stages import layout_of, split_stage, stage_inputs


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def origin_of(results: list[StageResult], config: dict) -> tuple[str | None, str | None]:
    """The stage that introduces the error, with the reasoning shown to the user.

    With introduced-error data: the first stage whose own error exceeds its noise tolerance.
    Without: the first failing stage whose inputs (data-flow graph) all pass.
    """
    for s in results:
        if s.fails_local:
            how = {"isolated": "teacher-forced on golden inputs",
                   "chained inputs": "re-evaluated in float64 on the inputs the candidate tapped",
                   "chained inputs (some derived)": "re-evaluated in float64 on the candidate's inputs, some "
                                                    "derived from its dump"}.get(s.local_source or "",
                                                                                 s.local_source or "")
            derived = f" ({s.stage} derived: {s.derived})" if s.derived else ""
            return s.stage, (f"{s.stage} introduces error {_num(s.local_error)} ({how}){derived}, "
                             f"{s.local_error / max(s.local_tolerance, 1e-300):.3g}× its tolerance "
                             f"{s.local_tolerance:.2g}; every earlier stage's introduced error is within its tolerance")
    by_name = {s.stage: s for s in results}
    n_layer = int(config.get("n_layer", 0))
    for s in results:
        if not s.failed:
            continue
        if s.status == "golden-nonfinite":
            return s.stage, f"{s.stage}: {s.note}"
        if s.status == "shape-mismatch":
            return s.stage, f"{s.stage} cannot be lined up with the golden: {s.note}"
        inputs = [by_name[n] for n in stage_inputs(s.stage, n_layer) if n in by_name]
        if all(i.status == "pass" for i in inputs):
            names = ", ".join(i.stage for i in inputs) or "the input ids"
            return s.stage, (f"{s.stage} fails (error {_num(s.error)} > {_num(s.tolerance)}) while every stage it "
                             f"reads from ({names}) passes: the error is introduced here (no introduced-error "
                             "check was possible: the golden has no weights or the trace lacks the inputs)")
    first = next(s for s in results if s.failed)
    missing = [n for n in stage_inputs(first.stage, n_layer) if n in by_name and by_name[n].status == "missing"]
    if missing:
        return first.stage, (f"{first.stage} is the first failing stage; the trace lacks {', '.join(missing)}, so "
                             f"the error may have been introduced there or at any earlier stage it does not hold")
    return first.stage, f"{first.stage} is the first failing stage; its inputs are not all in the trace"


def coverage_of(results: list[StageResult], config: dict) -> dict:
    """How much of the forward the trace covers: counts, the missing and derived stages, and a note
    when what is present cannot localize an error."""
    missing = [s.stage for s in results if s.status == "missing"]
    derived = [s.stage for s in results if s.derived and s.status != "missing"]
    compared = [s.stage for s in results if s.status != "missing"]
    out = {"stages": len(results), "compared": len(compared), "dumped": len(compared) - len(derived),
           "derived": derived, "missing": missing,
           "share": round(len(compared) / len(results), 4) if results else 0.0}
    first_block = [n for n in compared if not n.startswith(("final.", "logits"))]
    if compared and not first_block:
        out["note"] = (f"the trace has no stage before {compared[0]}: a divergence there cannot be localized to "
                       "the stage that introduced it")
    return out


def _ranges(idx: list[int]) -> str:
    out, start = [], None
    for k, v in enumerate(idx):
        if start is None:
            start = v
        if k + 1 == len(idx) or idx[k + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}–{v}")
            start = None
    return ", ".join(out)


def describe_tokens(bad: np.ndarray, real: np.ndarray) -> str:
    """bad/real: [T] bools over token positions."""
    real_idx = [int(t) for t in np.flatnonzero(real)]
    bad_idx = [int(t) for t in np.flatnonzero(bad & real)]
    if not bad_idx:
        return "no token"
    if len(bad_idx) == len(real_idx):
        return "all tokens"
    ok = [t for t in real_idx if t not in bad_idx]
    if ok == [real_idx[0]] and bad_idx == real_idx[1:]:
        return "every token but token 0 (only token 0 correct)"
    if bad_idx == [real_idx[-1]]:
        return f"only the last token ({bad_idx[0]})"
    if bad_idx == real_idx[real_idx.index(bad_idx[0]):]:
        return f"tokens from position {bad_idx[0]} on"
    return f"tokens {_ranges(bad_idx)}"


def describe_where(stage: str, per_row: np.ndarray, tolerance: float, diff: np.ndarray, valid: np.ndarray,
                   config: dict) -> str:
    """One line: which tokens, which heads, which channel slice carry the error."""
    layout = layout_of(stage)
    bad = per_row > tolerance
    parts = []
    if layout == "BTC":
        tok_bad = bad.any(0)
        tok_real = valid.any(-1).any(0)
    else:
        tok_bad = bad.any((0, 1))
        tok_real = valid.any(-1).any((0, 1))
        heads = [int(h) for h in np.flatnonzero(bad.any((0, 2)))]
        n_head = per_row.shape[1]
        parts.append("all heads" if len(heads) == n_head else f"heads {_ranges(heads)} of {n_head}")
    if bad.shape[0] > 1 and layout == "BTC":
        rows = [int(b) for b in np.flatnonzero(bad.any(1))]
        if len(rows) < bad.shape[0]:
            parts.append(f"batch rows {_ranges(rows)}")
    parts.insert(0, describe_tokens(tok_bad, tok_real))
    if layout == "BTC":
        channel = _channel_slice(diff, valid, config, split_stage(stage)[1])
        if channel:
            parts.append(channel)
    return "; ".join(parts)


def _channel_slice(diff: np.ndarray, valid: np.ndarray, config: dict, local: str) -> str | None:
    """A contiguous channel block holding ≥90% of the error energy points at a split or concat."""
    d = np.where(valid, np.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0), 0.0).astype(np.float64)
    energy = (d * d).reshape(-1, d.shape[-1]).sum(0)
    total = energy.sum()
    C = energy.size
    if total <= 0:
        return None
    csum = np.concatenate([[0.0], np.cumsum(energy)])
    best = None
    for width in _widths(C):
        sums = csum[width:] - csum[:-width]
        start = int(np.argmax(sums))
        if sums[start] >= 0.9 * total:
            best = (start, start + width)
            break
    if best is None or best[1] - best[0] > C // 2:
        return "all channels"
    a, b = best
    text = f"channels {a}–{b - 1} of {C} hold {100 * (csum[b] - csum[a]) / total:.0f}% of the error"
    n_embd, n_head = int(config.get("n_embd", 0)), int(config.get("n_head", 1))
    if n_embd and C in (n_embd, 3 * n_embd):
        D = n_embd // n_head
        if a % D == 0 and (b - a) % D == 0:
            part = ""
            if C == 3 * n_embd:
                part = f" ({'qkv'[a // n_embd]} part)"
            first, last = (a % n_embd) // D, ((b - 1) % n_embd) // D
            text += f" = head{'s' if last > first else ''} {first}{'' if last == first else f'–{last}'}{part}"
    return text


def _widths(C: int) -> list[int]:
    widths, w = [], 1
    while w < C:
        widths.append(w)
        w = w * 2 if w < 8 else w + max(1, w // 4)
    return widths + [C]


def first8_tables(stage: str, g: np.ndarray, c: np.ndarray, valid: np.ndarray, per_row: np.ndarray,
                  tolerance: float, golden_rms: float, token: int | None, first: int = 0) -> list[First8]:
    """First 8 values at token `first` (0, or the first one a --tokens golden kept), the worst token,
    and `token` if asked (query rows for attention). `golden_rms`: the RMS of the compared golden
    values, the scale of the out-of-tolerance marks."""
    layout = layout_of(stage)
    finite_rows = np.where(np.isfinite(per_row), per_row, np.finfo(np.float64).max)
    worst = np.unravel_index(int(np.argmax(finite_rows)), per_row.shape)
    if layout == "BTC":
        wb, wt, wh = int(worst[0]), int(worst[1]), None
    else:
        wb, wh, wt = int(worst[0]), int(worst[1]), int(worst[2])
    T = g.shape[2] if layout != "BTC" else g.shape[1]
    picks = [(0, 0 if wh is not None else None, first), (wb, wh, wt)]
    if token is not None and 0 <= token < T:
        picks.append((0, 0 if wh is not None else None, token))
    tables, seen = [], set()
    for b, h, t in picks:
        if (b, h, t) in seen:
            continue
        seen.add((b, h, t))
        bb = min(b, g.shape[0] - 1)
        gs = g[bb, t] if h is None else g[bb, h, t]
        cs = c[bb, t] if h is None else c[bb, h, t]
        gs, cs = gs.reshape(-1)[:8].astype(np.float64), cs.reshape(-1)[:8].astype(np.float64)
        with np.errstate(all="ignore"):
            d = cs - gs
            both_masked = np.isneginf(gs) & np.isneginf(cs)
            d = np.where(both_masked, 0.0, d)
            scale = np.where(np.isfinite(gs), np.maximum(np.abs(gs), golden_rms), golden_rms)
            out = ~(np.abs(d) <= tolerance * scale)
        tables.append(First8(token=t, batch=b, head=h, golden=gs.tolist(), candidate=cs.tolist(),
                             diff=d.tolist(), out_of_tolerance=(out & ~both_masked).tolist()))
    return tables
