"""im2col + GEMM convolution (the algorithm every conv can take): the kernel taps of a tile of output positions
become the columns of one BLAS GEMM per tile and group.

A tile holds one sample's slice of positions (its GEMM lands straight in NCHW), one whole sample (maps of at
least _ONE_SAMPLE_POSITIONS positions) or, for small maps, several whole samples (then one transposing copy);
tiles are cut so that a tile's columns stay in L2 (tile_bytes, conv.py's _TILE_BYTES). A bias rides in the GEMM
as a row of ones (forward adds it, backward sums it for free). Backward recomputes the columns tile by tile, so
that a conv holds on to its input only, as torch's does, except for single-tile convs whose weight needs a
gradient: their forward keeps its columns. Tiles of whole samples of an ungrouped, undilated 2-D conv whose
kernel covers its stride gather and scatter through padded planes split by column phase (im2col_planes,
col2im_planes: contiguous runs per tap, no padding test); the forward GEMMs go through conv_algorithm.gemm (mpnn's
own kernel where linalg takes it).
"""

from __future__ import annotations

import functools

import numpy as np

from mpnn.core import conv_kernels as K
from mpnn.core.conv_algorithm import ConvAlgorithm, gemm, scratch

# Samples of at least this many output positions get a tile each (their GEMM is wide enough alone and writes
# straight into the NCHW output) instead of several samples a tile and a transposing copy after the GEMM.
# ResNet-18, batch 32, thread CPU ms, several samples a tile -> one (torch alongside, same process, load 1.1):
# stem 3->64 32x32 forward 3.22 -> 1.71, forward+backward 8.41 -> 4.72; 3x3 s2 64->128 32->16 11.51 -> 10.32,
# 39.53 -> 38.65; 1x1 s2 64->128 2.00 -> 1.86, 10.50 -> 7.62. From 64 positions the 128->256 16->8 conv lost
# (forward+backward 32.4 -> 38.9), hence 256.
_ONE_SAMPLE_POSITIONS = 256


class Im2colGemm(ConvAlgorithm):
    """Any geometry: strides, dilations, groups, uneven padding, conv1d as height 1."""

    name = "im2col"

    def applies(self, problem, settings):
        return True

    def forward(self, problem, out, settings):
        x4, w4, b, geom, oh, ow = problem.x4, problem.w4, problem.b, problem.geom, problem.oh, problem.ow
        groups = geom[8]
        per_position = (x4.shape[1] * w4.shape[2] * w4.shape[3] + groups) * x4.dtype.itemsize
        # a weight larger than the tile budget streams from memory once per tile: tiles up to twice as large
        # as the weight (ResNet-18's 512-channel 3x3 conv on 4x4 maps, batch 32: 11 tiles of 3 samples took
        # 87 ms forward+backward, one tile of 32 samples 56 ms; torch 51 ms)
        budget = max(settings.tile_bytes, 2 * w4.size * x4.dtype.itemsize)
        if oh * ow >= _ONE_SAMPLE_POSITIONS and per_position * oh * ow <= budget:
            budget = per_position * oh * ow  # one whole sample a tile: its GEMM lands in NCHW, no transposing copy
        plan = _plan(x4.shape[0], per_position, oh * ow, budget)
        # a single tile keeps its columns for backward: recomputing the 9.4 MB of the 4x4-map conv above
        # (runs of 4 floats) cost 6-9 ms of its 55-60
        keep = len(plan) == 1 and problem.weight_grad
        cols = _forward(x4, w4, b, geom, ow, plan, out.reshape(x4.shape[0], w4.shape[0], oh * ow), keep)
        return x4, w4, geom, ow, plan, cols

    def backward(self, state, g4, need_x, need_w, need_b):
        x4, w4, geom, ow, plan, cols = state
        g3 = g4.reshape(g4.shape[0], g4.shape[1], g4.shape[2] * g4.shape[3])
        return _backward(g3, x4, w4, geom, ow, plan, need_x, need_w, need_b, cols)


@functools.lru_cache(maxsize=256)
def _plan(n, per_position, positions, tile_bytes):
    """Tiles (n0, n1, p0, p1): samples n0..n1 and output positions p0..p1, each tile's columns ~tile_bytes
    (per_position: the bytes of one output position's column, bias row included)."""
    per_sample = per_position * positions
    if per_sample >= tile_bytes or n == 1:
        step = max(1, tile_bytes // per_position)
        return tuple((i, i + 1, p, min(p + step, positions)) for i in range(n) for p in range(0, positions, step))
    nb = max(1, tile_bytes // per_sample)
    return tuple((i, min(i + nb, n), 0, positions) for i in range(0, n, nb))


def _grouped_weight(w4, b, groups):
    """Weight as (G, O/G, taps) GEMM operands, with the bias appended as one more column when given."""
    out_ch = w4.shape[0]
    wg = w4.reshape(groups, out_ch // groups, -1)
    if b is None:
        return wg
    return np.concatenate((wg, b.reshape(groups, out_ch // groups, 1)), axis=2)


def _gather(x, geom, p0, ow, positions, cols):
    """im2col of the tile x (its samples) into cols (R, nb, T) (positions: oh * ow). Tiles of whole samples of
    an ungrouped, undilated 2-D conv whose kernel covers its stride go through im2col_planes (padded planes
    split by column phase), the rest through im2col (conv1d, 1x1 and grouped convs: unchanged, unmeasured).
    Measured over a batch of 32 (thread CPU ms, im2col -> im2col_planes): ResNet-18's 3x3 stride-2 64->128
    2.30 -> 1.68, 128->256 1.49 -> 0.98, 256->512 0.91 -> 0.83, the 3->64 stem 0.28 -> 0.14; a 1x1
    stride-2 conv reads a quarter of its input, and copying whole planes made it slower (0.38 -> 0.96)."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geom
    if _planes(geom, cols.shape[2] == positions):
        K.im2col_planes(x, kh, kw, sh, sw, ph, pw, ow, cols)
    else:
        K.im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow, cols)


def _planes(geom, whole):
    """Whether a tile (whole: of whole samples) goes through the padded-plane kernels (see _gather)."""
    kh, kw, sh, sw, _, _, dh, dw, groups = geom
    return whole and (dh, dw, groups) == (1, 1, 1) and 1 < kh and 1 < kw and sh <= kh and sw <= kw


def _scatter(dcols, geom, p0, ow, positions, dx):
    """col2im of dcols (R, nb, T) added into dx (the tile's samples), by the same rule as _gather: col2im_planes
    or col2im. The whole backward, batch 32, thread CPU (col2im -> col2im_planes; torch alongside, load 1.5):
    3x3 s2 64->128 30.35 -> 27.75 ms (torch 32.09), 128->256 20.66 -> 20.04 (20.23), 256->512 18.71 -> 17.92."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geom
    if _planes(geom, dcols.shape[2] == positions):
        K.col2im_planes(dcols, kh, kw, sh, sw, ph, pw, ow, dx)
    else:
        K.col2im(dcols, kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow, dx)


def _forward(x4, w4, b, geom, ow, plan, out, keep):
    """out (N, O, L) = conv(x4) tile by tile: im2col (Numba) then one GEMM (BLAS) per tile and group.
    keep (single-tile plans only): return the columns for backward instead of recomputing them there
    (they fit in the tile budget; it saved ~30 us of 250 on the MNIST-1D layers)."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geom
    wg = _grouped_weight(w4, b, groups)
    g_, og, rows = wg.shape
    out_ch = out.shape[1]
    for n0, n1, p0, p1 in plan:
        nb, t = n1 - n0, p1 - p0
        shape = (g_ * rows, nb, t)
        cols = np.empty(shape, x4.dtype) if keep else scratch("cols", shape, x4.dtype)
        kept = cols
        _gather(x4[n0:n1], geom, p0, ow, out.shape[2], cols)
        cols = cols.reshape(g_, rows, nb * t)
        if nb == 1:  # the GEMM writes this sample's positions in place: (O, t) is a strided block of out
            gemm(wg, cols, out[n0, :, p0:p1].reshape(g_, og, t))
        else:  # several whole samples in one GEMM, then (O, nb, L) -> (nb, O, L)
            res = scratch("res", (g_, og, nb * t), x4.dtype)
            gemm(wg, cols, res)
            K.swap_leading_axes(res.reshape(out_ch, nb, t), out[n0:n1])
    return kept if keep else None


def _backward(g3, x4, w4, geom, ow, plan, need_x, need_w, need_b, kept):
    """Gradients of conv(x4, w4) + b for output gradient g3 (N, O, L), recomputing columns tile by tile
    (or using the forward's, kept, whose bias row is dropped when the bias needs no gradient)."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geom
    dtype = x4.dtype
    out_ch = w4.shape[0]
    og = out_ch // groups
    taps = w4.shape[1] * kh * kw
    dx = np.zeros(x4.shape, dtype) if need_x else None
    db = None
    if need_b and not need_w:
        db = g3.sum(axis=(0, 2))
    rows = taps + (1 if need_w and need_b else 0)  # the ones row turns the bias gradient into one more GEMM row
    # dW as (G, O/G, taps) = g @ cols^T, C-contiguous like the weight: the (taps, O) product cols @ g^T ran
    # ~20% faster in OpenBLAS, but its transposed result made every optimizer step copy it back to the
    # weight's layout (ResNet-18: 64 ms a step in np.ascontiguousarray, measured)
    dwo = np.empty((groups, og, rows), dtype) if need_w else None
    first = True
    wt = w4.reshape(groups, og, taps).transpose(0, 2, 1) if need_x else None
    for n0, n1, p0, p1 in plan:
        nb, t = n1 - n0, p1 - p0
        if nb == 1:
            gc = g3[n0, :, p0:p1].reshape(groups, og, t)
        else:
            gc = scratch("grad", (out_ch, nb, t), dtype)
            K.swap_leading_axes(g3[n0:n1], gc)
            gc = gc.reshape(groups, og, nb * t)
        if need_w and kept is not None:
            cols = kept.reshape(groups, -1, nb * t)[:, :rows]
        elif need_w:
            cols = scratch("cols", (groups * rows, nb, t), dtype)
            _gather(x4[n0:n1], geom, p0, ow, g3.shape[2], cols)
            cols = cols.reshape(groups, rows, nb * t)
        if need_w:
            if first:
                np.matmul(gc, cols.transpose(0, 2, 1), out=dwo)
                first = False
            else:
                part = scratch("dw", dwo.shape, dtype)
                np.matmul(gc, cols.transpose(0, 2, 1), out=part)
                dwo += part
        if need_x:
            dcols = scratch("dcols", (groups, taps, nb * t), dtype)
            np.matmul(wt, gc, out=dcols)
            _scatter(dcols.reshape(groups * taps, nb, t), geom, p0, ow, g3.shape[2], dx[n0:n1])
    dw = None
    if need_w:
        dw = np.ascontiguousarray(dwo[:, :, :taps]).reshape(w4.shape)  # a copy only with a bias row
        if need_b:
            db = dwo[:, :, taps].reshape(out_ch)
    return dx, dw, db
