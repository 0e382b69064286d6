"""batch_norm and layer_norm with fused backward; variance by two passes (mean, then squared deviations)."""

from __future__ import annotations

import numpy as np

from mpnn.core.errors import OpError
from mpnn.core.tensor import Tensor, make_result


def _arr(t):
    return None if t is None else t.data


def batch_norm(
    input: Tensor,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Normalize over every dim but 1 (channels). Training uses batch statistics and updates the running
    ones in place (unbiased variance, as torch); eval uses the running statistics."""
    x = input.data
    if x.ndim < 2:
        raise OpError("batch_norm", f"expects input of shape (N, C, ...), got {x.shape}")
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and _arr(t).shape != (c,):
            raise OpError(
                "batch_norm", f"{name} has shape {_arr(t).shape} but the input has {c} channels (input shape {x.shape})"
            )
    axes = (0,) + tuple(range(2, x.ndim))
    bshape = (1, c) + (1,) * (x.ndim - 2)
    n = x.size // c
    if training:
        if n <= 1:
            raise OpError(
                "batch_norm", f"expected more than 1 value per channel when training, got input of shape {x.shape}"
            )
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

    return make_result(out, parents, backward, "batch_norm", saved=() if weight is None else (weight,))


def layer_norm(input: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Normalize over the trailing ``normalized_shape`` dims, then scale and shift elementwise."""
    x = input.data
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if x.shape[x.ndim - k :] != shape:
        raise OpError("layer_norm", f"normalized_shape {shape} does not match the trailing dims of input {x.shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and _arr(t).shape != shape:
            raise OpError("layer_norm", f"{name} has shape {_arr(t).shape}, expected {shape}")
    from mpnn.core import normalization_kernels as K

    n = int(np.prod(shape))
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    x2 = K.rows(x.astype(dt, copy=False), n)
    w = np.ones(n, dt) if weight is None else _arr(weight).astype(dt, copy=False).reshape(n)
    b = np.zeros(n, dt) if bias is None else _arr(bias).astype(dt, copy=False).reshape(n)
    m = x2.shape[0]
    out = np.empty_like(x2)
    mean = np.empty(m, np.float64)
    invstd = np.empty(m, np.float64)
    K.layer_norm_forward(x2, w, b, float(eps), out, mean, invstd)
    parents = tuple(t for t in (input, weight, bias) if t is not None)

    def backward(g):
        need_x = input.requires_grad
        need_wb = (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
        g2 = K.rows(g.astype(dt, copy=False), n)
        gx = np.empty_like(x2) if need_x else np.empty((0, n), dt)
        gw = np.zeros(n, np.float64)
        gb = np.zeros(n, np.float64)
        K.layer_norm_backward(x2, w, g2, mean, invstd, need_x, need_wb, gx, gw, gb)
        grads = [gx.reshape(x.shape).astype(x.dtype, copy=False) if need_x else None]
        if weight is not None:
            grads.append(gw.reshape(shape).astype(weight.data.dtype) if weight.requires_grad else None)
        if bias is not None:
            grads.append(gb.reshape(shape).astype(bias.data.dtype) if bias.requires_grad else None)
        return tuple(grads)

    return make_result(
        out.reshape(x.shape).astype(x.dtype, copy=False),
        parents,
        backward,
        "layer_norm",
        saved=(input,) if weight is None else (input, weight),
    )
