"""Tensor constructors with torch's names: zeros, ones, full, arange, randn, rand, randint, eye, ..."""
from __future__ import annotations

import numpy as np

from mpnn.core.tensor import Tensor, to_dtype


def _shape(size):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        return tuple(size[0])
    return tuple(int(s) for s in size)


def _make(arr, dtype, requires_grad):
    if dtype is not None:
        arr = arr.astype(to_dtype(dtype), copy=False)
    return Tensor(arr, requires_grad=requires_grad)


def zeros(*size, dtype=None, requires_grad=False):
    return _make(np.zeros(_shape(size), dtype=to_dtype(dtype)), None, requires_grad)


def ones(*size, dtype=None, requires_grad=False):
    return _make(np.ones(_shape(size), dtype=to_dtype(dtype)), None, requires_grad)


def empty(*size, dtype=None, requires_grad=False):
    return _make(np.empty(_shape(size), dtype=to_dtype(dtype)), None, requires_grad)


def full(size, fill_value, dtype=None, requires_grad=False):
    if dtype is None and isinstance(fill_value, (int, np.integer)) and not isinstance(fill_value, bool):
        dtype = "int64"
    return _make(np.full(_shape((size,)), fill_value, dtype=to_dtype(dtype)), None, requires_grad)


def zeros_like(t, dtype=None, requires_grad=False):
    return _make(np.zeros_like(t.data, dtype=None if dtype is None else to_dtype(dtype)), None, requires_grad)


def ones_like(t, dtype=None, requires_grad=False):
    return _make(np.ones_like(t.data, dtype=None if dtype is None else to_dtype(dtype)), None, requires_grad)


def arange(start, end=None, step=1, dtype=None, requires_grad=False):
    if end is None:
        start, end = 0, start
    ints = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
    dt = to_dtype(dtype) if dtype is not None else (np.int64 if ints else np.float32)
    return _make(np.arange(start, end, step, dtype=dt), None, requires_grad)


def linspace(start, end, steps, dtype=None, requires_grad=False):
    return _make(np.linspace(start, end, steps, dtype=to_dtype(dtype)), None, requires_grad)


def eye(n, m=None, dtype=None, requires_grad=False):
    return _make(np.eye(n, m, dtype=to_dtype(dtype)), None, requires_grad)


def _gen():
    from mpnn.core.random import generator
    return generator()


def randn(*size, dtype=None, requires_grad=False):
    dt = to_dtype(dtype)
    return _make(_gen().standard_normal(_shape(size), dtype=np.float64).astype(dt), None, requires_grad)


def rand(*size, dtype=None, requires_grad=False):
    dt = to_dtype(dtype)
    return _make(_gen().random(_shape(size), dtype=np.float64).astype(dt), None, requires_grad)


def randint(low, high=None, size=(), dtype="int64"):
    if high is None:
        low, high = 0, low
    return _make(_gen().integers(low, high, size=_shape((size,)) if size != () else ()), dtype, False)


def randperm(n, dtype="int64"):
    return _make(_gen().permutation(n), dtype, False)


def from_numpy(arr: np.ndarray) -> Tensor:
    """Share memory with a NumPy array (no copy), keeping its dtype."""
    return Tensor._from_array(arr)
