"""Numba cache strategy: compile every kernel once in the launcher, before any worker starts, so the workers load
a warm on-disk cache instead of racing to write it (docs/architecture.md: concurrent cache=True compiles can race).

Workers inherit the launcher's NUMBA_CACHE_DIR (or Numba's default __pycache__ beside the sources), so they
read the files the launcher just wrote. One cache dir per worker was the alternative: no race, but every
worker compiles cold on every run and the cache is never shared.

The warm-up spans layers, so it lives here, at the top of the stack: mpnn.core.warmup() compiles the engine's
kernels (core imports nothing above it); this module then steps each optimizer (their fused update kernels), runs
the data layer's image transforms and calls the communicator's fence.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np


def warm_numba_cache() -> bool:
    """Compile every layer's kernels: mpnn.core.warmup() (when the engine provides it), the optimizers' updates,
    the data transforms, the communicator's fence; True if it ran. A failure is only a warning: the workers then
    compile for themselves."""
    try:
        engine = getattr(importlib.import_module("mpnn.core"), "warmup", None)
        if engine is not None:
            engine()
        warm_optimizers()
        from mpnn.data.transform_kernels import warmup as warm_data_transforms

        warm_data_transforms()  # the fused image transforms (under their own file lock)
        from mpnn.comm.mailbox import memory_fence

        memory_fence()  # the communicator's one Numba function
    except Exception as e:  # the run can still go on: each worker compiles what it needs
        print(
            f"mpnn launch: warning: kernel warm-up failed ({type(e).__name__}: {e}); "
            "workers will compile their own kernels",
            file=sys.stderr,
        )
        return False
    return True


def warm_optimizers() -> None:
    """One step of each fused optimizer update (Adam, AMSGrad, SGD with momentum) on float32 parameters of the
    shapes a conv net has (the kernels see them flat)."""
    from mpnn.core import ops
    from mpnn.core.tensor import Tensor
    from mpnn.optim import SGD, Adam

    rng = np.random.default_rng(0)
    params = []
    for shape in ((4, 3, 3), (8, 8, 3, 3), (4, 8, 3, 3)):
        param = Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)
        ops.sum(param).backward()  # a float32 .grad, as a loss leaves it
        params.append(param)
    for opt in (Adam(params, lr=1e-3), Adam(params, lr=1e-3, amsgrad=True), SGD(params, lr=1e-3, momentum=0.9)):
        opt.step()
