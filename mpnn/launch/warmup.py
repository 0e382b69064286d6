"""Numba cache strategy: compile every kernel once in the launcher, before any worker starts, so the workers load
a warm on-disk cache instead of racing to write it (docs/architecture.md: concurrent cache=True compiles can race).

Workers inherit the launcher's NUMBA_CACHE_DIR (or Numba's default __pycache__ beside the sources), so they
read the files the launcher just wrote. One cache dir per worker was the alternative: no race, but every
worker compiles cold on every run and the cache is never shared.

The warm-up spans layers, so it lives here, at the top of the stack: mpnn.core.warmup() compiles the engine's
kernels (core imports nothing above it); this module then steps each optimizer (their fused update kernels), runs
the data layer's image transforms, calls the communicator's fence and mpnn.compile's replay kernels.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

import numpy as np


def warm_numba_cache(progress=None) -> bool:
    """Compile every layer's kernels: mpnn.core.warmup() (when the engine provides it), the optimizers' updates,
    the data transforms, the communicator's fence; True if it ran. A failure is only a warning: the workers then
    compile for themselves. progress(done, total) after each piece; by default a ConsoleProgress, which says
    nothing when the cache is warm (about 1 s) and counts the pieces on stderr when they compile (~25 s)."""
    progress = ConsoleProgress() if progress is None else progress
    try:
        engine = getattr(importlib.import_module("mpnn.core"), "warmup", None)
        rest = [warm_optimizers, warm_data_transforms, warm_fence, warm_capture]
        engine_total = 0

        def engine_progress(done, total):
            nonlocal engine_total
            engine_total = total
            progress(done, total + len(rest))

        if engine is not None:
            engine(progress=engine_progress)
        for done, warm in enumerate(rest, engine_total + 1):
            warm()
            progress(done, engine_total + len(rest))
    except Exception as e:  # the run can still go on: each worker compiles what it needs
        print(
            f"mpnn launch: warning: kernel warm-up failed ({type(e).__name__}: {e}); "
            "workers will compile their own kernels",
            file=sys.stderr,
        )
        return False
    finally:
        close = getattr(progress, "close", None)
        if close is not None:
            close()
    return True


class ConsoleProgress:
    """Counts the warm-up's pieces on stderr once it has run longer than `after` seconds (a cold Numba cache):
    a rich progress bar on a terminal, else one line when it starts showing and one when done."""

    def __init__(self, after: float = 2.0, stream=None, force: bool = False):
        self.after, self.stream = (0.0 if force else after), stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.showing = False
        self.done = self.total = 0
        self._bar: Any = None  # a rich Progress while one is shown
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if not self.showing and time.monotonic() - self.start >= self.after:
            self.showing = True
            if self.stream.isatty():
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._bar = Progress(
                    TextColumn("mpnn: compiling kernels once"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=Console(file=self.stream),
                )
                self._bar.start()
                self._task = self._bar.add_task("kernels", total=total)
            else:
                self._say(
                    f"mpnn: compiling kernels once into the Numba cache ({done} of {total} done; "
                    "`mpnn warmup` does this ahead of time)"
                )
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        """Finish the bar or say how long it took (only if anything was shown)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.showing:
            self._say(f"mpnn: kernels ready ({self.done} of {self.total}) in {time.monotonic() - self.start:.1f} s")
            self.showing = False

    def _say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


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


def warm_capture() -> None:
    """mpnn.compile's fused replay kernels (relu, bias+relu, cross-entropy, bias gradient)."""
    from mpnn.capture.kernels import warmup

    warmup()


def warm_data_transforms() -> None:
    """The fused image transforms (under their own file lock)."""
    from mpnn.data.transform_kernels import warmup

    warmup()


def warm_fence() -> None:
    """The communicator's one Numba function."""
    from mpnn.comm.mailbox import memory_fence

    memory_fence()
