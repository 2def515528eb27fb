"""Large temporaries from the heap instead of fresh pages (glibc).

A comparison makes and frees hundreds of arrays of 10-200 MB: each stage read from both files, the
oracle's values, the jittered inputs of a noise twin. glibc serves every allocation above its mmap
threshold (32 MB at most, by its own tuning) from a fresh mapping, which the kernel faults in and
zeroes page by page, and unmaps it on free. For gpt2 at T=1024 that was 6-8 of ~45 CPU-seconds of
system time; with the threshold raised the heap reuses the pages: 1.5 s, for ~5% more peak RSS.

Process-wide state: the commands that compare call it, the library never does.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def reuse_large_allocations(threshold: int = 1 << 30) -> bool:
    """Serve allocations below `threshold` bytes from the heap and keep up to twice that of freed heap
    instead of returning it to the system. False where the C library has no mallopt (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold))
