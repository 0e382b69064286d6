"""``mpnn.compile(fn)``: capture a training step once per input signature, then replay it without per-op Python.

    step = mpnn.compile(train_step)       # train_step(x, y): forward, loss.backward(), opt.step(), returns loss
    for x, y in loader:
        loss = step(x, y)

The first call for a signature (each tensor argument's shape, dtype and requires_grad; other arguments by value
or identity; grad mode; the training flags of the modules the function reaches through its arguments, closure
and globals; the identity of its closure's contents) runs ``fn`` eagerly while recording it
(``mpnn.capture.recorder``). Later calls replay the recorded program (``mpnn.capture.program``): forward kernels
writing into the arrays the capture produced (the arena), the reverse pass unrolled, zero_grad and optimizer steps
called where the step called them. Values are bit-identical to eager's: every replay form calls the same kernels
(``mpnn.capture.replay``).

What is replayed is the tensor work, backward, zero_grad and optimizer.step(); other Python side effects of ``fn``
happen at capture only (as with a CUDA graph). Returned tensors are detached copies. A step that cannot be captured
runs eagerly from then on, after one ``CompileWarning`` saying why: it reads a tensor value into Python (``.item()``,
``bool(t)``, ``.numpy()``, ... : it may branch on it), uses an op without a replay form, draws random numbers,
writes in place to a tensor it reads, reads a parameter's ``.grad``, or passes a closure to ``optimizer.step``.

The cache holds ``max_entries`` programs (LRU). ``stats`` counts captures, hits, evictions, recaptures (a capture
of a signature seen before: evicted, or its guards failed because a parameter array was replaced) and eager calls;
more than 3 recaptures within 100 calls warns once per signature, naming it.
"""

from __future__ import annotations

import collections
import functools
import warnings

from mpnn.core import random as _random
from mpnn.core.grad_mode import is_grad_enabled
from mpnn.core.tensor import Tensor
from mpnn.core.tensor_base import from_array
from mpnn.nn.module import Module

from .program import CaptureError, Program, transfer_input_grads
from .recorder import Recorder

__all__ = ["CompileWarning", "CompiledFunction", "compile"]

RECAPTURE_WINDOW = 100
RECAPTURE_LIMIT = 3


class CompileWarning(UserWarning):
    """A compiled step that runs eagerly, or recaptures too often."""


def compile(fn=None, *, max_entries: int = 8):  # noqa: A001 (torch's name)
    """Wrap ``fn`` so that it is captured on its first call per signature and replayed after (see the module)."""
    if fn is None:
        return functools.partial(compile, max_entries=max_entries)
    return CompiledFunction(fn, max_entries=max_entries)


def _identity_key(v):
    """A closure's or global's value: numbers and strings by value, anything else (tensors included) by identity,
    so that rebinding the name to another object of the same shape recaptures."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v), v)
    return ("id", id(v))


def _value_key(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v), v)
    if isinstance(v, Tensor):
        return ("T", v.data.shape, v.data.dtype.str, bool(v.requires_grad))
    return ("id", id(v))


class CompiledFunction:
    def __init__(self, fn, max_entries: int = 8):
        if max_entries < 1:
            raise ValueError(f"mpnn.compile: max_entries must be >= 1, got {max_entries}")
        self.fn = fn
        self.max_entries = int(max_entries)
        self.stats = {"captures": 0, "hits": 0, "evictions": 0, "recaptures": 0, "eager": 0}
        self.eager_reason: str | None = None  # set once a capture failed: every call runs fn eagerly
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._seen: set = set()
        self._recent: collections.deque = collections.deque(maxlen=RECAPTURE_WINDOW)
        self._warned: set = set()
        self._modules = None
        self._global_tensors: tuple = ()
        functools.update_wrapper(self, fn)

    # ----- signature -----------------------------------------------------------------------------------------
    def _find_modules(self, args, kwargs):
        fn = self.fn
        cands = list(args) + list(kwargs.values())
        target = getattr(fn, "__func__", fn)
        if getattr(fn, "__self__", None) is not None:
            cands.append(fn.__self__)
        for cell in getattr(target, "__closure__", None) or ():
            try:
                cands.append(cell.cell_contents)
            except ValueError:
                pass
        code = getattr(target, "__code__", None)
        glb = getattr(target, "__globals__", {})
        for name in code.co_names if code is not None else ():
            if name in glb:
                cands.append(glb[name])
        mods, seen = [], set()
        for c in cands:
            if isinstance(c, Module):
                for m in c.modules():
                    if id(m) not in seen:
                        seen.add(id(m))
                        mods.append(m)
        return mods

    def signature(self, args, kwargs):
        target = getattr(self.fn, "__func__", self.fn)
        if self._modules is None:
            self._modules = self._find_modules(args, kwargs)
            code, glb = getattr(target, "__code__", None), getattr(target, "__globals__", {})
            names = code.co_names if code is not None else ()
            self._global_tensors = tuple(n for n in names if isinstance(glb.get(n), Tensor))
        closure = tuple(_identity_key(c.cell_contents) for c in getattr(target, "__closure__", None) or ())
        glb = getattr(target, "__globals__", {})
        return (
            tuple(_value_key(a) for a in args),
            tuple((k, _value_key(v)) for k, v in sorted(kwargs.items())),
            is_grad_enabled(),
            tuple(m.training for m in self._modules),
            closure,
            tuple(id(glb.get(name)) for name in self._global_tensors),
        )

    # ----- calls ---------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if self.eager_reason is not None:
            self.stats["eager"] += 1
            return self.fn(*args, **kwargs)
        key = self.signature(args, kwargs)
        prog = self._cache.get(key)
        if prog is not None:
            if prog.guards_hold():
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                self._recent.append(0)
                return prog.run(args)
            del self._cache[key]
        return self._capture(key, args, kwargs)

    def _capture(self, key, args, kwargs):
        proxies = []
        call_args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, Tensor):
                p = from_array(a.data.copy(), requires_grad=bool(a.requires_grad))
                proxies.append((i, p))
                call_args[i] = p
        rng = _random.generator().bit_generator.state
        with Recorder() as rec:
            result = self.fn(*call_args, **kwargs)
        grad_inputs = [(i, p) for i, p in proxies if p.requires_grad]
        try:
            if _random.generator().bit_generator.state != rng:
                raise CaptureError("the step draws random numbers (dropout, randn, ...)")
            prog = Program(rec, proxies, args, result)
        except CaptureError as exc:
            self.eager_reason = str(exc)
            warnings.warn(
                f"mpnn.compile({getattr(self.fn, '__qualname__', self.fn)!r}) runs eagerly from now on: {exc}",
                CompileWarning,
                stacklevel=3,
            )
            if grad_inputs:
                transfer_input_grads(grad_inputs, args)
            return _unproxy(result, proxies, args)
        if grad_inputs:
            transfer_input_grads(grad_inputs, args)
        recapture = key in self._seen
        self._seen.add(key)
        self.stats["captures"] += 1
        self.stats["recaptures"] += recapture
        self._recent.append(1 if recapture else 0)
        self._cache[key] = prog
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
            self.stats["evictions"] += 1
        if recapture and sum(self._recent) > RECAPTURE_LIMIT and key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"mpnn.compile({getattr(self.fn, '__qualname__', self.fn)!r}) recaptured {sum(self._recent)} times "
                f"in the last {len(self._recent)} calls; signature {key!r}: inputs whose shapes change, "
                f"max_entries={self.max_entries} too small, or parameters replaced between steps",
                CompileWarning,
                stacklevel=3,
            )
        return prog._result(prog.result_spec)

    def cache_size(self) -> int:
        return len(self._cache)


def _unproxy(result, proxies, args):
    swap = {id(p): args[i] for i, p in proxies}
    if isinstance(result, Tensor):
        return swap.get(id(result), result)
    if isinstance(result, (tuple, list)):
        return type(result)(_unproxy(x, proxies, args) for x in result)
    return result
