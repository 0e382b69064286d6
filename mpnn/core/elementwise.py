"""Elementwise ops: arithmetic with broadcasting, unary math, casts, comparisons. Each backward sits by its forward.

Every binary op reduces a broadcast gradient back to its input's shape (``unbroadcast``) and returns None for an
input that does not require grad, so no work is spent on it.
"""

from __future__ import annotations

import numpy as np

from mpnn.core.errors import OpError
from mpnn.core.tensor_base import OUTPUT, TensorBase, as_tensor, from_array, make_result

_from = from_array


def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``g`` over the axes that broadcasting added or stretched, so it has ``shape``."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _pair(op, a, b):
    """Two operands as Tensors; a Python number takes the other operand's dtype (as in torch)."""
    if not isinstance(a, TensorBase):
        a = as_tensor(a, like=b)
    if not isinstance(b, TensorBase):
        b = as_tensor(b, like=a)
    return a, b


def _broadcast_error(op, a, b):
    return OpError(op, f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast")


# ----- binary ---------------------------------------------------------------------------------------
def add(a, b):
    a, b = _pair("add", a, b)
    try:
        out = a.data + b.data
    except ValueError:
        raise _broadcast_error("add", a, b) from None
    sa, sb = a.data.shape, b.data.shape

    def backward(g):
        return (unbroadcast(g, sa) if a.requires_grad else None, unbroadcast(g, sb) if b.requires_grad else None)

    return make_result(out, (a, b), backward, "add", saved=())


def sub(a, b):
    a, b = _pair("sub", a, b)
    try:
        out = a.data - b.data
    except ValueError:
        raise _broadcast_error("sub", a, b) from None
    sa, sb = a.data.shape, b.data.shape

    def backward(g):
        return (unbroadcast(g, sa) if a.requires_grad else None, unbroadcast(-g, sb) if b.requires_grad else None)

    return make_result(out, (a, b), backward, "sub", saved=())


def mul(a, b):
    a, b = _pair("mul", a, b)
    try:
        out = a.data * b.data
    except ValueError:
        raise _broadcast_error("mul", a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        return (
            unbroadcast(g * bd, ad.shape) if a.requires_grad else None,
            unbroadcast(g * ad, bd.shape) if b.requires_grad else None,
        )

    return make_result(out, (a, b), backward, "mul", saved=(a, b))


def div(a, b):
    a, b = _pair("div", a, b)
    try:
        out = a.data / b.data
    except ValueError:
        raise _broadcast_error("div", a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        ga = unbroadcast(g / bd, ad.shape) if a.requires_grad else None
        gb = unbroadcast(-g * out / bd, bd.shape) if b.requires_grad else None
        return ga, gb

    return make_result(out, (a, b), backward, "div", saved=(b, OUTPUT))


def pow(a, b):
    a, b = _pair("pow", a, b)
    try:
        out = a.data**b.data
    except ValueError:
        raise _broadcast_error("pow", a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        ga = gb = None
        if a.requires_grad:
            ga = unbroadcast(g * bd * ad ** (bd - 1), ad.shape)
        if b.requires_grad:
            with np.errstate(divide="ignore", invalid="ignore"):
                logs = np.where(ad > 0, np.log(np.where(ad > 0, ad, 1)), 0).astype(out.dtype)
            gb = unbroadcast(g * out * logs, bd.shape)
        return ga, gb

    return make_result(out, (a, b), backward, "pow", saved=(a, b, OUTPUT))


def maximum(a, b):
    """Elementwise max; at ties the gradient is split evenly between the two inputs (as torch)."""
    return _minmax("maximum", a, b, np.greater)


def minimum(a, b):
    """Elementwise min; at ties the gradient is split evenly between the two inputs (as torch)."""
    return _minmax("minimum", a, b, np.less)


def _minmax(op, a, b, better):
    a, b = _pair(op, a, b)
    try:
        out = (np.maximum if op == "maximum" else np.minimum)(a.data, b.data)
    except ValueError:
        raise _broadcast_error(op, a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        wa = better(ad, bd) + 0.5 * (ad == bd)
        ga = unbroadcast((g * wa).astype(g.dtype), ad.shape) if a.requires_grad else None
        gb = unbroadcast((g * (1 - wa)).astype(g.dtype), bd.shape) if b.requires_grad else None
        return ga, gb

    return make_result(out, (a, b), backward, op, saved=(a, b))


# ----- unary ----------------------------------------------------------------------------------------
def neg(a):
    def backward(g):
        return (-g,)

    return make_result(-a.data, (a,), backward, "neg", saved=())


def exp(a):
    out = np.exp(a.data)

    def backward(g):
        return (g * out,)

    return make_result(out, (a,), backward, "exp", saved=(OUTPUT,))


def log(a):
    ad = a.data

    def backward(g):
        return (g / ad,)

    return make_result(np.log(ad), (a,), backward, "log", saved=(a,))


def sqrt(a):
    out = np.sqrt(a.data)

    def backward(g):
        return (g / (2 * out),)

    return make_result(out, (a,), backward, "sqrt", saved=(OUTPUT,))


def abs(a):
    ad = a.data

    def backward(g):
        return (g * np.sign(ad),)

    return make_result(np.abs(ad), (a,), backward, "abs", saved=(a,))


def clip(a, min=None, max=None):
    """Clamp to [min, max] (numbers or tensors, broadcast; min > max gives max, as torch.clamp). The gradient
    goes to the input where it was inside the range, and to a tensor bound where that bound was the result."""
    if min is None and max is None:
        raise OpError("clip", "at least one of min and max must be given")
    bounds = [b if isinstance(b, TensorBase) else None for b in (min, max)]
    lo = min.data if bounds[0] is not None else min
    hi = max.data if bounds[1] is not None else max
    ad = a.data
    try:
        out = np.clip(ad, lo, hi).astype(ad.dtype, copy=False)
    except ValueError:
        raise OpError("clip", f"bounds do not broadcast against the input of shape {ad.shape}") from None
    if out.shape != ad.shape:
        raise OpError(
            "clip", f"bounds of shapes {np.shape(lo)} and {np.shape(hi)} would change the input's shape {ad.shape}"
        )
    parents = (a,) + tuple(b for b in bounds if b is not None)

    def backward(g):
        use_lo = np.less(ad, lo) if lo is not None else np.zeros(ad.shape, bool)
        use_hi = np.greater(ad, hi) if hi is not None else np.zeros(ad.shape, bool)
        if lo is not None and hi is not None:
            crossed = np.greater(lo, hi)
            use_hi = use_hi | crossed
            use_lo = use_lo & np.logical_not(crossed)
        keep = np.logical_not(use_lo | use_hi)
        grads = [g * keep]
        for b, use in zip(bounds, (use_lo, use_hi)):
            if b is not None:
                grads.append(
                    unbroadcast((g * use).astype(g.dtype, copy=False), b.data.shape) if b.requires_grad else None
                )
        return tuple(grads)

    return make_result(out, parents, backward, "clip", saved=parents)


def sign(a):
    return _from(np.sign(a.data))


def clone(a):
    def backward(g):
        return (g,)

    return make_result(a.data.copy(), (a,), backward, "clone", saved=())


def to_dtype(a, dtype):
    """Cast; the gradient flows back cast to the input's dtype."""
    from mpnn.core.tensor import to_dtype as _dt

    dt = _dt(dtype)
    src = a.data.dtype
    if dt == src:
        return a
    if dt.kind != "f":
        return _from(a.data.astype(dt))

    def backward(g):
        return (g.astype(src),)

    return make_result(a.data.astype(dt), (a,), backward, "to", saved=())


def _compare(np_fn):
    def fn(self, other):
        other = other.data if isinstance(other, TensorBase) else other
        return _from(np_fn(self.data, other))

    return fn


class ElementwiseMethods:
    """Tensor's arithmetic operators and elementwise methods (mixed into Tensor)."""

    __slots__ = ()

    def __add__(self, other):
        return add(self, other)

    def __radd__(self, other):
        return add(other, self)

    def __sub__(self, other):
        return sub(self, other)

    def __rsub__(self, other):
        return sub(other, self)

    def __mul__(self, other):
        return mul(self, other)

    def __rmul__(self, other):
        return mul(other, self)

    def __truediv__(self, other):
        return div(self, other)

    def __rtruediv__(self, other):
        return div(other, self)

    def __pow__(self, other):
        return pow(self, other)

    def __rpow__(self, other):
        return pow(other, self)

    def __neg__(self):
        return neg(self)

    def __abs__(self):
        return abs(self)

    def add(self, other):
        return add(self, other)

    def sub(self, other):
        return sub(self, other)

    def mul(self, other):
        return mul(self, other)

    def div(self, other):
        return div(self, other)

    def pow(self, other):
        return pow(self, other)

    def maximum(self, other):
        return maximum(self, other)

    def minimum(self, other):
        return minimum(self, other)

    def neg(self):
        return neg(self)

    def exp(self):
        return exp(self)

    def log(self):
        return log(self)

    def sqrt(self):
        return sqrt(self)

    def abs(self):
        return abs(self)

    def clip(self, min=None, max=None):
        return clip(self, min, max)

    clamp = clip

    def sign(self):
        return sign(self)

    def clone(self):
        return clone(self)

    # comparisons and logic give bool tensors off the tape
    __lt__ = _compare(np.less)
    __le__ = _compare(np.less_equal)
    __gt__ = _compare(np.greater)
    __ge__ = _compare(np.greater_equal)
    __eq__ = _compare(np.equal)  # type: ignore[assignment]
    __ne__ = _compare(np.not_equal)  # type: ignore[assignment]
    eq = _compare(np.equal)
    ne = _compare(np.not_equal)
    lt = _compare(np.less)
    le = _compare(np.less_equal)
    gt = _compare(np.greater)
    ge = _compare(np.greater_equal)
    __and__ = _compare(np.logical_and)
    __or__ = _compare(np.logical_or)

    def __invert__(self):
        return _from(np.logical_not(self.data))
