"""What a convolution algorithm is to mpnn.core.conv: ConvProblem (one validated conv, as NCHW arrays and
its geometry), ConvSettings (the tunables), ConvAlgorithm (applies, forward, backward) and the per-thread
scratch arrays the algorithms share. The algorithms themselves live beside this file (conv_im2col.py,
conv_winograd.py); conv.py holds their selection order.

The small MNIST-1D convs take 30-150 us, so the per-call path allocates nothing it need not: conv.py builds
the ConvProblem with tuple.__new__ (no Python frame; two NamedTuples built the usual way cost 1.2-1.7 us
there, measured) and passes one live settings object (conv.SETTINGS) instead of a ConvSettings per call.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from mpnn.core import linalg

_local = threading.local()


class ConvProblem(NamedTuple):
    """One conv as the algorithms see it: x4 (N, C, H, W) C-contiguous, w4 (O, C/groups, kh, kw), b (O,) or
    None, all of one float dtype; geom = (kh, kw, sh, sw, ph, pw, dh, dw, groups) with ph, pw the top/left
    padding; the output is (N, O, oh, ow). weight_grad: whether a backward will want the weight's gradient
    (the weight requires grad and grad mode is on), so that forward may keep what that backward reads."""

    x4: np.ndarray
    w4: np.ndarray
    b: np.ndarray | None
    geom: tuple
    oh: int
    ow: int
    weight_grad: bool


class ConvSettings(NamedTuple):
    """The tunables: the im2col tile budget in bytes, the Winograd tile slots per chunk, and the fewest
    channels and output columns Winograd F(4x4, 3x3) takes on, the fewest channels F(2x2, 3x3) takes on
    (on maps narrower than that), the stride-2 Winograd's tiles per chunk, fewest input channels and output
    columns, and the fewest output positions per sample the 1x1 algorithm takes on. conv.SETTINGS has the same
    attributes, read live from conv.py's module constants (which tests patch); a ConvSettings fixes them, e.g.
    for conv.select."""

    tile_bytes: int
    winograd_tiles: int
    winograd_min_channels: int
    winograd_min_width: int
    winograd2_min_channels: int = 64
    winograd_s2_tiles: int = 256
    winograd_s2_min_channels: int = 64
    winograd_s2_min_width: int = 8
    pointwise_min_positions: int = 64


class ConvAlgorithm:
    """One way to compute a conv and its gradients.
    applies(problem, settings): whether it can and should run this conv (conv.py asks in selection order);
    settings: a ConvSettings or conv.SETTINGS.
    forward(problem, out, settings): write conv(x4, w4) + b into out (N, O, oh, ow); return the state its
    backward needs (it holds on to the input, the weight or what it made of them; never to `out`).
    backward(state, g4, need_x, need_w, need_b): (dx, dw, db) for the output gradient g4 (N, O, oh, ow),
    C-contiguous; dx shaped like x4, dw like w4, db (O,); None for each gradient not asked for."""

    name = "conv"

    def applies(self, problem, settings):
        raise NotImplementedError

    def forward(self, problem, out, settings):
        raise NotImplementedError

    def backward(self, state, g4, need_x, need_w, need_b):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


def gemm(a, b, out):
    """out (G, m, n) = a (G, m, k) @ b (G, k, n), one product per leading index: float32 products that
    linalg._mm's own AVX-512 kernel takes (K <= 1024) go there, the rest and any non-contiguous out to OpenBLAS.
    Measured (one thread, thread CPU ms, OpenBLAS 0.3.31 vs the own kernel): ResNet-18's strided-conv tile
    (128 x 577) @ (577 x 768) 0.81 vs 0.71, the F(2x2, 3x3) product (512 x 512) @ (512 x 128) 0.42 vs 0.38, the
    stem's (64 x 28) @ (28 x 2048) 0.07 vs 0.06; at K = 2305 OpenBLAS led (15.1 vs 15.8), hence the bound."""
    _, m, k = a.shape
    small = 2 * m * k * b.shape[2] < linalg._OWN_GEMM_MIN_FLOPS  # the MNIST-1D convs: no per-group Python calls
    if small or a.dtype != np.float32 or not out.flags.c_contiguous:
        return np.matmul(a, b, out=out)
    for i in range(a.shape[0]):
        linalg._mm(a[i], b[i], out=out[i])
    return out


def scratch(slot, shape, dtype):
    """A reusable work array for one tile (never handed out of an op), kept per thread, slot and dtype."""
    size = 1
    for s in shape:
        size *= s
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get((slot, dtype))
    if buf is None or buf.size < size:
        buf = bufs[(slot, dtype)] = np.empty(size, dtype)
    return buf[:size].reshape(shape)
