"""The engine's events, in one place: what layers above the autograd engine may subscribe to.

Telemetry times every backward, DataParallel reduces buckets as leaves receive gradients and finishes when
backward ends, plugins observe; none of them reaches into the engine's private state. Every registration
returns a ``RemovableHandle``. This module imports nothing from mpnn, so any layer may use it.

- ``register_backward_hooks(pre, post)``: ``pre(root)`` before and ``post(root)`` after every
  ``Tensor.backward`` (``post`` runs when backward raised, too, so timers always close).
- ``queue_callback(fn, on_error=None)``: run ``fn()`` once when the backward now in progress has visited every
  node (torch's ``Variable._execution_engine.queue_callback``); if that backward raises instead, ``fn`` is
  dropped and ``on_error(exc)`` runs, so a subscriber can reset its per-backward state.
- ``Tensor.register_post_accumulate_grad_hook(hook)`` (on the tensor itself): ``hook(leaf)`` after backward
  has accumulated that leaf's ``.grad``; ``Tensor.register_hook(hook)``: ``hook(grad) -> grad or None``
  on the gradient flowing into a tensor.
"""
from __future__ import annotations

import threading


class RemovableHandle:
    """Handle of one registration: ``remove()`` unregisters it (idempotent); usable as a context manager."""

    __slots__ = ("_registry", "_entry")

    def __init__(self, registry: list, entry):
        self._registry, self._entry = registry, entry

    def remove(self) -> None:
        try:
            self._registry.remove(self._entry)
        except ValueError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


backward_hooks: list = []  # (pre, post) pairs, called around every Tensor.backward

_pending = threading.local()  # per thread: callbacks queued by the backward running on that thread


def register_backward_hooks(pre=None, post=None) -> RemovableHandle:
    """Call ``pre(root)`` before and ``post(root)`` after every ``Tensor.backward``."""
    entry = (pre, post)
    backward_hooks.append(entry)
    return RemovableHandle(backward_hooks, entry)


def queue_callback(fn, on_error=None) -> None:
    """Run ``fn()`` when the backward in progress on this thread ends; ``on_error(exc)`` instead if it raises."""
    queue = getattr(_pending, "queue", None)
    if queue is None:
        queue = _pending.queue = []
    queue.append((fn, on_error))


def take_queued_callbacks() -> list:
    """The engine's side: the (fn, on_error) pairs queued during this thread's backward, emptied."""
    queue = getattr(_pending, "queue", None)
    if not queue:
        return []
    _pending.queue = []
    return queue
