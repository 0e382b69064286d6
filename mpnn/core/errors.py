"""The one exception type ops raise for bad input, so every message starts with the op's name."""


class OpError(ValueError):
    """Bad input to an op: names the op and what was wrong (shapes, dtypes, values)."""

    def __init__(self, op: str, message: str):
        super().__init__(f"{op}: {message}")
        self.op = op
