"""mpnn.launch.run(fn, n): call a Python function on n worker processes (like torch.multiprocessing.spawn),
supervised by the same launch() as `mpnn launch`, and return rank 0's return value."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from mpnn.launch.errors import WorkerError
from mpnn.launch.launcher import DEFAULT_TIMEOUT_S, LaunchConfig, launch
from mpnn.launch.payload import PAYLOAD_FILE, error_path, result_path

WORKER_MODULE = "mpnn.launch.worker"


def _payload(fn: Callable, args: tuple, kwargs: dict) -> bytes:
    try:
        call = cloudpickle.dumps((fn, tuple(args), dict(kwargs)))
    except Exception as e:
        raise TypeError(
            f"mpnn.launch.run: cannot pickle {getattr(fn, '__qualname__', fn)!r} "
            f"with its arguments: {type(e).__name__}: {e}"
        ) from e
    # The worker gets this process's sys.path, so functions of test modules and notebooks import there too.
    return pickle.dumps({"sys_path": list(sys.path), "call": call})


def _pythonpath() -> str:
    """PYTHONPATH that lets a worker import mpnn.launch.worker even when mpnn is not installed."""
    package_root = str(Path(__file__).resolve().parents[2])
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join([package_root, existing]) if existing else package_root


def run(
    fn: Callable,
    n: int | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    log_dir: str | os.PathLike | None = None,
    plugins=(),
) -> Any:
    """Run fn(*args, **kwargs) on n workers (default: one per usable core) and return rank 0's return value.

    fn and its arguments travel by cloudpickle, so lambdas, closures and notebook functions work. Each worker
    has the `mpnn launch` environment (MPNN_RANK, ...; mpnn.init() joins the world). A failed rank raises
    WorkerError naming it, with its traceback. log_dir keeps the run directory (default: a temporary one).
    plugins: spec strings, as `mpnn launch --plugin` (checked before any worker starts).
    """
    payload = _payload(fn, args, kwargs or {})
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mpnn-run-"))
        result = launch(
            LaunchConfig(
                command=["-m", WORKER_MODULE],
                nproc_per_node=n,
                log_dir=Path(log_dir),
                timeout=timeout,
                extra_env={"PYTHONPATH": _pythonpath()},
                run_files={PAYLOAD_FILE: payload},
                plugins=tuple(plugins),
                command_line=["mpnn.launch.run", f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"],
            )
        )
        if result.failure is not None:
            failure = result.failure
            traceback_file = error_path(result.run_dir, failure.rank)
            details = traceback_file.read_text() if traceback_file.exists() else "\n".join(failure.log_tail)
            raise WorkerError(failure.rank, failure.how, details)
        if result.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if result.signal is not None:  # the workers are stopped; now let the signal do what it does to us
            signal.raise_signal(result.signal)
            raise RuntimeError(f"mpnn.launch.run: interrupted by {signal.Signals(result.signal).name}")
        rank0 = result_path(result.run_dir, 0)
        return pickle.loads(rank0.read_bytes()) if rank0.exists() else None
