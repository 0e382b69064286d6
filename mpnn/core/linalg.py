"""Linear algebra: matmul with torch's broadcasting rules, and linear (x @ W.T + b) as one node."""
from __future__ import annotations

import numpy as np

from mpnn.core.elementwise import _pair, unbroadcast
from mpnn.core.errors import OpError
from mpnn.core.tensor_base import make_result


def matmul(a, b):
    """Matrix product with torch.matmul's rules: 1-D operands promoted, batch dims broadcast."""
    a, b = _pair("matmul", a, b)
    ad, bd = a.data, b.data
    if ad.ndim == 0 or bd.ndim == 0:
        raise OpError("matmul", f"both operands need at least 1 dimension, got shapes {ad.shape} and {bd.shape}")
    if ad.dtype != bd.dtype:
        raise OpError("matmul", f"operands have different dtypes {ad.dtype} and {bd.dtype} (shapes {ad.shape} "
                                f"and {bd.shape}); cast one with .to(...) first")
    try:
        out = ad @ bd
    except ValueError:
        raise OpError("matmul", f"shapes {ad.shape} and {bd.shape} cannot be multiplied "
                                f"({ad.shape[-1]} != {bd.shape[-2] if bd.ndim > 1 else bd.shape[0]})") from None

    def backward(g):
        if ad.ndim == 1 and bd.ndim == 1:
            return (g * bd if a.requires_grad else None, g * ad if b.requires_grad else None)
        a2 = ad[None, :] if ad.ndim == 1 else ad
        b2 = bd[:, None] if bd.ndim == 1 else bd
        g2 = g
        if ad.ndim == 1:
            g2 = np.expand_dims(g2, -2)
        if bd.ndim == 1:
            g2 = np.expand_dims(g2, -1)
        ga = gb = None
        if a.requires_grad:
            ga = g2 @ np.swapaxes(b2, -1, -2)
            ga = unbroadcast(ga, a2.shape).reshape(ad.shape)
        if b.requires_grad:
            gb = np.swapaxes(a2, -1, -2) @ g2
            gb = unbroadcast(gb, b2.shape).reshape(bd.shape)
        return ga, gb
    return make_result(out, (a, b), backward, "matmul", saved=(a, b))


def linear(x, weight, bias=None):
    """x @ weight.T + bias in one node (one GEMM forward, two backward), as torch.nn.functional.linear."""
    xd, wd = x.data, weight.data
    if xd.dtype != wd.dtype:
        raise OpError("linear", f"input dtype {xd.dtype} does not match weight dtype {wd.dtype} "
                                f"(input shape {xd.shape}, weight shape {wd.shape})")
    if wd.ndim != 2 or xd.shape[-1:] != wd.shape[1:]:
        raise OpError("linear", f"input of shape {xd.shape} does not match weight of shape {wd.shape} "
                                f"(expects last dim {wd.shape[-1] if wd.ndim else '?'})")
    out = xd @ wd.T
    if bias is not None:
        if bias.data.shape != (wd.shape[0],):
            raise OpError("linear", f"bias of shape {bias.data.shape} does not match weight {wd.shape}")
        out += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        gx = g @ wd if x.requires_grad else None
        gw = gb = None
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            g2 = g.reshape(-1, g.shape[-1])
            if weight.requires_grad:
                gw = g2.T @ xd.reshape(-1, xd.shape[-1])
            if bias is not None and bias.requires_grad:
                gb = g2.sum(axis=0)
        return (gx, gw) if bias is None else (gx, gw, gb)
    return make_result(out, parents, backward, "linear", saved=(x, weight))



class LinalgMethods:
    """Tensor's matrix-product operators and methods (mixed into Tensor)."""

    __slots__ = ()

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def matmul(self, other):
        return matmul(self, other)
