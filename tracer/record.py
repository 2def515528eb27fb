"""`tracer record`: turn prompts into cases and stream a recorded forward into a golden file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import partial

import numpy as np
import torch

from tracer.errors import TracerError
from tracer.models import LoadedModel, weights_of
from tracer.progress import step, track
from tracer.provenance import PRODUCER, versions
from tracer.recorder import CaseInput, Recorder
from tracer.stages import StageSelector, canonical_stages, stage_order
from tracer.store import DatasetOptions, StageWriter, content_hash, natural_storage, weights_digest
from tracer.writeback import DEFAULT_BUDGET, HostWeights, WriteBehind, host_array


def build_cases(loaded: LoadedModel, prompts: list[str], ids: list[list[int]], batch: bool) -> list[CaseInput]:
    """One case per prompt / id list, or one right-padded batch case with `batch`."""
    seqs: list[tuple[list[int], str | None]] = []
    for text in prompts:
        if not text:
            raise TracerError("empty prompt: give at least one character")
        seqs.append((loaded.encode(text), text))
    seqs += [(list(x), None) for x in ids]
    if not seqs:
        raise TracerError("nothing to record: give --prompt, --prompts-file or --ids")
    n_pos, vocab = loaded.config.n_positions, loaded.config.vocab_size
    for k, (seq, text) in enumerate(seqs):
        what = f"prompt {_short(text)!r}" if text is not None else f"ids #{k + 1}"
        if not seq:
            raise TracerError(f"{what} is empty")
        if len(seq) > n_pos:
            raise TracerError(f"{what} is {len(seq)} tokens; the model takes at most {n_pos} (n_positions)")
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            raise TracerError(f"{what} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    groups = [seqs] if batch else [[s] for s in seqs]
    cases = []
    for k, group in enumerate(groups):
        T = max(len(s) for s, _ in group)
        input_ids = np.zeros((len(group), T), dtype=np.int64)
        mask = np.zeros((len(group), T), dtype=np.int8)
        for b, (seq, _) in enumerate(group):
            input_ids[b, : len(seq)] = seq
            mask[b, : len(seq)] = 1
        prompts_of = [t for _, t in group] if all(t is not None for _, t in group) else None
        cases.append(CaseInput("batch" if batch else f"case{k}", input_ids, mask, prompts_of))
    return cases


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[:n] + "…"


def tf32_flags() -> dict[str, bool]:
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def record_golden(loaded: LoadedModel, cases: list[CaseInput], out: str, *, dtype: str, attn: str,
                  selector: StageSelector = StageSelector(), with_weights: bool = True, force: bool = False,
                  seed: int = 0, progress: Iterable | None = None, options: DatasetOptions = DatasetOptions(),
                  budget: int = DEFAULT_BUDGET) -> None:
    """Record every case into `out` atomically. `progress` wraps the case iterator (rich bar).

    Stages are written behind the forward (`WriteBehind`): at most `budget` bytes of them wait in
    memory. `options` chooses compression and the stages' storage dtype.
    """
    model = loaded.model
    device = next(model.parameters()).device
    selector.select(canonical_stages(model.config.n_layer))  # unknown glob: fail before any work
    weights, ties = weights_of(model)
    attrs = {
        "producer": PRODUCER,
        "model_source": loaded.source,
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "versions": versions(),
        "device": str(device),
        "dtype": dtype,
        "attn_implementation": attn,
        "tf32": str(tf32_flags()),
        "seed": seed,
        "tokenizer": loaded.tokenizer_kind,
        "storage_dtype": options.storage_dtype or natural_storage(dtype),
        "compression": options.compression,
    }
    if options.tokens is not None:
        attrs["tokens"] = options.tokens  # stages hold these positions only (their `tokens` attribute)
    orders = stage_order(model.config.n_layer)
    n_stages = len(selector.select(canonical_stages(model.config.n_layer)))
    with StageWriter(out, "golden", attrs, force=force) as writer, WriteBehind(writer, budget) as behind:
        writer.options = options
        if with_weights:
            for name in track(list(weights), "writing weights"):
                behind.submit(partial(writer.write_weights, HostWeights({name: weights[name]})))
            behind.submit(partial(writer.write_weights, {}, ties))
        else:  # golden_id still names the weights: their content hashes, as if written
            behind.submit(lambda: writer.set_attr("weights_xxh3", weights_digest(
                {name: content_hash(host_array(t)) for name, t in weights.items()})))
        for case in (progress(cases) if progress else cases):
            behind.submit(partial(writer.begin_case, case.name, case.input_ids, case.attention_mask, case.prompts))
            with step(f"{case.name}: forward, writing stages", n_stages) as written:

                def sink(stage: str, value: torch.Tensor, hf_module: str, _case=case.name, _done=written) -> None:
                    behind.stage(_case, stage, value, orders[stage], hf_module)
                    _done()

                with Recorder(model, sink, selector) as rec:
                    rec.run(torch.from_numpy(case.input_ids).to(device),
                            torch.from_numpy(case.attention_mask).to(device))
                    behind.submit(partial(_link_modules, writer, case.name, rec.links()))


def _link_modules(writer: StageWriter, case: str, links: dict[str, str]) -> None:
    for path, stage in links.items():
        writer.link_module(case, path, stage)
