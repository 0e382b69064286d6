"""Tensor constructors with torch's names: zeros, ones, full, arange, randn, rand, randint, eye, ..."""

from __future__ import annotations

import numpy as np

from mpnn.core.tensor import Tensor, check_device, to_dtype


def _shape(size):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        return tuple(size[0])
    return tuple(int(s) for s in size)


def _make(arr, dtype, requires_grad, device=None, where="tensor"):
    check_device(device, where)
    if dtype is not None:
        arr = arr.astype(to_dtype(dtype), copy=False)
    return Tensor(arr, requires_grad=requires_grad)


def zeros(*size, dtype=None, requires_grad=False, device=None):
    return _make(np.zeros(_shape(size), dtype=to_dtype(dtype)), None, requires_grad, device, "zeros")


def ones(*size, dtype=None, requires_grad=False, device=None):
    return _make(np.ones(_shape(size), dtype=to_dtype(dtype)), None, requires_grad, device, "ones")


def empty(*size, dtype=None, requires_grad=False, device=None):
    return _make(np.empty(_shape(size), dtype=to_dtype(dtype)), None, requires_grad, device, "empty")


def full(size, fill_value, dtype=None, requires_grad=False, device=None):
    if dtype is None and isinstance(fill_value, (int, np.integer)) and not isinstance(fill_value, bool):
        dtype = "int64"
    return _make(np.full(_shape((size,)), fill_value, dtype=to_dtype(dtype)), None, requires_grad, device, "full")


def zeros_like(t, dtype=None, requires_grad=False, device=None):
    return _make(
        np.zeros_like(t.data, dtype=None if dtype is None else to_dtype(dtype)),
        None,
        requires_grad,
        device,
        "zeros_like",
    )


def ones_like(t, dtype=None, requires_grad=False, device=None):
    return _make(
        np.ones_like(t.data, dtype=None if dtype is None else to_dtype(dtype)), None, requires_grad, device, "ones_like"
    )


def arange(start, end=None, step=1, dtype=None, requires_grad=False, device=None):
    if end is None:
        start, end = 0, start
    ints = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
    dt = to_dtype(dtype) if dtype is not None else (np.int64 if ints else np.float32)
    return _make(np.arange(start, end, step, dtype=dt), None, requires_grad, device, "arange")


def linspace(start, end, steps, dtype=None, requires_grad=False, device=None):
    return _make(np.linspace(start, end, steps, dtype=to_dtype(dtype)), None, requires_grad, device, "linspace")


def eye(n, m=None, dtype=None, requires_grad=False, device=None):
    return _make(np.eye(n, m, dtype=to_dtype(dtype)), None, requires_grad, device, "eye")


def _gen():
    from mpnn.core.random import generator

    return generator()


def randn(*size, dtype=None, requires_grad=False, device=None):
    dt = to_dtype(dtype)
    return _make(
        _gen().standard_normal(_shape(size), dtype=np.float64).astype(dt), None, requires_grad, device, "randn"
    )


def rand(*size, dtype=None, requires_grad=False, device=None):
    dt = to_dtype(dtype)
    return _make(_gen().random(_shape(size), dtype=np.float64).astype(dt), None, requires_grad, device, "rand")


def randint(low, high=None, size=None, dtype="int64", requires_grad=False, device=None):
    """Integers in [low, high): ``randint(high, size)`` or ``randint(low, high, size)``, as torch.randint."""
    if size is None:
        if isinstance(high, (tuple, list)):  # randint(high, size)
            low, high, size = 0, low, high
        else:
            size = ()
    if high is None:
        low, high = 0, low
    shape = _shape((size,)) if isinstance(size, (tuple, list)) else (int(size),)
    return _make(_gen().integers(low, high, size=shape), dtype, requires_grad, device, "randint")


def randperm(n, dtype="int64", requires_grad=False, device=None):
    return _make(_gen().permutation(n), dtype, requires_grad, device, "randperm")


def from_numpy(arr: np.ndarray) -> Tensor:
    """Share memory with a NumPy array (no copy), keeping its dtype."""
    return Tensor._from_array(arr)
