"""Max, average and adaptive-average pooling (PyTorch semantics, NCHW / NCL) over Numba window loops.

The 1-d ops are the 2-d kernels with a height of 1. Windows are clipped to the input once per output
row/column, so the inner loops carry no bounds checks; sums accumulate in float64.
"""

from __future__ import annotations

import numpy as np

from mpnn.core import conv_kernels as K
from mpnn.core.conv import _ints
from mpnn.core.errors import OpError
from mpnn.core.tensor import Tensor, as_tensor, make_result

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max over windows of (N, C, L) or (C, L) input; with return_indices also the argmax positions."""
    return _max_pool("max_pool1d", 1, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max over windows of (N, C, H, W) or (C, H, W) input; indices are flat h*W + w within each plane."""
    return _max_pool("max_pool2d", 2, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Mean over windows of (N, C, L) or (C, L) input (zero padding counted unless count_include_pad=False)."""
    return _avg_pool("avg_pool1d", 1, input, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """Mean over windows of (N, C, H, W) or (C, H, W) input; divisor_override replaces the window size."""
    return _avg_pool(
        "avg_pool2d", 2, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


def adaptive_avg_pool2d(input, output_size):
    """Mean over PyTorch's adaptive windows so that the output is output_size (an int, or (h, w) where
    None keeps that input size)."""
    op = "adaptive_avg_pool2d"
    input = as_tensor(input)
    x, batched = _input(op, 2, input)
    h, w = x.shape[2:]
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        sizes = tuple(output_size)
    else:
        sizes = (output_size, output_size)
    if not all(s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0) for s in sizes):
        raise OpError(
            op, f"output_size must be an int >= 0 or a pair of them (None keeps the input size), got {output_size!r}"
        )
    oh = h if sizes[0] is None else int(sizes[0])
    ow = w if sizes[1] is None else int(sizes[1])
    out = np.empty((x.shape[0], x.shape[1], oh, ow), x.dtype)
    K.adaptive_avg_pool2d_forward(x, out)

    def backward(g):
        dx = np.empty(x.shape, x.dtype)
        K.adaptive_avg_pool2d_backward(np.ascontiguousarray(g).reshape(out.shape), dx)
        return (dx.reshape(input.data.shape),)

    return make_result(out if batched else out[0], (input,), backward, op, saved=())


def _input(op, nd, input):
    """The input as a contiguous float (N, C, H, W) array (a 1-d input gets H = 1), and whether it was
    batched."""
    data = as_tensor(input).data
    if data.ndim not in (nd + 1, nd + 2):
        layout = "(N, C, L) or (C, L)" if nd == 1 else "(N, C, H, W) or (C, H, W)"
        raise OpError(op, f"expected input of shape {layout}, got {data.shape}")
    if data.dtype not in _FLOATS:
        raise OpError(op, f"input must be float32 or float64, got {data.dtype} (shape {data.shape})")
    if 0 in data.shape[-nd - 1 :]:
        raise OpError(op, f"expected non-empty channel and spatial dims, got input {data.shape}")
    batched = data.ndim == nd + 2
    x = data if batched else data[None]
    if nd == 1:
        x = x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])
    return np.ascontiguousarray(x), batched


def _windows(op, nd, x, kernel_size, stride, padding, dilation, ceil_mode):
    """(kernel, stride, padding, dilation, output size) per spatial dim, checked as PyTorch checks them."""
    kernel = _ints(op, "kernel_size", kernel_size, nd, 1)
    stride = (
        kernel
        if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
        else _ints(op, "stride", stride, nd, 1)
    )
    padding = _ints(op, "padding", padding, nd, 0)
    dilation = _ints(op, "dilation", dilation, nd, 1)
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise OpError(op, f"padding {padding} must be at most half the kernel size {kernel}")
    sizes = []
    for size, k, s, p, d in zip(x.shape[-nd:], kernel, stride, padding, dilation):
        out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside input or left pad
            out -= 1
        if out < 1:
            raise OpError(
                op,
                f"input {x.shape} is too small for kernel {kernel} (stride {stride}, padding "
                f"{padding}, dilation {dilation}): output size would be {out}",
            )
        sizes.append(out)
    if nd == 1:
        return (1,) + kernel, (1,) + stride, (0,) + padding, (1,) + dilation, [1] + sizes
    return kernel, stride, padding, dilation, sizes


def _max_pool(op, nd, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    input = as_tensor(input)
    x, _ = _input(op, nd, input)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = _windows(
        op, nd, x, kernel_size, stride, padding, dilation, ceil_mode
    )
    out = np.empty((x.shape[0], x.shape[1], oh, ow), x.dtype)
    argmax = np.empty(out.shape, np.int64)
    K.max_pool2d_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, out, argmax)

    def backward(g):
        dx = np.empty(x.shape, x.dtype)
        K.max_pool2d_backward(np.ascontiguousarray(g).reshape(out.shape), argmax, dx)
        return (dx.reshape(input.data.shape),)

    shape = input.data.shape[:-nd] + (out.shape[2:] if nd == 2 else out.shape[3:])
    result = make_result(out.reshape(shape), (input,), backward, op, saved=())
    if return_indices:
        return result, Tensor._from_array(argmax.reshape(shape))
    return result


def _avg_pool(op, nd, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    input = as_tensor(input)
    x, _ = _input(op, nd, input)
    (kh, kw), (sh, sw), (ph, pw), _, (oh, ow) = _windows(op, nd, x, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and (not isinstance(divisor_override, (int, np.integer)) or divisor_override == 0):
        raise OpError(op, f"divisor_override must be a non-zero int or None, got {divisor_override!r}")
    divisor = 0 if divisor_override is None else int(divisor_override)
    include = bool(count_include_pad)
    out = np.empty((x.shape[0], x.shape[1], oh, ow), x.dtype)
    K.avg_pool2d_forward(x, kh, kw, sh, sw, ph, pw, include, divisor, out)

    def backward(g):
        dx = np.empty(x.shape, x.dtype)
        K.avg_pool2d_backward(np.ascontiguousarray(g).reshape(out.shape), kh, kw, sh, sw, ph, pw, include, divisor, dx)
        return (dx.reshape(input.data.shape),)

    shape = input.data.shape[:-nd] + (out.shape[2:] if nd == 2 else out.shape[3:])
    return make_result(out.reshape(shape), (input,), backward, op, saved=())
