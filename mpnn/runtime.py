"""mpnn.init(): join the world the launcher (or mpirun, srun, torchrun) describes, and start telemetry."""
from __future__ import annotations

import os

from mpnn import telemetry
from mpnn.comm import get_comm, init_from_env


def init(plugins=None, timeout: float | None = None):
    """Join the world and return the Communicator (a world of one when no launcher started this process).

    When the launcher gave a run directory (MPNN_RUN_DIR), this worker's telemetry is recorded there:
    one line per optimizer step with its forward/backward/communication/optimizer times, loss and bytes.
    plugins: plugin objects (or spec strings) for this run, added to those the launcher named (MPNN_PLUGINS);
    their mpnn_run_start runs here.
    """
    comm = init_from_env(timeout=timeout)
    run_dir = os.environ.get("MPNN_RUN_DIR")
    if run_dir and telemetry.get_recorder() is None:
        from mpnn.telemetry.instrument import instrument
        rec = telemetry.start(run_dir, comm.rank, comm.world_size)
        instrument(rec, comm)
    specs = os.environ.get("MPNN_PLUGINS", "")
    if plugins or specs.strip():
        from mpnn.plugins import session
        session.start(comm, telemetry.get_recorder(), specs, plugins)
    return comm


__all__ = ["init", "get_comm"]
