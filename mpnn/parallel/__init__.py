"""Data parallelism over the communicator: DataParallel (bucketed, overlapped gradient averaging)."""

from mpnn.parallel.data_parallel import DataParallel

__all__ = ["DataParallel"]
