"""mpnn.init(): join the world the launcher (or mpirun, srun, torchrun) describes, and start telemetry."""

from __future__ import annotations

import os

from mpnn import telemetry
from mpnn.comm import get_comm, init_from_env, objects
from mpnn.core.allocator import keep_freed_memory
from mpnn.core.fpenv import set_flush_denormal
from mpnn.core.tensor import Tensor
from mpnn.worldspec import current_world

# allgather_object / broadcast_object carry Tensors (state_dict() values) as their arrays and rebuild them here
objects.register_array_type(Tensor, "mpnn.Tensor", lambda t: t.data, lambda array: Tensor(array))


def init(plugins=None, timeout: float | None = None, seed: int | None = None):
    """Join the world and return the Communicator (a world of one when no launcher started this process).

    When the launcher gave a run directory (MPNN_RUN_DIR), this worker's telemetry is recorded there:
    one line per optimizer step with its forward/backward/communication/optimizer times, loss and bytes.
    plugins: plugin objects (or spec strings) for this run, added to those the launcher named (MPNN_PLUGINS);
    their mpnn_run_start runs here.
    seed: when given, mpnn.manual_seed(seed) once the plugins are up, so the audit trail records the seed the run
    really uses (as it does for every later mpnn.manual_seed call), never one guessed from the command line.
    The calling thread flushes denormal floats to zero (mpnn.set_flush_denormal) unless MPNN_FLUSH_DENORMAL=0:
    once a model fits its data, gradients and activations below 1.2e-38 appear and each costs a microcode assist;
    the MNIST-1D MLP's step drifted from 0.49 to 0.57 ms over 40,000 steps without it, and stayed at 0.43-0.45
    with it. Values that small are below float32's resolution of any update they enter.
    The process keeps freed activation memory mapped (mpnn.core.allocator) unless MPNN_KEEP_FREED_MEMORY=0: the
    GPT example's step measured 73 ms instead of 81 ms, as glibc stopped faulting fresh pages in for every op.
    """
    if os.environ.get("MPNN_FLUSH_DENORMAL", "1").strip().lower() not in ("0", "false", "no"):
        set_flush_denormal(True)
    if os.environ.get("MPNN_KEEP_FREED_MEMORY", "1").strip().lower() not in ("0", "false", "no"):
        keep_freed_memory()
    _flush_on_sigterm()
    comm = init_from_env(timeout=timeout)
    run_dir = current_world().run_dir
    if run_dir and telemetry.get_recorder() is None:
        from mpnn.telemetry.instrument import instrument

        rec = telemetry.start(run_dir, comm.rank, comm.world_size)
        instrument(rec, comm)
    specs = os.environ.get("MPNN_PLUGINS", "")
    if plugins or specs.strip():
        from mpnn.plugins import session

        session.start(comm, telemetry.get_recorder(), specs, plugins)
    if seed is not None:
        from mpnn.core.random import manual_seed
        from mpnn.plugins import session

        with session.seed_source("mpnn.init"):
            manual_seed(seed)
    return comm


def _flush_on_sigterm() -> None:
    """A rank the launcher stops (SIGTERM, after a peer failed or the run was interrupted) writes its buffered
    telemetry and its end event, and flushes stdout and stderr into its log, before it dies of the same signal
    (so the launcher still sees "killed by SIGTERM"). Python's default SIGTERM death runs no atexit handler: a rank
    that ran 20 steps left only its start event. Installed only over the default handler, from the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the script (or a framework) handles SIGTERM itself

    def on_sigterm(signum, frame):
        import sys

        rec = telemetry.get_recorder()
        if rec is not None:
            try:
                rec.close()
            except Exception:  # dying anyway: never turn a stop into a traceback
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


__all__ = ["init", "get_comm"]
