"""The world from the launcher's environment: re-exported from mpnn.worldspec, the one parse (which imports nothing
from mpnn, so that mpnn.data can read rank and world size without importing the communicator and ZeroMQ)."""

from mpnn.worldspec import (
    DEFAULT_TIMEOUT,
    WorldSpec,
    _derived_port,  # noqa: F401  (tests)
    current_world,
    first_slurm_host,
    spec_from_env,
)

__all__ = ["DEFAULT_TIMEOUT", "WorldSpec", "current_world", "first_slurm_host", "spec_from_env"]
