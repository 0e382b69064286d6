"""Reductions: sum, mean, var, std, max/min (values and indices), amax/amin, argmax/argmin, prod, logsumexp,
cumsum (a scan, kept with the reductions it shares ``dim`` handling with).

Each takes torch's NumPy-style aliases too (``axis=`` for ``dim=``, ``keepdims=`` for ``keepdim=``), as keyword-only
arguments checked with one ``is not None`` test, so the common call pays next to nothing for them."""

from __future__ import annotations

import builtins
from collections import namedtuple

import numpy as np

from mpnn.core.elementwise import maximum, minimum, sqrt
from mpnn.core.errors import OpError
from mpnn.core.tensor_base import TensorBase, from_array, make_result

_from = from_array


def _axes(op, dim, ndim):
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -builtins.max(ndim, 1) <= d < builtins.max(ndim, 1):
            raise OpError(op, f"dim {d} is out of range for a tensor of {ndim} dimensions")
        out.append(d % builtins.max(ndim, 1))
    if ndim == 0:
        return ()  # torch accepts dim 0 or -1 on a 0-d tensor: a reduction over no axis
    return tuple(out)


def _np_names(op, dim, keepdim, axis, keepdims):
    """Resolve torch's NumPy-style aliases: ``axis`` for ``dim``, ``keepdims`` for ``keepdim`` (not both)."""
    if axis is not None:
        if dim is not None:
            raise TypeError(f"{op}(): got both dim={dim!r} and its alias axis={axis!r}; give one")
        dim = axis
    if keepdims is not None:
        if keepdim:
            raise TypeError(f"{op}(): got both keepdim={keepdim!r} and its alias keepdims={keepdims!r}; give one")
        keepdim = bool(keepdims)
    return dim, keepdim


def _expand_back(g, shape, axes, keepdim):
    """Reshape a reduced gradient so it broadcasts against the input again."""
    if axes is None:
        return np.broadcast_to(g.reshape((1,) * len(shape)) if len(shape) else g, shape)
    if not keepdim:
        g = np.expand_dims(g, axes)
    return np.broadcast_to(g, shape)


def sum(a, dim=None, keepdim=False, dtype=None, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("sum", dim, keepdim, axis, keepdims)
    axes = _axes("sum", dim, a.data.ndim)
    out = np.sum(a.data, axis=axes, keepdims=keepdim)
    if a.data.ndim == 0:
        out = a.data.copy()
    if dtype is None:  # booleans and integers sum to int64, as in torch
        dtype = np.int64 if a.data.dtype.kind in "biu" else a.data.dtype
    out = np.asarray(out, dtype=dtype)
    shape = a.data.shape

    def backward(g):
        return (np.array(_expand_back(g, shape, axes, keepdim), order="C"),)  # (ascontiguousarray makes 0-d 1-d)

    return make_result(out, (a,), backward, "sum", saved=())


def mean(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("mean", dim, keepdim, axis, keepdims)
    if a.data.dtype.kind != "f":
        raise OpError("mean", f"needs a floating-point tensor, got {a.data.dtype}")
    axes = _axes("mean", dim, a.data.ndim)
    out = np.asarray(np.mean(a.data, axis=axes, keepdims=keepdim), dtype=a.data.dtype)
    shape = a.data.shape
    count = a.data.size if axes is None else int(np.prod([shape[i] for i in axes]))

    def backward(g):
        return (np.array(_expand_back(g / count, shape, axes, keepdim), dtype=g.dtype, order="C"),)

    return make_result(out, (a,), backward, "mean", saved=())


def var(a, dim=None, keepdim=False, correction=1, unbiased=None, *, axis=None, keepdims=None):
    """Variance (two-pass: mean first, then squared deviations), Bessel-corrected by default as torch."""
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("var", dim, keepdim, axis, keepdims)
    if unbiased is not None:
        correction = 1 if unbiased else 0
    axes = _axes("var", dim, a.data.ndim)
    n = a.data.size if axes is None else int(np.prod([a.data.shape[i] for i in axes]))
    d = a - mean(a, dim=axes, keepdim=True)
    return sum(d * d, dim=axes, keepdim=keepdim) / builtins.max(n - correction, 0)


def std(a, dim=None, keepdim=False, correction=1, unbiased=None, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("std", dim, keepdim, axis, keepdims)
    return sqrt(var(a, dim, keepdim, correction, unbiased))


_ValuesIndices = namedtuple("ValuesIndices", ["values", "indices"])


def _extreme(op, a, dim, keepdim, reduce_fn, arg_fn):
    ad = a.data
    if ad.size == 0:
        raise OpError(op, f"cannot take {op} of an empty tensor of shape {ad.shape}")
    if dim is None:
        out = np.asarray(reduce_fn(ad))
        mask = ad == out
        count = mask.sum()

        def backward(g):
            return ((mask * (g / count)).astype(g.dtype),)

        return make_result(out, (a,), backward, op, saved=())
    axes = _axes(op, dim, ad.ndim)
    axis = axes[0] if axes else None
    idx = arg_fn(ad, axis=axis, keepdims=True) if ad.ndim else np.zeros((), np.int64)
    values = np.take_along_axis(ad, idx, axis=axis) if ad.ndim else ad.copy()
    shape = ad.shape

    def backward(g):
        if not shape:
            return (np.array(g, copy=True),)
        full = np.zeros(shape, dtype=g.dtype)
        gg = g if keepdim else np.expand_dims(g, axis)
        np.put_along_axis(full, idx, gg, axis=axis)
        return (full,)

    indices = idx.squeeze(axis) if not keepdim and ad.ndim else idx
    if not keepdim and ad.ndim:
        values = values.squeeze(axis)
    return _ValuesIndices(make_result(values, (a,), backward, op, saved=()), _from(indices.astype(np.int64)))


def max(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    """Without dim: the largest element (ties share the gradient). With dim: (values, indices), as torch."""
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("max", dim, keepdim, axis, keepdims)
    if isinstance(dim, TensorBase):
        return maximum(a, dim)
    return _extreme("max", a, dim, keepdim, np.max, np.argmax)


def min(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("min", dim, keepdim, axis, keepdims)
    if isinstance(dim, TensorBase):
        return minimum(a, dim)
    return _extreme("min", a, dim, keepdim, np.min, np.argmin)


def amax(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("amax", dim, keepdim, axis, keepdims)
    if dim is None:
        return max(a)
    axes = _axes("amax", dim, a.data.ndim)
    return _amaxmin("amax", a, axes, keepdim, np.max)


def amin(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("amin", dim, keepdim, axis, keepdims)
    if dim is None:
        return min(a)
    axes = _axes("amin", dim, a.data.ndim)
    return _amaxmin("amin", a, axes, keepdim, np.min)


def _amaxmin(op, a, axes, keepdim, fn):
    ad = a.data
    kept = fn(ad, axis=axes, keepdims=True)
    mask = ad == kept
    count = mask.sum(axis=axes, keepdims=True)

    def backward(g):
        gg = g if keepdim else np.expand_dims(g, axes)
        return ((mask * gg / count).astype(g.dtype),)

    out = kept if keepdim else np.squeeze(kept, axis=axes)
    return make_result(out, (a,), backward, op, saved=())


def argmax(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("argmax", dim, keepdim, axis, keepdims)
    return _arg("argmax", a, dim, keepdim, np.argmax)


def argmin(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("argmin", dim, keepdim, axis, keepdims)
    return _arg("argmin", a, dim, keepdim, np.argmin)


def _arg(op, a, dim, keepdim, fn):
    ad = a.data
    if dim is None:
        return _from(np.asarray(fn(ad), dtype=np.int64))
    if not isinstance(dim, int):
        raise OpError(op, f"dim must be one int, got {dim!r}")
    axes = _axes(op, dim, ad.ndim)
    if ad.ndim == 0:
        return _from(np.zeros((), np.int64))
    return _from(fn(ad, axis=axes[0], keepdims=keepdim).astype(np.int64))


def prod(a, dim=None, keepdim=False, dtype=None, *, axis=None, keepdims=None):
    """Product of all elements, or along one dim (torch.prod). The gradient of each element is the product of
    the others (prefix times suffix products, no division), so it is exact when the input holds zeros."""
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("prod", dim, keepdim, axis, keepdims)
    if dim is not None and not isinstance(dim, int):
        raise OpError("prod", f"dim must be one int (as torch.prod), got {dim!r}")
    ad = a.data
    axes = _axes("prod", dim, ad.ndim)
    if dtype is None:  # booleans and integers multiply to int64, as in torch
        dtype = np.int64 if ad.dtype.kind in "biu" else ad.dtype
    if ad.ndim == 0:
        out = np.array(ad, dtype=dtype)
    else:
        out = np.asarray(np.prod(ad, axis=axes, keepdims=keepdim and axes is not None), dtype=dtype)
    shape = ad.shape

    def backward(g):
        if ad.ndim == 0:
            return (np.array(g),)
        if axes is None:
            others = _others_product(ad.reshape(-1), 0).reshape(shape)
        else:
            others = _others_product(ad, axes[0])
        return ((_expand_back(g, shape, axes, keepdim) * others).astype(g.dtype, copy=False),)

    return make_result(out, (a,), backward, "prod", saved=(a,))


def _others_product(x, axis):
    """For each element along ``axis``, the product of all the others: prefix product * suffix product."""
    xm = np.moveaxis(x, axis, -1)
    left = np.ones_like(xm)
    right = np.ones_like(xm)
    if xm.shape[-1] > 1:
        np.cumprod(xm[..., :-1], axis=-1, out=left[..., 1:])
        right[..., :-1] = np.cumprod(xm[..., :0:-1], axis=-1)[..., ::-1]
    return np.moveaxis(left * right, -1, axis)


def logsumexp(a, dim=None, keepdim=False, *, axis=None, keepdims=None):
    """log(sum(exp(a))) over ``dim`` (an int or a tuple; required, as torch.logsumexp), computed stably: the
    largest element is taken out before exp, so large inputs do not overflow and -inf rows give -inf."""
    if axis is not None or keepdims is not None:
        dim, keepdim = _np_names("logsumexp", dim, keepdim, axis, keepdims)
    if dim is None:
        raise OpError("logsumexp", "dim must be given (an int or a tuple of ints), as for torch.logsumexp")
    ad = a.data
    axes = _axes("logsumexp", dim, ad.ndim)
    if ad.dtype.kind != "f":  # integers and booleans give a float result, as in torch
        ad = ad.astype(np.float32)
    if ad.ndim == 0:

        def backward0(g):
            return (np.array(g),)

        return make_result(ad.copy(), (a,), backward0, "logsumexp", saved=())
    m = np.max(ad, axis=axes, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0).astype(ad.dtype, copy=False)
    total = np.sum(np.exp(ad - m), axis=axes, keepdims=True)
    with np.errstate(divide="ignore"):
        kept = np.log(total) + m
    out = kept if keepdim else np.squeeze(kept, axis=axes)

    def backward(g):
        # softmax(a) = exp(a - m) / total: exact where exp(a - out) would lose out's rounding (1000 + log 2 in f32)
        gg = g if keepdim else np.expand_dims(g, axes)
        with np.errstate(invalid="ignore", divide="ignore"):  # a row of -inf has no direction: nan, as torch
            return ((gg * (np.exp(ad - m) / total)).astype(g.dtype, copy=False),)

    return make_result(out, (a,), backward, "logsumexp", saved=(a,))


def cumsum(a, dim=None, dtype=None, *, axis=None):
    """Running sum along ``dim`` (required, as torch.cumsum); the gradient is the reversed running sum."""
    if axis is not None:
        dim, _ = _np_names("cumsum", dim, False, axis, None)
    if dim is None or not isinstance(dim, int):
        raise OpError("cumsum", f"dim must be one int, got {dim!r}")
    ad = a.data
    axes = _axes("cumsum", dim, ad.ndim)
    ax = axes[0] if ad.ndim else 0
    if dtype is None:  # booleans and integers accumulate in int64, as in torch
        dtype = np.int64 if ad.dtype.kind in "biu" else ad.dtype
    out = np.array(ad, dtype=dtype) if ad.ndim == 0 else np.cumsum(ad, axis=ax, dtype=dtype)
    src = ad.dtype

    def backward(g):
        if g.ndim == 0:
            return (np.array(g, dtype=src),)
        return (np.flip(np.cumsum(np.flip(g, ax), axis=ax), ax).astype(src, copy=False),)

    return make_result(out, (a,), backward, "cumsum", saved=())


class ReduceMethods:
    """Tensor's reduction methods (mixed into Tensor). ``axis=``/``keepdims=`` are torch's NumPy-style aliases."""

    __slots__ = ()

    def sum(self, dim=None, keepdim=False, dtype=None, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("sum", dim, keepdim, axis, keepdims)
        return sum(self, dim, keepdim, dtype)

    def mean(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("mean", dim, keepdim, axis, keepdims)
        return mean(self, dim, keepdim)

    def var(self, dim=None, keepdim=False, correction=1, unbiased=None, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("var", dim, keepdim, axis, keepdims)
        return var(self, dim, keepdim, correction, unbiased)

    def std(self, dim=None, keepdim=False, correction=1, unbiased=None, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("std", dim, keepdim, axis, keepdims)
        return std(self, dim, keepdim, correction, unbiased)

    def max(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("max", dim, keepdim, axis, keepdims)
        return max(self, dim, keepdim)

    def min(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("min", dim, keepdim, axis, keepdims)
        return min(self, dim, keepdim)

    def amax(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("amax", dim, keepdim, axis, keepdims)
        return amax(self, dim, keepdim)

    def amin(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("amin", dim, keepdim, axis, keepdims)
        return amin(self, dim, keepdim)

    def argmax(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("argmax", dim, keepdim, axis, keepdims)
        return argmax(self, dim, keepdim)

    def argmin(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("argmin", dim, keepdim, axis, keepdims)
        return argmin(self, dim, keepdim)

    def prod(self, dim=None, keepdim=False, dtype=None, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("prod", dim, keepdim, axis, keepdims)
        return prod(self, dim, keepdim, dtype)

    def logsumexp(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        if axis is not None or keepdims is not None:
            dim, keepdim = _np_names("logsumexp", dim, keepdim, axis, keepdims)
        return logsumexp(self, dim, keepdim)

    def cumsum(self, dim=None, dtype=None, *, axis=None):
        if axis is not None:
            dim, _ = _np_names("cumsum", dim, False, axis, None)
        return cumsum(self, dim, dtype)
