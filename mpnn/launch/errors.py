"""The launcher's two exceptions: a launch that cannot start, and a worker of mpnn.launch.run that failed."""


class LaunchError(ValueError):
    """A launch that cannot start (bad flag value, missing secret, used run id); the message names the value."""


class WorkerError(RuntimeError):
    """A worker of mpnn.launch.run failed: names the rank and how, and carries its traceback (or its log tail)."""

    def __init__(self, rank: int, how: str, details: str):
        super().__init__(f"rank {rank} {how}\n{details}")
        self.rank = rank
        self.how = how
        self.details = details
