"""Which core each worker runs on, and pinning a child to it from its first instruction (before it imports NumPy,
so BLAS and Numba see one core)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, so taskset and cgroup limits count), sorted."""
    return sorted(os.sched_getaffinity(0))


def pin_plan(nproc: int, cores: Sequence[int]) -> list[int]:
    """The core of each local rank: round-robin over `cores`. The one place a layout-aware plan would go."""
    return [cores[local_rank % len(cores)] for local_rank in range(nproc)]


@contextlib.contextmanager
def thread_pinned_to(core: int) -> Iterator[None]:
    """Pin the calling thread (only it: Linux affinity is per thread) to `core` for the block.

    A child forked inside inherits the mask before it runs any code, with no preexec_fn (unsafe while the
    launcher's output threads run); the launcher's other threads keep their masks.
    """
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
