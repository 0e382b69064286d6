"""softmax, log_softmax, dropout and embedding: fused forward/backward pairs (cheaper than composing)."""
from __future__ import annotations

import numpy as np

from mpnn.core.errors import OpError
from mpnn.core.tensor import OUTPUT, Tensor, make_result


def _dim(op, dim, ndim):
    if dim is None:
        raise OpError(op, "dim must be given (implicit dim is deprecated in torch too)")
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise OpError(op, f"dim {dim} is out of range for a tensor of {ndim} dimensions")
    return dim % max(ndim, 1)


def softmax(a: Tensor, dim: int = None, dtype=None) -> Tensor:
    x = a.data if dtype is None else a.data.astype(dtype)
    ax = _dim("softmax", dim, x.ndim)
    e = np.exp(x - x.max(axis=ax, keepdims=True))
    out = e / e.sum(axis=ax, keepdims=True)

    def backward(g):
        return (out * (g - (g * out).sum(axis=ax, keepdims=True)),)
    return make_result(out, (a,), backward, "softmax", saved=(OUTPUT,))


def log_softmax(a: Tensor, dim: int = None, dtype=None) -> Tensor:
    x = a.data if dtype is None else a.data.astype(dtype)
    ax = _dim("log_softmax", dim, x.ndim)
    z = x - x.max(axis=ax, keepdims=True)
    out = z - np.log(np.exp(z).sum(axis=ax, keepdims=True))

    def backward(g):
        return (g - np.exp(out) * g.sum(axis=ax, keepdims=True),)
    return make_result(out, (a,), backward, "log_softmax", saved=(OUTPUT,))


def dropout(a: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0.0 <= p <= 1.0:
        raise OpError("dropout", f"probability p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return a
    from mpnn.core.random import generator
    if p == 1.0:
        mask = np.zeros(a.data.shape, dtype=a.data.dtype)
    else:
        keep = generator().random(a.data.shape, dtype=np.float32) >= p
        mask = keep.astype(a.data.dtype) * a.data.dtype.type(1.0 / (1.0 - p))

    def backward(g):
        return (g * mask,)
    return make_result(a.data * mask, (a,), backward, "dropout", saved=())


def embedding(input, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Rows of ``weight`` picked by integer ``input``; the padding row gets no gradient (as torch)."""
    idx = input.data if isinstance(input, Tensor) else np.asarray(input)
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
