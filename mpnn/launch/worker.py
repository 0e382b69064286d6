"""Entry point of a mpnn.launch.run worker (`python -m mpnn.launch.worker`): load the pickled call from the run
dir, run it, and leave rank 0's return value (or this rank's traceback) in the run dir for the caller."""

from __future__ import annotations

import pickle
import sys
import traceback
from pathlib import Path

import cloudpickle

from mpnn.launch.payload import PAYLOAD_FILE, error_path, result_path, write_private
from mpnn.worldspec import current_world


def main() -> int:
    """Run the call this worker was given; 0 on success, 1 after writing the traceback."""
    world = current_world()
    if world.launcher != "mpnn" or not world.run_dir:
        raise SystemExit("mpnn.launch.worker: not started by mpnn.launch.run (MPNN_RANK and MPNN_RUN_DIR are unset)")
    run_dir, rank = Path(world.run_dir), world.rank
    # The payload is the launcher's own file in the run dir (mode 0600), not bytes from a peer.
    payload = pickle.loads((run_dir / PAYLOAD_FILE).read_bytes())
    sys.path[:] = payload["sys_path"] + [p for p in sys.path if p not in payload["sys_path"]]
    try:
        fn, args, kwargs = pickle.loads(payload["call"])
        result = fn(*args, **kwargs)
        if rank == 0:
            write_private(result_path(run_dir, rank), cloudpickle.dumps(result))
    except Exception:
        text = traceback.format_exc()
        write_private(error_path(run_dir, rank), text.encode())
        sys.excepthook(*sys.exc_info())  # prints the traceback; telemetry and plugins record the error
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
