"""The tape and the reverse pass: nodes, edges, saved-tensor versions, and the engine that walks them.

Every op result that needs a gradient points at one ``Node``: the op's backward closure and one *edge* per
input, taken when the op ran: the input's own node, the input itself when it is a leaf that requires grad,
or None. Edges point at nodes, not tensors, so an in-place op that later gives a tensor a new node (see
``mpnn.core.inplace``) cannot reroute gradients of ops that read the tensor before the write.

The engine counts, for every node and leaf reachable from the root, how many edges lead into it, and runs a
node only when all of them have delivered (Kahn's algorithm), newest node first among the ready ones. So a
tensor reached along paths of different lengths (``x + x.exp()``, every residual block) gets the sum of all
its contributions before its own backward runs, and leaves get their final ``.grad`` as early as possible
(DataParallel starts reducing a bucket while backward goes on).

Saved tensors: an op names the tensors its backward reads (``saved=``); the node keeps each one's version
counter and value, and running the node after one of them was written in place raises torch's error instead
of computing a wrong gradient. A node run without ``retain_graph`` drops its closure; reaching it again raises.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

from mpnn import hooks
from mpnn.core.errors import OpError


class Version:
    """Count of in-place writes to one storage, shared by a tensor, its views and its detached aliases."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


_seq = itertools.count()

SECOND_BACKWARD = (
    "Trying to backward through the graph a second time (or directly access saved tensors "
    "after they have already been freed): the intermediate values of op {op!r} were freed "
    "by the first backward. Specify retain_graph=True on the first backward if you need to "
    "backward through the graph a second time"
)


class Node:
    """One recorded op: its backward, an edge per input, and the versions of the tensors backward reads."""

    __slots__ = ("edges", "backward", "op", "seq", "saved", "shape", "hooks", "retain")

    def __init__(self, edges, backward, op, saved, shape):
        self.edges = edges
        self.backward = backward
        self.op = op
        self.seq = next(_seq)
        self.saved = saved  # ((Version, value at record time, shape, dtype), ...)
        self.shape = shape  # the output's shape: every incoming gradient must have it
        self.hooks = None  # Tensor.register_hook on the output: grad -> grad
        self.retain = None  # weakref to the output tensor that asked for retain_grad()

    def name(self) -> str:
        return self.op

    def __repr__(self):
        return f"<{self.op} backward>"

    def apply(self, g, retain_graph):
        backward = self.backward
        if backward is None:
            raise RuntimeError(SECOND_BACKWARD.format(op=self.op))
        for ver, value, shape, dtype in self.saved:
            if ver.value != value:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: the {dtype} tensor of shape {tuple(shape)} that op {self.op!r} saved is at "
                    f"version {ver.value}; expected version {value} instead. Compute it out of place (or "
                    f"clone() it before the in-place write)"
                )
        grads = backward(g)
        if not retain_graph:
            self.backward = None
            self.saved = ()
        return grads


class SliceGrad:
    """A gradient that is zero outside one basic-index region of ``shape`` (the backward of ``x[i]``, split,
    chunk): the engine adds ``values`` into the input's accumulator in place instead of materializing zeros of
    the full shape for every slice and adding them up (a GPT block's q, k, v split made three zeroed copies of
    the (B, T, 3C) gradient and two full additions per layer)."""

    __slots__ = ("shape", "index", "values")

    def __init__(self, shape, index, values):
        self.shape, self.index, self.values = shape, index, values

    def dense(self):
        full = np.zeros(self.shape, dtype=self.values.dtype)
        full[self.index] = self.values
        return full


def _dense(g):
    return g.dense() if type(g) is SliceGrad else g


def _accumulate(prev, pg, key, owned):
    """prev + pg, in place when prev is an array the engine made (never one an op handed over: it may be saved)."""
    if type(prev) is SliceGrad:
        prev = prev.dense()
        owned.add(key)
    if key not in owned or (type(pg) is not SliceGrad and pg.dtype != prev.dtype):
        owned.add(key)
        if type(pg) is SliceGrad:
            prev = np.array(prev, dtype=np.result_type(prev, pg.values), copy=True)
            prev[pg.index] += pg.values
            return prev
        total = prev + pg
        return total if type(total) is np.ndarray else np.asarray(total)  # 0-d sums come back as NumPy scalars
    if type(pg) is SliceGrad:
        prev[pg.index] += pg.values
    else:
        np.add(prev, pg, out=prev)
    return prev


def saved_versions(tensors):
    """What a node keeps of the tensors its backward reads: version counter, value now, shape, dtype."""
    return tuple((t._ver, t._ver.value, t.data.shape, t.data.dtype) for t in tensors)


def edge_of(t):
    """The edge an op records for reading ``t``: its node, itself when it is a leaf, None without grad."""
    if not t.requires_grad:
        return None
    node = t._node
    if node is None:
        return t
    if t._base is not None and t._view_ver != t._ver.value:
        node = regenerate_view_node(t)
    return node


def view_backward(view_fn, base_shape):
    """Backward of a view: scatter the view's gradient into zeros of the base's shape."""

    def backward(g):
        full = np.zeros(base_shape, dtype=g.dtype)
        view_fn(full)[...] = g
        return (full,)

    return backward


def regenerate_view_node(t):
    """A view whose base was written in place (through another view or directly) reads the base's new value:
    point it at the base's current node (torch regenerates a view's grad_fn the same way)."""
    base = t._base
    node = None
    if base.requires_grad:
        node = Node((edge_of(base),), view_backward(t._view_fn, base.data.shape), "view", (), t.data.shape)
        t.requires_grad = True
    t._node = node
    t._view_ver = t._ver.value
    return node


# ----- the reverse pass ---------------------------------------------------------------------------------
def run_backward(root, grad, retain_graph=False):
    """Backpropagate ``grad`` from ``root``; then run the callbacks queued during it (or their on_error)."""
    with_queued_callbacks(lambda: _execute(root, grad, retain_graph))


def with_queued_callbacks(reverse_pass) -> None:
    """Run ``reverse_pass()``, then the callbacks queued during it, or, if it raised, their on_error with the
    error (the end-of-backward protocol; mpnn.capture's replayed backward keeps it through here too)."""
    try:
        reverse_pass()
    except BaseException as exc:
        for _, on_error in hooks.take_queued_callbacks():
            if on_error is not None:
                on_error(exc)
        raise
    for fn, _ in hooks.take_queued_callbacks():
        fn()


def _execute(root, grad, retain_graph):
    start = edge_of(root)
    if start is None:
        return
    if type(start) is not Node:
        accumulate_leaf(start, grad)
        return
    deps = {}
    stack = [start]
    seen = {id(start)}
    while stack:  # count the edges that lead into each reachable node and leaf
        node = stack.pop()
        for e in node.edges:
            if e is None:
                continue
            k = id(e)
            deps[k] = deps.get(k, 0) + 1
            if k not in seen:
                seen.add(k)
                if type(e) is Node:
                    stack.append(e)
    grads = {id(start): grad}
    owned = set()  # keys whose accumulated gradient is an array the engine made, so later adds go in place
    ready = [(-start.seq, start)]
    while ready:
        node = heapq.heappop(ready)[1]
        g = grads.pop(id(node), None)
        pgrads = None
        if g is not None:
            g = _dense(g)
            if node.hooks:
                g = _run_grad_hooks(node.hooks, g)
            if node.retain is not None:
                _retain(node.retain(), g)
            pgrads = node.apply(g, retain_graph)
        for i, e in enumerate(node.edges):
            if e is None:
                continue
            k = id(e)
            if pgrads is not None:
                pg = pgrads[i]
                if pg is not None:
                    expect = e.shape if type(e) is Node else e.data.shape
                    if pg.shape != expect:
                        raise OpError(
                            node.op, f"backward gave a gradient of shape {pg.shape} for an input of shape {expect}"
                        )
                    prev = grads.get(k)
                    grads[k] = pg if prev is None else _accumulate(prev, pg, k, owned)
            left = deps[k] - 1
            deps[k] = left
            if left == 0:
                if type(e) is Node:
                    heapq.heappush(ready, (-e.seq, e))
                else:
                    gl = grads.pop(k, None)
                    if gl is not None:
                        accumulate_leaf(e, _dense(gl))


def _run_grad_hooks(fns, g):
    from mpnn.core.tensor import Tensor

    for fn in fns:
        out = fn(Tensor._from_array(g))
        if out is not None:
            g = out.data if isinstance(out, Tensor) else np.asarray(out)
    return g


def _retain(t, g):
    if t is None:
        return
    if t.grad is None:
        t.grad = type(t)._from_array(np.array(g, dtype=t.data.dtype, copy=True))
    else:
        t.grad.data = t.grad.data + g


def accumulate_leaf(t, g):
    """Add ``g`` into leaf ``t``'s .grad (after its grad hooks), then run its post-accumulate hooks."""
    if t._grad_hooks:
        g = _run_grad_hooks(t._grad_hooks, g)
    data = t.data
    if g.shape != data.shape:
        raise OpError("backward", f"gradient of shape {g.shape} reached a leaf of shape {data.shape}")
    if t.grad is None:
        # Copy: an op's backward may hand the same array to several inputs.
        t.grad = type(t)._from_array(np.array(g, dtype=data.dtype, copy=True))
    else:
        np.add(t.grad.data, g, out=t.grad.data, casting="unsafe")
    if t._hooks:
        for hook in tuple(t._hooks):
            hook(t)
