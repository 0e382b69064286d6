"""Indexing ops: tensor[index] (basic indices give views, integer arrays gather), where, masked_fill, embedding."""
from __future__ import annotations

import builtins

import numpy as np

from mpnn.core.elementwise import _pair, unbroadcast
from mpnn.core.errors import OpError
from mpnn.core.tensor_base import TensorBase, as_tensor, make_result, make_view


def _is_basic(idx):
    if isinstance(idx, tuple):
        return builtins.all(_is_basic(i) for i in idx)
    return idx is None or idx is Ellipsis or isinstance(idx, (int, np.integer, slice))


def _unwrap_index(idx):
    if isinstance(idx, TensorBase):
        return idx.data
    if isinstance(idx, tuple):
        return tuple(_unwrap_index(i) for i in idx)
    if isinstance(idx, list):
        return np.asarray([_unwrap_index(i) for i in idx])
    return idx


def getitem(a, idx):
    idx = _unwrap_index(idx)
    basic = _is_basic(idx)
    if basic and Ellipsis not in (idx if isinstance(idx, tuple) else (idx,)):
        idx = (idx if isinstance(idx, tuple) else (idx,)) + (Ellipsis,)  # a 0-d view, never a NumPy scalar
    try:
        out = a.data[idx]
    except IndexError as e:
        raise OpError("index", f"{e} (tensor of shape {a.data.shape})") from None
    shape, dtype = a.data.shape, a.data.dtype

    def backward(g):
        full = np.zeros(shape, dtype=g.dtype)
        if basic:
            full[idx] = g  # basic indices never repeat an element
        else:
            np.add.at(full, idx, g)  # integer arrays may select an element more than once
        return (full,)
    if basic:
        return make_view(out, a, backward, "index", lambda arr: arr[idx])
    if not isinstance(out, np.ndarray):
        out = np.asarray(out, dtype=dtype)
    return make_result(out, (a,), backward, "index", saved=())


def where(cond, a, b):
    cond = cond.data if isinstance(cond, TensorBase) else np.asarray(cond)
    if cond.dtype != np.bool_:
        raise OpError("where", f"condition must be bool, got {cond.dtype}")
    a, b = _pair("where", a, b)
    try:
        out = np.where(cond, a.data, b.data)
    except ValueError:
        raise OpError("where", f"shapes {cond.shape}, {a.data.shape}, {b.data.shape} do not broadcast") from None
    sa, sb = a.data.shape, b.data.shape

    def backward(g):
        return (unbroadcast(np.where(cond, g, 0).astype(g.dtype), sa) if a.requires_grad else None,
                unbroadcast(np.where(cond, 0, g).astype(g.dtype), sb) if b.requires_grad else None)
    return make_result(out, (a, b), backward, "where", saved=())


def masked_fill(a, mask, value):
    m = mask.data if isinstance(mask, TensorBase) else np.asarray(mask)
    return where(m, as_tensor(value, like=a), a)



def embedding(input, weight: TensorBase, padding_idx: int | None = None) -> TensorBase:
    """Rows of ``weight`` picked by integer ``input``; the padding row gets no gradient (as torch)."""
    idx = input.data if isinstance(input, TensorBase) else np.asarray(input)
    if idx.dtype.kind not in "iu":
        raise OpError("embedding", f"indices must be integers, got {idx.dtype}")
    num = weight.data.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        bad = idx[(idx < 0) | (idx >= num)].flat[0]
        raise OpError("embedding", f"index {bad} is out of range for an embedding of {num} rows")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num
    out = weight.data[idx]
    wshape = weight.data.shape

    def backward(g):
        full = np.zeros(wshape, dtype=g.dtype)
        np.add.at(full, idx.reshape(-1), g.reshape(-1, wshape[1]))
        if padding_idx is not None:
            full[padding_idx] = 0
        return (full,)
    return make_result(out, (weight,), backward, "embedding", saved=())


class IndexingMethods:
    """Tensor's indexing methods (mixed into Tensor); writes (``t[i] = v``) are in mpnn.core.inplace."""

    __slots__ = ()

    def __getitem__(self, idx):
        return getitem(self, idx)

    def masked_fill(self, mask, value):
        return masked_fill(self, mask, value)
