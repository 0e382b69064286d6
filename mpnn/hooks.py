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
- ``register_optimizer_step_hooks(pre, post)``: ``pre(optimizer, args, kwargs)`` before and ``post(...)`` after
  every optimizer's ``step()`` (torch's global optimizer step hooks; telemetry times the step with them).
- ``register_sampler_hooks(set_epoch, first_pass)``: ``set_epoch(sampler, epoch)`` after every
  ``DistributedSampler.set_epoch``; ``first_pass(sampler, indices)`` the first time a sampler hands out its shard
  (the audit trail fingerprints each rank's shard).
- ``register_save_hook(fn)``: ``fn(path, sha256)`` after every successful ``mpnn.save`` (checkpoint digests).
- ``register_seed_hook(fn)``: ``fn(seed)`` after every ``mpnn.manual_seed`` (the audit trail records the seed the
  script really used, not one parsed from its command line).
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


class _Pending(threading.local):
    """Per thread: callbacks queued by the backward running on that thread (None: none yet; a class default, so
    that a read on a thread that never queued one does not raise and catch AttributeError inside getattr)."""

    queue = None


_pending = _Pending()


def register_backward_hooks(pre=None, post=None) -> RemovableHandle:
    """Call ``pre(root)`` before and ``post(root)`` after every ``Tensor.backward``."""
    entry = (pre, post)
    backward_hooks.append(entry)
    return RemovableHandle(backward_hooks, entry)


def queue_callback(fn, on_error=None) -> None:
    """Run ``fn()`` when the backward in progress on this thread ends; ``on_error(exc)`` instead if it raises."""
    queue = _pending.queue
    if queue is None:
        queue = _pending.queue = []
    queue.append((fn, on_error))


def take_queued_callbacks() -> list:
    """The engine's side: the (fn, on_error) pairs queued during this thread's backward, emptied."""
    queue = _pending.queue
    if not queue:
        return []
    _pending.queue = []
    return queue


optimizer_step_hooks: list = []  # (pre, post) pairs around every optimizer step
sampler_epoch_hooks: list = []  # fn(sampler, epoch)
sampler_first_pass_hooks: list = []  # fn(sampler, indices)
save_hooks: list = []  # fn(path, sha256)
seed_hooks: list = []  # fn(seed)


def register_optimizer_step_hooks(pre=None, post=None) -> RemovableHandle:
    """Call ``pre(optimizer, args, kwargs)`` before and ``post(optimizer, args, kwargs)`` after every step()."""
    entry = (pre, post)
    optimizer_step_hooks.append(entry)
    return RemovableHandle(optimizer_step_hooks, entry)


class _Handles(RemovableHandle):
    """Several registrations removed together."""

    __slots__ = ("_handles",)

    def __init__(self, handles):
        super().__init__([], None)
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def register_sampler_hooks(set_epoch=None, first_pass=None) -> RemovableHandle:
    """Call ``set_epoch(sampler, epoch)`` after every DistributedSampler.set_epoch and ``first_pass(sampler,
    indices)`` on each sampler's first pass."""
    handles = []
    for fn, registry in ((set_epoch, sampler_epoch_hooks), (first_pass, sampler_first_pass_hooks)):
        if fn is not None:
            registry.append(fn)
            handles.append(RemovableHandle(registry, fn))
    return _Handles(handles)


def register_save_hook(fn) -> RemovableHandle:
    """Call ``fn(path, sha256)`` after every successful ``mpnn.save`` (the file is hashed only when one exists)."""
    save_hooks.append(fn)
    return RemovableHandle(save_hooks, fn)


def register_seed_hook(fn) -> RemovableHandle:
    """Call ``fn(seed)`` after every ``mpnn.manual_seed``."""
    seed_hooks.append(fn)
    return RemovableHandle(seed_hooks, fn)
