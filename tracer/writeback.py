"""Write-behind for recording: the forward runs on while earlier stages are hashed and written.

The recorder's sink only queues a reference to each stage (no copy on CPU); on CUDA it starts an
asynchronous copy into a pinned host buffer on a side stream, so neither the copy nor the write
stalls the forward. One writer thread turns queued stages into datasets: the layout copy of
head-split views, storage narrowing, xxh3 and the HDF5 write, all of which release the GIL or hold
it only briefly. The writer uses numpy, never torch kernels, so the forward keeps torch's threads.
Memory stays bounded: the sink waits while more than `budget` bytes are queued. A failure in the
writer (a full disk, a value outside the storage dtype, Ctrl-C) is raised in the recording thread
at its next call, so the file is discarded exactly as with synchronous writes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from tracer.errors import TracerError
from tracer.store import StageWriter, from_bf16_bits

DEFAULT_BUDGET = 512 << 20  # bytes of stages queued behind the forward


def host_array(t: torch.Tensor) -> np.ndarray:
    """Values as numpy, without a copy for CPU tensors (bf16 widens exactly to float32, in numpy)."""
    t = t.detach()
    if t.is_cuda:
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return from_bf16_bits(t.view(torch.int16).numpy().view(np.uint16))
    return t.numpy()


class HostWeights(Mapping):
    """Parameters converted to numpy one at a time as they are written (a GPU model is never
    copied to the host all at once)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self._params = params

    def __getitem__(self, name: str) -> np.ndarray:
        return host_array(self._params[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


class PinnedPool:
    """Page-locked host buffers reused across stages: pinning memory is slow, copying into it is not."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buffer.numel(), []).append(buffer)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


class WriteBehind:
    """Runs `StageWriter` calls on a writer thread, in submission order. Use as a context manager
    inside the writer's own: a clean exit waits for every queued write."""

    def __init__(self, writer: StageWriter, budget: int = DEFAULT_BUDGET):
        self.writer = writer
        self.budget = budget
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tracer-writer", daemon=True)
        self._pool: PinnedPool | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        with self._cond:
            if exc_type is not None and self._error is None:
                self._error = exc  # the writer skips what is still queued
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        if exc_type is None:
            self._raise()
        return False

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None], nbytes: int = 0) -> None:
        """Queue `job`; wait while more than `budget` bytes are queued (one job always fits)."""
        with self._cond:
            while self._error is None and self._queued and self._queued + nbytes > self.budget:
                self._cond.wait()
            self._raise()
            self._jobs.append((job, nbytes))
            self._queued += nbytes
            self._cond.notify_all()

    def stage(self, case: str, stage: str, value: torch.Tensor, order: int, hf_module: str = "") -> None:
        """Queue one stage without copying it (CPU) or after starting its copy to the host (CUDA)."""
        value = value.detach()
        version = _version(value)

        def unchanged() -> None:
            if _version(value) != version:  # on CUDA the side-stream copy may have raced the change
                raise TracerError(f"the model changed {stage} in place after it was recorded: "
                                  "its stored value would not be the one the forward computed")

        if value.is_cuda:
            host, buffer, ready = self._copy_to_host(value)

            def job() -> None:
                ready.synchronize()
                unchanged()
                self.writer.write_stage(case, stage, host_array(host), order, hf_module)
                self._pool.give(buffer)
        else:
            def job() -> None:
                unchanged()
                self.writer.write_stage(case, stage, host_array(value), order, hf_module)
        self.submit(job, value.nbytes)

    def _copy_to_host(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]:
        """Start `value`'s device-to-host copy on a side stream, after the work that produced it."""
        if self._pool is None:
            self._pool = PinnedPool()
        stream = self._streams.get(value.device)
        if stream is None:
            stream = self._streams[value.device] = torch.cuda.Stream(value.device)
        buffer = self._pool.take(value.nbytes)
        host = buffer.view(value.dtype).view(value.shape)
        stream.wait_stream(torch.cuda.current_stream(value.device))
        with torch.cuda.stream(stream):
            host.copy_(value, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        value.record_stream(stream)  # its memory is not reused before the copy is done
        return host, buffer, ready

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, nbytes = self._jobs[0]  # still counted: its tensor is held until written
                skip = self._error is not None
            try:
                if not skip:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the recording thread
                with self._cond:
                    self._error = self._error or exc
            del job
            with self._cond:
                self._jobs.popleft()
                self._queued -= nbytes
                self._cond.notify_all()
