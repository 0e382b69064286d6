"""Winograd F(4x4, 3x3) convolution: 3x3, stride 1, dilation 1, ungrouped convs with enough channels.

4x fewer multiplies than im2col, whose three GEMMs alone (~27 ms on the 32->64, 64x64, batch 8 benchmark)
took longer than torch's (oneDNN) whole forward+backward (~23 ms). F(2x2, 3x3) (2.25x) came to ~21.5 ms
there, F(4x4, 3x3) to ~17 ms (kernels alone, one thread). Its price is float32 rounding: ~5e-6 of the
largest output against ~3e-7 for F(2x2, 3x3) (interpolation points up to +-2); MKL-DNN (oneDNN) trains
with the same F(4x4, 3x3). Work goes in chunks of whole 4x4 tile rows (settings.winograd_tiles slots,
conv.py's _WINOGRAD_TILES) whose work arrays stay in L2; backward recomputes the input transform, so that
a conv holds on to its input and the transformed weight only.
"""

from __future__ import annotations

import platform

import numpy as np

from mpnn.core import conv_kernels as K
from mpnn.core import conv_weight_cache
from mpnn.core.conv_algorithm import ConvAlgorithm, scratch

_WINOGRAD_GEOMETRY = (3, 3, 1, 1, 1, 1, 1)  # (kh, kw, sh, sw, dh, dw, groups) it computes


class WinogradF4x4(ConvAlgorithm):
    """3x3, stride 1, dilation 1, one group, with at least settings.winograd_min_channels input and output
    channels and settings.winograd_min_width output columns (where the transforms pay, see conv.py)."""

    name = "winograd-f4x4"

    def applies(self, problem, settings):
        kh, kw, sh, sw, _, _, dh, dw, groups = problem.geom
        return (
            (kh, kw, sh, sw, dh, dw, groups) == _WINOGRAD_GEOMETRY
            and problem.ow >= settings.winograd_min_width
            and min(problem.x4.shape[1], problem.w4.shape[0]) >= settings.winograd_min_channels
        )

    @staticmethod
    def fits(geom, channels, out_ch, ow, settings):
        """applies() on the bare numbers: geom as ConvProblem's, the input and output channels, output width."""
        kh, kw, sh, sw, _, _, dh, dw, groups = geom
        return (
            (kh, kw, sh, sw, dh, dw, groups) == _WINOGRAD_GEOMETRY
            and ow >= settings.winograd_min_width
            and min(channels, out_ch) >= settings.winograd_min_channels
        )

    def forward(self, problem, out, settings):
        x4, geom = problem.x4, problem.geom
        # wide layers take longer chunks: once U (36 x O x C) overflows L2, every chunk streams it again.
        # ResNet-18, batch 32, forward+backward ms with 72 / 144 / 288 slots: 64 channels 32x32 45 / 44 / 51,
        # 128 on 16x16 46 / 40 / 40, 256 on 8x8 51 / 45 / 43.5 (torch 50-60, one loaded run each)
        tiles = settings.winograd_tiles * max(1, min(4, max(x4.shape[1], problem.w4.shape[0]) // 64))
        u = conv_weight_cache.transformed(problem.w4, self.name, _winograd_weight, problem.weight_grad)
        _winograd_forward(x4, u, problem.b, geom[4], geom[5], out, tiles)
        return x4, u, geom[4], geom[5], tiles

    def backward(self, state, g4, need_x, need_w, need_b):
        x4, u, ph, pw, tiles = state
        return _winograd_backward(g4, x4, u, ph, pw, tiles, need_x, need_w, need_b)


_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ]
)
_WINOGRAD_BLOCK = 36  # entries of a tile's transformed 6x6 block


def _winograd_weight(w4):
    """U (36, O, C): entry 6a + b of G w G^T for every (out, in) channel pair, by conv_kernels.winograd_weight
    (a batched np.matmul of 6x3 matrices per channel pair took ~3 ms at 128x128 channels, one (36, 9) GEMM
    0.43 ms, the kernel 0.19 ms)."""
    o, c = w4.shape[:2]
    u = np.empty((_WINOGRAD_BLOCK, o, c), w4.dtype)
    K.winograd_weight(np.ascontiguousarray(w4), _G.astype(w4.dtype), u)
    return u


def _winograd_weight_grad(du):
    """dw (O, C, 3, 3) = G^T dU G from du (36, O, C), by conv_kernels.winograd_weight_grad."""
    o, c = du.shape[1:]
    dw = np.empty((o, c, 3, 3), du.dtype)
    K.winograd_weight_grad(du, _G.astype(du.dtype), dw)
    return dw


# NumPy 2.4's matmul on aarch64 returned wrong products for a left operand whose rows lie further apart than its
# width, at some small shapes: (8, 7) with rows 8 apart @ (7, 7), also (3, 2) @ (2, 2), (4, 3) @ (3, 3) and
# (5, 4) @ (4, 4), in the emulated arm64 CI root (3 of 640 shapes in one sweep, 1 of 9 in another); x86-64 gave every
# one exactly. dM's slice that leaves out the junk slots is such an operand, so off x86-64 it is made contiguous.
_STRIDED_LEFT_OK = platform.machine() in ("x86_64", "AMD64")


def _winograd_buffer(slot, channels, tiles, dtype):
    """A (36, P) work buffer and its (36, channels, tiles) GEMM view; P*itemsize is 64 bytes past a
    multiple of 4 KiB so that the rows the kernels stream together fall in different L1 sets."""
    itemsize = np.dtype(dtype).itemsize
    page = 4096 // itemsize
    p = -(-channels * tiles // page) * page + 64 // itemsize
    buf = scratch(slot, (_WINOGRAD_BLOCK, p), dtype)
    return buf, buf[:, : channels * tiles].reshape(_WINOGRAD_BLOCK, channels, tiles)


def _winograd_chunks(n, out_h, out_w, tiles):
    """(tiles_h, tiles_w, [(r0, rows)]): chunks of whole tile rows, ~`tiles` tile slots each
    (a tile row has tiles_w + 1 slots, see conv_kernels)."""
    tiles_h, tiles_w = (out_h + 3) // 4, (out_w + 3) // 4
    step = max(1, tiles // (tiles_w + 1))
    total = n * tiles_h
    return tiles_h, tiles_w, [(r, min(step, total - r)) for r in range(0, total, step)]


def _winograd_forward(x4, u, b, ph, pw, out, tiles):
    """out (N, O, OH, OW) = conv(x4) + b: per chunk input transform (Numba), 36 GEMMs (BLAS), output transform."""
    n, c = x4.shape[:2]
    o = u.shape[1]
    tiles_h, tiles_w, chunks = _winograd_chunks(n, out.shape[2], out.shape[3], tiles)
    bias = b if b is not None else np.zeros(o, x4.dtype)
    height = None
    for r0, rows in chunks:
        if rows != height:  # the work buffers change only for the last, shorter chunk
            height, t = rows, rows * (tiles_w + 1)
            vbuf, v = _winograd_buffer("v", c, t, x4.dtype)
            mbuf, m = _winograd_buffer("m", o, t, x4.dtype)
            # the junk slots are the last `rows` of each channel's T (conv_kernels): the GEMM leaves them out
            real = rows * tiles_w
            m[:, :, real:] = 0.0  # never read for an output; kept finite
        K.winograd_input(x4, ph, pw, tiles_h, tiles_w, r0, rows, vbuf)
        np.matmul(u, v[:, :, :real], out=m[:, :, :real])
        K.winograd_output(mbuf, bias, tiles_h, tiles_w, r0, rows, out)


def _winograd_backward(g4, x4, u, ph, pw, tiles, need_x, need_w, need_b):
    """Gradients of the Winograd conv for output gradient g4 (N, O, OH, OW), chunk by chunk:
    dM = A dY A^T, then dU += dM V^T and dV = U^T dM (BLAS), dx from B dV B^T, dw = G^T dU G.
    The bias gradient is summed from dM's entry 7 = (1, 1), which is the sum of each tile's dY."""
    dtype = x4.dtype
    n, c = x4.shape[:2]
    o = u.shape[1]
    if not (need_x or need_w):
        return None, None, (g4.sum(axis=(0, 2, 3)) if need_b else None)
    tiles_h, tiles_w, chunks = _winograd_chunks(n, g4.shape[2], g4.shape[3], tiles)
    dx = np.zeros(x4.shape, dtype) if need_x else None
    du = np.empty((_WINOGRAD_BLOCK, o, c), dtype) if need_w else None  # the first chunk's product lands in it
    sums = np.zeros((o, chunks[0][1] * (tiles_w + 1)))  # the bias gradient's partial sums (float64)
    ut = u.transpose(0, 2, 1)
    part = scratch("du", (_WINOGRAD_BLOCK, o, c), dtype) if need_w and len(chunks) > 1 else None
    height = None
    for r0, rows in chunks:
        if rows != height:  # the work buffers change only for the last, shorter chunk
            height, t = rows, rows * (tiles_w + 1)
            dmbuf, dm = _winograd_buffer("dm", o, t, dtype)
            vtbuf, vt = _winograd_buffer("v", t, c, dtype)  # (36, T, C): channels innermost
            dvbuf, dv = _winograd_buffer("dv", c, t, dtype)
            real = rows * tiles_w  # the GEMMs leave out the junk slots (the last `rows` of T)
            dv[:, :, real:] = 0.0  # winograd_grad_input reads them as zeros
        K.winograd_grad_output(g4, tiles_h, tiles_w, r0, rows, dmbuf, sums)
        dmr = dm[:, :, :real]
        if need_w:
            # V^T laid out (T, C) makes dM @ V^T a plain NN product: OpenBLAS ran it at ~160-175 GFLOP/s
            # against ~90 for the NT product on a (C, T) layout (measured, 100-130-tile chunks)
            K.winograd_input_t(x4, ph, pw, tiles_h, tiles_w, r0, rows, vtbuf)
            left = dmr if _STRIDED_LEFT_OK else np.ascontiguousarray(dmr)
            if r0 == 0:
                np.matmul(left, vt[:, :real], out=du)
            else:
                np.matmul(left, vt[:, :real], out=part)
                du += part
        if need_x:
            np.matmul(ut, dmr, out=dv[:, :, :real])
            K.winograd_grad_input(dvbuf, ph, pw, tiles_h, tiles_w, r0, rows, dx)
    dw = _winograd_weight_grad(du) if need_w else None
    return dx, dw, (sums.sum(axis=1).astype(dtype) if need_b else None)
