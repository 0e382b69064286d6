"""Winograd F(2x2, 3x3) convolution for small maps: 3x3, stride 1, dilation 1, ungrouped convs whose output is
narrower than F(4x4, 3x3) pays on (conv.py's _WINOGRAD_MIN_WIDTH) and whose channels are wide enough that the
GEMMs dominate (_WINOGRAD2_MIN_CHANNELS).

ResNet-18's last stage (512 channels on 4x4 maps, batch 32) ran as im2col + GEMM in ~55-60 ms forward+backward,
its three GEMMs alone ~50 ms (torch 51 ms): F(2x2, 3x3) does 2.25x fewer multiplies, 16 GEMMs (512 x 512) x
(512 x 128) per pass at ~115 GFLOP/s. F(4x4, 3x3) measured 75 ms there: a 4x4 map is one tile and one junk slot
per tile row, and its transformed weight (36 x 512 x 512 floats, 38 MB) costs more memory traffic than the
input. The whole batch is one chunk (small maps: V is 16 x C x 4N), kept for backward when the weight needs a
gradient.
"""

from __future__ import annotations

import numpy as np

from mpnn.core import conv_kernels as K
from mpnn.core import conv_weight_cache
from mpnn.core.conv_algorithm import ConvAlgorithm, gemm, scratch

_GEOMETRY = (3, 3, 1, 1, 1, 1, 1)  # (kh, kw, sh, sw, dh, dw, groups) it computes
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = np.kron(_G, _G)  # (16, 9): entry 4a + b of G w G^T from the 9 taps of w
_BLOCK = 16


class WinogradF2x2(ConvAlgorithm):
    """3x3, stride 1, dilation 1, one group, output narrower than settings.winograd_min_width (F(4x4, 3x3)
    takes the wider ones) and at least settings.winograd2_min_channels input and output channels."""

    name = "winograd-f2x2"

    def applies(self, problem, settings):
        kh, kw, sh, sw, _, _, dh, dw, groups = problem.geom
        return (
            (kh, kw, sh, sw, dh, dw, groups) == _GEOMETRY
            and problem.ow < settings.winograd_min_width
            and min(problem.x4.shape[1], problem.w4.shape[0]) >= settings.winograd2_min_channels
        )

    def forward(self, problem, out, settings):
        x4, w4, geom = problem.x4, problem.w4, problem.geom
        n, c = x4.shape[:2]
        o = w4.shape[0]
        ph, pw = geom[4], geom[5]
        tiles_h, tiles_w = (problem.oh + 1) // 2, (problem.ow + 1) // 2
        p = n * tiles_h * tiles_w
        u = conv_weight_cache.transformed(w4, self.name, _transform_weight, problem.weight_grad)
        # a backward that wants the weight's gradient reads V again: keep it (4 MB at 512 channels, 4x4 maps,
        # batch 32) rather than recompute it (its scalar transform took ~4 ms of the layer's ~55)
        keep = problem.weight_grad
        v = np.empty((_BLOCK, c, p), x4.dtype) if keep else scratch("v2", (_BLOCK, c, p), x4.dtype)
        K.winograd2_input(x4, ph, pw, tiles_h, tiles_w, v)
        m = scratch("m2", (_BLOCK, o, p), x4.dtype)
        gemm(u, v, m)
        bias = problem.b if problem.b is not None else np.zeros(o, x4.dtype)
        K.winograd2_output(m, bias, tiles_h, tiles_w, out)
        return x4, u, ph, pw, tiles_h, tiles_w, v if keep else None

    def backward(self, state, g4, need_x, need_w, need_b):
        x4, u, ph, pw, tiles_h, tiles_w, kept = state
        dtype = x4.dtype
        n, c = x4.shape[:2]
        o = u.shape[1]
        p = n * tiles_h * tiles_w
        db = g4.sum(axis=(0, 2, 3)) if need_b else None
        if not (need_x or need_w):
            return None, None, db
        dm = scratch("dm2", (_BLOCK, o, p), dtype)
        K.winograd2_grad_output(g4, tiles_h, tiles_w, dm)
        dw = dx = None
        if need_w:
            v = kept
            if v is None:
                v = scratch("v2", (_BLOCK, c, p), dtype)
                K.winograd2_input(x4, ph, pw, tiles_h, tiles_w, v)
            du = scratch("du2", (_BLOCK, o, c), dtype)
            np.matmul(dm, v.transpose(0, 2, 1), out=du)
            dw = np.empty((o * c, 9), dtype)  # C-contiguous like the weight (the optimizer reads it flat)
            np.matmul(du.reshape(_BLOCK, o * c).T, _GG.astype(dtype), out=dw)
            dw = dw.reshape(o, c, 3, 3)
        if need_x:
            dv = scratch("dv2", (_BLOCK, c, p), dtype)
            np.matmul(u.transpose(0, 2, 1), dm, out=dv)
            dx = np.zeros(x4.shape, dtype)
            K.winograd2_grad_input(dv, ph, pw, tiles_h, tiles_w, dx)
        return dx, dw, db


def _transform_weight(w4):
    """U (16, O, C) = G w G^T for every channel pair (conv_kernels.winograd_weight: 4.5 -> 3.4 ms at 512x512)."""
    o, c = w4.shape[:2]
    u = np.empty((_BLOCK, o, c), w4.dtype)
    K.winograd_weight(np.ascontiguousarray(w4), _G.astype(w4.dtype), u)
    return u
