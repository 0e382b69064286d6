"""Errors of the communication layer: every failure of a collective is a CommError naming the ranks involved."""


class CommError(RuntimeError):
    """A collective, the rendezvous or the transport failed; the message names the ranks involved."""


class CommTimeout(CommError):
    """A peer stopped answering: `silent_rank` is the rank this world waited for in vain (None if unknown)."""

    def __init__(self, message, silent_rank=None):
        super().__init__(message)
        self.silent_rank = silent_rank

    def __reduce__(self):
        return type(self), (str(self), self.silent_rank)


class CollectiveMismatch(CommError):
    """Two ranks called different collectives (op, dtype, shape or root) at the same point of the program."""

    def __init__(self, message, ranks=()):
        super().__init__(message)
        self.ranks = tuple(ranks)

    def __reduce__(self):
        return type(self), (str(self), self.ranks)


class AuthError(CommError):
    """A peer could not prove it holds the run's secret, or the secret itself is missing or unsafe."""
