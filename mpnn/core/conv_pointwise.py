"""1x1 convolution as plain GEMMs: ungrouped, unpadded 1x1 convs of any stride (ResNet's projection shortcuts,
the bottlenecks' channel mixers) on maps of at least _POINTWISE_MIN_POSITIONS output positions (conv.py).

A 1x1 conv is out (N, O, L) = W (O, C) @ xs (N, C, L), where xs is the input itself at stride 1 (no copy) and its
subsample x[:, :, ::sh, ::sw] otherwise (one Numba pass, conv_pointwise_kernels.subsample). im2col's general gather
(a padding test per run, ~90 ns per 16-float row) cost ~3 ms of the 4.6 of ResNet-18's 64->128 stride-2 shortcut
forward; this one costs 0.15 ms there. Forward keeps xs when a backward will want the weight's gradient (a new
array per call, never a per-thread scratch: mpnn.compile's replay runs other convs between this forward and its
backward) and always the input (a reference), so that a backward asked for dW anyway recomputes xs.
"""

from __future__ import annotations

import numpy as np

from mpnn.core import conv_pointwise_kernels as K
from mpnn.core.conv_algorithm import ConvAlgorithm, scratch


class Pointwise(ConvAlgorithm):
    """Kernel 1x1, no padding (the output size implies none at the bottom/right either), one group, any stride,
    at least settings.pointwise_min_positions output positions per sample.

    Side by side in one process (AMD EPYC Zen 4, one thread, float32, medians of 15, im2col -> this, ms, two runs):
    ResNet-18's 1x1 stride-2 shortcut 64->128 on 32x32 input, batch 32: forward (no_grad) 2.99 -> 2.55 and
    3.20 -> 2.74, forward+backward 11.47 -> 8.85 and 12.17 -> 9.77; a ResNet-50 bottleneck's 1x1 256->64 on 56x56,
    batch 8: forward 16.34 -> 12.49 and 16.63 -> 12.57, forward+backward 59.20 -> 45.70 and 66.30 -> 49.50.
    ResNet-18's 128->256 shortcut on 16x16 input (64 output positions) forward 2.63 -> 1.96 and 2.20 -> 1.64,
    forward+backward 8.32 -> 6.74 and 9.68 -> 7.41; its 256->512 one on 8x8 (16 positions) stays on im2col, which
    puts several samples in one GEMM (forward+backward 6.03 against 7.69 here)."""

    name = "pointwise"

    def applies(self, problem, settings):
        kh, kw, sh, sw, ph, pw, _, _, groups = problem.geom
        _, _, h, w = problem.x4.shape
        oh, ow = problem.oh, problem.ow
        return (
            kh == 1
            and kw == 1
            and ph == 0
            and pw == 0
            and groups == 1
            and oh == (h - 1) // sh + 1
            and ow == (w - 1) // sw + 1
            and oh * ow >= settings.pointwise_min_positions
        )

    def forward(self, problem, out, settings):
        x4, w4, b, geom = problem.x4, problem.w4, problem.b, problem.geom
        sh, sw = geom[2], geom[3]
        n, c = x4.shape[:2]
        o = w4.shape[0]
        xs = _subsample(x4, sh, sw, problem.oh, problem.ow)
        out3 = out.reshape(n, o, problem.oh * problem.ow)
        # one batched GEMM straight into NCHW; conv_algorithm.gemm (per-sample calls of mpnn's own kernel) measured
        # the same here (64->128 shortcut 1.59 vs 1.65 ms, the 256->64 56x56 one 10.4 vs 10.1)
        np.matmul(w4.reshape(o, c), xs.reshape(n, c, problem.oh * problem.ow), out=out3)
        if b is not None:
            np.add(out3, b.reshape(1, o, 1), out=out3)
        return x4, w4, sh, sw, problem.oh, problem.ow, xs if problem.weight_grad else None

    def backward(self, state, g4, need_x, need_w, need_b):
        x4, w4, sh, sw, oh, ow, xs = state
        n, c = x4.shape[:2]
        o = w4.shape[0]
        dtype = x4.dtype
        g3 = g4.reshape(n, o, oh * ow)
        db = g4.sum(axis=(0, 2, 3)) if need_b else None
        dw = dx = None
        if need_w:
            if xs is None:  # forward was told no weight gradient would be wanted: recompute the subsample
                xs = _subsample(x4, sh, sw, oh, ow)
            xs3 = xs.reshape(n, c, oh * ow)
            # dW = sum over samples of g[n] @ xs[n]^T, accumulated without an (N, O, C) temporary; measured on the
            # 64->128 shortcut: 2.02 ms, one batched product then .sum(0) 1.94, transposing both operands to one
            # (O, N*L) @ (N*L, C) GEMM 2.40, np.einsum 3.16
            dw2 = np.zeros((o, c), dtype) if n == 0 else np.empty((o, c), dtype)
            if n:
                np.matmul(g3[0], xs3[0].T, out=dw2)
            if n > 1:
                part = scratch("pointwise_dw", (o, c), dtype)
                for i in range(1, n):
                    np.matmul(g3[i], xs3[i].T, out=part)
                    np.add(dw2, part, out=dw2)
            dw = dw2.reshape(w4.shape)
        if need_x:
            wt = w4.reshape(o, c).T
            if sh == 1 and sw == 1:
                dx = np.empty(x4.shape, dtype)
                np.matmul(wt, g3, out=dx.reshape(n, c, oh * ow))
            else:
                dxs = scratch("pointwise_dx", (n, c, oh * ow), dtype)
                np.matmul(wt, g3, out=dxs)
                dx = np.empty(x4.shape, dtype)
                K.unsubsample(dxs.reshape(n, c, oh, ow), sh, sw, dx)
        return dx, dw, db


def _subsample(x4, sh, sw, oh, ow):
    """x4 itself at stride 1, else a new C-contiguous x4[:, :, ::sh, ::sw] (N, C, oh, ow)."""
    if sh == 1 and sw == 1:
        return x4
    xs = np.empty((x4.shape[0], x4.shape[1], oh, ow), x4.dtype)
    K.subsample(x4, sh, sw, xs)
    return xs
