"""The launcher behind `mpnn launch`: run directory, per-run secret, one pinned worker process per core,
supervision with no process left behind, live view; and mpnn.launch.run(fn, n) to launch a Python function."""

from mpnn.launch.api import run
from mpnn.launch.errors import LaunchError, WorkerError
from mpnn.launch.launcher import LaunchConfig, LaunchResult, launch

__all__ = ["run", "launch", "LaunchConfig", "LaunchResult", "LaunchError", "WorkerError"]
