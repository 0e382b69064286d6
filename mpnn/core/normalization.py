"""batch_norm and layer_norm with fused backward; variance by two passes (mean, then squared deviations)."""
from __future__ import annotations

import numpy as np

from mpnn.core.errors import OpError
from mpnn.core.tensor import Tensor, make_result


def _arr(t):
    return None if t is None else t.data


def batch_norm(input: Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalize over every dim but 1 (channels). Training uses batch statistics and updates the running
    ones in place (unbiased variance, as torch); eval uses the running statistics."""
    x = input.data
    if x.ndim < 2:
        raise OpError("batch_norm", f"expects input of shape (N, C, ...), got {x.shape}")
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and _arr(t).shape != (c,):
            raise OpError("batch_norm", f"{name} has shape {_arr(t).shape} but the input has {c} channels "
                                        f"(input shape {x.shape})")
    axes = (0,) + tuple(range(2, x.ndim))
    bshape = (1, c) + (1,) * (x.ndim - 2)
    n = x.size // c
    if training:
        if n <= 1:
            raise OpError("batch_norm", f"expected more than 1 value per channel when training, got input "
                                        f"of shape {x.shape}")
        mean = x.mean(axis=axes)
        centered = x - mean.reshape(bshape)
        var = (centered * centered).mean(axis=axes)
        if running_mean is not None:
            rm = _arr(running_mean)
            rm *= 1 - momentum
            rm += momentum * mean
        if running_var is not None:
            rv = _arr(running_var)
            rv *= 1 - momentum
            rv += momentum * var * (n / (n - 1))
    else:
        if running_mean is None or running_var is None:
            raise OpError("batch_norm", "eval mode needs running_mean and running_var")
        mean, var = _arr(running_mean), _arr(running_var)
        centered = x - mean.reshape(bshape)
    invstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    xhat = centered * invstd.reshape(bshape)
    w = _arr(weight)
    out = xhat * w.reshape(bshape) if w is not None else xhat.copy()
    if bias is not None:
        out += _arr(bias).reshape(bshape)
    parents = tuple(t for t in (input, weight, bias) if t is not None)

    def backward(g):
        gw = (g * xhat).sum(axis=axes) if weight is not None and weight.requires_grad else None
        gb = g.sum(axis=axes) if bias is not None and bias.requires_grad else None
        gx = None
        if input.requires_grad:
            dxhat = g * w.reshape(bshape) if w is not None else g
            if training:
                s1 = dxhat.sum(axis=axes).reshape(bshape)
                s2 = (dxhat * xhat).sum(axis=axes).reshape(bshape)
                gx = (invstd.reshape(bshape) / n) * (n * dxhat - s1 - xhat * s2)
            else:
                gx = dxhat * invstd.reshape(bshape)
        grads = [gx]
        if weight is not None:
            grads.append(gw)
        if bias is not None:
            grads.append(gb)
        return tuple(grads)
    return make_result(out, parents, backward, "batch_norm",
                       saved=() if weight is None else (weight,))


def layer_norm(input: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Normalize over the trailing ``normalized_shape`` dims, then scale and shift elementwise."""
    x = input.data
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if x.shape[x.ndim - k:] != shape:
        raise OpError("layer_norm", f"normalized_shape {shape} does not match the trailing dims of input "
                                    f"{x.shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and _arr(t).shape != shape:
            raise OpError("layer_norm", f"{name} has shape {_arr(t).shape}, expected {shape}")
    axes = tuple(range(x.ndim - k, x.ndim))
    n = int(np.prod(shape))
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)
    invstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    xhat = centered * invstd
    w = _arr(weight)
    out = xhat * w if w is not None else xhat.copy()
    if bias is not None:
        out += _arr(bias)
    parents = tuple(t for t in (input, weight, bias) if t is not None)
    lead = tuple(range(x.ndim - k))

    def backward(g):
        grads = []
        if input.requires_grad:
            dxhat = g * w if w is not None else g
            s1 = dxhat.sum(axis=axes, keepdims=True)
            s2 = (dxhat * xhat).sum(axis=axes, keepdims=True)
            grads.append((invstd / n) * (n * dxhat - s1 - xhat * s2))
        else:
            grads.append(None)
        if weight is not None:
            grads.append((g * xhat).sum(axis=lead) if weight.requires_grad else None)
        if bias is not None:
            grads.append(g.sum(axis=lead) if bias.requires_grad else None)
        return tuple(grads)
    return make_result(out, parents, backward, "layer_norm",
                       saved=() if weight is None else (weight,))
