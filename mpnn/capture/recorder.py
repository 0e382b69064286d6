"""Capture: run a step eagerly once while recording what it does.

For the length of one call the recorder is installed (``tensor_base.capture_hook``), and a few entry points are
swapped for recording wrappers (and put back afterwards, even on error): ``Tensor.backward`` (the root and seed of
each reverse pass), ``Optimizer.zero_grad`` / ``Module.zero_grad``, and the reads that leave the tensor world
(``item``, ``bool``, ``float``, ``int``, ``numpy``, ``tolist``, ``__array__``): a step whose Python sees tensor
values may branch on them, so it cannot be replayed. Optimizer steps are seen through ``mpnn.hooks``' step hooks,
gradient clipping (``nn.utils.clip_grad_norm_`` / ``clip_grad_value_``, NumPy over the .grad arrays) through
``nn.utils.capture_call``: both replay whole, where the step made them.
Nothing is recorded from other threads, nor from inside an optimizer step or zero_grad (they replay whole).
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

from mpnn import hooks
from mpnn.core import tensor_base
from mpnn.core.grad_mode import _state as _grad_state
from mpnn.core.tensor import Tensor
from mpnn.nn import utils as nn_utils
from mpnn.nn.module import Module
from mpnn.optim.optimizer import Optimizer

from .replay import REPLAY, OpRecord, Unsupported

_MPNN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_READS = ("item", "__bool__", "__float__", "__int__", "numpy", "tolist", "__array__")
_CORE_DIR = os.path.join(_MPNN_DIR, "core") + os.sep
# core modules whose ops make tensors off the tape from other tensors' values (comparisons, sign, integer casts,
# argmax and the index results of max/min/sort/topk/max_pool): replay must recompute or refuse them
_DERIVING = frozenset(os.path.join(_CORE_DIR, f) for f in ("elementwise.py", "reduce.py", "indexing.py", "pool.py"))
_FROM_ARRAY = tensor_base.from_array.__code__
_MAKE_RESULT = tensor_base.make_result.__code__


def user_line(depth: int = 2) -> str:
    """'file:line' of the innermost frame outside the mpnn package (the user's code that called in)."""
    f = sys._getframe(depth)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_MPNN_DIR + os.sep):
        f = f.f_back
    if f is None:
        return "<unknown>"
    return f"{f.f_code.co_filename}:{f.f_lineno}"


class Recorder:
    def __init__(self, fuse: bool = True):
        self.fuse = fuse  # replay forms may reorder float arithmetic (mpnn.compile(fuse=))
        self.thread = threading.get_ident()
        self.ops: list[OpRecord] = []
        # ("op", OpRecord) | ("backward", root, seed, retain) | ("call", fn, obj, args, kw) | ("step", opt)
        self.events: list = []
        self.produced: dict[int, int] = {}  # id(result tensor) -> index in ops
        self.keep: list = []  # every tensor seen, so that ids stay unique while recording
        self.reads: list[tuple[str, str]] = []  # (what, where) of value reads
        self.unsupported: tuple[str, str] | None = None  # (op and reason, where)
        self.quiet = 0  # > 0 inside an optimizer step or zero_grad
        self.step_bumps: dict[int, int] = {}  # id(tensor) -> version bumps made by recorded optimizer steps
        self.side_results: set[int] = set()  # ids of tensors a recorded call returns (refreshed at each replay)
        self.derived: dict[int, tuple[str, str]] = {}  # id(tensor) -> (op, where): made off the tape, not replayable
        self.derived_arrays: set[int] = set()  # their arrays' ids (where() reads its condition as an array)
        self._saved = {}
        self._handle = None
        self._pre_versions = None

    # ----- the op hook ---------------------------------------------------------------------------------------
    def on_result(self, t, parents, backward, op):
        if self.quiet or threading.get_ident() != self.thread or self.unsupported is not None:
            return
        builder = REPLAY.get(op)
        if builder is None:
            self.unsupported = (f"op {op!r} (no replay form)", user_line(3))
            return
        frame = sys._getframe(2)  # 0: here, 1: make_result, 2: the op (or make_view)
        if frame.f_code.co_name == "make_view":
            frame = frame.f_back
        rec = OpRecord(
            op,
            t,
            tuple(parents),
            backward,
            dict(frame.f_locals),
            tuple(bool(p.requires_grad) for p in parents),
            bool(getattr(_grad_state, "enabled", True)),
            self.fuse,
        )
        try:
            rec.forward, rec.replay_bwd = builder(rec)
        except (Unsupported, KeyError) as exc:
            self.unsupported = (f"op {op!r} ({exc})", user_line(3))
            return
        name = self._derived_argument(rec.locals)
        if name is not None:  # an index or condition computed from tensor values off the tape: frozen in replay
            self.unsupported = (f"op {op!r} (its {name} was made off the tape from tensor values)", user_line(3))
            return
        rec.locals = None  # what the builder needed it has taken
        self.produced[id(t)] = len(self.ops)
        self.ops.append(rec)
        self.events.append(("op", rec))
        self.keep.append(t)
        self.keep.extend(parents)

    def _derived_argument(self, local_values: dict) -> str | None:
        """The name of an op's argument that is, or reads, a tensor made off the tape while recording (argmax's
        indices passed to getitem, gather or embedding; a where() condition), else None. Arrays are followed to
        their base, so a view of such a tensor's array counts too."""
        if not self.derived:
            return None
        for name, value in local_values.items():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, Tensor) and id(item) in self.derived:
                    return name
                while isinstance(item, np.ndarray):
                    if id(item) in self.derived_arrays:
                        return name
                    item = item.base
        return None

    # ----- tensors made off the tape --------------------------------------------------------------------------
    def on_tensor(self, t):
        """Every tensor made while recording passes here (tensor_base.init_slots). Tape results are on_result's.
        One made off the tape by a core op from other tensors' values would be a constant in replay: a comparison
        (``x > 0``, ``labels == k``) is recorded with a replay form (the same NumPy ufunc into its array); the others
        (sign, integer casts, argmax, index results) are noted, and a step that reads or returns one is refused.
        Factory tensors (zeros, arange, ...) depend on no tensor value and stay constants."""
        f = sys._getframe(2)  # 0: here, 1: the init_slots wrapper, 2: from_array or make_result
        code = f.f_code
        if code is _MAKE_RESULT or self.quiet or threading.get_ident() != self.thread:
            return
        if code is _FROM_ARRAY:
            f = f.f_back
        if f is None or f.f_code.co_filename not in _DERIVING:
            return
        self.keep.append(t)
        loc = f.f_locals
        np_fn = loc.get("np_fn")
        me = loc.get("self")
        if (
            f.f_code.co_name == "fn"
            and isinstance(np_fn, np.ufunc)
            and isinstance(me, Tensor)
            and self.unsupported is None
        ):
            other = loc.get("other")
            rec = _comparison(np_fn, me, other, t, self.fuse)
            if rec is not None:
                self.produced[id(t)] = len(self.ops)
                self.ops.append(rec)
                self.events.append(("op", rec))
                self.keep.append(me)
                return
        self.derived[id(t)] = (f.f_code.co_name, user_line(3))
        self.derived_arrays.add(id(t.data))

    # ----- gradient clipping (mpnn.nn.utils.capture_call) ---------------------------------------------------
    def on_call(self, fn, parameters, *args):
        """A clip_grad_*_ call: run now, and replayed whole at its place in the step over the parameters' .grad
        of that step (the list of parameters is taken now, as a generator would be spent); the returned norm's
        array is refreshed with each replay's norm."""
        if self.quiet or threading.get_ident() != self.thread:
            return fn(parameters, *args)
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        self.quiet += 1
        try:
            result = fn(params, *args)
        finally:
            self.quiet -= 1

        def replay(_obj):
            new = fn(params, *args)
            if result is not None:
                np.copyto(result.data, new.data)

        self.events.append(("call", replay, None, (), {}))
        if result is not None:
            self.side_results.add(id(result))
            self.keep.append(result)
        self.keep.extend(params)
        return result

    # ----- install / remove ----------------------------------------------------------------------------------
    def __enter__(self):
        rec = self
        saved = self._saved
        for name in _READS:
            original = getattr(Tensor, name)
            saved[(Tensor, name)] = original

            def reader(self_, *a, _name=name, _orig=original, **k):
                if threading.get_ident() == rec.thread and not rec.quiet:
                    rec.reads.append((_name, user_line(2)))
                return _orig(self_, *a, **k)

            setattr(Tensor, name, reader)

        original_backward = Tensor.backward
        saved[(Tensor, "backward")] = original_backward

        def backward(self_, gradient=None, retain_graph=None, create_graph=False, inputs=None):
            if threading.get_ident() != rec.thread or rec.quiet:
                return original_backward(self_, gradient, retain_graph, create_graph, inputs)
            from mpnn.core import autograd

            seen = {}
            real = autograd.run_backward

            def spy(root, g, retain):
                seen["seed"] = g
                return real(root, g, retain)

            autograd.run_backward = spy
            try:
                original_backward(self_, gradient, retain_graph, create_graph, inputs)
            finally:
                autograd.run_backward = real
            rec.events.append(("backward", self_, seen.get("seed"), bool(retain_graph)))
            rec.keep.append(self_)

        Tensor.backward = backward

        for cls in (Optimizer, Module):
            original = cls.zero_grad
            saved[(cls, "zero_grad")] = original

            def zero_grad(self_, *a, _orig=original, **k):
                if threading.get_ident() != rec.thread or rec.quiet:
                    return _orig(self_, *a, **k)
                rec.events.append(("call", _orig, self_, a, k))
                rec.quiet += 1
                try:
                    return _orig(self_, *a, **k)
                finally:
                    rec.quiet -= 1

            cls.zero_grad = zero_grad

        self._handle = hooks.register_optimizer_step_hooks(pre=self._step_pre, post=self._step_post)
        nn_utils.capture_call = self.on_call
        init_slots = tensor_base.init_slots
        self._saved[(tensor_base, "init_slots")] = init_slots
        on_tensor = self.on_tensor

        def recording_init_slots(t, arr, requires_grad):
            init_slots(t, arr, requires_grad)
            on_tensor(t)

        tensor_base.init_slots = recording_init_slots
        tensor_base.capture_hook = self.on_result
        return self

    def __exit__(self, *exc):
        tensor_base.capture_hook = None
        nn_utils.capture_call = None
        self._handle.remove()
        for (cls, name), original in self._saved.items():
            setattr(cls, name, original)
        self._saved.clear()
        return False

    # ----- optimizer steps -----------------------------------------------------------------------------------
    def _step_pre(self, opt, args, kwargs):
        if threading.get_ident() != self.thread:
            return
        if self.quiet == 0:
            if args or kwargs:
                self.unsupported = ("optimizer.step(closure)", user_line(3))
            self.events.append(("step", opt))
            params = [p for g in opt.param_groups for p in g["params"]]
            self._pre_versions = [(p, p._ver.value) for p in params]
        self.quiet += 1

    def _step_post(self, opt, args, kwargs):
        if threading.get_ident() != self.thread:
            return
        self.quiet -= 1
        if self.quiet == 0 and self._pre_versions is not None:
            for p, v in self._pre_versions:
                k = id(p._ver)
                self.step_bumps[k] = self.step_bumps.get(k, 0) + p._ver.value - v
                self.keep.append(p)
            self._pre_versions = None


def _comparison(np_fn, a, other, t, fuse):
    """The OpRecord of a comparison ``a <op> other`` (a tensor against a tensor or a Python number) whose result
    ``t`` is an array it can be written into again, or None."""
    o = t.data
    if type(o) is not np.ndarray or not o.flags.writeable or not o.flags.c_contiguous:
        return None
    # other: a number, or the array of the other tensor (the comparison has already taken .data): an arena buffer
    # refreshed in place, a parameter's array, or a constant
    if isinstance(other, np.ndarray) or other is None or isinstance(other, (bool, int, float)):
        parents, b = (a,), other
    else:
        return None
    ad = a.data
    rec = OpRecord("compare", t, parents, None, {}, tuple(False for _ in parents), False, fuse)

    def forward():  # the same ufunc on the same operands, into the result's array
        np_fn(ad, b, out=o)

    rec.forward, rec.replay_bwd = forward, None
    rec.locals = None
    return rec
