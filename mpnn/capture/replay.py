"""Replay forms: for each op the recorder can capture, how to run it again over the same arrays.

A builder gets one recorded op (``OpRecord``: its result tensor, parents, eager backward closure and the op
function's local variables at the moment it called ``make_result``) and returns ``(forward, backward)``:

- ``forward()`` recomputes the result *in place*, into the array the eager call produced (that array is the
  op's buffer in the arena from then on), from the parents' arrays, which are buffers too; None for a view
  (reshape of a contiguous array), whose array follows its base by itself.
- ``backward(g)`` returns one gradient per parent (or None), as the eager closure does.

Bit-exactness is by construction: each form calls the same NumPy ufuncs or Numba kernels with the same operands
as the eager op, only with ``out=``. Where the eager backward closure reads nothing but parent and result arrays
(which the forward replay refreshes in place), the form reuses that closure as it is. Where the eager code keeps
temporaries from its forward (cross_entropy's softmax, a conv algorithm's state), the form recomputes them in its
forward and its backward reads them from there.

A builder raises ``Unsupported`` for a case it does not cover (the op then runs eagerly, with a warning naming
it). Ops without a builder are not captured at all.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import time

import numpy as np

from mpnn.core import conv_kernels as CK
from mpnn.core.conv import SETTINGS as conv_settings
from mpnn.core.conv_im2col import Im2colGemm
from mpnn.core.conv_im2col import _plan as _im2col_tiles
from mpnn.core.linalg import _mm
from mpnn.core.loss import _check_labels, _log_softmax_rows
from mpnn.core.random import generator as random_generator

from .kernels import (
    bias_add,
    bias_relu,
    bias_relu_add,
    col2im_channel_major,
    col2im_channel_major_s2,
    col2im_rows,
    column_sum,
    cross_entropy_forward,
    im2col_channel_major,
    im2col_channel_major_s2,
    im2col_rows,
    matmul_abt,
    pack_weight_bias,
    relu_backward,
    relu_backward_colsum,
    relu_forward,
    relu_in_place,
    scale_into,
    swap_relu,
    swap_relu_backward,
)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class Unsupported(Exception):
    """This call of the op has no replay form (the message says which case)."""


class OpRecord:
    """One op as the recorder saw it."""

    __slots__ = (
        "op",
        "out",
        "parents",
        "backward",
        "locals",
        "needs",
        "grad_on",
        "version",
        "parent_versions",
        "forward",
        "replay_bwd",
        "fuse",
    )

    def __init__(self, op, out, parents, backward, local_vars, needs, grad_on, fuse=True):
        self.op = op
        self.out = out
        self.parents = parents
        self.backward = backward
        self.locals = local_vars
        self.needs = needs  # per parent: did it require grad when the op ran (an edge on the tape)
        self.grad_on = grad_on
        self.version = out._ver.value
        self.parent_versions = tuple(p._ver.value for p in parents)
        self.forward = None
        self.replay_bwd = None
        self.fuse = fuse  # may reorder float arithmetic (results within ~1e-7 relative of eager, not bit for bit)


REPLAY: dict = {}


def register(*names):
    def deco(fn):
        for n in names:
            REPLAY[n] = fn
        return fn

    return deco


def _same_result(o, expect_dtype, expect_shape):
    if o.dtype != expect_dtype or o.shape != expect_shape or not o.flags.c_contiguous or not o.flags.writeable:
        raise Unsupported(f"result {o.dtype} {o.shape} cannot be written in place")


# ----- elementwise -----------------------------------------------------------------------------------------
def _binary(ufunc):
    def build(r):
        a, b = r.parents
        ad, bd, o = a.data, b.data, r.out.data
        _same_result(o, o.dtype, np.broadcast_shapes(ad.shape, bd.shape))

        def forward():
            ufunc(ad, bd, out=o)

        forward.binary_parts = (ufunc, ad, bd, o)
        return forward, r.backward

    return build


register("add")(_binary(np.add))
register("sub")(_binary(np.subtract))
register("mul")(_binary(np.multiply))
register("div")(_binary(np.true_divide))


def _unary(ufunc):
    def build(r):
        (a,) = r.parents
        ad, o = a.data, r.out.data
        _same_result(o, o.dtype, ad.shape)

        def forward():
            ufunc(ad, out=o)

        return forward, r.backward

    return build


register("neg")(_unary(np.negative))
register("exp")(_unary(np.exp))
register("log")(_unary(np.log))
register("tanh")(_unary(np.tanh))
register("sqrt")(_unary(np.sqrt))


@register("relu")
def _relu(r):
    (a,) = r.parents
    ad, o = a.data, r.out.data
    _same_result(o, o.dtype, ad.shape)

    def forward():
        np.maximum(ad, 0, out=o)

    if o.dtype not in _FLOATS or not o.flags.c_contiguous:
        return forward, r.backward  # the eager closure reads the result (an arena buffer) only
    if ad.dtype == o.dtype and ad.flags.c_contiguous:
        flat_a, flat_out = ad.reshape(-1), o.reshape(-1)

        def forward():  # np.maximum(ad, 0)'s bits in one Numba pass (see kernels.relu_forward)
            relu_forward(flat_a, flat_out)

        forward.relu_parts = (ad, o)
    dx = np.empty_like(o)
    flat_o, flat_dx = o.reshape(-1), dx.reshape(-1)

    def backward(g):  # one Numba pass into a buffer of its own (read-only downstream, rewritten next step)
        if g.dtype != o.dtype or not g.flags.c_contiguous:
            return r.backward(g)
        relu_backward(g.reshape(-1), flat_o, flat_dx)
        return (dx,)

    return forward, backward


@register("sigmoid")
def _sigmoid(r):
    (a,) = r.parents
    ad, o = a.data, r.out.data
    _same_result(o, ad.dtype, ad.shape)

    def forward():  # eager's expression, then into the buffer
        e = np.exp(-np.abs(ad))
        np.copyto(o, np.where(ad >= 0, 1 / (1 + e), e / (1 + e)).astype(ad.dtype, copy=False))

    return forward, r.backward


# ----- movement ----------------------------------------------------------------------------------------------
@register("reshape")
def _reshape(r):
    (a,) = r.parents
    o = r.out.data
    if np.shares_memory(o, a.data):
        return None, r.backward  # a view of its input's buffer: nothing to do
    shape = o.shape
    ad = a.data

    def forward():
        np.copyto(o, ad.reshape(shape))

    return forward, r.backward


@register("clone")
def _clone(r):
    """contiguous() of a strided tensor, clone(): eager's C-order copy, into the result's buffer."""
    (a,) = r.parents
    ad, o = a.data, r.out.data
    _same_result(o, ad.dtype, ad.shape)

    def forward():
        np.copyto(o, ad)

    return forward, r.backward  # passes g through


@register("to")
def _to(r):
    """A float cast (``mask.float()``, ``.to(float64)``): eager's astype, into the result's buffer (the same unsafe
    cast); the eager closure casts g back."""
    (a,) = r.parents
    ad, o = a.data, r.out.data
    _same_result(o, o.dtype, ad.shape)

    def forward():
        np.copyto(o, ad, casting="unsafe")

    return forward, r.backward


@register("where")
def _where(r):
    """np.where's selection into the result's buffer: b everywhere, then a where the condition holds (no
    arithmetic: the same values). The condition is the array eager read: a comparison's result (replayed into it
    in place) or a constant. The eager closure reads the condition and g."""
    a, b = r.parents
    cond, ad, bd, o = r.locals["cond"], a.data, b.data, r.out.data
    _same_result(o, o.dtype, np.broadcast_shapes(cond.shape, ad.shape, bd.shape))
    if ad.dtype != o.dtype or bd.dtype != o.dtype:
        raise Unsupported(f"where of {ad.dtype} and {bd.dtype} into {o.dtype}")

    def forward():
        np.copyto(o, bd)
        np.copyto(o, ad, where=cond)

    return forward, r.backward


@register("cat")
def _cat(r):
    """np.concatenate of the parents' arrays into the result's buffer; the eager closure splits g."""
    loc = r.locals
    arrays = [t.data for t in r.parents]
    o, dim = r.out.data, loc["dim"]
    _same_result(o, o.dtype, o.shape)
    if any(x.dtype != o.dtype for x in arrays):
        raise Unsupported("cat of mixed dtypes")

    def forward():
        np.concatenate(arrays, axis=dim, out=o)

    return forward, r.backward


@register("matmul")
def _matmul(r):
    """``a @ b`` into the result's buffer (np.matmul with out=: the same BLAS calls); the eager closure reads the
    operands' arrays, refreshed in place."""
    a, b = r.parents
    ad, bd, o = a.data, b.data, r.out.data
    if type(o) is not np.ndarray:
        raise Unsupported("matmul of two vectors (a scalar result)")
    _same_result(o, ad.dtype, o.shape)

    def forward():
        np.matmul(ad, bd, out=o)

    return forward, r.backward


# ----- reductions --------------------------------------------------------------------------------------------
@register("mean", "sum")
def _reduce(r):
    (a,) = r.parents
    ad, o = a.data, r.out.data
    loc = r.locals
    axes, keepdim = loc["axes"], loc["keepdim"]
    if ad.dtype.kind != "f" or o.dtype != ad.dtype or ad.ndim == 0:
        raise Unsupported(f"{r.op} of a {ad.dtype} tensor of {ad.ndim} dims")
    fn = np.mean if r.op == "mean" else np.sum

    def forward():
        np.copyto(o, fn(ad, axis=axes, keepdims=keepdim))

    return forward, r.backward


# ----- linear ------------------------------------------------------------------------------------------------
_THREAD = threading.local()


def _gemm_work():
    """This thread's GEMM packing buffers (linalg._mm's work dict), kept from step to step and shared by every linear
    form that runs in it: the GEMMs run one after another, so one set serves them all and stays in cache. With a set
    per op the replayed GPT step ran 1.06-1.14x eager's time (eager's fresh buffers reuse freed, cached memory)."""
    work = getattr(_THREAD, "gemm_work", None)
    if work is None:
        work = _THREAD.gemm_work = {}
    return work


@register("linear")
def _linear(r):
    x, weight = r.parents[0], r.parents[1]
    bias = r.parents[2] if len(r.parents) == 3 else None
    xd, wd, o = x.data, weight.data, r.out.data
    x2 = xd.reshape(-1, xd.shape[-1])
    if not np.shares_memory(x2, xd):
        raise Unsupported("linear of a non-contiguous input")
    o2 = o.reshape(-1, wd.shape[0])
    if not (o.flags.c_contiguous and np.shares_memory(o2, o)):
        raise Unsupported("linear result not contiguous")
    wt = wd.T
    bd = None if bias is None else bias.data

    def forward():
        _mm(x2, wt, out=o2, work=_gemm_work())
        if bd is not None:
            np.add(o2, bd, out=o2)

    if bd is not None and o2.dtype in _FLOATS and bd.dtype == o2.dtype and bd.flags.c_contiguous:

        def forward():  # the bias add in one Numba pass (kernels.bias_add: np.add's additions)
            _mm(x2, wt, out=o2, work=_gemm_work())
            bias_add(o2, bd)

        forward.linear_parts = (x2, wt, o2, bd)
    if o2.dtype not in _FLOATS or wd.dtype != o2.dtype or not (x2.flags.c_contiguous and wd.flags.c_contiguous):
        return forward, r.backward  # reads x2 and the weight: a buffer and a parameter
    # eager's closure, into buffers of their own (read-only downstream, rewritten next step): the same _mm calls
    # and, for the bias, the same row-by-row float sum as NumPy's g2.sum(axis=0) (kernels.column_sum)
    gx2 = np.empty(x2.shape, o2.dtype)
    gx = gx2.reshape(xd.shape)
    # the weight and bias gradients' buffers, read at each call: the program may hand one to the leaf as its .grad
    # (no copy) and put a fresh array here when that .grad is still held at the next backward (see lendable)
    wbuf = [np.empty(wd.shape, o2.dtype)]
    bbuf = None if bias is None else [np.empty(bd.shape, o2.dtype)]
    oshape = o.shape

    relu_act = [None]  # (fuse) the ReLU output whose mask this backward applies first, as o2's 2-d shape
    masked = np.empty(o2.shape, o2.dtype)

    def backward(g):
        act = relu_act[0]
        if g.dtype != o2.dtype or g.shape != oshape or not g.flags.c_contiguous or g.size == 0:
            if act is not None:  # the ReLU's backward, as its eager closure computes it
                g = g * (act.reshape(oshape) > 0)
            return r.backward(g)
        g2 = g.reshape(o2.shape)
        rb = None
        if act is not None:  # the ReLU's mask, with the bias gradient's column sums in the same pass
            if bias is not None and bias.requires_grad:
                rb = bbuf[0]
                relu_backward_colsum(g2, act, masked, rb)
            else:
                relu_backward(g2.reshape(-1), act.reshape(-1), masked.reshape(-1))
            g2 = masked
        rx = rw = None
        if x.requires_grad:
            _mm(g2, wd, out=gx2, work=_gemm_work())
            rx = gx
        if weight.requires_grad:
            rw = _mm(g2.T, x2, out=wbuf[0], work=_gemm_work())
        if bias is None:
            return (rx, rw)
        if bias.requires_grad and rb is None:
            rb = bbuf[0]
            column_sum(g2, rb)
        return (rx, rw, rb)

    def mask_with(act):
        """(fuse) The ReLU after this layer passes its gradient through; this backward applies its mask."""
        relu_act[0] = act.reshape(o2.shape)

    backward.lendable = {1: wbuf} if bias is None else {1: wbuf, 2: bbuf}
    backward.mask_with = mask_with
    return forward, backward


# ----- convolution -------------------------------------------------------------------------------------------
@register("conv1d", "conv2d")
def _conv(r):
    loc = r.locals
    problem, algorithm, settings = loc["problem"], loc["algorithm"], conv_settings
    input, weight = r.parents[0], r.parents[1]
    bias = r.parents[2] if len(r.parents) == 3 else None
    x4 = problem[0]
    if not np.shares_memory(x4, input.data):
        raise Unsupported(f"{r.op} of a non-contiguous input")
    if not np.shares_memory(problem[1], weight.data) or (bias is not None and problem[2] is not bias.data):
        raise Unsupported(f"{r.op}: weight or bias is a copy")
    n, out_ch, oh, ow = x4.shape[0], weight.data.shape[0], loc["oh"], loc["ow"]
    o4 = r.out.data.reshape(n, out_ch, oh, ow)
    if not np.shares_memory(o4, r.out.data):
        raise Unsupported(f"{r.op} result not contiguous")
    xshape, wshape = input.data.shape, weight.data.shape
    need_b = bias is not None and bias.requires_grad
    has_bias = bias is not None
    if isinstance(algorithm, Im2colGemm):
        plan = _im2col_plan(problem, settings)
        if len(plan) == 1 and o4.flags.c_contiguous:
            return _conv_im2col(r, problem, plan[0], o4, input, weight, bias, need_b)
    state = [None]

    def forward():
        state[0] = algorithm.forward(problem, o4, settings)

    def backward(g):  # the eager closure's body, over the state the forward replay left
        g4 = np.ascontiguousarray(g).reshape(n, out_ch, oh, ow)
        dx, dw, db = algorithm.backward(state[0], g4, input.requires_grad, weight.requires_grad, need_b)
        dx = None if dx is None else dx.reshape(xshape)
        dw = None if dw is None else dw.reshape(wshape)
        return (dx, dw) if not has_bias else (dx, dw, db)

    return forward, backward


# ----- losses ------------------------------------------------------------------------------------------------
@register("cross_entropy")
def _cross_entropy(r):
    loc = r.locals
    x = loc["x"]
    if "rows" not in loc:
        raise Unsupported("cross_entropy with probability targets")
    if x.ndim != 2 or loc["w"] is not None or loc["eps"] or loc["reduction"] not in ("mean", "sum"):
        raise Unsupported("cross_entropy other than (N, C) logits, integer labels, no weight or smoothing, mean/sum")
    rows, labels, c, ignore_index = loc["rows"], loc["labels"], loc["c"], loc["ignore_index"]
    if rows is not x or labels.ndim != 1:
        raise Unsupported("cross_entropy: labels not a 1-d array")
    mean = loc["reduction"] == "mean"
    o = r.out.data
    _same_result(o, x.dtype, ())
    dtype = x.dtype
    if r.fuse and dtype in _FLOATS and rows.flags.c_contiguous and labels.dtype.kind in "iu":
        return _cross_entropy_fused(r, rows, labels, c, ignore_index, mean, o)
    n = len(labels)
    arange = np.arange(n)
    st = {}

    def forward():  # eager's arithmetic, line for line (eps == 0, no class weights)
        valid = _check_labels("cross_entropy", labels, c, ignore_index)
        e, s, logp = _log_softmax_rows(rows)
        safe = np.where(valid, labels, 0)
        wrow = np.ones(n, dtype=dtype)
        wrow = wrow * valid
        picked = logp[arange, safe]
        loss = -(1 - 0.0) * wrow * picked
        denom = wrow.sum() if mean else 1
        np.copyto(o, np.asarray(loss.sum() / denom, dtype=dtype))
        st["e"], st["s"], st["safe"], st["wrow"], st["denom"] = e, s, safe, wrow, denom

    def backward(g):
        p = st["e"] / st["s"]
        q = np.zeros_like(rows)
        q[arange, st["safe"]] = (1 - 0.0) * st["wrow"]
        grow = p * q.sum(axis=1, keepdims=True) - q
        gscale = g / st["denom"]
        grow = (grow * gscale).astype(dtype, copy=False)
        return (np.ascontiguousarray(grow),)

    return forward, backward


def _cross_entropy_fused(r, rows, labels, c, ignore_index, mean, o):
    """One Numba pass per row for the loss and the gradient of the summed loss (kernels.cross_entropy_forward);
    backward scales it by g / count (mean) or g (sum) into a buffer of its own."""
    dtype = rows.dtype
    grad = np.empty_like(rows)
    dx = np.empty_like(rows)
    flat_grad, flat_dx = grad.reshape(-1), dx.reshape(-1)
    st = [1]

    def forward():
        total, count, bad = cross_entropy_forward(rows, labels, ignore_index, grad)
        if bad >= 0:
            _check_labels("cross_entropy", labels, c, ignore_index)  # raises, naming the label
        if mean:
            o[()] = total / count if count else np.nan
            st[0] = count
        else:
            o[()] = total

    def backward(g):
        if mean:  # every label ignored: eager's g / 0 makes the gradient NaN; so does this
            scale = float(g) / st[0] if st[0] else float("nan")
        else:
            scale = float(g)
        scale_into(flat_grad, dtype.type(scale), flat_dx)
        return (dx,)

    return forward, backward


def fuse(rec, keep=frozenset()):
    """Fuse pairs of ops that ran one right after the other, where no arithmetic is reordered (so eager's bits):
    a linear layer's bias add and the ReLU after it (kernels.bias_relu); a one-tile conv's transposing epilogue and
    the ReLU after it (kernels.swap_relu), and in backward the ReLU's mask with the conv's transposing copy of the
    gradient (kernels.swap_relu_backward; the ReLU then passes its gradient through, which is exact only when the
    ReLU is the conv result's one consumer).

    A conv -> ReLU -> conv chain of 1-d one-tile convs (the MNIST-1D CNN's) goes further when the first conv's
    result and the ReLU's have no reader but the next op, are not among keep (ids of the tensors the step returns)
    and are not stored by the step: the activation stays channel-major (O, N, L), as the first GEMM leaves it, the
    ReLU applied in place;
    the next conv gathers its columns from there and sends its input gradient back in that layout, so neither
    transposing copy runs (MNIST-1D CNN, two of its three convs). The conv's and the ReLU's own (N, O, L) arrays
    are then not written: nothing reads them.

    Returns {index in rec.ops: forward to run instead, None: nothing}; the backward forms it changes are changed on
    the records."""
    ops = rec.ops
    position = {id(ev[1]): n for n, ev in enumerate(rec.events) if ev[0] == "op"}
    consumers = {}
    for r in ops:
        for p in r.parents:
            consumers[id(p)] = consumers.get(id(p), 0) + 1
    roots = {id(ev[1]) for ev in rec.events if ev[0] == "backward"}
    out = {}
    for k in range(len(ops) - 1):
        a, b = ops[k], ops[k + 1]
        if k in out or b.parents[0] is not a.out or position[id(b)] != position[id(a)] + 1:
            continue
        rel = getattr(b.forward, "relu_parts", None)
        if rel is None or rel[0] is not a.out.data:
            continue
        lin = getattr(a.forward, "linear_parts", None)
        if lin is not None:
            x2, wt, o2, bd = lin
            dst = rel[1]
            if dst.dtype != o2.dtype or dst.size != o2.size:
                continue
            dst2 = dst.reshape(o2.shape)

            def forward(x2=x2, wt=wt, o2=o2, bd=bd, dst2=dst2):
                _mm(x2, wt, out=o2, work=_gemm_work())
                bias_relu(o2, bd, dst2)

            add = _residual_add(ops, k + 2, b, dst, position)
            if add is not None:  # and a residual add of the ReLU's output right after (kernels.bias_relu_add)
                other, total, relu_first = add

                def forward(x2=x2, wt=wt, o2=o2, bd=bd, dst2=dst2, other=other, total=total, first=relu_first):
                    _mm(x2, wt, out=o2, work=_gemm_work())
                    bias_relu_add(o2, bd, dst2, other, total, first)

                out[k + 2] = None
            out[k] = forward
            out[k + 1] = None
            mask = getattr(a.replay_bwd, "mask_with", None)
            if mask is not None and consumers.get(id(a.out)) == 1 and id(a.out) not in roots and b.needs[0]:
                mask(dst)  # the ReLU's backward goes into the linear layer's (kernels.relu_backward_colsum)
                b.replay_bwd = _pass_through
            continue
        conv = getattr(a.forward, "fuse_relu", None)
        if conv is None or rel[1].dtype != a.out.data.dtype:
            continue
        mask = getattr(a.replay_bwd, "mask_with", None)
        masked = mask is not None and consumers.get(id(a.out)) == 1 and id(a.out) not in roots and b.needs[0]
        c = _channel_major_consumer(ops, k, consumers, roots, keep, masked)
        if c is not None:
            forward, act = a.forward.relu_channel_major()  # (the forward replaces conv + ReLU, as fuse_relu's does)
            out[k] = forward
            out[k + 1] = None
            c.forward.take_channel_major(act)
            if masked:
                a.replay_bwd.mask_with_channel_major(act)
                b.replay_bwd = _pass_through
            continue
        out[k] = conv(rel[1])
        out[k + 1] = None
        if masked:
            mask(rel[1])
            b.replay_bwd = _pass_through
    return out


_CHAIN_REFS = (5, 7)


def _channel_major_consumer(ops, k, consumers, roots, keep, masked):
    """The conv that reads ops[k + 1] (a ReLU of the conv ops[k]) when the three may hand the activation over
    channel-major (see fuse), else None. masked: the ReLU's backward goes into the first conv's (a gradient
    flows); then the second conv's backward must send it channel-major too."""
    a, b = ops[k], ops[k + 1]
    produce = getattr(a.forward, "relu_channel_major", None)
    if produce is None or not all(
        consumers.get(id(t)) == 1 and id(t) not in roots and id(t) not in keep for t in (a.out, b.out)
    ):
        return None
    if b.needs[0] and not (masked and hasattr(a.replay_bwd, "mask_with_channel_major")):
        return None
    for c in ops[k + 2 :]:
        if any(p is b.out for p in c.parents):
            break
    else:
        return None
    if c.parents[0] is not b.out or getattr(c.forward, "take_channel_major", None) is None:
        return None
    # a result stored by the step (a module attribute, a list, a hook's closure) is read after replay too: its
    # array must be refreshed, so no hand-off. The capture's own references (the op records, the forms' and the
    # autograd nodes' closures; getrefcount's argument) are 5 for the conv's result and 7 for the ReLU's, fewer
    # without gradients (tests/test_compile_replay_speed.py checks both ways)
    if sys.getrefcount(a.out) > _CHAIN_REFS[0] or sys.getrefcount(b.out) > _CHAIN_REFS[1]:
        return None
    act_shape = (a.out.data.shape[1], a.out.data.shape[0], a.out.data.shape[-1])
    x = b.out.data
    if x.ndim != 3 or (x.shape[1], x.shape[0], x.shape[2]) != act_shape or x.dtype != a.out.data.dtype:
        return None
    if c.needs[0] != b.needs[0]:
        return None
    return c


def _residual_add(ops, i, relu, act, position):
    """(the other operand, the sum's array, whether the ReLU's output is the first operand) as 2-d arrays of the
    linear layer's shape when ops[i] is an add of the ReLU's output and another array of its shape and dtype that
    ran right after the ReLU (a residual block's h + relu(linear(h))), else None."""
    if i >= len(ops):
        return None
    c = ops[i]
    parts = getattr(c.forward, "binary_parts", None)
    if parts is None or parts[0] is not np.add or position[id(c)] != position[id(relu)] + 1:
        return None
    _, ad, bd, o = parts
    if ad is act and c.parents[0] is relu.out:
        other, first = bd, True
    elif bd is act and c.parents[1] is relu.out:
        other, first = ad, False
    else:
        return None
    if other is act or not all(
        x.shape == act.shape and x.dtype == act.dtype and x.flags.c_contiguous for x in (other, o)
    ):
        return None
    return other.reshape(-1, act.shape[-1]), o.reshape(-1, act.shape[-1]), first


def _pass_through(g):
    return (g,)


def _pick(a, b, trials=4):
    """A call of a() or b(), two kernels that compute the same values (so either gives eager's bits): the first
    2 * (trials + 1) calls alternate between them and time each (a first call of each left out), after that the
    one with the shorter best time runs. For kernels whose speed turns on shapes and strides in ways a rule would
    miss (kernels.im2col_rows)."""
    times = ([], [])
    state = [None, 0]

    def call():
        fn = state[0]
        if fn is not None:
            return fn()
        i = state[1] % 2
        state[1] += 1
        f = b if i else a
        t0 = time.perf_counter()
        f()
        times[i].append(time.perf_counter() - t0)
        if state[1] >= 2 * (trials + 1):
            state[0] = a if min(times[0][1:]) <= min(times[1][1:]) else b

    call.times = times
    call.choice = state
    return call


# ----- convolution through im2col, one tile ---------------------------------------------------------------------
def _im2col_plan(problem, settings):
    """Im2colGemm.forward's tiling of this conv (the same arithmetic, so the same tiles)."""
    x4, w4, geom = problem[0], problem[1], problem[3]
    per_position = (x4.shape[1] * w4.shape[2] * w4.shape[3] + geom[8]) * x4.dtype.itemsize
    budget = max(settings.tile_bytes, 2 * w4.size * x4.dtype.itemsize)
    return _im2col_tiles(x4.shape[0], per_position, problem[4] * problem[5], budget)


def _conv_im2col(r, problem, tile, o4, input, weight, bias, need_b):
    """Im2colGemm's forward and backward for a one-tile conv (the MNIST-1D layers), over buffers planned once: the
    weight with its bias column, the columns (kept for backward, as Im2colGemm keeps them), the GEMM result, the
    output gradient's transposed copy, the column gradients, dx, dW. The same kernels on the same operands as
    conv_im2col._forward/_backward, so the same bits; nothing allocated per step (eager: ~0.5 MB per conv)."""
    x4, w4, b, geom, oh, ow, weight_grad = problem
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geom
    dtype = x4.dtype
    n0, n1, p0, p1 = tile
    nb, t = n1 - n0, p1 - p0
    out_ch = w4.shape[0]
    og = out_ch // groups
    taps = w4.shape[1] * kh * kw
    rows = taps + (0 if b is None else 1)
    wg = np.empty((groups, og, rows), dtype)  # _grouped_weight's concatenation, refreshed each step
    w3 = w4.reshape(groups, og, taps)
    b2 = None if b is None else b.reshape(groups, og)
    cols = np.empty((groups * rows, nb, t), dtype)
    cols3 = cols.reshape(groups, rows, nb * t)
    out3 = o4.reshape(o4.shape[0], out_ch, oh * ow)
    if nb == 1:
        gemm_out, res = out3[n0, :, p0:p1].reshape(groups, og, t), None
    else:
        res = np.empty((groups, og, nb * t), dtype)
        gemm_out = res
    x_tile = x4[n0:n1]
    # a 1-d conv over whole rows: the gather and scatter may go through kernels.im2col_rows / col2im_rows (the same
    # values and sums; faster on short rows, slower where rows lie 4 KiB apart): the first calls time both
    rows = (
        dtype in _FLOATS
        and kh == 1
        and x4.shape[2] == 1
        and oh == 1
        and ph == 0
        and p0 == 0
        and t == ow
        and (n0, n1) == (0, x4.shape[0])
        and x4.flags.c_contiguous
    )
    x3 = x4.reshape(x4.shape[0], x4.shape[1], x4.shape[3]) if rows else None

    def gather_core():
        CK.im2col(x_tile, kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow, cols)

    gather = _pick(gather_core, lambda: im2col_rows(x3, kw, sw, pw, dw, groups, cols)) if rows else gather_core
    dx_channel_major = [None]  # (C, N, L): the input gradient, when the input arrives channel-major (see fuse)
    phases = [None]  # (2, N * T) scratch of the stride-2 channel-major kernels, when they apply

    def take_channel_major(src):
        """fuse: this conv's input arrives channel-major, src (C, N, L) (the GEMM result of the conv before it,
        ReLU applied), instead of in x4: the columns come from there (kernels.im2col_channel_major: the same
        values), and the input gradient goes back channel-major too (kernels.col2im_channel_major); by phases
        for stride 2 over rows of twice the output length (kernels.*_channel_major_s2, the same values and sums)."""
        nonlocal gather
        if sw == 2 and src.shape[2] in (2 * t, 2 * t - 1):
            phases[0] = np.empty((2, nb * t), dtype)
            gather = functools.partial(im2col_channel_major_s2, src, kw, pw, dw, groups, cols, phases[0])
        else:
            gather = functools.partial(im2col_channel_major, src, kw, sw, pw, dw, groups, cols)
        if need_x0:
            dx_channel_major[0] = np.empty(src.shape, dtype)

    def pack():
        """_grouped_weight's concatenation into wg: the weight, then the bias column."""
        if b2 is None:
            np.copyto(wg, w3)
        elif packed_by_kernel:
            pack_weight_bias(w3, b2, wg)
        else:
            wg[:, :, :taps] = w3
            wg[:, :, taps] = b2

    packed_by_kernel = b2 is not None and dtype in _FLOATS and b2.dtype == w3.dtype == dtype and w3.flags.c_contiguous

    def forward():
        pack()
        gather()
        np.matmul(wg, cols3, out=gemm_out)
        if res is not None:
            CK.swap_leading_axes(res.reshape(out_ch, nb, t), out3[n0:n1])

    if res is not None and dtype in _FLOATS:

        def fuse_relu(act):
            """This conv's forward with the ReLU that follows writing act in the same pass (see fuse)."""
            act3 = act.reshape(out3.shape)[n0:n1]
            res3, dst = res.reshape(out_ch, nb, t), out3[n0:n1]

            def forward_relu():
                forward_gemm()
                swap_relu(res3, dst, act3)

            return forward_relu

        def forward_gemm():
            pack()
            gather()
            np.matmul(wg, cols3, out=gemm_out)

        def relu_channel_major():
            """(forward, act): this conv's forward with the ReLU after it applied in place to the GEMM result,
            which stays channel-major, act (O, N, T), for the next conv to read (see fuse); the conv's and the
            ReLU's (N, O, T) arrays are not written."""
            flat = res.reshape(-1)

            def forward_relu_channel_major():
                forward_gemm()
                relu_in_place(flat)  # np.maximum(res, 0)'s bits

            return forward_relu_channel_major, res.reshape(out_ch, nb, t)

        forward.fuse_relu = fuse_relu
        if (n0, n1) == (0, x4.shape[0]) and oh == 1 and t == ow:
            forward.relu_channel_major = relu_channel_major
    if rows:
        forward.take_channel_major = take_channel_major

    # backward, for the flags the capture saw (others: the algorithm's own backward over the same state)
    need_x0, need_w0 = bool(input.requires_grad), bool(weight.requires_grad)
    if not weight_grad and need_w0:  # forward kept no columns: Im2colGemm recomputes them; so do we, there
        need_w0 = None
    rows_b = taps + (1 if need_w0 and need_b else 0)
    dx = np.empty(x4.shape, dtype) if need_x0 else None
    dx_tile = None if dx is None else dx[n0:n1]
    dwo = np.empty((groups, og, rows_b), dtype) if need_w0 else None
    dw_out = None
    if need_w0:
        dw_out = dwo.reshape(w4.shape) if rows_b == taps else np.empty(w4.shape, dtype)
    wt = w3.transpose(0, 2, 1)
    gc_buf = None if nb == 1 else np.empty((out_ch, nb, t), dtype)
    dcols = np.empty((groups, taps, nb * t), dtype) if need_x0 else None
    cols_w = cols.reshape(groups, -1, nb * t)[:, :rows_b]
    n, xshape, wshape = x4.shape[0], input.data.shape, weight.data.shape
    state = (x4, w4, geom, ow, (tile,), cols if weight_grad else None)
    has_bias = bias is not None
    generic = Im2colGemm()
    # fuse=True: the weight gradient's GEMM (og x K) @ (K x rows) through kernels.matmul_abt where OpenBLAS packs
    # such small-output, long-K products poorly (not NumPy's bits: reassociated sums). Rows >= 8 (a tile's width)
    # and outputs up to 32k entries: measured (25 x 76, K 1000) 80 -> 41 us, (16 x 145, K 4096) 534 -> 213,
    # (128 x 128, K 256) 97 -> 92; at (25 x 6, K 1900) it lost, 7.4 -> 9.3.
    abt = bool(
        r.fuse
        and need_w0
        and dtype in _FLOATS
        and rows_b >= 8
        and og * rows_b <= 32768
        and cols_w[0].flags.c_contiguous
    )

    relu_act = [None]  # the ReLU output whose mask this backward applies (fuse), as (N, O, L)
    act_channel_major = [None]  # or that output channel-major (O, N, L), the gradient arriving so too (see fuse)
    fast = [None]  # with a ReLU's mask: every view the usual case reads, made once (backward's Python, not its work)

    def mask_with(act):
        a3 = relu_act[0] = act.reshape(n, out_ch, oh * ow)
        gc = gc_buf.reshape(groups, og, nb * t)
        gb = None
        if need_w0 and need_b:
            gb = dwo[:, :, taps].reshape(out_ch)
            if not np.shares_memory(gb, dwo):  # a copy (grouped): made each call by the general path
                return
        if need_b and not need_w0:
            return
        fast[0] = (
            a3 if (n0, n1) == (0, n) else a3[n0:n1],
            (n0, n1) == (0, n),
            gc,
            tuple((gc[gi], cols_w[gi], dwo[gi]) for gi in range(groups)) if need_w0 and abt else None,
            cols_w.transpose(0, 2, 1),
            None if dcols is None else dcols.reshape(groups * taps, nb, t),
            (dw_out.reshape(groups, og, taps), dwo[:, :, :taps]) if need_w0 and rows_b != taps else None,
            None if dx is None else dx.reshape(xshape),
            None if dw_out is None else dw_out.reshape(wshape),
            gb,
        )

    def mask_with_channel_major(act):
        """fuse: the ReLU after this conv kept its output channel-major, act (O, N, L) (relu_channel_major), and
        the gradient arrives in that layout: the mask is then one elementwise pass (kernels.relu_backward, the
        same multiply by 1 or 0), no transposing copy."""
        mask_with(act)
        relu_act[0] = None
        act_channel_major[0] = act

    def backward_fast(g, f):
        """The usual case's work, as the general path below does it, over the views of mask_with."""
        a_tile, whole, gc, groups_abt, cols_wt, dcols3, dw_copy, gx, gw, gb = f
        if act_channel_major[0] is not None:
            relu_backward(g.reshape(-1), a_tile.reshape(-1), gc_buf.reshape(-1))
        else:
            g3 = g.reshape(n, out_ch, oh * ow)
            swap_relu_backward(g3 if whole else g3[n0:n1], a_tile, gc_buf)
        if need_w0:
            if groups_abt is not None:
                for gg, cw, dw_g in groups_abt:
                    matmul_abt(gg, cw, dw_g)
            else:
                np.matmul(gc, cols_wt, out=dwo)
        if need_x0:
            np.matmul(wt, gc, out=dcols)
            gxc = dx_channel_major[0]
            if gxc is not None:
                if phases[0] is not None:  # writes every entry (and zeroes dcols's unused ones, scratch)
                    col2im_channel_major_s2(dcols3, kw, pw, dw, groups, gxc, phases[0])
                else:
                    gxc.fill(0)
                    col2im_channel_major(dcols3, kw, sw, pw, dw, groups, gxc)
                gx = gxc
            else:
                dx.fill(0)
                scatter()
        if dw_copy is not None:  # the weight's part of the GEMM result, into the buffer lent as its .grad
            gw = wbuf[0]
            np.copyto(gw.reshape(groups, og, taps), dw_copy[1])
        if gb is not None:  # the bias column (strided in the GEMM result), likewise
            np.copyto(bbuf[0], gb)
            gb = bbuf[0]
        return (gx, gw) if not has_bias else (gx, gw, gb)

    gsize = n * out_ch * oh * ow
    scatter = None
    if dcols is not None:
        dcols_rows = dcols.reshape(groups * taps, nb, t)

        def scatter_core():
            CK.col2im(dcols_rows, kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow, dx_tile)

        scatter = scatter_core
        if rows:
            dx3 = dx.reshape(x3.shape)
            scatter = _pick(scatter_core, lambda: col2im_rows(dcols_rows, kw, sw, pw, dw, groups, dx3))
    # the fast path's weight and bias gradients, contiguous, read at each call: the program may hand them to the
    # leaves as their .grad without accumulate_leaf's copy (see Program._reclaim). MNIST-1D CNN: 6 copies and
    # tensors in accumulate_leaf, 10.6 us of the reverse pass
    wbuf = [np.empty(wshape, dtype)] if need_w0 and rows_b != taps else None
    bbuf = [np.empty(out_ch, dtype)] if need_w0 and need_b else None

    def backward(g):
        need_x, need_w = bool(input.requires_grad), bool(weight.requires_grad)
        f = fast[0]
        if (
            f is not None
            and need_x == need_x0
            and need_w == need_w0
            and type(g) is np.ndarray
            and g.dtype == dtype
            and g.size == gsize
            and g.flags.c_contiguous
        ):
            return backward_fast(g, f)
        act = relu_act[0]
        if act_channel_major[0] is not None:  # (a gradient the fast path does not take) back to (N, O, L)
            g = _from_channel_major(g.reshape(out_ch, n, oh * ow))
            act = _from_channel_major(act_channel_major[0])
        g4 = np.ascontiguousarray(g).reshape(n, out_ch, oh, ow)
        if need_x != need_x0 or need_w != need_w0 or g4.dtype != dtype:
            if act is not None:  # the ReLU's backward, as its eager closure computes it
                g4 = g4 * (act.reshape(g4.shape) > 0)
            gx, gw, gb = generic.backward(state, g4, need_x, need_w, need_b)
        else:
            g3 = g4.reshape(n, out_ch, oh * ow)
            if act is not None:
                swap_relu_backward(g3[n0:n1], act[n0:n1], gc_buf)
                g3 = None  # (never read unmasked)
            gb = None
            if need_b and not need_w:
                if act is not None:  # (rare: a bias without a weight gradient) the masked gradient, in NCL order
                    gm = np.empty((nb, out_ch, t), dtype)
                    CK.swap_leading_axes(gc_buf, gm)
                    gb = gm.sum(axis=(0, 2))
                else:
                    gb = g3.sum(axis=(0, 2))
            if act is not None:
                gc = gc_buf.reshape(groups, og, nb * t)
            elif nb == 1:
                gc = g3[n0, :, p0:p1].reshape(groups, og, t)
            else:
                CK.swap_leading_axes(g3[n0:n1], gc_buf)
                gc = gc_buf.reshape(groups, og, nb * t)
            if need_w:
                if abt and gc.flags.c_contiguous:
                    for gi in range(groups):
                        matmul_abt(gc[gi], cols_w[gi], dwo[gi])
                else:
                    np.matmul(gc, cols_w.transpose(0, 2, 1), out=dwo)
            if need_x:
                dx.fill(0)
                np.matmul(wt, gc, out=dcols)
                CK.col2im(dcols.reshape(groups * taps, nb, t), kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow, dx_tile)
            gx, gw = dx, None
            if need_w:
                if rows_b != taps:
                    np.copyto(dw_out.reshape(groups, og, taps), dwo[:, :, :taps])
                gw = dw_out
                if need_b:
                    gb = dwo[:, :, taps].reshape(out_ch)
        gx = None if gx is None else gx.reshape(xshape)
        if gx is not None and dx_channel_major[0] is not None:  # the conv before reads it channel-major
            CK.swap_leading_axes(gx.reshape(x3.shape), dx_channel_major[0])
            gx = dx_channel_major[0]
        gw = None if gw is None else gw.reshape(wshape)
        return (gx, gw) if not has_bias else (gx, gw, gb)

    if gc_buf is not None and dtype in _FLOATS:
        backward.mask_with = mask_with
        if (n0, n1) == (0, n):
            backward.mask_with_channel_major = mask_with_channel_major
        backward.lendable = {k: v for k, v in ((1, wbuf), (2, bbuf)) if v is not None}
    return forward, backward


def _from_channel_major(a):
    """A (C, N, L) array as a new (N, C, L) one."""
    out = np.empty((a.shape[1], a.shape[0], a.shape[2]), a.dtype)
    CK.swap_leading_axes(np.ascontiguousarray(a), out)
    return out


# ----- views -------------------------------------------------------------------------------------------------
@register("transpose", "permute", "squeeze", "unsqueeze", "expand")
def _view(r):
    (a,) = r.parents
    if not np.shares_memory(r.out.data, a.data):
        raise Unsupported("result is a copy, not a view")
    return None, r.backward  # follows its base's buffer; the eager closure reads only g


@register("index")
def _index(r):
    """Basic indices (split, chunk, x[i]) give a view; integer arrays a gather, copied into the result's buffer.
    Both backward closures read nothing but g (a view's gradient is a SliceGrad, summed as the engine sums it)."""
    (a,) = r.parents
    ad, o = a.data, r.out.data
    idx = r.locals["idx"]
    if r.locals["basic"]:
        if not np.shares_memory(o, ad):
            raise Unsupported("basic index that copied")
        return None, r.backward
    _same_result(o, o.dtype, o.shape)

    def forward():
        np.copyto(o, ad[idx])

    return forward, r.backward


# ----- embedding ---------------------------------------------------------------------------------------------
@register("embedding")
def _embedding(r):
    """The rows gathered into the result's buffer (np.take: a copy, so eager's bits) after eager's range check;
    backward: eager's zeroed (rows, D) array and indexing_kernels.add_rows, into a buffer planned once."""
    from mpnn.core.errors import OpError
    from mpnn.core.indexing_kernels import add_rows

    loc = r.locals
    idx, padding_idx, num = loc["idx"], loc["padding_idx"], loc["num"]
    (weight,) = r.parents
    wd, o = weight.data, r.out.data
    _same_result(o, wd.dtype, idx.shape + wd.shape[1:])
    if wd.ndim != 2:
        raise Unsupported(f"embedding weight of {wd.ndim} dims")

    def forward():
        if idx.size and (idx.min() < 0 or idx.max() >= num):
            bad = idx[(idx < 0) | (idx >= num)].flat[0]
            raise OpError("embedding", f"index {bad} is out of range for an embedding of {num} rows")
        np.take(wd, idx, axis=0, out=o, mode="clip")  # in range (checked): clip never clips, and never buffers

    flat = idx.reshape(-1)
    if flat.dtype == np.int64 and flat.flags.c_contiguous and (flat.size == 0 or np.shares_memory(flat, idx)):
        idx64, copy_idx = flat, False
    else:
        idx64, copy_idx = np.empty(idx.size, np.int64), True
    full = np.empty(wd.shape, wd.dtype)
    d = wd.shape[1]

    def backward(g):
        if g.dtype != full.dtype:
            return r.backward(g)
        if copy_idx:
            np.copyto(idx64, idx.reshape(-1), casting="unsafe")
        full.fill(0)
        add_rows(full, idx64, np.ascontiguousarray(g.reshape(-1, d)))
        if padding_idx is not None:
            full[padding_idx] = 0
        return (full,)

    return forward, backward


# ----- normalization and activations -------------------------------------------------------------------------
@register("layer_norm")
def _layer_norm(r):
    """normalization_kernels.layer_norm_forward over eager's arrays (the input's rows, weight and bias as the
    kernel read them, the result, the per-row mean and 1/std that backward reads): the eager closure reads those
    same arrays, refreshed in place, so it is the backward form as it is."""
    from mpnn.core import normalization_kernels as NK

    loc = r.locals
    x, x2, w, b, out, mean, invstd = loc["x"], loc["x2"], loc["w"], loc["b"], loc["out"], loc["mean"], loc["invstd"]
    eps = float(loc["eps"])
    weight, bias = loc["weight"], loc["bias"]
    o = r.out.data
    if not np.shares_memory(x2, x) or not np.shares_memory(out, o):
        raise Unsupported(f"layer_norm of a {x.dtype} or strided input")
    for t, arr in ((weight, w), (bias, b)):
        if t is not None and not np.shares_memory(arr, t.data):
            raise Unsupported("layer_norm weight or bias of another dtype than the input")

    def forward():
        NK.layer_norm_forward(x2, w, b, eps, out, mean, invstd)

    return forward, r.backward


@register("batch_norm")
def _batch_norm(r):
    """normalization_kernels' forward over eager's arrays (the input as (N, C, L), weight and bias as the kernel
    read them, the result, the per-channel mean and 1/std that backward reads), then the running statistics
    updated in place with eager's expressions (training); eval recomputes the statistics from the running ones
    as eager does. Backward: eager's kernel call into buffers planned once, the float64 weight and bias sums cast
    into buffers as eager's astype casts them."""
    from mpnn.core import normalization_kernels as NK

    loc = r.locals
    x, x3, w, b, out, mean, invstd = loc["x"], loc["x3"], loc["w"], loc["b"], loc["out"], loc["mean"], loc["invstd"]
    training, eps, momentum, dt = bool(loc["training"]), float(loc["eps"]), loc["momentum"], loc["dt"]
    weight, bias, input = loc["weight"], loc["bias"], loc["input"]
    rm_t, rv_t = loc["running_mean"], loc["running_var"]  # their arrays read at each call, as eager reads them
    o = r.out.data
    if not np.shares_memory(x3, x) or not np.shares_memory(out, o) or x.dtype != dt:
        raise Unsupported(f"batch_norm of a {x.dtype} or strided input")
    for t, arr in ((weight, w), (bias, b)):
        if t is not None and not np.shares_memory(arr, t.data):
            raise Unsupported("batch_norm weight or bias of another dtype than the input")
    c = x3.shape[1]
    n = x.size // c
    module = _batch_norm_module(rm_t) if training and rm_t is not None else None
    counter = None if module is None else module.num_batches_tracked
    cumulative = module is not None and module.momentum is None  # factor 1 / num_batches_tracked, as the module's
    if training:
        var = loc["var"]

        def forward():
            factor = momentum
            if counter is not None:  # the module's forward counted the batch in NumPy: counted here again
                counter.data += 1
                if cumulative:
                    factor = 1.0 / float(counter.data)
            NK.batch_norm_train_forward(x3, w, b, eps, out, mean, invstd, var)
            if rm_t is not None:
                rm = rm_t.data
                rm *= 1 - factor
                rm += factor * mean
            if rv_t is not None:
                rv = rv_t.data
                rv *= 1 - factor
                rv += factor * var * (n / (n - 1))

    else:

        def forward():
            np.copyto(mean, rm_t.data.astype(dt))
            np.copyto(invstd, (1.0 / np.sqrt(rv_t.data.astype(np.float64) + eps)).astype(dt))
            NK.batch_norm_eval_forward(x3, mean, invstd, w, b, out)

    gx3 = np.empty_like(x3)
    gw64, gb64 = np.empty(c, np.float64), np.empty(c, np.float64)
    gw = None if weight is None else np.empty(c, weight.data.dtype)
    gb = None if bias is None else np.empty(c, bias.data.dtype)
    gx = gx3.reshape(x.shape)
    empty = x3[:0]

    def backward(g):
        need_x = input.requires_grad
        g3 = np.ascontiguousarray(g, dtype=dt).reshape(x3.shape)
        NK.batch_norm_backward(x3, g3, mean, invstd, w, training, need_x, gx3 if need_x else empty, gw64, gb64)
        grads = [gx if need_x else None]
        for t, buf, sums in ((weight, gw, gw64), (bias, gb, gb64)):
            if t is not None:
                if t.requires_grad:
                    np.copyto(buf, sums, casting="same_kind")  # eager's sums.astype(dtype)
                grads.append(buf if t.requires_grad else None)
        return tuple(grads)

    return forward, backward


def _batch_norm_module(running_mean):
    """The BatchNorm module whose forward called batch_norm with this running mean (found up the capture's stack),
    or None (a functional call): its forward counts batches in num_batches_tracked, a NumPy edit the recorder does
    not see."""
    from mpnn.nn.norm import _BatchNorm

    f = sys._getframe(1)
    for _ in range(12):
        f = f.f_back
        if f is None:
            return None
        mod = f.f_locals.get("self")
        if isinstance(mod, _BatchNorm) and mod.running_mean is running_mean:
            return mod if mod.track_running_stats and mod.num_batches_tracked is not None else None
    return None


@register("adaptive_avg_pool2d")
def _adaptive_avg_pool2d(r):
    """pool_kernels' adaptive average over eager's arrays (the input as contiguous (N, C, H, W) and the result);
    backward the same kernel into a buffer planned once."""
    loc = r.locals
    x, out = loc["x"], loc["out"]
    (a,) = r.parents
    if not np.shares_memory(x, a.data) or not np.shares_memory(out, r.out.data) or x.size != a.data.size:
        raise Unsupported("adaptive_avg_pool2d of a strided input")
    dx = np.empty(x.shape, x.dtype)
    gx = dx.reshape(a.data.shape)
    oshape = out.shape

    def forward():
        CK.adaptive_avg_pool2d_forward(x, out)

    def backward(g):
        CK.adaptive_avg_pool2d_backward(np.ascontiguousarray(g).reshape(oshape), dx)
        return (gx,)

    return forward, backward


@register("dropout")
def _dropout(r):
    """Inverted dropout drawing its mask again each replay from mpnn's generator, as eager draws it: the same
    float32 uniforms (Generator.random into a buffer planned once), the same >= p test, cast and scale, so that
    from one seed replay and eager draw the same masks in the same order (capture checks that the step draws
    nothing else: mpnn.capture). Backward is eager's g * mask into a buffer planned once."""
    loc = r.locals
    (a,) = r.parents
    ad, o, mask, p = a.data, r.out.data, loc["mask"], loc["p"]
    _same_result(o, o.dtype, ad.shape)
    if mask.shape != ad.shape or not mask.flags.c_contiguous:
        raise Unsupported("dropout with a broadcast mask")
    dx = np.empty(ad.shape, np.result_type(o.dtype, mask.dtype))

    def backward(g):
        np.multiply(g, mask, out=dx)
        return (dx,)

    if p == 1.0:  # no draw: the mask stays zeros

        def forward():
            np.multiply(ad, mask, out=o)

        forward.draws = ()
        return forward, backward
    uniform = np.empty(ad.shape, np.float32)
    keep = np.empty(ad.shape, bool)
    scale = ad.dtype.type(1.0 / (1.0 - p))
    draw = random_generator().random

    def forward():
        draw(dtype=np.float32, out=uniform)
        np.greater_equal(uniform, p, out=keep)
        np.copyto(mask, keep)
        np.multiply(mask, scale, out=mask)
        np.multiply(ad, mask, out=o)

    forward.draws = (ad.shape,)
    return forward, backward


@register("max_pool1d", "max_pool2d")
def _max_pool(r):
    """pool_kernels' window max over eager's arrays (the input as contiguous (N, C, H, W), the result and its argmax
    planes), so the same values and the same argmax ties; backward scatters through that argmax into a buffer
    planned once. return_indices hands the argmax out as a tensor made off the tape: not replayed."""
    loc = r.locals
    if loc["return_indices"]:
        raise Unsupported("max pooling with return_indices")
    x, out, argmax = loc["x"], loc["out"], loc["argmax"]
    (a,) = r.parents
    if not np.shares_memory(x, a.data) or not np.shares_memory(out, r.out.data) or x.size != a.data.size:
        raise Unsupported("max pooling of a strided input")
    geom = tuple(loc[k] for k in ("kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw"))
    dx = np.empty(x.shape, x.dtype)
    gx = dx.reshape(a.data.shape)
    oshape = out.shape

    def forward():
        CK.max_pool2d_forward(x, *geom, out, argmax)

    def backward(g):
        CK.max_pool2d_backward(np.ascontiguousarray(g).reshape(oshape), argmax, dx)
        return (gx,)

    return forward, backward


@register("gelu")
def _gelu(r):
    """activation_kernels' GELU loops (erf, or the tanh approximation) over eager's arrays: the input as a flat
    view, the result, and the kept CDF / tanh(inner) that backward reads; backward the same loops into a buffer
    planned once."""
    from mpnn.core import activation_kernels as AK

    loc = r.locals
    ad, x, out, kept, approximate = loc["ad"], loc["x"], loc["out"], loc["kept"], loc["approximate"]
    o = r.out.data
    if x.dtype != ad.dtype or not np.shares_memory(x, ad) or not np.shares_memory(out, o):
        raise Unsupported(f"gelu of a {ad.dtype} or strided input")
    exact = approximate == "none"
    if exact:
        kernel = AK.gelu_forward_float32 if x.dtype == np.float32 else AK.gelu_forward_exact

        def forward():
            kernel(x, out, kept)

    else:

        def forward():
            AK.gelu_tanh_inner(x, kept)
            np.tanh(kept, out=kept)
            AK.gelu_tanh_forward(x, kept, out)

    gx = np.empty_like(x)
    gauss = np.empty_like(x) if exact and x.dtype != np.float32 else None
    shape = ad.shape

    def backward(g):
        if g.dtype != x.dtype:
            return r.backward(g)
        gf = AK.flat(g)
        if exact and gauss is None:
            AK.gelu_backward_float32(x, gf, kept, gx)
        elif exact:
            np.multiply(x, x, out=gauss)
            np.multiply(gauss, -0.5, out=gauss)  # eager's gauss *= -0.5
            np.exp(gauss, out=gauss)
            AK.gelu_backward(x, gf, kept, gauss, gx)
        else:
            AK.gelu_tanh_backward(x, kept, gf, gx)
        return (gx.reshape(shape),)

    return forward, backward


@register("softmax", "log_softmax")
def _softmax(r):
    """Eager's expression, then into the result's buffer; the eager closure reads only that result."""
    (a,) = r.parents
    loc = r.locals
    ad, o, ax, dtype = a.data, r.out.data, loc["ax"], loc["dtype"]
    if loc["out"] is not o:
        raise Unsupported("result is not the array eager computed")
    _same_result(o, o.dtype, ad.shape)

    if r.op == "softmax":

        def forward():
            x = ad if dtype is None else ad.astype(dtype)
            e = np.exp(x - x.max(axis=ax, keepdims=True))
            np.copyto(o, e / e.sum(axis=ax, keepdims=True))

    else:

        def forward():
            x = ad if dtype is None else ad.astype(dtype)
            z = x - x.max(axis=ax, keepdims=True)
            np.copyto(o, z - np.log(np.exp(z).sum(axis=ax, keepdims=True)))

    return forward, r.backward


# ----- attention ---------------------------------------------------------------------------------------------
@register("scaled_dot_product_attention")
def _attention(r):
    """attention_kernels' flash-style forward and backward with eager's operands: q, k, v read where they lie in
    their buffers (copied first, each step, only where eager copies them), the mask as eager passes it, the output
    and log-sum-exp in eager's arrays, the scratch and the gradients in buffers planned once. Scores with NaN or
    inf, which eager answers through a composed path, raise in replay."""
    from mpnn.core import attention as A
    from mpnn.core import attention_kernels as AK
    from mpnn.core.errors import OpError

    loc = r.locals
    q, k, v = r.parents
    qd, kd, vd = loc["qd"], loc["kd"], loc["vd"]
    qi, ki, vi = loc["qi"], loc["ki"], loc["vi"]
    md, batch, dtype = loc["md"], loc["batch"], loc["dtype"]
    n, L, S, E, Ev = loc["n"], loc["L"], loc["S"], loc["E"], loc["Ev"]
    oo, ldo, of, lse = loc["oo"], loc["ldo"], loc["of"], loc["lse"]
    sc, causal, br, bc, per_query_mask = loc["sc"], loc["causal"], loc["br"], loc["bc"], loc["per_query_mask"]
    qb, kb, vb = loc["qb"], loc["kb"], loc["vb"]
    if not np.shares_memory(of, r.out.data):
        raise Unsupported("output buffer")
    ops = [None]
    static_ops = (A._operand(qd, qi), A._operand(kd, ki), A._operand(vd, vi))
    in_place = all(np.shares_memory(f, src) for (f, _, _), src in zip(static_ops, (qd, kd, vd)) if src.size)

    def operands():
        return static_ops if in_place else (A._operand(qd, qi), A._operand(kd, ki), A._operand(vd, vi))

    static_mask = (loc["mode"], loc["bmask"], loc["amask"], loc["mi"])
    mask_in_place = md is None or np.shares_memory(static_mask[1] if md.dtype == np.bool_ else static_mask[2], md)

    def mask_args():
        return static_mask if mask_in_place else A._mask_args(md, batch, L, S, dtype)

    masks = [static_mask]
    f_scratch = A._forward_scratch(E, L, br, bc, per_query_mask, dtype)
    f_edge = A._edge(br, dtype)

    def forward():
        (qf, qo, ldq), (kf, ko, ldk), (vf, vo, ldv) = ops[0] = operands()
        mode, bmask, amask, mi = masks[0] = mask_args()
        if n and L:
            bad = AK.attention_forward(
                qf, qo, ldq, kf, ko, ldk, vf, vo, ldv, S, E, oo, ldo, Ev, mode, bmask, amask, mi, causal, f_edge,
                sc, br, bc, *f_scratch, of, lse,
            )  # fmt: skip
            if bad:
                raise OpError(
                    A._OP, "NaN or inf among the attention scores in a compiled step (eager answers through a "
                    "composed path there): run the step eagerly to find where they come from",
                )  # fmt: skip

    nq, nk, nv = math.prod(qb), math.prod(kb), math.prod(vb)
    fresh = n == nq == nk == nv and bool(S)
    dq, dk, dv = np.empty((nq, L, E), dtype), np.empty((nk, S, E), dtype), np.empty((nv, S, Ev), dtype)
    bk, bq = A._block(A._BWD_K, S), A._block(A._BWD_Q, L)
    b_scratch = A._backward_scratch(E, Ev, L, bk, bq, per_query_mask, dtype)
    b_edge = A._edge(bq, dtype)
    problems = np.arange(n)
    gshape = batch + (L, Ev)

    def backward(g):
        (qf, qo, ldq), (kf, ko, ldk), (vf, vo, ldv) = ops[0]
        mode, bmask, amask, mi = masks[0]
        gf, go, ldg = A._operand(g.astype(dtype, copy=False).reshape(gshape), problems)
        if not fresh:
            dq.fill(0)
            dk.fill(0)
            dv.fill(0)
        if n and S and (L or fresh):
            AK.attention_backward(
                qf, qo, ldq, kf, ko, ldk, vf, vo, ldv, gf, go, ldg, of, oo, ldo, Ev, lse, S, E, qi, ki, vi,
                mode, bmask, amask, mi, causal, b_edge, sc, bk, bq, fresh, *b_scratch, dq, dk, dv,
            )  # fmt: skip
        return (
            dq.reshape(qd.shape) if q.requires_grad else None,
            dk.reshape(kd.shape) if k.requires_grad else None,
            dv.reshape(vd.shape) if v.requires_grad else None,
        )

    return forward, backward
