"""In-place ops: ``add_``, ``mul_``, ``copy_``, ``t[idx] = v``, ``+=`` and friends, differentiable where torch's are.

An in-place write bumps the version counter the tensor shares with its views, so a backward that saved the old
value raises instead of using the new one (``mpnn.core.autograd``). Writing to a leaf that requires grad, or to
a view of one, is refused outside ``no_grad`` (the optimizer's update belongs there). On a tensor on the tape
the write is recorded: the tensor gets a new node whose edges lead to its old node and to the other operands.
A write through a view of such a tensor is recorded on the base (its gradient flows around the written region
and through the op inside it) and the view is re-derived from the base, as torch's CopySlices does.
"""

from __future__ import annotations

import numpy as np

from mpnn.core.autograd import Node, edge_of, saved_versions, view_backward
from mpnn.core.elementwise import mul, unbroadcast
from mpnn.core.errors import OpError
from mpnn.core.grad_mode import is_grad_enabled
from mpnn.core.indexing import _along, _corner, _unwrap_index
from mpnn.core.tensor_base import TensorBase, as_tensor

_unbroadcast = unbroadcast


def bump_version(t: TensorBase) -> None:
    """Record an in-place write done outside mpnn's ops (an optimizer's fused update, load_state_dict)."""
    t._ver.value += 1


def _check_writable(t: TensorBase, op: str) -> None:
    if not is_grad_enabled():
        return
    leaf = t if t._base is None else t._base
    if leaf._node is None and leaf.requires_grad:
        what = "a leaf tensor that requires grad" if t._base is None else "a view of a leaf tensor that requires grad"
        raise RuntimeError(
            f"{op}: {what} is being used in an in-place operation; do it under mpnn.no_grad() "
            f"(as an optimizer does), or on a clone()"
        )


def apply_inplace(t: TensorBase, op: str, write, backward, others=(), saved=(), saves_result=False):
    """Run ``write()`` (which changes ``t.data`` in place) and record it on the tape when it must be.

    backward(g) -> (gradient for t's old value or None, gradient per tensor in ``others``); ``saved``: the
    tensors of ``others`` that backward reads; ``saves_result``: backward reads t's new value."""
    _check_writable(t, op)
    record = is_grad_enabled() and (t.requires_grad or any(o.requires_grad for o in others))
    if record:
        base = t._base
        old_edge = edge_of(t if base is None else base)
        other_edges = tuple(edge_of(o) for o in others)
    try:
        write()
    except ValueError as e:  # NumPy refuses writes into broadcast (expanded) views and mismatched shapes
        raise OpError(op, f"cannot write in place into a tensor of shape {t.data.shape}: {e}") from None
    t._ver.value += 1
    if not record:
        return t
    keep = saved_versions(tuple(saved) + ((t,) if saves_result else ()))
    if base is None:
        t._node = Node((old_edge,) + other_edges, backward, op, keep, t.data.shape)
        t.requires_grad = True
        return t
    view_fn = t._view_fn

    def base_backward(g):
        gb = np.array(g, copy=True)
        region = view_fn(gb)
        if not np.may_share_memory(region, gb):
            raise OpError(op, "the in-place write went through a view that cannot be rebuilt on the gradient")
        grads = backward(np.array(region, copy=True))
        region[...] = 0 if grads[0] is None else grads[0]
        return (gb,) + tuple(grads[1:])

    base._node = Node((old_edge,) + other_edges, base_backward, op, keep, base.data.shape)
    base.requires_grad = True
    t._node = Node((base._node,), view_backward(view_fn, base.data.shape), "view", (), t.data.shape)
    t.requires_grad = True
    t._view_ver = t._ver.value
    return t


def _operand(t, other, op):
    o = as_tensor(other, like=t)
    try:
        shape = np.broadcast_shapes(t.data.shape, o.data.shape)
    except ValueError:
        shape = None
    if shape != t.data.shape:
        raise OpError(
            op,
            f"an operand of shape {tuple(o.data.shape)} does not broadcast to the written "
            f"tensor's shape {tuple(t.data.shape)}",
        )
    return o


def _ufunc_write(fn, t, o, op):
    def write():
        try:
            fn(t.data, o.data, out=t.data, casting="same_kind")
        except TypeError as e:
            raise OpError(
                op,
                f"result of dtype {np.result_type(t.data, o.data)} can't be written into a "
                f"tensor of dtype {t.data.dtype}: {e}",
            ) from None

    return write


def _add_or_sub(t, other, alpha, op, ufunc, sign):
    o = _operand(t, other, op)
    oshape = o.data.shape
    if alpha != 1:
        o = as_tensor(o.data * alpha, like=t) if not o.requires_grad else _scaled(o, alpha)
    return apply_inplace(
        t,
        op,
        _ufunc_write(ufunc, t, o, op),
        lambda g: (g, _unbroadcast(g if sign > 0 else -g, oshape) if o.requires_grad else None),
        (o,),
    )


def add_(t, other, alpha=1):
    return _add_or_sub(t, other, alpha, "add_", np.add, 1)


def sub_(t, other, alpha=1):
    return _add_or_sub(t, other, alpha, "sub_", np.subtract, -1)


def _scaled(o, alpha):
    return mul(o, alpha)


def mul_(t, other):
    o = _operand(t, other, "mul_")
    old = np.array(t.data, copy=True) if o.requires_grad and is_grad_enabled() else None
    od = o.data

    def backward(g):
        return (g * od, _unbroadcast(g * old, od.shape) if old is not None else None)

    return apply_inplace(t, "mul_", _ufunc_write(np.multiply, t, o, "mul_"), backward, (o,), saved=(o,))


def div_(t, other):
    o = _operand(t, other, "div_")
    od = o.data
    out = t.data

    def backward(g):
        return (g / od, _unbroadcast(-g * out / od, od.shape) if o.requires_grad else None)

    return apply_inplace(
        t, "div_", _ufunc_write(np.true_divide, t, o, "div_"), backward, (o,), saved=(o,), saves_result=True
    )


def copy_(t, src, non_blocking=False):
    o = as_tensor(src)
    _operand(t, o, "copy_")
    oshape = o.data.shape

    def write():
        np.copyto(t.data, o.data, casting="unsafe")

    return apply_inplace(
        t,
        "copy_",
        write,
        lambda g: (None, _unbroadcast(g, oshape).astype(o.data.dtype, copy=False) if o.requires_grad else None),
        (o,),
    )


def fill_(t, value):
    v = value.data if isinstance(value, TensorBase) else value
    if np.ndim(v) != 0:
        raise OpError("fill_", f"fill_ takes a number or a 0-d tensor, got shape {np.shape(v)}")
    others = (value,) if isinstance(value, TensorBase) else ()

    def write():
        t.data[...] = v

    return apply_inplace(t, "fill_", write, lambda g: (None,) + ((g.sum().reshape(()),) if others else ()), others)


def zero_(t):
    def write():
        t.data[...] = 0

    return apply_inplace(t, "zero_", write, lambda g: (None,))


def clamp_(t, min=None, max=None):
    if min is None and max is None:
        raise OpError("clamp_", "at least one of min and max must be given")
    lo = min.data if isinstance(min, TensorBase) else min
    hi = max.data if isinstance(max, TensorBase) else max
    keep = np.ones(t.data.shape, dtype=bool)
    if lo is not None:
        keep &= t.data >= lo
    if hi is not None:
        keep &= t.data <= hi

    def write():
        np.clip(t.data, lo, hi, out=t.data)

    return apply_inplace(t, "clamp_", write, lambda g: (g * keep,))


def relu_(t):
    keep = t.data > 0

    def write():
        np.maximum(t.data, 0, out=t.data)

    return apply_inplace(t, "relu_", write, lambda g: (g * keep,))


def masked_fill_(t, mask, value):
    m = mask.data if isinstance(mask, TensorBase) else np.asarray(mask)
    if m.dtype != np.bool_:
        raise OpError("masked_fill_", f"mask must be bool, got {m.dtype}")
    v = value.data if isinstance(value, TensorBase) else value

    def write():
        np.copyto(t.data, np.asarray(v, dtype=t.data.dtype), where=np.broadcast_to(m, t.data.shape))

    return apply_inplace(t, "masked_fill_", write, lambda g: (np.where(m, 0, g).astype(g.dtype),))


def setitem(t, idx, value):
    """``t[idx] = value``: an in-place write; differentiable for ``t``'s other elements and for ``value``."""
    index = _unwrap_index(idx)
    o = value if isinstance(value, TensorBase) else None
    vd = value.data if o is not None else value
    others = (o,) if o is not None else ()

    def write():
        try:
            t.data[index] = vd
        except IndexError as e:
            raise OpError("setitem", f"{e} (tensor of shape {t.data.shape})") from None

    def backward(g):
        gt = np.array(g, copy=True)
        gv = None
        if o is not None and o.requires_grad:
            region = np.array(g[index], copy=True)
            while region.ndim < o.data.ndim:
                region = region[None]
            gv = _unbroadcast(region, o.data.shape)
        gt[index] = 0
        return (gt, gv) if others else (gt,)

    return apply_inplace(t, "setitem", write, backward, others)


def scatter_(t, dim, index, src=None, value=None, *, reduce=None):
    """torch's Tensor.scatter_: write ``src`` (a tensor) or ``value`` (a number) into ``t`` at ``index`` along
    ``dim``; differentiable as scatter (the old value's gradient is zero where written)."""
    if reduce is not None:
        raise OpError("scatter_", f"reduce={reduce!r} is not supported; use scatter_add_ for reduce='add'")
    if src is not None and not isinstance(src, TensorBase):
        src, value = None, src  # t.scatter_(dim, index, 2.0): a number in src's place
    if src is None and value is None:
        raise OpError("scatter_", "give src (a tensor) or value (a number)")
    if src is not None and src.data.dtype != t.data.dtype:
        raise OpError("scatter_", f"src dtype {src.data.dtype} does not match the tensor's {t.data.dtype}")
    grids, work, _, ishape = _along("scatter_", t.data.shape, dim, index, None if src is None else src.data.shape)
    others = () if src is None else (src,)

    def write():
        _worked(t.data, work)[grids] = value if src is None else _corner(src.data, ishape)

    def backward(g):
        g1 = g.reshape(work)
        gt = g1.copy()
        gt[grids] = 0
        if src is None:
            return (gt.reshape(g.shape),)
        gs = None
        if src.requires_grad:
            gs = np.zeros(src.data.shape if src.data.ndim else (1,), dtype=g.dtype)
            _corner(gs, ishape)[...] = g1[grids]
            gs = gs.reshape(src.data.shape)
        return (gt.reshape(g.shape), gs)

    return apply_inplace(t, "scatter_", write, backward, others)


def scatter_add_(t, dim, index, src):
    """torch's Tensor.scatter_add_: add ``src`` into ``t`` at ``index`` along ``dim`` (repeated indices
    accumulate); the old value's gradient passes through, src's is gathered at ``index``."""
    if not isinstance(src, TensorBase):
        raise OpError("scatter_add_", f"src must be a tensor, got {type(src).__name__}")
    if src.data.dtype != t.data.dtype:
        raise OpError("scatter_add_", f"src dtype {src.data.dtype} does not match the tensor's {t.data.dtype}")
    grids, work, _, ishape = _along("scatter_add_", t.data.shape, dim, index, src.data.shape)

    def write():
        np.add.at(_worked(t.data, work), grids, _corner(src.data, ishape))

    def backward(g):
        gs = None
        if src.requires_grad:
            gs = np.zeros(src.data.shape if src.data.ndim else (1,), dtype=g.dtype)
            _corner(gs, ishape)[...] = g.reshape(work)[grids]
            gs = gs.reshape(src.data.shape)
        return (g, gs)

    return apply_inplace(t, "scatter_add_", write, backward, (src,))


def _worked(arr, work):
    """``arr`` as the shape gather/scatter work in (a 0-d array as (1,)), always a view so writes land."""
    return arr.reshape(work) if arr.shape != work else arr


class InplaceMethods:
    """Tensor's in-place methods and operators (mixed into Tensor): each returns the tensor itself."""

    __slots__ = ()

    def __setitem__(self, idx, value):
        setitem(self, idx, value)

    def add_(self, other, alpha=1):
        return add_(self, other, alpha)

    def sub_(self, other, alpha=1):
        return sub_(self, other, alpha)

    def mul_(self, other):
        return mul_(self, other)

    def div_(self, other):
        return div_(self, other)

    def copy_(self, src, non_blocking=False):
        return copy_(self, src)

    def fill_(self, value):
        return fill_(self, value)

    def zero_(self):
        return zero_(self)

    def clamp_(self, min=None, max=None):
        return clamp_(self, min, max)

    clip_ = clamp_

    def relu_(self):
        return relu_(self)

    def scatter_(self, dim, index, src=None, value=None, *, reduce=None):
        return scatter_(self, dim, index, src, value, reduce=reduce)

    def scatter_add_(self, dim, index, src):
        return scatter_add_(self, dim, index, src)

    def masked_fill_(self, mask, value):
        return masked_fill_(self, mask, value)

    def __iadd__(self, other):
        return add_(self, other)

    def __isub__(self, other):
        return sub_(self, other)

    def __imul__(self, other):
        return mul_(self, other)

    def __itruediv__(self, other):
        return div_(self, other)
