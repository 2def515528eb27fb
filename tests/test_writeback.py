"""Write-behind: bounded memory, submission order, and failures that reach the recording thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tracer.errors import TracerError
from tracer.store import Golden, StageWriter
from tracer.writeback import WriteBehind

ATTRS = {"model_config": {"n_layer": 1}}


def writer(tmp_path: Path) -> StageWriter:
    return StageWriter(tmp_path / "g.h5", "golden", ATTRS)


def test_submit_waits_while_the_budget_is_used(tmp_path: Path) -> None:
    release = threading.Event()
    with writer(tmp_path) as w, WriteBehind(w, budget=100) as behind:
        behind.submit(lambda: release.wait(10), nbytes=60)  # one job always fits, even alone over budget
        second = threading.Thread(target=behind.submit, args=(lambda: None, 60))
        second.start()
        second.join(0.3)
        assert second.is_alive(), "60 + 60 bytes queued with a budget of 100"
        release.set()
        second.join(10)
        assert not second.is_alive()


def test_stages_are_written_in_order_without_copies(tmp_path: Path) -> None:
    qkv = torch.arange(2 * 3 * 12, dtype=torch.float32).view(1, 6, 12)
    q = qkv[..., :4].view(1, 6, 2, 2).transpose(1, 2)  # a strided head-split view
    with writer(tmp_path) as w, WriteBehind(w) as behind:
        behind.submit(lambda: w.begin_case("case0", np.zeros((1, 6), np.int64), np.ones((1, 6), np.int8)))
        behind.stage("case0", "blocks.0.attn.qkv", qkv, order=4)
        behind.stage("case0", "blocks.0.attn.q", q, order=5)
    with Golden.open(tmp_path / "g.h5") as g:
        np.testing.assert_array_equal(g.case("case0").read("blocks.0.attn.q"), q.numpy())
        np.testing.assert_array_equal(g.case("case0").read("blocks.0.attn.qkv"), qkv.numpy())


def test_a_writer_failure_reaches_the_recording_thread_and_discards_the_file(tmp_path: Path) -> None:
    ran = []
    with pytest.raises(TracerError, match="cannot write .*g.h5: disk full"):
        with writer(tmp_path) as w, WriteBehind(w) as behind:
            behind.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
            behind.submit(lambda: ran.append("after"))
    assert ran == []  # what was queued behind the failure is skipped
    assert list(tmp_path.iterdir()) == []


def test_recording_thread_failure_stops_the_writer(tmp_path: Path) -> None:
    release, ran = threading.Event(), []
    with pytest.raises(KeyboardInterrupt):
        with writer(tmp_path) as w, WriteBehind(w) as behind:
            behind.submit(lambda: release.wait(10))
            behind.submit(lambda: ran.append("queued"))
            threading.Timer(0.2, release.set).start()  # the busy job ends after the interrupt is seen
            raise KeyboardInterrupt
    assert ran == []
    assert list(tmp_path.iterdir()) == []


def test_a_stage_changed_in_place_before_it_is_written_is_refused(tmp_path: Path) -> None:
    release = threading.Event()
    value = torch.ones(1, 2, 4)
    with pytest.raises(TracerError, match="changed blocks.0.ln1 in place"):
        with writer(tmp_path) as w, WriteBehind(w) as behind:
            behind.submit(lambda: release.wait(10))
            behind.submit(lambda: w.begin_case("case0", np.zeros((1, 2), np.int64), np.ones((1, 2), np.int8)))
            behind.stage("case0", "blocks.0.ln1", value, order=3)
            value.add_(1.0)
            release.set()
    assert list(tmp_path.iterdir()) == []
