"""The comparing process's allocator setting: applied where glibc has mallopt, a no-op elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tracer import allocator


def test_large_allocations_are_kept_on_the_heap_in_a_child_process():
    """Process-wide state: set in a child, where allocating and freeing 64 MB blocks then leaves them
    mapped (the heap reuses them) instead of unmapping each on free."""
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's")
    code = (
        "import numpy as np, resource; from tracer.allocator import reuse_large_allocations as r\n"
        "import sys; ok = r() if sys.argv[1] == '1' else True\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): a = np.ones(1 << 23); del a\n"
        "print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {}
    for on in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, on], capture_output=True, text=True, check=True).stdout
        ok, n = out.split()
        assert ok == "True"
        faults[on] = int(n)
    assert faults["1"] < faults["0"] / 4, faults  # 20 x 16k page faults without, about one block's with


def test_no_mallopt_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.reuse_large_allocations() is False
