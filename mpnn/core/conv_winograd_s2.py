"""Winograd for 3x3 stride-2 convs (padding 1): the conv is a 2x2 stride-1 conv over the four phases of the padded
input (space to depth: 4C channels), run as Winograd F(4x4, 2x2) on 5x5 patches of each phase (the transforms and
layouts: conv_winograd_s2_kernels.py).

ResNet-18's stride-2 3x3 convs ran as im2col + GEMM at OpenBLAS's peak, 12-15 ms forward each at batch 32, behind
torch by 2-3 ms: only fewer multiplies help. Direct: 9 C multiplies per output. F(4x4, 2x2) over the 4C phase
channels: 25 points x 4C / 16 outputs = 6.25 C, and the 2x2 kernels of the phases with one kernel row or column
(those hold a 3x3 kernel's zero taps) vanish at the transform's point at infinity, so those GEMMs drop their
channels: 81 C / 16 = 5.06 C (0.56x). The batch goes through in chunks of whole images (about settings'
winograd_s2_tiles tile slots each); a forward whose weight wants a gradient keeps each chunk's transformed input
for backward, which makes the transformed weight again (it lives in per-thread scratch, as the products do).
ResNet-18 (batch 32, thread CPU ms, im2col -> this): 64->128 32x32 forward 14.6 -> 13.6, backward 31.8 -> 24.7;
128->256 16x16 forward 13.9 -> 12.7, backward 28.2 -> 23.2; its 256->512 8x8 conv stays with im2col (conv.py).
"""

from __future__ import annotations

import numpy as np

from mpnn.core import conv_weight_cache, linalg
from mpnn.core import conv_winograd_s2_kernels as K
from mpnn.core.conv_algorithm import ConvAlgorithm, scratch

_GEOMETRY = (3, 3, 2, 2, 1, 1, 1, 1, 1)  # geom (kh, kw, sh, sw, ph, pw, dh, dw, groups) it computes
_SLOT, _ROWS = K.slots()
_TAPS, _COEF = K.weight_coefficients()
_POINTS = tuple((int(_ROWS[t]), int(_ROWS[t + 1] - _ROWS[t])) for t in range(25))  # (first row, phases) per point


class WinogradS2(ConvAlgorithm):
    """3x3, stride 2, padding 1, dilation 1, one group, at least settings.winograd_s2_min_channels input channels
    and an output at least settings.winograd_s2_min_width wide."""

    name = "winograd-s2"

    def applies(self, problem, settings):
        return (
            problem.geom == _GEOMETRY
            and problem.x4.shape[1] >= settings.winograd_s2_min_channels
            and problem.ow >= settings.winograd_s2_min_width
        )

    def forward(self, problem, out, settings):
        x4, w4 = problem.x4, problem.w4
        dtype = x4.dtype
        n, c = x4.shape[:2]
        o = w4.shape[0]
        tiles_h, tiles_w = (problem.oh + 3) // 4, (problem.ow + 3) // 4
        per_image = tiles_h * tiles_w
        nb = max(1, settings.winograd_s2_tiles // per_image)
        # U is as large as the weight times 9 x 4 x 81/144 (10.6 MB at 256 x 128 channels): a fresh array each call
        # faulted its pages in (~0.7 ms of that layer's forward), so a training forward makes it in scratch and
        # its backward makes it again (0.2-0.6 ms); one that does not train the weight takes it from the cache
        train = problem.weight_grad
        make = _weight_in_scratch if train else _transform_weight
        u = conv_weight_cache.transformed(w4, self.name, make, train)
        cached = None if train else u
        bias = problem.b if problem.b is not None else np.zeros(o, dtype)
        # a backward that wants the weight's gradient reads V again: keep each chunk's (the whole batch's V is as
        # large as the input times 81/16 x 4/(oh ow / tiles), 10.6 MB for ResNet-18's 64->128 layer at batch 32)
        # rather than recompute it (its input transform took ~3 of that layer's ~24 ms backward)
        kept = [] if problem.weight_grad else None
        for n0 in range(0, n, nb):
            n1 = min(n, n0 + nb)
            t = (n1 - n0) * per_image
            # 81 C rows and one junk row (conv_winograd_s2_kernels.input_transform)
            v = np.empty((81 * c + 1, t), dtype) if kept is not None else scratch("v2", (81 * c + 1, t), dtype)
            K.input_transform(x4[n0:n1], 1, 1, tiles_h, tiles_w, _SLOT, _ROWS, v)
            m = scratch("m2", (25, o, t), dtype)
            for pt, (r, k) in enumerate(_POINTS):
                linalg._mm(u[o * c * r : o * c * (r + k)].reshape(o, c * k), v[c * r : c * (r + k)], out=m[pt])
            K.output_transform(m, bias, tiles_h, tiles_w, out[n0:n1])
            if kept is not None:
                kept.append(v)
        return x4, w4, tiles_h, tiles_w, nb, kept, cached

    def backward(self, state, g4, need_x, need_w, need_b):
        x4, w4, tiles_h, tiles_w, nb, kept, u = state
        dtype = x4.dtype
        n, c = x4.shape[:2]
        o = g4.shape[1]
        if need_x and u is None:
            u = _weight_in_scratch(w4)
        per_image = tiles_h * tiles_w
        db = g4.sum(axis=(0, 2, 3)) if need_b else None
        if not (need_x or need_w):
            return None, None, db
        du = np.empty(81 * o * c, dtype) if need_w else None
        dx = np.empty(x4.shape, dtype) if need_x else None
        for n0 in range(0, n, nb):
            n1 = min(n, n0 + nb)
            t = (n1 - n0) * per_image
            dm = scratch("dm2", (25, o, t), dtype)
            K.grad_output(g4[n0:n1], tiles_h, tiles_w, dm)
            if need_w:
                if kept is not None:
                    v = kept[n0 // nb]
                else:
                    v = scratch("v2", (81 * c + 1, t), dtype)
                    K.input_transform(x4[n0:n1], 1, 1, tiles_h, tiles_w, _SLOT, _ROWS, v)
                for pt, (r, k) in enumerate(_POINTS):
                    dst = du[o * c * r : o * c * (r + k)].reshape(o, c * k)
                    if n0 == 0:
                        linalg._mm(dm[pt], v[c * r : c * (r + k)].T, out=dst)
                    else:
                        part = scratch("du", (o, c * k), dtype)
                        linalg._mm(dm[pt], v[c * r : c * (r + k)].T, out=part)
                        dst += part
            if need_x:
                dv = scratch("dv2", (81 * c, t), dtype)
                for pt, (r, k) in enumerate(_POINTS):
                    linalg._mm(u[o * c * r : o * c * (r + k)].reshape(o, c * k).T, dm[pt], out=dv[c * r : c * (r + k)])
                K.grad_input(dv, 1, 1, tiles_h, tiles_w, _SLOT, _ROWS, dx[n0:n1])
        dw = None
        if need_w:
            dw = np.empty((o, c, 3, 3), dtype)
            K.weight_grad(du, _SLOT, _ROWS, _TAPS, _COEF, dw)
        return dx, dw, db


def _transform_weight(w4, u=None):
    """U (81 O C,): the weight's F(4x4, 2x2) transform per phase point (conv_winograd_s2_kernels.weight_transform),
    into u or a fresh array."""
    o, c = w4.shape[:2]
    if u is None:
        u = np.empty(81 * o * c, w4.dtype)
    K.weight_transform(np.ascontiguousarray(w4), _SLOT, _ROWS, _TAPS, _COEF, u)
    return u


def _weight_in_scratch(w4):
    o, c = w4.shape[:2]
    return _transform_weight(w4, scratch("du2", (81 * o * c,), w4.dtype))
