"""batch_norm and layer_norm as Numba kernels (normalization_kernels.py): fused forward and backward; variance by
two passes (mean, then squared deviations), accumulated in float64."""

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
    from mpnn.core import normalization_kernels as K

    n = x.size // c
    if training and n <= 1:
        raise OpError(
            "batch_norm", f"expected more than 1 value per channel when training, got input of shape {x.shape}"
        )
    if not training and (running_mean is None or running_var is None):
        raise OpError("batch_norm", "eval mode needs running_mean and running_var")
    dt = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    positions = int(np.prod(x.shape[2:]))  # L: 1 for (N, C) input
    x3 = np.ascontiguousarray(x, dtype=dt).reshape(x.shape[0], c, positions)  # (N, C, L): a copy only when strided
    w = np.ones(c, dt) if weight is None else _arr(weight).astype(dt, copy=False)
    b = np.zeros(c, dt) if bias is None else _arr(bias).astype(dt, copy=False)
    out = np.empty_like(x3)
    if training:
        mean, invstd, var = np.empty(c, dt), np.empty(c, dt), np.empty(c, np.float64)
        K.batch_norm_train_forward(x3, w, b, float(eps), out, mean, invstd, var)
        if running_mean is not None:
            rm = _arr(running_mean)
            rm *= 1 - momentum
            rm += momentum * mean
        if running_var is not None:
            rv = _arr(running_var)
            rv *= 1 - momentum
            rv += momentum * var * (n / (n - 1))
    else:
        mean = _arr(running_mean).astype(dt)
        invstd = (1.0 / np.sqrt(_arr(running_var).astype(np.float64) + eps)).astype(dt)
        K.batch_norm_eval_forward(x3, mean, invstd, w, b, out)
    parents = tuple(t for t in (input, weight, bias) if t is not None)

    def backward(g):
        need_x = input.requires_grad
        g3 = np.ascontiguousarray(g, dtype=dt).reshape(x3.shape)
        gx = np.empty_like(x3) if need_x else x3[:0]
        gw = np.empty(c, np.float64)
        gb = np.empty(c, np.float64)
        K.batch_norm_backward(x3, g3, mean, invstd, w, training, need_x, gx, gw, gb)
        grads = [gx.reshape(x.shape).astype(x.dtype, copy=False) if need_x else None]
        if weight is not None:
            grads.append(gw.astype(weight.data.dtype) if weight.requires_grad else None)
        if bias is not None:
            grads.append(gb.astype(bias.data.dtype) if bias.requires_grad else None)
        return tuple(grads)

    # backward recomputes xhat from the input, the per-channel mean and 1/std (as torch keeps them), so the input
    # is saved; the output is not read (a residual block's in-place `out += identity` is fine)
    return make_result(
        out.reshape(x.shape).astype(x.dtype, copy=False),
        parents,
        backward,
        "batch_norm",
        saved=(input,) if weight is None else (input, weight),
    )


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
