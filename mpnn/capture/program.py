"""A captured step as a flat program: forward kernels over the arena, the reverse pass unrolled, and the
optimizer steps and zero_grad calls where the step made them.

The arena is the set of arrays the capture call produced: each recorded op writes its result into the array its
eager call returned, so views (reshape) of those arrays follow by themselves and nothing is allocated for
forward results after capture. Inputs are copied into private arrays that the capture ran on.

The reverse pass is unrolled at build time in the engine's own order: the recorded ops reachable from the root,
newest first (the engine's Kahn order with newest-first ties is exactly that order, since every consumer of a
result was recorded after it), each parent's contributions summed in the order the engine sums them, and each
leaf's gradient handed to ``autograd.accumulate_leaf`` right after its last consumer ran (its hooks, DataParallel's
buckets among them, fire there as in eager).
"""

from __future__ import annotations

import sys

import numpy as np

from mpnn import hooks
from mpnn.core.autograd import SliceGrad, _accumulate, _dense, accumulate_leaf, with_queued_callbacks
from mpnn.core.tensor import Tensor
from mpnn.core.tensor_base import from_array

from .optim import replay_step
from .replay import fuse


class CaptureError(Exception):
    """The recorded step cannot be replayed (the message says why); the step runs eagerly instead."""


class Program:
    """``run(inputs)`` replays the step with new input arrays; returns the step's result structure."""

    def __init__(self, rec, proxies, user_args, result):
        self.proxies = proxies  # [(arg index, proxy tensor)]
        self.steps = []  # callables, in order
        self.guards = []  # (tensor, its array, requires_grad) of every tensor read that the step did not make
        self.grad_inputs = [(i, p) for i, p in proxies if p.requires_grad]
        self._lent = []  # buffers of backward forms handed to leaves as their .grad (see _reclaim)
        self._build(rec, proxies, frozenset(_tensor_ids(result)) | rec.side_results)
        self.result_spec = self._spec(result, rec)

    # ----- build ---------------------------------------------------------------------------------------------
    def _build(self, rec, proxies, returned):
        """returned: ids of the tensors the step hands back (its result's, a clip_grad norm's): fuse keeps those."""
        if rec.reads:
            what, where = rec.reads[0]
            raise CaptureError(f"the step reads a tensor value ({_read_name(what)}) at {where}")
        if rec.unsupported is not None:
            what, where = rec.unsupported
            raise CaptureError(f"{what} at {where}")
        for r in rec.ops if rec.derived else ():
            for p in r.parents:
                _refuse_derived(rec, p)
        produced = rec.produced
        proxy_ids = {id(p) for _, p in proxies}
        externals = {}
        for r in rec.ops:
            if r.out._ver.value - r.version > rec.step_bumps.get(id(r.out._ver), 0):  # a view of a parameter
                raise CaptureError(f"an in-place write to the result of {r.op!r} (shape {r.out.data.shape})")
            if r.out._node is not None and (r.out._node.hooks or r.out._node.retain is not None):
                raise CaptureError(f"a hook or retain_grad on the result of {r.op!r}")
            for p in r.parents:
                k = id(p)
                if k in produced or k in proxy_ids or k in externals:
                    continue
                if p.requires_grad and p._node is not None:
                    raise CaptureError(f"{r.op!r} reads a tensor from a graph built outside the step")
                externals[k] = (p, r.op)
        # a .grad made during the capture is a new tensor every step: reading it in the step cannot be replayed
        leaves = [p for p, _ in externals.values() if p.requires_grad]
        leaves += [p for ev in rec.events if ev[0] == "step" for g in ev[1].param_groups for p in g["params"]]
        grads = {id(p.grad) for p in leaves if p.grad is not None}
        for k, (p, op) in externals.items():
            if k in grads:
                raise CaptureError(f"{op!r} reads a parameter's .grad inside the step")
            self.guards.append((p, p.data, p.requires_grad))
        self._check_versions(rec)

        index = {id(r): i for i, r in enumerate(rec.ops)}
        fused = fuse(rec, returned)
        for ev in rec.events:
            kind = ev[0]
            if kind == "op":
                i = index[id(ev[1])]
                forward = fused[i] if i in fused else ev[1].forward
                if forward is not None:
                    self.steps.append(forward)
            elif kind == "backward":
                self.steps.append(self._backward_step(rec, ev[1], ev[2]))
            elif kind == "call":
                _, fn, obj, a, k = ev
                self.steps.append(_bind(fn, obj, a, k))
            elif kind == "step":
                self.steps.append(replay_step(ev[1], rec.fuse) or ev[1].step)

    def _check_versions(self, rec):
        """Every tensor the ops read must be at the version it had when first read, but for optimizer updates."""
        first = {}
        for r in rec.ops:
            for p, v in zip(r.parents, r.parent_versions):
                first.setdefault(id(p._ver), (p, v))
        for p, v in first.values():
            allowed = rec.step_bumps.get(id(p._ver), 0)
            if p._ver.value - v > allowed:
                raise CaptureError(f"an in-place write to a tensor of shape {p.data.shape} that the step reads")

    def _backward_step(self, rec, root, seed):
        produced = rec.produced
        if id(root) not in produced:
            raise CaptureError("backward from a tensor the step did not compute")
        if seed is None:
            raise CaptureError("backward without a seed")
        ops = rec.ops
        start = produced[id(root)]
        reached = {start}
        last_consumer = {}  # leaf id -> lowest op index with an edge into it
        leaves = {}
        plan = []
        for i in range(start, -1, -1):
            if i not in reached:
                continue
            r = ops[i]
            if r.out._node is None and i != start:
                continue
            targets = []
            for j, (p, need) in enumerate(zip(r.parents, r.needs)):
                if not need:
                    continue
                k = id(p)
                if k in produced:
                    reached.add(produced[k])
                else:
                    leaves[k] = p
                    last_consumer[k] = i
                targets.append((j, k))
            plan.append((i, id(r.out), r.replay_bwd, targets))
        edges = {}  # leaf id -> how many edges reach it
        for _, _, _, targets in plan:
            for _, k in targets:
                if k in leaves:
                    edges[k] = edges.get(k, 0) + 1
        steps = []
        for i, key, bwd, targets in plan:
            lendable = getattr(bwd, "lendable", None) or {}
            fin = [
                (k, leaves[k], lendable.get(j) if edges[k] == 1 else None)
                for j, k in targets
                if k in leaves and last_consumer.get(k) == i
            ]
            # one leaf finalized once, in edge order
            uniq, seen = [], set()
            for k, leaf, holder in fin:
                if k not in seen:
                    seen.add(k)
                    uniq.append((k, leaf, holder))
            steps.append((key, bwd, tuple(targets), tuple(uniq)))
        steps = tuple(steps)
        root_key = id(root)
        lent = self._lent

        sums = {}  # target -> the buffer its contributions are summed into (planned at the first step that sums)

        def reverse():
            if lent:
                _reclaim(lent)
            grads = {root_key: seed}
            owned = set()
            for key, bwd, targets, fin in steps:
                g = grads.pop(key, None)
                if g is not None:
                    pgrads = bwd(_dense(g))
                    for j, k in targets:
                        pg = pgrads[j]
                        if pg is None:
                            continue
                        prev = grads.get(k)
                        if prev is None:
                            grads[k] = pg
                        elif type(prev) is SliceGrad or type(pg) is SliceGrad:  # split's slices: as the engine
                            grads[k] = _accumulate(prev, pg, k, owned)
                        elif k in owned:
                            np.add(prev, pg, out=prev)
                        else:  # the engine's prev + pg, into a buffer of this program's when it fits
                            buf = sums.get(k)
                            if (
                                buf is not None
                                and prev.shape == buf.shape
                                and pg.shape == buf.shape
                                and prev.dtype == buf.dtype
                                and pg.dtype == buf.dtype
                            ):
                                np.add(prev, pg, out=buf)
                            else:
                                buf = prev + pg
                                if prev.dtype == pg.dtype == buf.dtype and prev.shape == pg.shape:
                                    sums[k] = buf
                            grads[k] = buf
                            owned.add(k)
                for k, leaf, holder in fin:
                    gl = grads.pop(k, None)
                    if gl is None:
                        continue
                    if (
                        holder is not None
                        and gl is holder[0]
                        and leaf.grad is None
                        and not leaf._grad_hooks
                        and not leaf._hooks
                        and gl.dtype == leaf.data.dtype
                    ):
                        # the form's buffer becomes the .grad, as accumulate_leaf's copy would (no copy: the MLP's
                        # 79k gradient entries, 30 us a step); reclaimed or replaced at the next backward
                        leaf.grad = from_array(gl)
                        lent.append(holder)
                    else:
                        accumulate_leaf(leaf, _dense(gl))

        def backward():
            around = tuple(hooks.backward_hooks)
            for pre, _ in around:
                if pre is not None:
                    pre(root)
            try:
                with_queued_callbacks(reverse)
            finally:
                for _, post in around:
                    if post is not None:
                        post(root)

        return backward

    # ----- results -------------------------------------------------------------------------------------------
    def _spec(self, result, rec):
        """How to rebuild fn's return value from the arena: copies of computed tensors, the rest as they were."""
        if isinstance(result, Tensor):
            _refuse_derived(rec, result)
            if (
                id(result) in rec.produced
                or id(result) in rec.side_results
                or any(result is p for _, p in self.proxies)
            ):
                arr = result.data
                return ("copy", arr)
            return ("const", result)
        if isinstance(result, (tuple, list)):
            return (type(result), [self._spec(x, rec) for x in result])
        if isinstance(result, dict):
            return ("dict", {k: self._spec(v, rec) for k, v in result.items()})
        if result is None or isinstance(result, (int, float, str, bool)):
            return ("const", result)
        raise CaptureError(f"the step returns a {type(result).__name__}: only tensors, numbers and containers")

    def _result(self, spec):
        kind = spec[0]
        if kind == "copy":
            return from_array(spec[1].copy())
        if kind == "const":
            return spec[1]
        if kind == "dict":
            return {k: self._result(v) for k, v in spec[1].items()}
        return kind(self._result(x) for x in spec[1])

    # ----- run -----------------------------------------------------------------------------------------------
    def guards_hold(self) -> bool:
        for t, arr, rg in self.guards:
            if t.data is not arr or t.requires_grad is not rg:
                return False
        return True

    def run(self, args):
        for i, proxy in self.proxies:
            np.copyto(proxy.data, args[i].data)
        for step in self.steps:
            step()
        if self.grad_inputs:
            transfer_input_grads(self.grad_inputs, args)
        return self._result(self.result_spec)


def _reclaim(lent):
    """Before a backward writes its forms' buffers again: a buffer handed to a leaf as its .grad that anything
    still references (the .grad itself when zero_grad did not drop it, a tensor or view the caller kept) stays
    theirs, and its form gets a fresh array, as eager makes a fresh .grad each step. Otherwise (the usual step:
    zero_grad dropped the .grad and nothing else holds it) the form writes it again, which nobody can see.
    The count: the holder's slot and getrefcount's argument; any view of the buffer holds it as its base."""
    for holder in lent:
        if sys.getrefcount(holder[0]) > 2:
            holder[0] = np.empty_like(holder[0])
    lent.clear()


def transfer_input_grads(grad_inputs, args):
    """An input that requires grad ran as a private leaf: its gradient goes to the caller's tensor."""
    for i, proxy in grad_inputs:
        g = proxy.grad
        if g is not None:
            proxy.grad = None
            accumulate_leaf(args[i], g.data)


def _refuse_derived(rec, t):
    d = rec.derived.get(id(t))
    if d is not None:
        raise CaptureError(
            f"{d[0]!r} at {d[1]} makes a tensor off the tape from tensor values (argmax, sign, an integer cast, "
            "index results, ...) that the step then uses or returns: replay would keep its first value"
        )


def _tensor_ids(result):
    """ids of the tensors in fn's return value (tensors, numbers and containers of them)."""
    if isinstance(result, Tensor):
        yield id(result)
    elif isinstance(result, (tuple, list)):
        for x in result:
            yield from _tensor_ids(x)
    elif isinstance(result, dict):
        for x in result.values():
            yield from _tensor_ids(x)


def _bind(fn, obj, a, k):
    def call():
        fn(obj, *a, **k)

    return call


def _read_name(what):
    return {
        "__bool__": "bool(t)",
        "__float__": "float(t)",
        "__int__": "int(t)",
        "__array__": "np.asarray(t)",
        "item": ".item()",
        "numpy": ".numpy()",
        "tolist": ".tolist()",
    }.get(what, what)
