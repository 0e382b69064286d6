"""Numba cache strategy: compile every kernel once in the launcher, before any worker starts, so the workers load
a warm on-disk cache instead of racing to write it (DESIGN: concurrent cache=True compiles can race).

Workers inherit the launcher's NUMBA_CACHE_DIR (or Numba's default __pycache__ beside the sources), so they
read the files the launcher just wrote. One cache dir per worker was the alternative: no race, but every
worker compiles cold on every run and the cache is never shared.
"""
from __future__ import annotations

import importlib
import sys


def warm_numba_cache() -> bool:
    """Call mpnn.core.warmup() when the engine provides it; True if it ran. A failure is only a warning:
    the workers then compile for themselves."""
    hook = getattr(importlib.import_module("mpnn.core"), "warmup", None)
    if hook is None:
        return False
    try:
        hook()
        from mpnn.comm.mailbox import memory_fence
        memory_fence()  # the communicator's one Numba function
    except Exception as e:  # the run can still go on: each worker compiles what it needs
        print(f"mpnn launch: warning: kernel warm-up failed ({type(e).__name__}: {e}); "
              "workers will compile their own kernels", file=sys.stderr)
        return False
    return True
