"""Grad mode: whether ops are recorded on the tape, per thread (torch's no_grad, enable_grad, set_grad_enabled).

Thread-local because the communication thread runs user code (gradient codecs, hooks) while the training thread
is in the middle of a forward pass: one thread's ``no_grad`` must not switch recording off for another. A new
thread starts with recording on, as in torch. Each mode is a context manager and a decorator.
"""

from __future__ import annotations

import functools
import threading


class _State(threading.local):
    """Per thread; the class attribute is every thread's default (a plain threading.local read with getattr's
    default raises and catches AttributeError inside on a thread that never set it: 0.45 us a call, on every op)."""

    enabled = True


_state = _State()


def is_grad_enabled() -> bool:
    """True when ops on tensors that require grad are recorded on this thread's tape."""
    return _state.enabled


def _set_enabled(flag: bool) -> None:
    _state.enabled = flag


class _GradMode:
    """A grad-mode switch usable as ``with mode():`` and as ``@mode()`` on a function."""

    _flag = True

    def __enter__(self):
        self._prev = is_grad_enabled()
        _set_enabled(self._flag)
        return self

    def __exit__(self, *exc):
        _set_enabled(self._prev)
        return False

    def _fresh(self) -> _GradMode:
        return type(self)()

    def __call__(self, fn):
        if not callable(fn):
            raise TypeError(f"{type(self).__name__}: used as a decorator it takes a function, got {fn!r}")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self._fresh():
                return fn(*args, **kwargs)

        return wrapper


class no_grad(_GradMode):
    """Stop recording ops on the tape (as torch.no_grad): for evaluation and in-place parameter updates."""

    _flag = False


class enable_grad(_GradMode):
    """Record ops again, e.g. inside a no_grad block (as torch.enable_grad)."""

    _flag = True


class set_grad_enabled(_GradMode):
    """``set_grad_enabled(flag)`` switches recording now; as a context manager or decorator it restores the
    previous mode on exit (as torch.set_grad_enabled)."""

    def __init__(self, mode: bool):
        self._flag = bool(mode)
        self._prev = is_grad_enabled()
        _set_enabled(self._flag)

    def __enter__(self):
        return self

    def _fresh(self) -> _GradMode:
        return set_grad_enabled(self._flag)

    def __call__(self, fn):
        _set_enabled(self._prev)  # used as a decorator: the call above must not have switched the mode
        return super().__call__(fn)
