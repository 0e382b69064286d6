"""Reductions: sum, mean, var, std, max/min (values and indices), amax/amin, argmax/argmin."""
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
    return tuple(out)


def _expand_back(g, shape, axes, keepdim):
    """Reshape a reduced gradient so it broadcasts against the input again."""
    if axes is None:
        return np.broadcast_to(g.reshape((1,) * len(shape)) if len(shape) else g, shape)
    if not keepdim:
        g = np.expand_dims(g, axes)
    return np.broadcast_to(g, shape)


def sum(a, dim=None, keepdim=False, dtype=None):
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


def mean(a, dim=None, keepdim=False):
    if a.data.dtype.kind != "f":
        raise OpError("mean", f"needs a floating-point tensor, got {a.data.dtype}")
    axes = _axes("mean", dim, a.data.ndim)
    out = np.asarray(np.mean(a.data, axis=axes, keepdims=keepdim), dtype=a.data.dtype)
    shape = a.data.shape
    count = a.data.size if axes is None else int(np.prod([shape[i] for i in axes]))

    def backward(g):
        return (np.array(_expand_back(g / count, shape, axes, keepdim), dtype=g.dtype, order="C"),)
    return make_result(out, (a,), backward, "mean", saved=())


def var(a, dim=None, keepdim=False, correction=1, unbiased=None):
    """Variance (two-pass: mean first, then squared deviations), Bessel-corrected by default as torch."""
    if unbiased is not None:
        correction = 1 if unbiased else 0
    axes = _axes("var", dim, a.data.ndim)
    n = a.data.size if axes is None else int(np.prod([a.data.shape[i] for i in axes]))
    d = a - mean(a, dim=axes, keepdim=True)
    return sum(d * d, dim=axes, keepdim=keepdim) / builtins.max(n - correction, 0)


def std(a, dim=None, keepdim=False, correction=1, unbiased=None):
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
    axis = _axes(op, dim, ad.ndim)[0]
    idx = arg_fn(ad, axis=axis, keepdims=True) if ad.ndim else np.zeros((), np.int64)
    values = np.take_along_axis(ad, idx, axis=axis) if ad.ndim else ad.copy()
    shape = ad.shape

    def backward(g):
        full = np.zeros(shape, dtype=g.dtype)
        gg = g if keepdim else np.expand_dims(g, axis)
        np.put_along_axis(full, idx, gg, axis=axis)
        return (full,)
    indices = idx.squeeze(axis) if not keepdim and ad.ndim else idx
    if not keepdim and ad.ndim:
        values = values.squeeze(axis)
    return _ValuesIndices(make_result(values, (a,), backward, op, saved=()), _from(indices.astype(np.int64)))


def max(a, dim=None, keepdim=False):
    """Without dim: the largest element (ties share the gradient). With dim: (values, indices), as torch."""
    if isinstance(dim, TensorBase):
        return maximum(a, dim)
    return _extreme("max", a, dim, keepdim, np.max, np.argmax)


def min(a, dim=None, keepdim=False):
    if isinstance(dim, TensorBase):
        return minimum(a, dim)
    return _extreme("min", a, dim, keepdim, np.min, np.argmin)


def amax(a, dim=None, keepdim=False):
    if dim is None:
        return max(a)
    axes = _axes("amax", dim, a.data.ndim)
    return _amaxmin("amax", a, axes, keepdim, np.max)


def amin(a, dim=None, keepdim=False):
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


def argmax(a, dim=None, keepdim=False):
    if dim is None:
        return _from(np.asarray(np.argmax(a.data), dtype=np.int64))
    return _from(np.argmax(a.data, axis=dim, keepdims=keepdim).astype(np.int64))


def argmin(a, dim=None, keepdim=False):
    if dim is None:
        return _from(np.asarray(np.argmin(a.data), dtype=np.int64))
    return _from(np.argmin(a.data, axis=dim, keepdims=keepdim).astype(np.int64))



class ReduceMethods:
    """Tensor's reduction methods (mixed into Tensor)."""

    __slots__ = ()

    def sum(self, dim=None, keepdim=False, dtype=None):
        return sum(self, dim, keepdim, dtype)

    def mean(self, dim=None, keepdim=False):
        return mean(self, dim, keepdim)

    def var(self, dim=None, keepdim=False, correction=1, unbiased=None):
        return var(self, dim, keepdim, correction, unbiased)

    def std(self, dim=None, keepdim=False, correction=1, unbiased=None):
        return std(self, dim, keepdim, correction, unbiased)

    def max(self, dim=None, keepdim=False):
        return max(self, dim, keepdim)

    def min(self, dim=None, keepdim=False):
        return min(self, dim, keepdim)

    def amax(self, dim=None, keepdim=False):
        return amax(self, dim, keepdim)

    def amin(self, dim=None, keepdim=False):
        return amin(self, dim, keepdim)

    def argmax(self, dim=None, keepdim=False):
        return argmax(self, dim, keepdim)

    def argmin(self, dim=None, keepdim=False):
        return argmin(self, dim, keepdim)
