"""Stop signals: SIGINT, SIGTERM and SIGHUP to the launcher become an orderly stop of every worker, instead of
killing the launcher and orphaning them. Handlers can only be installed from the main thread."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What signal.signal() returns and takes: a handler, SIG_DFL/SIG_IGN, or None (one not installed from Python).
Handler = Callable[[int, FrameType | None], Any] | int | None


class StopSignals:
    """Context manager that records stop signals (the first in `received`, how many in `count`) while active."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self._previous: dict[int, Handler] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        self.count += 1

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
