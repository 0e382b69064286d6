"""``mpnn.compile(fn)``: capture a training step once per input signature, then replay it without per-op Python.

    step = mpnn.compile(train_step)       # train_step(x, y): forward, loss.backward(), opt.step(), returns loss
    for x, y in loader:
        loss = step(x, y)

The first call for a signature (each tensor argument's shape, dtype and requires_grad; other arguments by value
or identity; grad mode; the training flags of the modules the function reaches through its arguments, closure
and globals; its closure's contents and the tensors, modules and plain values of the globals it names: numbers
and strings by value, the rest by identity) runs ``fn`` eagerly while recording it
(``mpnn.capture.recorder``). Later calls replay the recorded program (``mpnn.capture.program``): forward kernels
writing into the arrays the capture produced (the arena), the reverse pass unrolled, zero_grad and optimizer steps
called where the step called them. With ``fuse=False`` values are bit-identical to eager's: every replay form calls
the same kernels on the same operands (``mpnn.capture.replay``), some of them fused into one pass without reordering
any arithmetic (bias + ReLU after a linear layer, ReLU). The default ``fuse=True`` also replays cross-entropy as one
Numba pass per row that sums in float64: the loss and gradients then agree with eager's to ~1e-7 relative; and
Adam's update divides by its bias correction as a multiply by the reciprocal (one division per entry instead of
two): each update within an ulp or two of Adam.step's.
Optimizer steps (Adam, AdamW, SGD) replay with their own kernels minus the per-parameter Python
(``mpnn.capture.optim``); one-tile im2col convs and linear layers replay over buffers planned once.

What is replayed is the tensor work, backward, zero_grad and optimizer.step(); other Python side effects of ``fn``
happen at capture only (as with a CUDA graph). Returned tensors are detached copies. A step that cannot be captured
runs eagerly from then on, after one ``CompileWarning`` saying why: it reads a tensor value into Python (``.item()``,
``bool(t)``, ``.numpy()``, ... : it may branch on it), uses an op without a replay form, draws random numbers
other than dropout's (dropout draws its mask again each replay, consuming mpnn's generator as eager does), writes
in place to a tensor it reads, reads a parameter's ``.grad``, or passes a closure to ``optimizer.step``.

A captured program is dropped and the step captured again when a parameter's array is replaced, or when a public
attribute, parameter, buffer or child of a module the step reaches was assigned, added or deleted since the capture
(a Python value its forward may have baked in; ``mpnn.nn.module.attribute_changes()`` says cheaply whether any
moved at all). Private plain attributes (``self._name = value``) are taken as the module's bookkeeping, not guarded.

The cache holds ``max_entries`` programs (LRU). ``stats`` counts captures, hits, evictions, recaptures (a capture
of a signature seen before: evicted, or its guards failed) and eager calls; more than 3 recaptures within 100 calls
warns once per signature, naming it. Under telemetry every call puts the process's totals over all compiled
functions into the current step's line as ``"compile": {"captures", "hits", "evictions", "recaptures", "eager",
"entries"}`` (``entries``: programs cached now), and each warning becomes a ``compile_warning`` event.
"""

from __future__ import annotations

import collections
import functools
import warnings

import numpy as np

from mpnn.core import random as _random
from mpnn.core.grad_mode import is_grad_enabled
from mpnn.core.tensor import Tensor
from mpnn.core.tensor_base import from_array
from mpnn.nn import module as _module
from mpnn.nn.module import Module
from mpnn.telemetry import get_recorder

from .program import CaptureError, Program, transfer_input_grads
from .recorder import Recorder

__all__ = ["CompileWarning", "CompiledFunction", "compile"]

RECAPTURE_WINDOW = 100
RECAPTURE_LIMIT = 3

# the process's counts over every compiled function: what telemetry's step lines carry under "compile"
TOTALS = {"captures": 0, "hits": 0, "evictions": 0, "recaptures": 0, "eager": 0, "entries": 0}
_MODULE_STORES = frozenset(("training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"))


class CompileWarning(UserWarning):
    """A compiled step that runs eagerly, or recaptures too often."""


def compile(fn=None, *, max_entries: int = 8, fuse: bool = True):  # noqa: A001 (torch's name)
    """Wrap ``fn`` so that it is captured on its first call per signature and replayed after (see the module).
    ``fuse=False`` keeps only replay forms that give eager's bits (no fused kernel that reorders arithmetic)."""
    if fn is None:
        return functools.partial(compile, max_entries=max_entries, fuse=fuse)
    return CompiledFunction(fn, max_entries=max_entries, fuse=fuse)


def _identity_key(v):
    """A closure's or global's value: numbers and strings by value, anything else (tensors included) by identity,
    so that rebinding the name to another object of the same shape recaptures."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v), v)
    return ("id", id(v))


def _modules_fingerprint(mods):
    """Every module's public plain attributes (numbers and strings by value, the rest by identity) and the
    identities of its parameters, buffers and children: what a captured forward may have read as Python values.
    Private plain attributes ("_name") are the module's own bookkeeping (DataParallel counts its steps in one)."""
    out = []
    for m in mods:
        d = m.__dict__
        out.append(tuple((k, _identity_key(v)) for k, v in d.items() if k[:1] != "_" and k not in _MODULE_STORES))
        for store in ("_parameters", "_buffers", "_modules"):
            out.append(tuple((k, id(v)) for k, v in d[store].items()))
    return tuple(out)


def _report(warning=None, pending=None):
    """The totals into the current step's telemetry line (pending: counts of a capture under way, whose step line
    closes inside fn), a warning as an event."""
    rec = get_recorder()
    if rec is not None:
        totals = dict(TOTALS)
        for k, n in (pending or {}).items():
            totals[k] += n
        rec.add_metrics(compile=totals)
        if warning is not None:
            rec.event("compile_warning", message=warning)


def _cells_key(cells):
    """The closure's contents as _identity_key keys them (an empty cell: a name the function defines later), in one
    loop: a function call per cell cost ~0.3 us a cell on every step."""
    out = []
    for cell in cells:
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell (a name the function defines later)
            out.append(("empty",))
            continue
        out.append((type(v), v) if v is None or isinstance(v, (bool, int, float, str)) else ("id", id(v)))
    return tuple(out)


def _value_key(v):
    if isinstance(v, Tensor):
        d = v.data
        return ("T", d.shape, d.dtype, v.requires_grad is True)
    if v is None or isinstance(v, (bool, int, float, str)):
        return (type(v), v)
    return ("id", id(v))


class CompiledFunction:
    def __init__(self, fn, max_entries: int = 8, fuse: bool = True):
        if max_entries < 1:
            raise ValueError(f"mpnn.compile: max_entries must be >= 1, got {max_entries}")
        self.fn = fn
        self.fuse = bool(fuse)
        self.max_entries = int(max_entries)
        self.stats = {"captures": 0, "hits": 0, "evictions": 0, "recaptures": 0, "eager": 0}
        self._module_state: dict = {}  # id(program) -> (attribute_changes() when last checked, fingerprint)
        self.eager_reason: str | None = None  # set once a capture failed: every call runs fn eagerly
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._seen: set = set()
        self._recent: collections.deque = collections.deque(maxlen=RECAPTURE_WINDOW)
        self._warned: set = set()
        self._modules = None  # the modules the step reaches (set with the rest by _prepare on the first call)
        self._cells: tuple = ()
        self._globals: dict = {}
        self._global_names: tuple = ()
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

    def _prepare(self, args, kwargs):
        target = getattr(self.fn, "__func__", self.fn)
        self._modules = self._find_modules(args, kwargs)
        self._cells = tuple(getattr(target, "__closure__", None) or ())
        code, glb = getattr(target, "__code__", None), getattr(target, "__globals__", {})
        self._globals = glb
        # globals the code names that hold tensors, modules or plain values (a rebinding recaptures); modules,
        # functions and classes are taken as fixed
        self._global_names = tuple(
            n
            for n in (code.co_names if code is not None else ())
            if n in glb and (glb[n] is None or isinstance(glb[n], (Tensor, Module, bool, int, float, str)))
        )

    def signature(self, args, kwargs):
        if self._modules is None:
            self._prepare(args, kwargs)
        glb = self._globals
        return (
            tuple([_value_key(a) for a in args]),
            tuple([(k, _value_key(v)) for k, v in sorted(kwargs.items())]) if kwargs else (),
            is_grad_enabled(),
            tuple([m.training for m in self._modules]),
            _cells_key(self._cells),
            tuple([_identity_key(glb.get(n)) for n in self._global_names]),
        )

    # ----- counts and guards ---------------------------------------------------------------------------------
    def _count(self, what, n=1):
        self.stats[what] += n
        TOTALS[what] += n

    def _warn(self, message):
        warnings.warn(message, CompileWarning, stacklevel=4)
        return message

    def _modules_unchanged(self, prog) -> bool:
        changes = _module.attribute_changes()
        seen, fingerprint = self._module_state[id(prog)]
        if seen == changes:
            return True
        if _modules_fingerprint(self._modules) != fingerprint:
            return False
        self._module_state[id(prog)] = (changes, fingerprint)
        return True

    def _drop(self, key):
        prog = self._cache.pop(key)
        self._module_state.pop(id(prog), None)
        TOTALS["entries"] -= 1

    # ----- calls ---------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if self.eager_reason is not None:
            self._count("eager")
            _report()
            return self.fn(*args, **kwargs)
        key = self.signature(args, kwargs)
        prog = self._cache.get(key)
        if prog is not None:
            if prog.guards_hold() and self._modules_unchanged(prog):
                if len(self._cache) > 1:
                    self._cache.move_to_end(key)
                self._count("hits")
                self._recent.append(0)
                _report()
                return prog.run(args)
            modules_moved = not self._modules_unchanged(prog)
            self._drop(key)
            if modules_moved:  # a child added or removed changes the modules the signature covers
                self._modules = None
                key = self.signature(args, kwargs)
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
        recapture = key in self._seen
        _report(pending={"captures": 1, "recaptures": int(recapture), "entries": 1})
        with Recorder(fuse=self.fuse) as rec:
            result = self.fn(*call_args, **kwargs)
        grad_inputs = [(i, p) for i, p in proxies if p.requires_grad]
        try:
            # (after an op without a replay form nothing more was recorded, dropouts included: Program names that op)
            if rec.unsupported is None and _random.generator().bit_generator.state != _state_after_replayed_draws(
                rng, rec
            ):
                raise CaptureError("the step draws random numbers (randn, shuffling, ...) other than dropout's")
            prog = Program(rec, proxies, args, result)
        except CaptureError as exc:
            self.eager_reason = str(exc)
            self._count("eager")  # this call ran eagerly
            message = f"mpnn.compile({getattr(self.fn, '__qualname__', self.fn)!r}) runs eagerly from now on: {exc}"
            _report(self._warn(message))
            if grad_inputs:
                transfer_input_grads(grad_inputs, args)
            return _unproxy(result, proxies, args)
        if grad_inputs:
            transfer_input_grads(grad_inputs, args)
        self._seen.add(key)
        self._count("captures")
        self._count("recaptures", int(recapture))
        self._recent.append(1 if recapture else 0)
        self._cache[key] = prog
        TOTALS["entries"] += 1
        if self._modules is None:
            self._modules = self._find_modules(args, kwargs)
        self._module_state[id(prog)] = (_module.attribute_changes(), _modules_fingerprint(self._modules))
        while len(self._cache) > self.max_entries:
            self._drop(next(iter(self._cache)))
            self._count("evictions")
        warning = None
        if recapture and sum(self._recent) > RECAPTURE_LIMIT and key not in self._warned:
            self._warned.add(key)
            warning = self._warn(
                f"mpnn.compile({getattr(self.fn, '__qualname__', self.fn)!r}) recaptured {sum(self._recent)} times "
                f"in the last {len(self._recent)} calls; signature {key!r}: inputs whose shapes change, "
                f"max_entries={self.max_entries} too small, or parameters or module attributes replaced between steps"
            )
        _report(warning)
        return prog._result(prog.result_spec)

    def cache_size(self) -> int:
        return len(self._cache)

    def __del__(self):
        TOTALS["entries"] -= len(getattr(self, "_cache", ()))


def _unproxy(result, proxies, args):
    swap = {id(p): args[i] for i, p in proxies}
    if isinstance(result, Tensor):
        return swap.get(id(result), result)
    if isinstance(result, (tuple, list)):
        return type(result)(_unproxy(x, proxies, args) for x in result)
    return result


def _state_after_replayed_draws(state, rec):
    """The generator's state after the draws the recorded ops make again in replay (dropout's masks), from
    `state`: equal to the state the step left only if it drew nothing else, so that replay consumes the stream
    exactly as eager does and the same seed gives the same masks."""
    draws = [shape for r in rec.ops for shape in getattr(r.forward, "draws", ())]
    if not draws:  # the usual step: no dropout (a PCG64() seeds itself from the OS: ~100 us of a ~2.5 ms capture)
        return state
    sim = np.random.Generator(np.random.PCG64(0))
    sim.bit_generator.state = state
    for shape in draws:
        sim.random(shape, dtype=np.float32)
    return sim.bit_generator.state
