"""pad (torch.nn.functional.pad): constant, reflect, replicate and circular padding of the last dims.

The pad tuple runs from the last dim backwards: (left, right, top, bottom, ...). Negative pads crop.
Constant padding is two slice copies; the other modes gather each padded dim through an index map
(NumPy take), and their backward folds the gradient back with np.add.at on that map.
"""

from __future__ import annotations

import numpy as np

from mpnn.core.errors import OpError
from mpnn.core.tensor import as_tensor, make_result

_MODES = ("constant", "reflect", "replicate", "circular")


def pad(input, pad, mode="constant", value=None):
    """Pad the last len(pad)//2 dims of input by pad = (before_last, after_last, before_2nd_last, ...)."""
    input = as_tensor(input)
    x = input.data
    pairs = _pairs(x.shape, pad, mode)
    dims = [x.ndim - 1 - i for i in range(len(pairs))]
    out_shape = list(x.shape)
    for d, (lo, hi) in zip(dims, pairs):
        out_shape[d] = x.shape[d] + lo + hi
        if out_shape[d] < (0 if mode == "constant" else 1):
            raise OpError("pad", f"pad {tuple(pad)} leaves dim {d} of input {x.shape} with size {out_shape[d]}")
    if mode == "constant":
        return _constant(input, pairs, dims, tuple(out_shape), 0.0 if value is None else value)
    if value not in (None, 0, 0.0):
        raise OpError("pad", f'value={value!r} applies only to mode="constant", not {mode!r}')
    maps = [(d, _index_map(mode, x.shape[d], lo, hi, x.shape, pad)) for d, (lo, hi) in zip(dims, pairs)]
    out = x
    for d, idx in maps:
        out = np.take(out, idx, axis=d)

    def backward(g):
        for d, idx in reversed(maps):
            folded = np.zeros(g.shape[:d] + (x.shape[d],) + g.shape[d + 1 :], g.dtype)
            np.add.at(np.moveaxis(folded, d, 0), idx, np.moveaxis(g, d, 0))
            g = folded
        return (g,)

    return make_result(out, (input,), backward, "pad", saved=())


def _pairs(shape, pad, mode):
    """[(before, after)] for the last dims, checked: an even-length int sequence the input's rank covers."""
    if mode not in _MODES:
        raise OpError("pad", f"mode must be one of {_MODES}, got {mode!r}")
    if (
        not isinstance(pad, (tuple, list))
        or len(pad) % 2
        or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in pad)
    ):
        raise OpError("pad", f"pad must be a tuple of an even number of ints, got {pad!r}")
    count = len(pad) // 2
    if count > len(shape):
        raise OpError("pad", f"pad {tuple(pad)} pads {count} dims but the input {shape} has {len(shape)}")
    if mode != "constant" and not (1 <= count <= 3 and len(shape) in (count + 1, count + 2)):
        raise OpError(
            "pad",
            f'mode "{mode}" pads the last 1-3 dims of a batched or unbatched input '
            f"(pad of {count} dims needs {count + 1} or {count + 2} dims), got input {shape}",
        )
    return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(count)]


def _constant(input, pairs, dims, out_shape, value):
    """Fill with value, then copy the (cropped) input into its place; backward slices the gradient back."""
    x = input.data
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    for d, (lo, hi) in zip(dims, pairs):
        src[d] = slice(max(-lo, 0), x.shape[d] - max(-hi, 0))
        dst[d] = slice(max(lo, 0), out_shape[d] - max(hi, 0))
    src, dst = tuple(src), tuple(dst)
    out = np.full(out_shape, value, dtype=x.dtype)
    out[dst] = x[src]

    def backward(g):
        dx = np.zeros(x.shape, g.dtype)
        dx[src] = g[dst]
        return (dx,)

    return make_result(out, (input,), backward, "pad", saved=())


def _index_map(mode, n, lo, hi, shape, pad):
    """Input position of each output position along one dim; as torch, a negative pad first crops the
    dim and the other side then pads the cropped dim."""
    start = max(-lo, 0)
    kept = n - start - max(-hi, 0)
    lo, hi = max(lo, 0), max(hi, 0)
    if mode == "reflect" and (lo >= kept or hi >= kept):
        raise OpError("pad", f"reflect padding {tuple(pad)} must be smaller than each padded dim of input {shape}")
    if mode == "circular" and (lo > kept or hi > kept):
        raise OpError("pad", f"circular padding {tuple(pad)} must be at most each padded dim of input {shape}")
    pos = np.arange(-lo, kept + hi)
    if mode == "replicate":
        pos = np.clip(pos, 0, kept - 1)
    elif mode == "circular":
        pos = pos % kept
    elif kept == 1:
        pos = np.zeros_like(pos)
    else:
        period = 2 * (kept - 1)
        pos = pos % period
        pos = np.where(pos >= kept, period - pos, pos)
    return pos + start
