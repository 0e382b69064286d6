"""The op-timing switch behind ``mpnn.profiler``: while it is on, every op function and every node's backward run
through a timing wrapper; while it is off, nothing of it is on the hot path.

``install(sink, record_shapes)`` puts a wrapper in place of each op function (``op_functions()``) wherever a loaded
module's namespace holds it (``mpnn.core.ops``, the family modules, ``nn.functional``, the Tensor mixins' modules,
a user script's ``from mpnn.core.ops import add``), and swaps ``Node.apply`` for a timed one. The returned
``uninstall()`` puts the very same function objects back (a second sweep also replaces any wrapper that a module
imported while the switch was on), so after it ``make_result``, ``Node.apply`` and every op are the objects they
were: an unprofiled step runs exactly the code it ran before the profiler existed.

``sink((kind, name, t0_ns, t1_ns, thread_id, shapes))`` (one tuple: ``list.append`` is a sink) gets one call
per op call (kind "op") and per node run (kind "backward", name = the node's op), with
``time.perf_counter_ns()`` readings taken around the call; the
sink (mpnn.profiler) works out nesting and self time. ``shapes`` is None unless ``record_shapes``: then one entry
per positional argument, a tensor's or array's shape as a list, a list of those for a list/tuple of tensors, []
for anything else (torch.profiler's "Input Shapes"); for a backward, the incoming gradient's shape.

Not seen: an op called through a reference that is not a module attribute (a dict of ops, a default argument,
a local variable bound before ``install``) and functions outside ``op_functions()`` (factories, the optimizers'
fused updates, collectives).
"""

from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np

from mpnn.core import (
    activation,
    attention,
    autograd,
    conv,
    elementwise,
    indexing,
    inplace,
    linalg,
    loss,
    movement,
    normalization,
    pad,
    pool,
    reduce,
)
from mpnn.core import random as core_random
from mpnn.core.tensor_base import TensorBase

_FAMILIES = (
    elementwise,
    activation,
    reduce,
    movement,
    indexing,
    linalg,
    inplace,
    attention,
    normalization,
    loss,
    pad,
    pool,
)
# Public functions of the families that are helpers, not ops (no tensor result on the tape of their own).
_NOT_OPS = frozenset({"unbroadcast", "bump_version", "apply_inplace"})
_EXTRA = (conv.conv1d, conv.conv2d, core_random.multinomial)

_lock = threading.Lock()
_active = False


def op_functions() -> dict[int, types.FunctionType]:
    """id -> function of every op the switch times: the families' public functions, conv1d/2d, multinomial."""
    found: dict[int, types.FunctionType] = {}
    for module in _FAMILIES:
        for name, value in vars(module).items():
            if (
                type(value) is types.FunctionType
                and value.__module__ == module.__name__
                and not name.startswith("_")
                and name not in _NOT_OPS
            ):
                found[id(value)] = value
    for fn in _EXTRA:
        found[id(fn)] = fn
    return found


def is_active() -> bool:
    return _active


def _shape(value):
    if isinstance(value, (TensorBase, np.ndarray)):
        return list(value.shape) if isinstance(value, np.ndarray) else list(value.data.shape)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (TensorBase, np.ndarray)) for v in value):
        return [_shape(v) for v in value]
    return []


def _wrap(fn, sink, record_shapes):
    name = fn.__name__
    clock = time.perf_counter_ns
    ident = threading.get_ident

    if record_shapes:

        def timed(*args, **kwargs):
            shapes = [_shape(a) for a in args]
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                sink(("op", name, t0, clock(), ident(), shapes))

    else:

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                sink(("op", name, t0, clock(), ident(), None))

    timed.__name__ = fn.__name__
    timed.__qualname__ = fn.__qualname__
    timed.__module__ = fn.__module__
    timed.__doc__ = fn.__doc__
    timed.__wrapped__ = fn  # type: ignore[attr-defined]
    return timed


def _timed_apply(original, sink, record_shapes):
    clock = time.perf_counter_ns
    ident = threading.get_ident

    def apply(self, g, retain_graph):
        t0 = clock()
        try:
            return original(self, g, retain_graph)
        finally:
            sink(("backward", self.op, t0, clock(), ident(), [list(np.shape(g))] if record_shapes else None))

    apply.__wrapped__ = original  # type: ignore[attr-defined]
    return apply


def _sweep(replace: dict[int, object]) -> list[tuple[dict, str, object]]:
    """Put replace[id(value)] in place of every module-namespace value found in `replace`; the undo list."""
    done = []
    for module in list(sys.modules.values()):
        try:
            namespace = vars(module)
        except TypeError:  # not a module (some packages put other objects in sys.modules)
            continue
        for key, value in list(namespace.items()):
            new = replace.get(id(value))
            if new is not None and value is not new:
                namespace[key] = new
                done.append((namespace, key, value))
    return done


def install(sink, record_shapes: bool = False):
    """Turn op timing on (see the module docstring); returns ``uninstall()``. RuntimeError if it is already on."""
    global _active
    with _lock:
        if _active:
            raise RuntimeError("mpnn.profiler: a profiler is already recording; stop it before starting another")
        originals = op_functions()
        wrappers = {key: _wrap(fn, sink, record_shapes) for key, fn in originals.items()}
        original_apply = autograd.Node.apply
        _sweep(wrappers)
        autograd.Node.apply = _timed_apply(original_apply, sink, record_shapes)
        _active = True

    def uninstall() -> None:
        global _active
        with _lock:
            if autograd.Node.apply is not original_apply:
                autograd.Node.apply = original_apply
            # Every wrapper back to its function, including wrappers that modules imported while it was on.
            _sweep({id(w): originals[key] for key, w in wrappers.items()})
            _active = False

    return uninstall
