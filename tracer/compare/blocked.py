"""The introduced-error check of a large stage, evaluated a block at a time (SPEC §6).

A stage's float64 reference and its float32 noise twin are evaluated block by block and only
their per-row sums are kept (`RowSums`): gpt2's logits at T=1024 are 400 MB as float64 and one
attention stage 100 MB, while a block stays a few MB that the allocator reuses instead of
faulting in fresh pages. Blocks are consecutive rows of the stage, so the per-row errors come out
in the stage's own order and the results are the whole-stage ones.

* token-wise stages (norms, products, residuals, the activation): blocks of tokens;
* the logits: blocks of the vocabulary (blocks of tokens would cast all of wte once per block);
* attention scores and probs: blocks of query rows of one head, and under the causal mask a
  block of queries before t1 is evaluated against the keys before t1 only, the rest being masked
  in the reference whatever the inputs; ctx: blocks of query rows of all heads, against the keys
  before t1 where the candidate's probs are zero beyond them (else against all).
"""

from __future__ import annotations

import numpy as np

from tracer.compare import metrics
from tracer.compare.metrics import RowSums, as_rows, is_masked, row_blocks
from tracer.compare.precisions import StagePrecisions
from tracer.compare.reference import Lookup, Reference
from tracer.compare.tolerance import BLOCK_FORMATS
from tracer.stages import split_stage, stage_inputs

# Stages computed row by row (token by token) from same-shaped rows of their inputs.
TOKEN_WISE = frozenset({"ln1", "ln2", "final.ln", "attn.qkv", "attn.out", "mlp.fc", "mlp.act", "mlp.out",
                        "resid_mid", "resid_post", "logits"})
ATTENTION = frozenset({"attn.scores", "attn.probs", "attn.ctx"})
QUERY_SHARE = 8  # a block of one head holds at most ROW_BLOCK / QUERY_SHARE elements: 8 spans a head at T=1024

Check = tuple[float, np.ndarray, float]  # (introduced error, its per-row values, the noise twin's error)


def query_spans(n_queries: int, row_size: int, share: int = QUERY_SHARE) -> list[tuple[int, int]]:
    """Consecutive spans of query rows of `row_size` elements each, a span at most ROW_BLOCK / `share`
    elements; with a causal mask each sees only the keys before its end, so smaller spans skip more
    of the masked square (8 spans: 56% of it computed)."""
    step = max(1, metrics.ROW_BLOCK // (share * max(row_size, 1)))
    return [(a, min(a + step, n_queries)) for a in range(0, n_queries, step)]


class BlockedCheck:
    """Introduced-error checks of one case's large stages (`run`), with the case's reference,
    precisions, inputs and the causal-and-padding mask `allowed` [B,1,T,T]."""

    def __init__(self, ref: Reference, precisions: StagePrecisions, ids: np.ndarray, mask: np.ndarray,
                 allowed: np.ndarray):
        self.ref, self.precisions, self.ids, self.mask, self.allowed = ref, precisions, ids, mask, allowed

    def run(self, stage: str, cand: np.ndarray, inputs: Lookup, valid: np.ndarray,
            rows: np.ndarray) -> Check | None:
        """(introduced error, its rows, noise) of a large stage, or None when the stage is small or
        its inputs are not shaped for blocks (the whole-stage check then runs)."""
        name = split_stage(stage)[1]
        if cand.size <= metrics.ROW_BLOCK:
            return None
        if name == "logits":
            return self._logits(cand, inputs, valid)
        if name in TOKEN_WISE:
            return self._token_wise(stage, cand, inputs, valid)
        if name in ATTENTION and self.precisions.precision_of(stage) not in BLOCK_FORMATS:
            arrays = [inputs(n) for n in stage_inputs(stage, self.ref.spec.n_layer)]
            if name == "attn.ctx":
                return self._ctx(stage, cand, arrays, valid)
            return self._scores_or_probs(stage, cand, arrays, valid, rows)
        return None

    def _pair(self, stage: str, inputs: dict[str, np.ndarray], jittered: dict[str, np.ndarray], twin: Reference,
              **knobs) -> tuple[np.ndarray, np.ndarray]:
        """(float64 reference, noise twin) of one block: `twin` evaluates the `jittered` inputs as they are."""
        reference = self.ref.evaluate(stage, Lookup(inputs.__getitem__), self.ids, self.mask, np.float64, **knobs)
        noisy = self.precisions.noisy(stage, Lookup(jittered.__getitem__), self.precisions.precision_of(stage),
                                      twin=twin, **knobs)
        return reference, noisy

    def _jittered(self, stage: str, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], Reference]:
        """The noise twin's inputs, jittered whole and in the order a whole evaluation draws them, and
        the twin that evaluates blocks of them without jittering again."""
        twin = self.precisions.noise_ref(self.precisions.precision_of(stage))
        return [twin.perturb(a, np.float32) for a in arrays], twin.steady()

    def _token_wise(self, stage: str, cand: np.ndarray, inputs: Lookup, valid: np.ndarray) -> Check | None:
        """Blocks of tokens. Each block draws the noise twin's jitter from the same stream, in order,
        so a stage with one input (a matmul, a norm) sees exactly the jitter a whole evaluation would."""
        names = stage_inputs(stage, self.ref.spec.n_layer)
        arrays = {n: inputs(n) for n in names}
        if any(a.shape[:-1] != cand.shape[:-1] for a in arrays.values()):
            return None
        precision = self.precisions.precision_of(stage)
        flat = {n: a.reshape(-1, a.shape[-1]) for n, a in arrays.items()}
        c, v = as_rows(cand, cand.shape), as_rows(valid, cand.shape)
        local, noise = RowSums(), RowSums()
        for s in row_blocks(c.shape[0], max(c.shape[1], max(a.shape[1] for a in flat.values()))):
            block = Lookup(lambda n, s=s: flat[n][s][None])
            reference = self.ref.evaluate(stage, block, self.ids, self.mask, np.float64)[0]
            noisy = self.precisions.noisy(stage, block, precision)[0]
            noise.add(noisy, reference, v[s], ref_sq=local.add(c[s], reference, v[s]))
        error, per_row = local.error(cand.shape[:-1])
        return error, per_row, noise.error(cand.shape[:-1])[0]

    def _logits(self, cand: np.ndarray, inputs: Lookup, valid: np.ndarray) -> Check:
        """Blocks of the vocabulary, every token at once."""
        x = inputs("final.ln")
        (jittered,), steady = self._jittered("logits", [x])
        c, v = as_rows(cand, cand.shape), as_rows(valid, cand.shape)
        local, noise = RowSums(), RowSums()
        for k, cols in enumerate(row_blocks(c.shape[1], c.shape[0])):
            reference, noisy = (a.reshape(-1, a.shape[-1]) for a in self._pair(
                "logits", {"final.ln": x}, {"final.ln": jittered}, steady, vocab=cols))
            ref_sq = local.add(c[:, cols], reference, v[:, cols], same_rows=k > 0)
            noise.add(noisy, reference, v[:, cols], same_rows=k > 0, ref_sq=ref_sq)
        error, per_row = local.error(cand.shape[:-1])
        return error, per_row, noise.error(cand.shape[:-1])[0]

    def _scores_or_probs(self, stage: str, cand: np.ndarray, arrays: list[np.ndarray], valid: np.ndarray,
                         rows: np.ndarray) -> Check | None:
        """Blocks of query rows of one head [b, h, t0:t1], against keys [0, t1). Beyond t1 the
        reference is masked: scores there must be masked in the candidate too (else the row is
        infinitely wrong, as a differently masked row is), probs count as they are against 0."""
        B, H, T, S = cand.shape
        scores = split_stage(stage)[1] == "attn.scores"
        if scores:
            q, k = arrays
            if q.shape[:3] != (B, H, T) or k.shape[:3] != (B, H, S) or self.allowed.shape[-1] != S:
                return None
        elif arrays[0].shape != cand.shape or self.allowed.shape[-1] != S:
            return None
        jittered, steady = self._jittered(stage, arrays)
        names = stage_inputs(stage, self.ref.spec.n_layer)
        allowed = np.broadcast_to(self.allowed, (B, 1, T, S))
        local, noise = RowSums(), RowSums()
        misplaced = np.zeros((B, H, T), dtype=bool)   # rows whose mask differs from the reference's
        noise_misplaced = False
        for b in range(B):
            for h in range(H):
                for t0, t1 in query_spans(T, S):
                    keys = min(t1, S)
                    if scores:  # q rows of the block, k of the keys it sees
                        pick = lambda a: dict(zip(names, (a[0][b:b + 1, h:h + 1, t0:t1],  # noqa: E731
                                                          a[1][b:b + 1, h:h + 1, :keys])))
                    else:
                        pick = lambda a: {names[0]: a[0][b:b + 1, h:h + 1, t0:t1, :keys]}  # noqa: E731
                    reference, noisy = (x[0, 0] for x in self._pair(stage, pick(arrays), pick(jittered), steady,
                                                                    allowed=allowed[b:b + 1, :, t0:t1, :keys]))
                    c, tail = cand[b, h, t0:t1, :keys], cand[b, h, t0:t1, keys:]
                    v, r = valid[b, h, t0:t1, :keys], rows[b, h, t0:t1, 0]
                    ref_sq = local.add(c, reference, v)
                    if scores:
                        ref_masked = is_masked(reference)
                        misplaced[b, h, t0:t1] = (r[:, None] & (is_masked(c) != ref_masked)).any(-1) | \
                            (r & ~is_masked(tail).all(-1))
                        noise_misplaced |= bool((r[:, None] & (is_masked(noisy) != ref_masked)).any())
                        noise.add(noisy, reference, r[:, None] & ~ref_masked)
                    else:
                        local.add_zero_reference(tail, valid[b, h, t0:t1, keys:])
                        noise.add(noisy, reference, v, ref_sq=ref_sq)
        error, per_row = local.error(cand.shape[:-1])
        if misplaced.any():
            error, per_row = float("inf"), np.where(misplaced, np.inf, per_row)
        return error, per_row, float("inf") if noise_misplaced else noise.error(cand.shape[:-1])[0]

    def _ctx(self, stage: str, cand: np.ndarray, arrays: list[np.ndarray], valid: np.ndarray) -> Check | None:
        """Blocks of query rows of all heads [b, t0:t1]: ctx = probs @ v against keys [0, t1) when the
        candidate's probs are exactly zero beyond (NaN, or weight on a future key, keeps them all)."""
        probs, v = arrays
        B, T = cand.shape[:2]
        H, S = probs.shape[1], probs.shape[-1]
        if probs.shape[0] != B or probs.shape[2] != T or v.shape[:3] != (B, H, S) or cand.shape[-1] != H * v.shape[-1]:
            return None
        jittered, steady = self._jittered(stage, arrays)
        names = stage_inputs(stage, self.ref.spec.n_layer)
        local, noise = RowSums(), RowSums()
        for b in range(B):
            for t0, t1 in query_spans(T, S * H, share=1):  # all heads: ~12 spans at T=1024, larger products
                beyond = probs[b, :, t0:t1, t1:]
                keys = t1 if t1 < S and not beyond.any() and np.isfinite(v[b, :, t1:]).all() else S
                pick = lambda a: dict(zip(names, (a[0][b:b + 1, :, t0:t1, :keys], a[1][b:b + 1, :, :keys])))  # noqa: E731
                reference, noisy = (x[0] for x in self._pair(stage, pick(arrays), pick(jittered), steady))
                ref_sq = local.add(cand[b, t0:t1], reference, valid[b, t0:t1])
                noise.add(noisy, reference, valid[b, t0:t1], ref_sq=ref_sq)
        error, per_row = local.error(cand.shape[:-1])
        return error, per_row, noise.error(cand.shape[:-1])[0]
