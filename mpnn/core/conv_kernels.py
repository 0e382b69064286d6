"""Numba loops for convolution and pooling: im2col/col2im and the Winograd F(4x4, 3x3) transforms around
the BLAS GEMMs (mpnn.core.conv), and the pooling windows (mpnn.core.pool).

Every kernel takes C-contiguous float32 or float64 arrays, Python ints (int64) and bools, so each compiles
to at most two specializations (one per float dtype), cached on disk. Outputs are written in place.
Why Numba: a NumPy fancy-indexing im2col lost to oneDNN by 1.6x on wide layers and 6-10x on few channels
(docs/architecture.md); these loops copy whole contiguous runs per kernel tap instead. For pooling, a NumPy
reshape-max (2x2, (64, 32, 32, 32) float32) took 30.6 ms against 6.7 ms for max_pool2d_forward here
(torch: 11.6 ms forward+backward, these kernels 8.6 ms).
"""

import numpy as np
from numba import njit, uint64


@njit(cache=True, fastmath=False)
def _valid_range(offset, stride, size, count):
    """Output positions o in [lo, hi) whose input position o*stride + offset lies in [0, size)."""
    lo = 0 if offset >= 0 else (stride - 1 - offset) // stride
    hi = (size - 1 - offset) // stride + 1 if size - 1 - offset >= 0 else 0
    lo = min(lo, count)
    hi = min(max(hi, lo), count)
    return lo, hi


@njit(cache=True, fastmath=False)
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow_, cols):
    """Gather the kernel taps of x (N, C, H, W) for output positions [p0, p0 + T) into cols (R, N, T).

    Row g*GR + ((c - g*Cg)*kh + i)*kw + j (GR = R // groups rows per group, Cg = C // groups channels),
    column p - p0 holds x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw] for p = oh*ow_ + ow, 0 in the
    padding. A group's rows past its Cg*kh*kw taps (a bias row) are set to 1. ph, pw are the top/left
    padding; the bottom/right padding is implied by the output size, so "same" padding may be uneven.
    """
    # Flat unsigned indices: no view per row (each costs a refcount) and no negative-index wraparound
    # check, so the copies vectorize; measured 3-4x faster than row views on both tiny and 3x3 tiles.
    n_, c_, h_, w_ = x.shape
    t_ = cols.shape[2]
    cg = c_ // groups
    taps = cg * kh * kw
    group_rows = cols.shape[0] // groups
    oh_first = p0 // ow_
    oh_end = (p0 + t_ - 1) // ow_ + 1
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    for c in range(c_):
        grp = c // cg
        for i in range(kh):
            h_off = i * dh - ph
            for j in range(kw):
                r = grp * group_rows + ((c - grp * cg) * kh + i) * kw + j
                w_off = j * dw - pw
                lo, hi = _valid_range(w_off, sw, w_, ow_)
                for oh in range(oh_first, oh_end):
                    base = oh * ow_ - p0  # column of (oh, ow) is base + ow
                    a = max(-base, 0)
                    b = min(t_ - base, ow_)
                    ih = oh * sh + h_off
                    inside = 0 <= ih < h_
                    c0 = min(max(lo, a), b) if inside else b
                    c1 = min(max(hi, c0), b) if inside else b
                    for n in range(n_):
                        d0 = (r * n_ + n) * t_ + base
                        s0 = ((n * c_ + c) * h_ + ih) * w_ + w_off
                        # LLVM: padding fills scalar on x86-64 and aarch64 (a call in the loop); short runs
                        for ow in range(a, c0):
                            cf[uint64(d0 + ow)] = 0.0
                        if sw == 1:
                            # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
                            for ow in range(c0, c1):
                                cf[uint64(d0 + ow)] = xf[uint64(s0 + ow)]
                        else:
                            # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
                            for ow in range(c0, c1):
                                cf[uint64(d0 + ow)] = xf[uint64(s0 + ow * sw)]
                        for ow in range(c1, b):
                            cf[uint64(d0 + ow)] = 0.0
    for grp in range(groups):
        for r in range(taps, group_rows):
            cols[grp * group_rows + r] = 1.0


@njit(cache=True, fastmath=False)
def im2col_planes(x, kh, kw, sh, sw, ph, pw, ow_, cols):
    """im2col for whole samples, dilation 1, one group: cols (R, N, oh*ow) as im2col(..., p0=0) writes it.

    Each (n, c) plane is first copied into a zero-bordered padded plane split into its sw column phases
    (phase q holds padded columns q, q + sw, ...), so that every kernel tap reads contiguous runs with no
    padding test, whatever the stride."""
    # Measured (batch 32, thread CPU ms, im2col -> this): ResNet-18's 3x3 stride-2 64->128 2.30 -> 1.68, 128->256
    # 1.49 -> 0.98, 256->512 0.91 -> 0.83, the 3->64 stem 0.28 -> 0.14. Filling one channel's planes for all
    # samples first and then writing tap by tap keeps the writes in im2col's order: plane by plane (all taps of
    # one sample, rows n_ * T floats apart, a 4 KiB multiple) it was 2x slower than im2col.
    n_, c_, h_, w_ = x.shape
    t_ = cols.shape[2]
    oh_ = t_ // ow_
    hp = (oh_ - 1) * sh + kh  # padded rows and columns the taps reach
    wp = (ow_ - 1) * sw + kw
    wq = (wp + sw - 1) // sw
    plane = sw * hp * wq
    pl = np.zeros(n_ * plane, x.dtype)  # one channel's padded planes, every sample (~150 KB at 64 channels)
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    r0, r1 = min(ph, hp), min(h_ + ph, hp)  # padded rows that hold input
    taps = c_ * kh * kw
    for c in range(c_):
        for n in range(n_):
            src = (n * c_ + c) * h_ * w_ - pw
            for q in range(sw):  # phase q: padded columns q + m * sw, input columns q + m * sw - pw
                m0 = max(0, (pw - q + sw - 1) // sw)
                m1 = max(m0, min(wq, (w_ + pw - q + sw - 1) // sw))
                for r in range(r0, r1):
                    dst = n * plane + (q * hp + r) * wq
                    row = src + (r - ph) * w_ + q
                    for m in range(m0, m1):
                        pl[uint64(dst + m)] = xf[uint64(row + m * sw)]
        for i in range(kh):
            for j in range(kw):
                d = ((c * kh + i) * kw + j) * n_ * t_
                base = ((j % sw) * hp + i) * wq + j // sw
                for n in range(n_):
                    for oh in range(oh_):
                        s = n * plane + base + oh * sh * wq
                        e = d + n * t_ + oh * ow_
                        # LLVM vectorizes this loop on x86-64 (8 float32 lanes)
                        for ow in range(ow_):
                            cf[uint64(e + ow)] = pl[uint64(s + ow)]
    for r in range(taps, cols.shape[0]):
        cols[r] = 1.0


@njit(cache=True, fastmath=False)
def col2im_planes(cols, kh, kw, sh, sw, ph, pw, ow_, dx):
    """The adjoint of im2col_planes: cols (R, N, oh*ow), R = C*kh*kw (no bias rows), added into dx (N, C, H, W).
    One channel at a time, every tap adds contiguous runs into the zero-bordered, phase-split planes, which are
    then added into dx (the padding dropped)."""
    # Measured (thread CPU, batch 32, col2im -> this): ResNet-18's 3x3 s2 64->128 32->16 2.69 -> 2.34 ms over the
    # whole batch, 5.65 -> 3.62 in one-sample calls; 128->256 16->8 1.52 -> 1.26; the 3->64 stem 0.24 -> 0.15.
    n_, c_, h_, w_ = dx.shape
    t_ = cols.shape[2]
    oh_ = t_ // ow_
    hp = (oh_ - 1) * sh + kh
    wp = (ow_ - 1) * sw + kw
    wq = (wp + sw - 1) // sw
    plane = sw * hp * wq
    pl = np.empty(n_ * plane, dx.dtype)
    cf = cols.reshape(-1)
    df = dx.reshape(-1)
    r0, r1 = min(ph, hp), min(h_ + ph, hp)
    for c in range(c_):
        pl[:] = 0.0
        for i in range(kh):
            for j in range(kw):
                d = ((c * kh + i) * kw + j) * n_ * t_
                base = ((j % sw) * hp + i) * wq + j // sw
                for n in range(n_):
                    for oh in range(oh_):
                        s = n * plane + base + oh * sh * wq
                        e = d + n * t_ + oh * ow_
                        # LLVM vectorizes this loop on x86-64 (8 float32 lanes)
                        for ow in range(ow_):
                            pl[uint64(s + ow)] += cf[uint64(e + ow)]
        for n in range(n_):
            dst = (n * c_ + c) * h_ * w_ - pw
            for q in range(sw):
                m0 = max(0, (pw - q + sw - 1) // sw)
                m1 = max(m0, min(wq, (w_ + pw - q + sw - 1) // sw))
                for r in range(r0, r1):
                    src = n * plane + (q * hp + r) * wq
                    row = dst + (r - ph) * w_ + q
                    for m in range(m0, m1):
                        df[uint64(row + m * sw)] += pl[uint64(src + m)]


@njit(cache=True, fastmath=False)
def col2im(cols, kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow_, dx):
    """The adjoint of im2col: add each column entry back to the input element it was gathered from.

    cols is (R, N, T) with R = C*kh*kw (no bias rows); dx (N, C, H, W) is accumulated into, not cleared,
    so that tiles of output positions can be scattered one after another.
    """
    n_, c_, h_, w_ = dx.shape
    t_ = cols.shape[2]
    cg = c_ // groups
    group_rows = cols.shape[0] // groups
    oh_first = p0 // ow_
    oh_end = (p0 + t_ - 1) // ow_ + 1
    cf = cols.reshape(-1)
    df = dx.reshape(-1)
    for c in range(c_):
        grp = c // cg
        for i in range(kh):
            h_off = i * dh - ph
            for j in range(kw):
                r = grp * group_rows + ((c - grp * cg) * kh + i) * kw + j
                w_off = j * dw - pw
                lo, hi = _valid_range(w_off, sw, w_, ow_)
                for oh in range(oh_first, oh_end):
                    ih = oh * sh + h_off
                    if ih < 0 or ih >= h_:
                        continue
                    base = oh * ow_ - p0
                    c0 = min(max(lo, -base), ow_)
                    c1 = min(max(hi, c0), t_ - base)
                    for n in range(n_):
                        s0 = (r * n_ + n) * t_ + base
                        d0 = ((n * c_ + c) * h_ + ih) * w_ + w_off
                        if sw == 1:
                            # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
                            for ow in range(c0, c1):
                                df[uint64(d0 + ow)] += cf[uint64(s0 + ow)]
                        else:
                            # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
                            for ow in range(c0, c1):
                                df[uint64(d0 + ow * sw)] += cf[uint64(s0 + ow)]


@njit(cache=True, fastmath=False)
def swap_leading_axes(src, dst):
    """dst[j, i, :] = src[i, j, :]: the (O, N, L) <-> (N, O, L) copy around a GEMM over several samples.
    NumPy's transposing copy took 2-3x longer for rows of 5-19 (MNIST-1D layers: 10 us against 4-6)."""
    a_, b_, t_ = src.shape
    sf = src.reshape(-1)
    df = dst.reshape(-1)
    for i in range(a_):
        for j in range(b_):
            s = (i * b_ + j) * t_
            d = (j * a_ + i) * t_
            # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
            for k in range(t_):
                df[uint64(d + k)] = sf[uint64(s + k)]


@njit(cache=True, fastmath=False)
def _window_taps(count, stride, pad, dilation, k, size):
    """Per output position o along one axis: the taps [lo, hi) of its window that land inside [0, size)."""
    lo = np.empty(count, np.int64)
    hi = np.empty(count, np.int64)
    for o in range(count):
        lo[o], hi[o] = _valid_range(o * stride - pad, dilation, size, k)
    return lo, hi


@njit(cache=True, fastmath=False)
def max_pool2d_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, out, argmax):
    """out[n, c, oh, ow] = max over the window (padding never wins); argmax holds the first maximum's flat
    index ih*W + iw in the plane, -1 if the window is all padding (NaN wins, as in PyTorch)."""
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = out.shape[2], out.shape[3]
    hlo, hhi = _window_taps(oh_, sh, ph, dh, kh, h_)
    wlo, whi = _window_taps(ow_, sw, pw, dw, kw, w_)
    for n in range(n_):
        for c in range(c_):
            for oh in range(oh_):
                for ow in range(ow_):
                    best = -1
                    best_val = -np.inf
                    # LLVM: scalar on x86-64 and aarch64 (a max with the NaN rule: no known reduction)
                    for i in range(hlo[oh], hhi[oh]):
                        ih = oh * sh - ph + i * dh
                        for j in range(wlo[ow], whi[ow]):
                            iw = ow * sw - pw + j * dw
                            v = x[n, c, ih, iw]
                            if best < 0 or v > best_val or v != v:  # as PyTorch: a NaN always takes over
                                best_val = v
                                best = ih * w_ + iw
                    out[n, c, oh, ow] = best_val
                    argmax[n, c, oh, ow] = best


@njit(cache=True, fastmath=False)
def max_pool2d_backward(g, argmax, dx):
    """Scatter-add each output gradient to the input element that won its window (dx is overwritten)."""
    n_, c_, h_, w_ = dx.shape
    oh_, ow_ = g.shape[2], g.shape[3]
    for n in range(n_):
        for c in range(c_):
            plane = dx[n, c]
            for ih in range(h_):
                for iw in range(w_):
                    plane[ih, iw] = 0.0
            # LLVM: scalar on x86-64 and aarch64 (a scatter through argmax)
            for oh in range(oh_):
                for ow in range(ow_):
                    k = argmax[n, c, oh, ow]
                    if k >= 0:
                        plane[k // w_, k % w_] += g[n, c, oh, ow]


@njit(cache=True, fastmath=False)
def _avg_windows(count, stride, pad, k, size, count_include_pad):
    """Per output position along one axis, PyTorch's avg-pool window [lo, hi) clipped to the input, and
    its extent for the divisor (clipped to the padded input, or to the input without count_include_pad)."""
    lo = np.empty(count, np.int64)
    hi = np.empty(count, np.int64)
    span = np.empty(count, np.int64)
    for o in range(count):
        start = o * stride - pad
        end = min(start + k, size + pad)
        span[o] = end - start
        lo[o] = max(start, 0)
        hi[o] = min(end, size)
        if not count_include_pad:
            span[o] = hi[o] - lo[o]
    return lo, hi, span


@njit(cache=True, fastmath=False)
def avg_pool2d_forward(x, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override, out):
    """out = window sum / divisor by PyTorch's rule (divisor_override > 0 replaces it); sums in float64."""
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = out.shape[2], out.shape[3]
    hlo, hhi, hspan = _avg_windows(oh_, sh, ph, kh, h_, count_include_pad)
    wlo, whi, wspan = _avg_windows(ow_, sw, pw, kw, w_, count_include_pad)
    for n in range(n_):
        for c in range(c_):
            for oh in range(oh_):
                for ow in range(ow_):
                    div = divisor_override if divisor_override > 0 else hspan[oh] * wspan[ow]
                    acc = 0.0
                    # LLVM: scalar on x86-64 and aarch64 (a float sum it may not reorder)
                    for ih in range(hlo[oh], hhi[oh]):
                        for iw in range(wlo[ow], whi[ow]):
                            acc += x[n, c, ih, iw]
                    out[n, c, oh, ow] = acc / div if div > 0 else 0.0


@njit(cache=True, fastmath=False)
def avg_pool2d_backward(g, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override, dx):
    """Spread each output gradient evenly (by the forward's divisor) over its window (dx is overwritten)."""
    n_, c_, h_, w_ = dx.shape
    oh_, ow_ = g.shape[2], g.shape[3]
    hlo, hhi, hspan = _avg_windows(oh_, sh, ph, kh, h_, count_include_pad)
    wlo, whi, wspan = _avg_windows(ow_, sw, pw, kw, w_, count_include_pad)
    for n in range(n_):
        for c in range(c_):
            plane = dx[n, c]
            for ih in range(h_):
                for iw in range(w_):
                    plane[ih, iw] = 0.0
            for oh in range(oh_):
                for ow in range(ow_):
                    div = divisor_override if divisor_override > 0 else hspan[oh] * wspan[ow]
                    if div <= 0:
                        continue
                    share = g[n, c, oh, ow] / div
                    # LLVM: scalar on x86-64 and aarch64 (stores into plane that may overlap)
                    for ih in range(hlo[oh], hhi[oh]):
                        for iw in range(wlo[ow], whi[ow]):
                            plane[ih, iw] += share


@njit(cache=True, fastmath=False)
def _adaptive_windows(out_size, in_size):
    """PyTorch's adaptive windows: [floor(o*in/out), ceil((o+1)*in/out)) for each output position o."""
    lo = np.empty(out_size, np.int64)
    hi = np.empty(out_size, np.int64)
    for o in range(out_size):
        lo[o] = (o * in_size) // out_size
        hi[o] = ((o + 1) * in_size + out_size - 1) // out_size
    return lo, hi


@njit(cache=True, fastmath=False)
def adaptive_avg_pool2d_forward(x, out):
    """out[n, c, oh, ow] = mean of x over the adaptive window of (oh, ow); sums in float64."""
    n_, c_, h_, w_ = x.shape
    oh_, ow_ = out.shape[2], out.shape[3]
    hlo, hhi = _adaptive_windows(oh_, h_)
    wlo, whi = _adaptive_windows(ow_, w_)
    for n in range(n_):
        for c in range(c_):
            for oh in range(oh_):
                for ow in range(ow_):
                    acc = 0.0
                    # LLVM: scalar on x86-64 and aarch64 (a float sum it may not reorder)
                    for ih in range(hlo[oh], hhi[oh]):
                        for iw in range(wlo[ow], whi[ow]):
                            acc += x[n, c, ih, iw]
                    out[n, c, oh, ow] = acc / ((hhi[oh] - hlo[oh]) * (whi[ow] - wlo[ow]))


@njit(cache=True, fastmath=False)
def adaptive_avg_pool2d_backward(g, dx):
    """Spread each output gradient evenly over its adaptive window (dx is overwritten)."""
    n_, c_, h_, w_ = dx.shape
    oh_, ow_ = g.shape[2], g.shape[3]
    hlo, hhi = _adaptive_windows(oh_, h_)
    wlo, whi = _adaptive_windows(ow_, w_)
    for n in range(n_):
        for c in range(c_):
            plane = dx[n, c]
            for ih in range(h_):
                for iw in range(w_):
                    plane[ih, iw] = 0.0
            for oh in range(oh_):
                for ow in range(ow_):
                    share = g[n, c, oh, ow] / ((hhi[oh] - hlo[oh]) * (whi[ow] - wlo[ow]))
                    # LLVM: scalar on x86-64 and aarch64 (stores into plane that may overlap)
                    for ih in range(hlo[oh], hhi[oh]):
                        for iw in range(wlo[ow], whi[ow]):
                            plane[ih, iw] += share


# ----- Winograd F(4x4, 3x3): 3x3 convolutions with stride 1 and dilation 1 ---------------------------------
# The GEMM stage runs 36 products (O, C) x (C, tiles) per 4x4 output tile instead of (O, 9C) x (9C, 16):
# 4x fewer multiplies than im2col (F(2x2, 3x3), 2.25x, measured 1.2-1.4x slower end to end; Lavin & Gray
# 2015). A 4x4 output tile (th, tw) reads the 6x6 input patch whose corner is (4*th - ph, 4*tw - pw).
# Tile rows are numbered R = n*tiles_h + th across the batch; a chunk is the `rows` tile rows from r0.
# Each tile row has S = tiles_w + 1 slots, the last one a junk slot (zero in dm, dv and vt), so that every
# tile has a right neighbour slot: every pass then runs as one long unit-stride loop over a whole
# (channels, T = rows*S) matrix, which LLVM vectorizes. Per-row loops of tiles_w iterations spent most of
# their time in loop set-up (measured 3-5x slower). Slots go column by column: slot k of the chunk's tile
# row rr is slot(rr, k) = k*rows + rr, its right neighbour `rows` further on (sk), and the junk slots are the
# last `rows` of each channel's T, so the GEMMs leave them out as a plain strided operand. Row by row (the
# junk slot beside each row, the GEMMs multiplying it too: a third of their work on 8x8 maps, a fifth on
# 16x16, a ninth on 32x32), the loads and stores that meet the NCHW arrays were unit-stride; now they are
# `rows` apart and scalar, or one input row apart on long chunks (_gather_phases). ResNet-18, batch 32,
# forward / forward+backward mpnn/torch time, same process, two runs each, load 2-3: 256ch 8x8 0.96, 0.86 /
# 0.69, 0.71 -> 0.81, 0.80 / 0.66, 0.67; 128ch 16x16 0.76, 0.70 / 0.81, 0.69 -> 0.69, 0.71 / 0.70, 0.71; 64ch
# 32x32 a wash (0.58 / 0.60 either way).
# Rows are split into their four column phases (4k + r), so that a tile's six columns are phases 0-3 of
# its slot and 0-1 of the next.
# v/m/dm/dv are (36, P) buffers: row 6a + b holds entry (a, b) of every tile's 6x6 block as a
# (channels, T) matrix in its first channels*T elements; P is padded off a multiple of 4 KiB because
# streams exactly 4 KiB-multiples apart all hit one L1 set (measured 4x slower).
# Each vectorized loop stores to at most 8 streams: with more, LLVM needs too many run-time alias checks
# and leaves the loop scalar (measured: 8 vectorize, 9 do not), so the 2-D transforms run as a pass down
# the columns and a pass along the rows rather than one fused loop.
#   B^T = [[4,0,-5,0,1,0],[0,-4,-4,1,1,0],[0,4,-4,-1,1,0],[0,-2,-1,2,1,0],[0,2,-1,-2,1,0],[0,4,0,-5,0,1]]
#   G = [[1/4,0,0],[-1/6,-1/6,-1/6],[-1/6,1/6,-1/6],[1/24,1/12,1/6],[1/24,-1/12,1/6],[0,0,1]]
#   A^T = [[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],[0,1,-1,8,-8,1]]
#   forward: Y = A^T [(G w G^T) * (B^T d B)] A


@njit(cache=True, fastmath=False)
def _phase_bounds(offset, size, count):
    """k range [lo, hi) in which all four columns 4k + r + offset (r = 0..3) lie in [0, size)."""
    lo, hi = 0, count
    for r in range(4):
        a, b = _valid_range(offset + r, 4, size, count)
        lo = max(lo, a)
        hi = min(hi, b)
    return lo, max(hi, lo)


@njit(cache=True, fastmath=False)
def _constants(dtype_of):
    """2, 4, 5 and 8 typed as the arrays' float dtype (a float64 literal would widen float32 math)."""
    c = np.empty(4, dtype_of.dtype)
    c[0], c[1], c[2], c[3] = 2.0, 4.0, 5.0, 8.0
    return c[0], c[1], c[2], c[3]


# A chunk's tile rows rr are unit-stride in its slots (slot(rr, k) = k*rows + rr), so the gather from NCHW rows
# runs the other way round on chunks of many tile rows: for each (channel, patch row, column phase, slot),
# one loop over the tile rows, unit-stride stores and loads one input row apart. ResNet-18, batch 32, one
# conv's gathers, ms, row by row (4 phases x slots stores per input row) -> by tile rows: 128 channels
# 16x16 (28 tile rows a chunk) 3.45 -> 0.84, 256 on 8x8 (64) 2.82 -> 1.70, 64 on 8x8 (24) 0.91 -> 0.25. With
# fewer tile rows a chunk (wide maps: 8 for 64 channels on 32x32, 4 on 64x64) the loop is too short: those
# keep the row order, without the per-element edge tests (64 on 32x32, the whole input transform: 4.65 -> 3.20 ms,
# 5.86 -> 4.21 in a second run; by tile rows it was slower there). winograd_output's and
# winograd_grad_input's scatters into NCHW rows do the same: 128 on 16x16 2.72 -> 2.16 and 6.92 -> 3.01 ms,
# 256 on 8x8 3.19 -> 1.65 and 5.86 -> 5.56 (AMD Zen 4, one thread, medians of 15).
_GATHER_BY_TILE_ROWS = 16


@njit(cache=True, fastmath=False)
def _tile_rows_inside(c_, h_, w_, top, tiles_h, r0, rows, patch):
    """For each patch row a < patch, the chunk's tile rows rr whose row 4*th + top + a lies inside the
    (c_, h_, w_) images: (base, pos, count) with pos[a, :count[a]] those rr and base[a, m] the flat offset of
    that row of channel 0 ((n, th) = divmod(r0 + rr, tiles_h))."""
    base = np.empty((patch, rows), np.int64)
    pos = np.empty((patch, rows), np.int64)
    count = np.zeros(patch, np.int64)
    for a in range(patch):
        for rr in range(rows):
            n, th = divmod(r0 + rr, tiles_h)
            ih = 4 * th + top + a
            if 0 <= ih < h_:
                base[a, count[a]] = (n * c_ * h_ + ih) * w_
                pos[a, count[a]] = rr
                count[a] += 1
    return base, pos, count


@njit(cache=True, fastmath=False)
def _tile_row_block(rows, tiles_h):
    """How many of a chunk's tile rows one pass over the tile rows takes: all of them, or 8 where the chunk
    holds more than 8 images. The images' planes lie a multiple of 4 KiB apart (ResNet-18's), so their rows
    share L1 sets, and L1 has 8 ways: 256 channels on 8x8 maps, batch 32 (32 images a chunk), grad-input
    scatter 5.8 -> 2.4 ms, input gather 2.4 -> 2.0 ms in blocks of 8 tile rows (Zen 4)."""
    return rows if rows <= 8 * tiles_h else 8


@njit(cache=True, fastmath=False)
def _gather_phases(src, n_, c_, h_, w_, top, left, tiles_h, r0, rows, slots, patch, dst, stride):
    """dst[(4a + r)*stride + c*T + k*rows + rr] = src[n, c, 4*th + top + a, 4k + r + left], or 0 where that
    lies outside the (n_, c_, h_, w_) array src (flat), for patch rows a < patch, column phases r < 4, slots
    k < slots and the chunk's tile rows rr, (n, th) = divmod(r0 + rr, tiles_h); T = rows*slots."""
    t_ = rows * slots
    hw = h_ * w_
    los = np.empty(4, np.int64)
    his = np.empty(4, np.int64)
    for r in range(4):  # slots whose column 4k + r + left lies inside the row
        los[r], his[r] = _valid_range(r + left, 4, w_, slots)
    if rows >= _GATHER_BY_TILE_ROWS:
        base, pos, count = _tile_rows_inside(c_, h_, w_, top, tiles_h, r0, rows, patch)
        blk = _tile_row_block(rows, tiles_h)
        for c in range(c_):
            for a in range(patch):
                d = 4 * a * stride + c * t_
                na = count[a]
                for r in range(4):
                    for k in range(slots):
                        if na < rows or not los[r] <= k < his[r]:
                            e = d + r * stride + k * rows
                            for m in range(rows):
                                dst[uint64(e + m)] = 0.0
                for m0 in range(0, na, blk):
                    m1 = min(m0 + blk, na)
                    for r in range(4):
                        for k in range(los[r], his[r]):
                            e = d + r * stride + k * rows
                            off = c * hw + 4 * k + r + left
                            # one load an input row apart and one unit-stride store per tile row
                            for m in range(m0, m1):
                                dst[uint64(e + pos[a, m])] = src[uint64(base[a, m] + off)]
        return
    for i in range(4 * patch * stride):  # all zero first, then only the inside columns are written
        dst[uint64(i)] = 0.0
    for c in range(c_):
        for rr in range(rows):
            n, th = divmod(r0 + rr, tiles_h)
            for a in range(patch):
                ih = 4 * th + top + a
                if 0 <= ih < h_:
                    d = 4 * a * stride + c * t_ + rr
                    s = ((n * c_ + c) * h_ + ih) * w_ + left
                    for r in range(4):
                        e = d + r * stride
                        # scalar: stores `rows` apart
                        for k in range(los[r], his[r]):
                            dst[uint64(e + k * rows)] = src[uint64(s + 4 * k + r)]


@njit(cache=True, fastmath=False, inline="always")
def _bt(d, two, four, five):
    """B^T d, the F(4x4, 3x3) input transform of 6 values (interpolation points 0, 1, -1, 2, -2)."""
    d0, d1, d2, d3, d4, d5 = d
    return (
        four * d0 - five * d2 + d4,
        (d3 + d4) - four * (d1 + d2),
        (d4 - d3) + four * (d1 - d2),
        (d4 - d2) + two * (d3 - d1),
        (d4 - d2) - two * (d3 - d1),
        four * d1 - five * d3 + d5,
    )


@njit(cache=True, fastmath=False, inline="always")
def _b(v, two, four, five):
    """B v, the adjoint of _bt."""
    v0, v1, v2, v3, v4, v5 = v
    return (
        four * v0,
        four * (v2 - v1) + two * (v4 - v3) + four * v5,
        -(five * v0 + four * (v1 + v2) + (v3 + v4)),
        (v1 - v2) + two * (v3 - v4) - five * v5,
        v0 + v1 + v2 + v3 + v4,
        v5,
    )


@njit(cache=True, fastmath=False, inline="always")
def _at(m, two, four, eight):
    """A^T m: 6 transformed values back to 4 outputs."""
    m0, m1, m2, m3, m4, m5 = m
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return (m0 + s12 + s34, d12 + two * d34, s12 + four * s34, d12 + eight * d34 + m5)


@njit(cache=True, fastmath=False, inline="always")
def _a(g, two, four, eight):
    """A g, the adjoint of _at: 4 output gradients to 6 transformed ones."""
    g0, g1, g2, g3 = g
    s02, s13 = g0 + g2, g1 + g3
    t02, t13 = g0 + four * g2, two * g1 + eight * g3
    return (g0, s02 + s13, s02 - s13, t02 + t13, t02 - t13, g3)


@njit(cache=True, fastmath=False, inline="always")
def _row6(f, i, stride, nxt):
    """The 6 columns of tile i in four phase rows stride apart: phases 0-3 of slot i, phases 0-1 of slot
    i + nxt (its right neighbour)."""
    return (
        f[uint64(i)],
        f[uint64(i + stride)],
        f[uint64(i + 2 * stride)],
        f[uint64(i + 3 * stride)],
        f[uint64(i + nxt)],
        f[uint64(i + stride + nxt)],
    )


@njit(cache=True, fastmath=False, inline="always")
def _put6(f, i, stride, t):
    """f[i + e*stride] = t[e] for the 6 entries of t."""
    f[uint64(i)] = t[0]
    f[uint64(i + stride)] = t[1]
    f[uint64(i + 2 * stride)] = t[2]
    f[uint64(i + 3 * stride)] = t[3]
    f[uint64(i + 4 * stride)] = t[4]
    f[uint64(i + 5 * stride)] = t[5]


@njit(cache=True, fastmath=False, inline="always")
def _get6(f, i, stride):
    """(f[i], f[i + stride], ..., f[i + 5*stride])."""
    return (
        f[uint64(i)],
        f[uint64(i + stride)],
        f[uint64(i + 2 * stride)],
        f[uint64(i + 3 * stride)],
        f[uint64(i + 4 * stride)],
        f[uint64(i + 5 * stride)],
    )


@njit(cache=True, fastmath=False)
def winograd_input(x, ph, pw, tiles_h, tiles_w, r0, rows, v):
    """v[6a + b, c*T + k*rows + rr] = (B^T d B)[a, b] for the 6x6 input patch d of tile (r0 + rr, k) (finite
    values in the junk slots k = tiles_w, the last `rows` of each channel's T: the GEMM leaves them out)."""
    n_, c_, h_, w_ = x.shape
    slots = tiles_w + 1
    sk = rows  # slot(rr, k) = k*rows + rr: column by column (see above)
    t_ = rows * slots
    size = c_ * t_
    ln = size + sk
    xf = x.reshape(-1)
    vf = v.reshape(-1)
    p = v.shape[1]
    two, four, five, _ = _constants(x)
    q = np.empty(24 * ln, x.dtype)  # q[(4a + r)*ln + j]: phase r of patch row a, slot j
    _gather_phases(xf, n_, c_, h_, w_, -ph, -pw, tiles_h, r0, rows, slots, 6, q, ln)
    for r in range(24):
        for k in range(sk):
            q[r * ln + size + k] = 0.0
    for r in range(4):  # B^T down the columns, in place (one loop per phase: at most 8 store streams
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for j in range(ln):  # per loop, or LLVM gives up vectorizing for want of alias checks)
            _put6(q, r * ln + j, 4 * ln, _bt(_get6(q, r * ln + j, 4 * ln), two, four, five))
    for a in range(6):  # then B along the rows: tile j's columns are phases 0-3 of slot j, 0-1 of j + sk
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for j in range(size):
            _put6(vf, 6 * a * p + j, p, _bt(_row6(q, 4 * a * ln + j, ln, sk), two, four, five))


@njit(cache=True, fastmath=False)
def winograd_output(m, bias, tiles_h, tiles_w, r0, rows, out):
    """out[n, o, 4th + i, 4k + j] = (A^T M A)[i, j] + bias[o] for the chunk's tiles (clipped to out)."""
    n_, o_, oh_, ow_ = out.shape
    slots = tiles_w + 1
    sk, sr = rows, 1  # slot(rr, k) = k*rows + rr: column by column (see above)
    t_ = rows * slots
    size = o_ * t_
    mf = m.reshape(-1)
    of = out.reshape(-1)
    p = m.shape[1]
    two, four, _, eight = _constants(m)
    y = np.empty(24 * size, m.dtype)  # y[(6i + b)*size + j] = (A^T M)[i, b]
    for b in range(6):  # A^T down the columns
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for j in range(size):
            z = _at(_get6(mf, b * p + j, 6 * p), two, four, eight)
            y[uint64(b * size + j)] = z[0]
            y[uint64((6 + b) * size + j)] = z[1]
            y[uint64((12 + b) * size + j)] = z[2]
            y[uint64((18 + b) * size + j)] = z[3]
    if rows >= _GATHER_BY_TILE_ROWS:  # then A along the rows, tile rows innermost (see _gather_phases)
        base, pos, count = _tile_rows_inside(o_, oh_, ow_, 0, tiles_h, r0, rows, 4)
        zz = np.empty(4 * tiles_w * rows, m.dtype)  # zz[(4k + r)*rows + rr]: column 4k + r of tile row rr
        blk = _tile_row_block(rows, tiles_h)
        plane = oh_ * ow_
        for o in range(o_):
            bo = bias[o]
            for i in range(4):
                for k in range(tiles_w):
                    q = 6 * i * size + o * t_ + k * sk
                    d = 4 * k * rows
                    for rr in range(rows):  # unit-stride in y and zz
                        z = _at(_get6(y, q + rr, size), two, four, eight)
                        zz[uint64(d + rr)] = z[0] + bo
                        zz[uint64(d + rows + rr)] = z[1] + bo
                        zz[uint64(d + 2 * rows + rr)] = z[2] + bo
                        zz[uint64(d + 3 * rows + rr)] = z[3] + bo
                ni = count[i]
                for m0 in range(0, ni, blk):
                    m1 = min(m0 + blk, ni)
                    for k in range(tiles_w):
                        for r in range(min(4, ow_ - 4 * k)):
                            src = (4 * k + r) * rows
                            off = o * plane + 4 * k + r
                            # a scatter into the output rows, one row apart per tile row
                            for e in range(m0, m1):
                                of[uint64(base[i, e] + off)] = zz[uint64(src + pos[i, e])]
        return
    full = ow_ // 4
    # then A along the rows, interleaving the four column phases into the output rows (in the scatter
    # itself: ~5% faster than a separate pass into a (16, T) array, measured)
    for o in range(o_):
        bo = bias[o]
        for rr in range(rows):
            n, th = divmod(r0 + rr, tiles_h)
            j0 = o * t_ + rr * sr
            for i in range(min(4, oh_ - 4 * th)):
                row = ((n * o_ + o) * oh_ + 4 * th + i) * ow_
                q = 6 * i * size + j0
                for k in range(full):  # scalar: slots sk apart in y
                    z = _at(_get6(y, q + k * sk, size), two, four, eight)
                    of[uint64(row + 4 * k)] = z[0] + bo
                    of[uint64(row + 4 * k + 1)] = z[1] + bo
                    of[uint64(row + 4 * k + 2)] = z[2] + bo
                    of[uint64(row + 4 * k + 3)] = z[3] + bo
                if full < tiles_w:
                    z = _at(_get6(y, q + full * sk, size), two, four, eight)
                    for r in range(ow_ - 4 * full):
                        of[uint64(row + 4 * full + r)] = z[r] + bo


@njit(cache=True, fastmath=False)
def winograd_grad_output(g, tiles_h, tiles_w, r0, rows, dm, sums):
    """dm[6a + b, o*T + slot(rr, k)] = (A dY A^T)[a, b] for tile (r0 + rr, k)'s 4x4 output gradient dY (0 past
    the edge, and in the junk slots). Entry 7 = (1, 1) is the sum of the tile's dY, so the bias gradient
    is the sum of the float64 sums[o, :] that it is also added into."""
    n_, o_, oh_, ow_ = g.shape
    slots = tiles_w + 1
    # slot(rr, k) = k*rows + rr: column by column (see above)
    t_ = rows * slots
    size = o_ * t_
    gf = g.reshape(-1)
    df = dm.reshape(-1)
    p = dm.shape[1]
    two, four, _, eight = _constants(g)
    q = np.empty(16 * size, g.dtype)  # q[(4i + r)*size + j]: phase r of the tile's output-gradient row i
    # (0 past the edge: the junk slot tiles_w reads past the row)
    _gather_phases(gf, n_, o_, oh_, ow_, 0, 0, tiles_h, r0, rows, slots, 4, q, size)
    # A along the rows into z, then down the columns (measured: recomputing z inside the column pass, or
    # the columns first, was no faster)
    z = np.empty(24 * size, g.dtype)  # z[(6i + b)*size + j] = (dY A^T)[i, b]
    for i in range(4):
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for j in range(size):
            _put6(
                z,
                6 * i * size + j,
                size,
                _a(
                    (
                        q[uint64(4 * i * size + j)],
                        q[uint64((4 * i + 1) * size + j)],
                        q[uint64((4 * i + 2) * size + j)],
                        q[uint64((4 * i + 3) * size + j)],
                    ),
                    two,
                    four,
                    eight,
                ),
            )
    for b in range(6):
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for j in range(size):
            _put6(
                df,
                b * p + j,
                6 * p,
                _a(
                    (
                        z[uint64(b * size + j)],
                        z[uint64((6 + b) * size + j)],
                        z[uint64((12 + b) * size + j)],
                        z[uint64((18 + b) * size + j)],
                    ),
                    two,
                    four,
                    eight,
                ),
            )
    for o in range(o_):
        base = 7 * p + o * t_
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for k in range(t_):
            sums[o, k] += df[uint64(base + k)]


@njit(cache=True, fastmath=False)
def winograd_grad_input(dv, ph, pw, tiles_h, tiles_w, r0, rows, dx):
    """dx[n, c, 4th - ph + a, 4k - pw + b] += (B dV B^T)[a, b] over the chunk's tiles (overlaps add up;
    positions in the padding are dropped). dv's junk slots must be 0."""
    n_, c_, h_, w_ = dx.shape
    slots = tiles_w + 1
    sk, sr = rows, 1  # slot(rr, k) = k*rows + rr: column by column (see above)
    t_ = rows * slots
    size = c_ * t_
    ln = size + sk
    vf = dv.reshape(-1)
    xf = dx.reshape(-1)
    p = dv.shape[1]
    two, four, five, _ = _constants(dv)
    # y[(6a + b)*ln + sk + j] = (B dV)[a, b] of slot j and y[.. + 0 .. sk] = 0, so that slot j - sk (the
    # left neighbour) is always readable (0 before a row's first slot: a junk slot, or the start)
    y = np.empty(36 * ln, dv.dtype)
    for b in range(36):
        for k in range(sk):
            y[b * ln + k] = 0.0
    for b in range(6):  # B down the columns
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for j in range(size):
            _put6(y, b * ln + sk + j, 6 * ln, _b(_get6(vf, b * p + j, 6 * p), two, four, five))
    acc = np.empty(4 * size, dv.dtype)
    lo, hi = _phase_bounds(-pw, w_, slots)
    base, pos, count = _tile_rows_inside(c_, h_, w_, -ph, tiles_h, r0, rows, 6)
    blk = _tile_row_block(rows, tiles_h)
    plane = h_ * w_
    los = np.empty(4, np.int64)
    his = np.empty(4, np.int64)
    for b in range(4):  # slots whose column 4k + b - pw lies inside the row
        los[b], his[b] = _valid_range(b - pw, 4, w_, slots)
    for a in range(6):
        r = 6 * a * ln
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for j in range(size):  # B along the row: column phase b of slot j gets tile j's entry b and,
            cur = _b(_get6(y, r + sk + j, ln), two, four, five)  # for b < 2, tile j - sk's entry b + 4
            prev = _get6(y, r + j, ln)
            acc[uint64(j)] = cur[0] + (prev[0] + prev[1] + prev[2] + prev[3] + prev[4])
            acc[uint64(size + j)] = cur[1] + prev[5]
            acc[uint64(2 * size + j)] = cur[2]
            acc[uint64(3 * size + j)] = cur[3]
        if rows >= _GATHER_BY_TILE_ROWS:  # tile rows innermost (see _gather_phases)
            na = count[a]
            for c in range(c_):
                for m0 in range(0, na, blk):
                    m1 = min(m0 + blk, na)
                    for b in range(4):
                        for k in range(los[b], his[b]):
                            src = b * size + c * t_ + k * sk
                            off = c * plane + 4 * k + b - pw
                            # a scatter-add into the input gradient's rows, one row apart per tile row
                            for e in range(m0, m1):
                                xf[uint64(base[a, e] + off)] += acc[uint64(src + pos[a, e])]
            continue
        for c in range(c_):
            for rr in range(rows):
                n, th = divmod(r0 + rr, tiles_h)
                ih = 4 * th - ph + a
                if ih < 0 or ih >= h_:
                    continue
                j0 = c * t_ + rr * sr
                row = ((n * c_ + c) * h_ + ih) * w_ - pw
                for k in range(lo, hi):  # four phases in one loop; slots sk apart in acc
                    e = j0 + k * sk
                    xf[uint64(row + 4 * k)] += acc[uint64(e)]
                    xf[uint64(row + 4 * k + 1)] += acc[uint64(size + e)]
                    xf[uint64(row + 4 * k + 2)] += acc[uint64(2 * size + e)]
                    xf[uint64(row + 4 * k + 3)] += acc[uint64(3 * size + e)]
                for k in range(lo):  # edge columns
                    for b in range(4):
                        if 0 <= 4 * k + b - pw < w_:
                            xf[uint64(row + 4 * k + b)] += acc[uint64(b * size + j0 + k * sk)]
                for k in range(hi, slots):
                    for b in range(4):
                        if 0 <= 4 * k + b - pw < w_:
                            xf[uint64(row + 4 * k + b)] += acc[uint64(b * size + j0 + k * sk)]


@njit(cache=True, fastmath=False)
def winograd_input_t(x, ph, pw, tiles_h, tiles_w, r0, rows, vt):
    """The input transform in (36, T, C) layout (channels innermost), for dU = dM @ V^T as a plain
    (non-transposed) GEMM: vt[6a + b, slot(rr, k), c] = (B^T d B)[a, b] of tile (r0 + rr, k), channel c.
    Each tile row's 6 input rows are staged split into column phases with channels innermost,
    stage[a, r, slot, c] = padded input (row a, column 4*slot + r), so that both passes of the transform
    run as long unit-stride loops over (slot, channel) (loops over the 32 channels of one tile were
    2.5x slower)."""
    n_, c_, h_, w_ = x.shape
    slots = tiles_w + 1
    sk, sr = rows, 1  # slot(rr, k) = k*rows + rr: column by column (see above)
    p = vt.shape[1]
    tf = vt.reshape(-1)
    xf = x.reshape(-1)
    two, four, five, _ = _constants(x)
    phase = slots * c_  # one column phase of one patch row
    row = 4 * phase
    stage = np.zeros(6 * row, x.dtype)  # the padding columns stay 0
    los = np.empty(4, np.int64)
    his = np.empty(4, np.int64)
    for r in range(4):  # slots whose column 4*slot + r - pw lies inside the input
        los[r], his[r] = _valid_range(r - pw, 4, w_, slots)
    for rr in range(rows):
        n, th = divmod(r0 + rr, tiles_h)
        for a in range(6):
            ih = 4 * th - ph + a
            inside = 0 <= ih < h_
            for c in range(c_):
                src = ((n * c_ + c) * h_ + ih) * w_ - pw
                for r in range(4):
                    dst = a * row + r * phase + c
                    # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
                    for k in range(los[r], his[r]):
                        stage[uint64(dst + k * c_)] = xf[uint64(src + 4 * k + r)] if inside else 0.0
        # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
        for i in range(row):  # B^T down the rows, in place
            _put6(stage, i, row, _bt(_get6(stage, i, row), two, four, five))
        for a in range(6):  # then B along the row: tile k's columns are phases 0-3 of slot k, 0-1 of k + 1
            for k in range(tiles_w):
                s = a * row + k * c_
                t = (k * sk + rr * sr) * c_  # row slot(rr, k) of vt
                # LLVM vectorizes this loop on x86-64 (8 float32 lanes) and aarch64 (NEON, 4 lanes)
                for m in range(c_):
                    d = (
                        stage[uint64(s + m)],
                        stage[uint64(s + phase + m)],
                        stage[uint64(s + 2 * phase + m)],
                        stage[uint64(s + 3 * phase + m)],
                        stage[uint64(s + c_ + m)],
                        stage[uint64(s + phase + c_ + m)],
                    )
                    _put6(tf, 6 * a * p + t + m, p, _bt(d, two, four, five))
        t = (tiles_w * sk + rr * sr) * c_  # the junk slot
        for i in range(36):
            for c in range(c_):
                tf[uint64(i * p + t + c)] = 0.0


# ----- Winograd F(2x2, 3x3) for small maps (conv_winograd2.py) ---------------------------------------------
# Tiles p = (n*tiles_h + th)*tiles_w + tw, no junk slots: on 4x4 maps F(4x4, 3x3) wastes half its slots and
# its U (36 x O x C, 38 MB at 512 channels) outweighs the input; F(2x2, 3x3)'s 16 products of (O, C) x (C, P)
# run with P = 4N. B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], A^T = [[1, 1, 1, 0],
# [0, 1, -1, -1]]. A tile's 16 entries leave nothing to vectorize (2 tiles a row on 4x4 maps), so the transforms
# run on whole rows instead: one entry of every tile (or of every image) a row, each row one unit-stride loop
# that LLVM vectorizes, with the scalar work left to one gather or scatter through a table. Each entry takes the
# same floating-point operations in the same order as the scalar per-tile loops these replaced, so results are
# bit for bit the same (a NaN stays a NaN; which NaN's payload survives where two meet is LLVM's to choose, as
# before). v, m, dm and dv's 16 rows lie C * P floats apart, a multiple of 4 KiB: 16 interleaved streams that far
# apart all fall in one L1 set, so each row is read or written by its own loops. ResNet-18's 512-channel 4x4
# layer at batch 32 (64K tiles), float32, AMD EPYC Zen 4, one thread, old (scalar per tile) -> new, ms: input
# 1.03 -> 0.28, output 1.07 -> 0.21, grad_output 0.95 -> 0.22, grad_input 1.33 -> 0.52.
_W2_INPUT_BLOCK = 4  # channels a pass of winograd2_input (8: the same time; 2: 0.33 ms, 16: 0.32 ms)
_W2_BLOCK = 8  # channels a pass of the other three (output: 1 channel 0.26 ms, 8: 0.21 ms)


@njit(cache=True, fastmath=False)
def winograd2_input(x, ph, pw, tiles_h, tiles_w, v):
    """v[4a + b, c, p] = (B^T d B)[a, b] for the 4x4 input patch d of tile p (corner (2th - ph, 2tw - pw))."""
    # 1.03 -> 0.28 ms on ResNet-18's 512-channel 4x4 layer, batch 32 (AMD EPYC Zen 4, one thread; the scalar
    # per-tile loops before). Blocks of _W2_INPUT_BLOCK channels; column l = j*N + n holds channel c0 + j of
    # image n. x is first transposed into xa (image-minor), then copied run by run into the zero-padded xt (its
    # padding is written once), B^T runs down whole padded rows (every column s of a tile row at once: the tiles
    # of a row share their columns), then B along them, straight into v, one row of v (a run of nb * P) at a time.
    n_, c_, h_, w_ = x.shape
    hp, wp = 2 * tiles_h + 2, 2 * tiles_w + 2
    t_ = tiles_h * tiles_w
    p_ = n_ * t_
    hw = h_ * w_
    blk = _W2_INPUT_BLOCK
    lm = blk * n_  # columns of xt and cr (the last, narrower block uses fewer)
    xa = np.empty(blk * hw * n_, x.dtype)  # x[n, c0 + j, r, s] at (j*H*W + r*W + s)*N + n
    xt = np.zeros(hp * wp * lm, x.dtype)  # the same, zero-padded: padded entry (r, s) at (r*wp + s)*lm + l
    run = wp * lm  # one padded row
    cr = np.empty(4 * tiles_h * run, x.dtype)  # (B^T d)[a, s] of tile row th at ((a*tiles_h + th)*wp + s)*lm + l
    xf = x.reshape(-1)
    vf = v.reshape(-1)
    plane = c_ * p_  # distance between v[k] and v[k + 1]
    r0, r1 = max(ph, 0), min(h_ + ph, hp)  # padded rows that hold input rows
    s0, s1 = max(pw, 0), min(w_ + pw, wp)
    ur, um = uint64(run), uint64(lm)
    one, two, three, four = uint64(1), uint64(2), uint64(3), uint64(4)
    for c0 in range(0, c_, blk):
        nb = min(blk, c_ - c0)
        ul = uint64(nb * n_)
        # the transpose, image by image (each reads nb * H * W contiguous inputs): 0.19 ms of the 0.28. Scattered
        # straight into xt's padded rows, lm floats apart, the same copies took 0.38 ms
        for n in range(n_):
            for j in range(nb):
                src = (n * c_ + c0 + j) * hw
                for e in range(hw):
                    xa[uint64((j * hw + e) * n_ + n)] = xf[uint64(src + e)]
        for j in range(nb):
            for r in range(r0, r1):
                for s in range(s0, s1):
                    a0 = uint64((j * hw + (r - ph) * w_ + s - pw) * n_)
                    d0 = uint64((r * wp + s) * lm + j * n_)
                    for i in range(n_):
                        xt[d0 + uint64(i)] = xa[a0 + uint64(i)]
        # B^T down the columns, a padded row (wp * lm floats) a loop: LLVM vectorizes them. Per tile and channel
        # (loops of N = 32) these and B's loops below took 0.47 ms, most of it in the loops' scalar remainders
        for th in range(tiles_h):
            q0 = uint64(2 * th) * ur
            q1, q2, q3 = q0 + ur, q0 + two * ur, q0 + three * ur
            k0 = uint64(th) * ur
            k1, k2, k3 = k0 + uint64(tiles_h) * ur, k0 + uint64(2 * tiles_h) * ur, k0 + uint64(3 * tiles_h) * ur
            for i in range(ur):
                cr[k0 + i] = xt[q0 + i] - xt[q2 + i]
            for i in range(ur):
                cr[k1 + i] = xt[q1 + i] + xt[q2 + i]
            for i in range(ur):
                cr[k2 + i] = xt[q2 + i] - xt[q1 + i]
            for i in range(ur):
                cr[k3 + i] = xt[q1 + i] - xt[q3 + i]
        # then B along the rows, into v[4a + jj, c0:c0 + nb, :] (nb * P contiguous floats, entry l*T + t)
        for a in range(4):
            for jj in range(4):
                d = uint64((4 * a + jj) * plane + c0 * p_)
                if tiles_h == 2 and tiles_w == 2:
                    # 4x4 maps: the 4 tiles of an image interleaved by LLVM's vectorizer (AVX-512 permutes)
                    e00 = uint64(a * tiles_h) * ur
                    e01 = e00 + two * um
                    e10 = e00 + ur
                    e11 = e10 + two * um
                    if jj == 0:
                        for i in range(ul):
                            vf[d + four * i] = cr[e00 + i] - cr[e00 + two * um + i]
                            vf[d + four * i + one] = cr[e01 + i] - cr[e01 + two * um + i]
                            vf[d + four * i + two] = cr[e10 + i] - cr[e10 + two * um + i]
                            vf[d + four * i + three] = cr[e11 + i] - cr[e11 + two * um + i]
                    elif jj == 1:
                        for i in range(ul):
                            vf[d + four * i] = cr[e00 + um + i] + cr[e00 + two * um + i]
                            vf[d + four * i + one] = cr[e01 + um + i] + cr[e01 + two * um + i]
                            vf[d + four * i + two] = cr[e10 + um + i] + cr[e10 + two * um + i]
                            vf[d + four * i + three] = cr[e11 + um + i] + cr[e11 + two * um + i]
                    elif jj == 2:
                        for i in range(ul):
                            vf[d + four * i] = cr[e00 + two * um + i] - cr[e00 + um + i]
                            vf[d + four * i + one] = cr[e01 + two * um + i] - cr[e01 + um + i]
                            vf[d + four * i + two] = cr[e10 + two * um + i] - cr[e10 + um + i]
                            vf[d + four * i + three] = cr[e11 + two * um + i] - cr[e11 + um + i]
                    else:
                        for i in range(ul):
                            vf[d + four * i] = cr[e00 + um + i] - cr[e00 + three * um + i]
                            vf[d + four * i + one] = cr[e01 + um + i] - cr[e01 + three * um + i]
                            vf[d + four * i + two] = cr[e10 + um + i] - cr[e10 + three * um + i]
                            vf[d + four * i + three] = cr[e11 + um + i] - cr[e11 + three * um + i]
                else:
                    for th in range(tiles_h):
                        for tw in range(tiles_w):
                            t = uint64(th * tiles_w + tw)
                            e = uint64(a * tiles_h + th) * ur + uint64(2 * tw) * um
                            c0_, c1_, c2_, c3_ = e, e + um, e + two * um, e + three * um
                            for i in range(ul):
                                o = d + i * uint64(t_) + t
                                if jj == 0:
                                    vf[o] = cr[c0_ + i] - cr[c2_ + i]
                                elif jj == 1:
                                    vf[o] = cr[c1_ + i] + cr[c2_ + i]
                                elif jj == 2:
                                    vf[o] = cr[c2_ + i] - cr[c1_ + i]
                                else:
                                    vf[o] = cr[c1_ + i] - cr[c3_ + i]


@njit(cache=True, fastmath=False)
def winograd2_output(m, bias, tiles_h, tiles_w, out):
    """out[n, o, 2th + i, 2tw + j] = (A^T M A)[i, j] + bias[o] for M = m[:, o, p] (clipped to out)."""
    # 1.07 -> 0.21 ms on ResNet-18's 512-channel 4x4 layer, batch 32 (AMD EPYC Zen 4, one thread; the scalar
    # per-tile loops before read m[:, o, p] across 16 planes O * P floats apart, one L1 set)
    n_, o_, oh_, ow_ = out.shape
    t_ = tiles_h * tiles_w
    p_ = n_ * t_
    plane = o_ * p_
    ohw = oh_ * ow_
    up = uint64(p_)
    mf = m.reshape(-1)
    of = out.reshape(-1)
    tab = np.empty(ohw, np.int64)  # output pixel (oh, ow) of image n: yb entry tab[oh*ow_ + ow] + n*T
    for oh in range(oh_):
        for ow in range(ow_):
            tab[oh * ow_ + ow] = (2 * (oh % 2) + ow % 2) * p_ + (oh // 2) * tiles_w + ow // 2
    blk = _W2_BLOCK
    ub = np.empty(8 * p_, m.dtype)  # M A: row 2a + j
    yb = np.empty(blk * 4 * p_, out.dtype)  # A^T M A + bias of channel o0 + jo: row 4*jo + 2i + j
    for o0 in range(0, o_, blk):
        nb = min(blk, o_ - o0)
        # rows of P tiles, LLVM vectorizes each loop: 0.11 ms of the 0.21
        for jo in range(nb):
            o = o0 + jo
            bo = bias[o]
            for a in range(4):  # A along the rows
                s0 = uint64(4 * a * plane + o * p_)
                s1, s2, s3 = s0 + uint64(plane), s0 + uint64(2 * plane), s0 + uint64(3 * plane)
                d0 = uint64(2 * a * p_)
                d1 = d0 + up
                for i in range(up):
                    ub[d0 + i] = mf[s0 + i] + mf[s1 + i] + mf[s2 + i]
                for i in range(up):
                    ub[d1 + i] = mf[s1 + i] - mf[s2 + i] - mf[s3 + i]
            for j in range(2):  # then A^T down the columns
                u0, u2 = uint64(j * p_), uint64((2 + j) * p_)
                u4, u6 = uint64((4 + j) * p_), uint64((6 + j) * p_)
                y0 = uint64((4 * jo + j) * p_)
                y1 = uint64((4 * jo + 2 + j) * p_)
                for i in range(up):
                    yb[y0 + i] = ub[u0 + i] + ub[u2 + i] + ub[u4 + i] + bo
                for i in range(up):
                    yb[y1 + i] = ub[u2 + i] - ub[u4 + i] - ub[u6 + i] + bo
        # then the scatter, out[n, o0:o0 + nb] (one contiguous run) pixel by pixel through the table: 0.10 ms of
        # the 0.21; 0.35 ms as nested loops over the tile's rows and columns with the edge tests
        for n in range(n_):
            for jo in range(nb):
                dst = uint64((n * o_ + o0 + jo) * ohw)
                src = uint64(4 * jo * p_ + n * t_)
                for e in range(ohw):
                    of[dst + uint64(e)] = yb[src + uint64(tab[e])]


@njit(cache=True, fastmath=False)
def winograd2_grad_output(g, tiles_h, tiles_w, dm):
    """dm[4a + b, o, p] = (A dY A^T)[a, b] for tile p's 2x2 output gradient dY (0 past the edge)."""
    # 0.95 -> 0.22 ms on ResNet-18's 512-channel 4x4 layer, batch 32 (AMD EPYC Zen 4, one thread; the scalar
    # per-tile loops before). The output transform's table and blocks, run backward: g gathered into 4 rows of P
    # tiles a channel, then A^T and A on whole rows (LLVM vectorizes them), each row of dm written by its own loop
    n_, o_, oh_, ow_ = g.shape
    t_ = tiles_h * tiles_w
    p_ = n_ * t_
    plane = o_ * p_
    ohw = oh_ * ow_
    up = uint64(p_)
    two, three, four = uint64(2), uint64(3), uint64(4)
    gf = g.reshape(-1)
    dmf = dm.reshape(-1)
    tab = np.empty(ohw, np.int64)  # pixel (oh, ow) of image n: yb entry tab[oh*ow_ + ow] + n*T
    for oh in range(oh_):
        for ow in range(ow_):
            tab[oh * ow_ + ow] = (2 * (oh % 2) + ow % 2) * p_ + (oh // 2) * tiles_w + ow // 2
    blk = _W2_BLOCK
    yb = np.zeros(blk * 4 * p_, g.dtype)  # dY[i, j] of channel o0 + jo: row 4*jo + 2i + j (past the edge: 0)
    zb = np.empty(8 * p_, g.dtype)  # dY A^T: row 4i + b
    for o0 in range(0, o_, blk):
        nb = min(blk, o_ - o0)
        for n in range(n_):
            for jo in range(nb):
                src = uint64((n * o_ + o0 + jo) * ohw)
                dst = uint64(4 * jo * p_ + n * t_)
                for e in range(ohw):
                    yb[dst + uint64(tab[e])] = gf[src + uint64(e)]
        for jo in range(nb):
            o = o0 + jo
            for i in range(2):
                s0 = uint64((4 * jo + 2 * i) * p_)
                s1 = s0 + up
                d = uint64(4 * i * p_)
                for q in range(up):
                    zb[d + q] = yb[s0 + q]
                for q in range(up):
                    zb[d + up + q] = yb[s0 + q] + yb[s1 + q]
                for q in range(up):
                    zb[d + two * up + q] = yb[s0 + q] - yb[s1 + q]
                for q in range(up):
                    zb[d + three * up + q] = -yb[s1 + q]
            for b in range(4):
                z0 = uint64(b * p_)
                z1 = z0 + four * up
                d = uint64(b * plane + o * p_)
                for q in range(up):
                    dmf[d + q] = zb[z0 + q]
                d += uint64(4 * plane)
                for q in range(up):
                    dmf[d + q] = zb[z0 + q] + zb[z1 + q]
                d += uint64(4 * plane)
                for q in range(up):
                    dmf[d + q] = zb[z0 + q] - zb[z1 + q]
                d += uint64(4 * plane)
                for q in range(up):
                    dmf[d + q] = -zb[z1 + q]


@njit(cache=True, fastmath=False)
def winograd2_grad_input(dv, ph, pw, tiles_h, tiles_w, dx):
    """dx[n, c, 2th - ph + a, 2tw - pw + b] += (B dV B^T)[a, b] (overlapping patches add up; padding dropped)."""
    # 1.33 -> 0.52 ms on ResNet-18's 512-channel 4x4 layer, batch 32 (AMD EPYC Zen 4, one thread; the scalar
    # per-tile loops before). B and B^T on whole rows of P tiles a channel (LLVM vectorizes them; 0.19 ms of the
    # 0.52), then each pixel of dx adds its up to 4 entries in tile order, as the per-tile loops did, through a table
    n_, c_, h_, w_ = dx.shape
    t_ = tiles_h * tiles_w
    p_ = n_ * t_
    plane = c_ * p_
    hw = h_ * w_
    up = uint64(p_)
    two, three = uint64(2), uint64(3)
    dvf = dv.reshape(-1)
    dxf = dx.reshape(-1)
    blk = _W2_BLOCK
    rs = 17 * p_  # one channel's rows in rb: 16 of (B dV B^T)[a, b] (row 4a + b), then one of -0.0
    # pixel e = ih*W + iw of image n adds rb[tab[4e + k] + n*T] for k = 0..3, its tiles in order; the slots it
    # lacks point at the -0.0 row (x + -0.0 is x bit for bit, signed zeros and NaNs included). Looping over
    # each pixel's count instead took 0.65 ms
    tab = np.full(4 * hw, 16 * p_, np.int64)
    cnt = np.zeros(hw, np.int64)
    for th in range(tiles_h):
        for tw in range(tiles_w):
            for b in range(4):
                iw = 2 * tw - pw + b
                if iw < 0 or iw >= w_:
                    continue
                for a in range(4):
                    ih = 2 * th - ph + a
                    if 0 <= ih < h_:
                        e = ih * w_ + iw
                        tab[4 * e + cnt[e]] = (4 * a + b) * p_ + th * tiles_w + tw
                        cnt[e] += 1
    tb = np.empty(16 * p_, dv.dtype)  # B dV: row 4a + b
    rb = np.empty(blk * rs, dv.dtype)
    for jo in range(blk):
        for q in range(p_):
            rb[uint64(jo * rs + 16 * p_ + q)] = -0.0
    for c0 in range(0, c_, blk):
        nb = min(blk, c_ - c0)
        for jo in range(nb):
            c = c0 + jo
            for a in range(4):  # B along the rows (the adjoint of B^T's rows), 4 rows of dv a pass
                s0 = uint64(4 * a * plane + c * p_)
                s1, s2, s3 = s0 + uint64(plane), s0 + uint64(2 * plane), s0 + uint64(3 * plane)
                d = uint64(4 * a * p_)
                for q in range(up):
                    tb[d + q] = dvf[s0 + q]
                for q in range(up):
                    tb[d + up + q] = dvf[s1 + q] - dvf[s2 + q] + dvf[s3 + q]
                for q in range(up):
                    tb[d + two * up + q] = dvf[s2 + q] - dvf[s0 + q] + dvf[s1 + q]
                for q in range(up):
                    tb[d + three * up + q] = -dvf[s3 + q]
            r = uint64(jo * rs)
            for b in range(4):  # then down the columns
                e0 = uint64(b * p_)
                e1, e2, e3 = e0 + uint64(4 * p_), e0 + uint64(8 * p_), e0 + uint64(12 * p_)
                for q in range(up):
                    rb[r + e0 + q] = tb[e0 + q]
                for q in range(up):
                    rb[r + e1 + q] = tb[e1 + q] - tb[e2 + q] + tb[e3 + q]
                for q in range(up):
                    rb[r + e2 + q] = tb[e2 + q] - tb[e0 + q] + tb[e1 + q]
                for q in range(up):
                    rb[r + e3 + q] = -tb[e3 + q]
        for n in range(n_):  # dx[n, c0:c0 + nb] is one contiguous run
            for jo in range(nb):
                dst = uint64((n * c_ + c0 + jo) * hw)
                src = uint64(jo * rs + n * t_)
                for e in range(hw):
                    k = uint64(4 * e)
                    acc = dxf[dst + uint64(e)]
                    acc += rb[src + uint64(tab[k])]
                    acc += rb[src + uint64(tab[k + uint64(1)])]
                    acc += rb[src + uint64(tab[k + uint64(2)])]
                    acc += rb[src + uint64(tab[k + uint64(3)])]
                    dxf[dst + uint64(e)] = acc


# ----- Winograd weight transforms: U = G w G^T and its adjoint dw = G^T dU G, for F(2x2) and F(4x4) ---------
# g is the (r, 3) matrix G in the weight's dtype (r = 4 for F(2x2, 3x3), 6 for F(4x4, 3x3)); U is (r*r, O, C),
# entry a*r + d of G w G^T for channel pair (o, c). Blocks of 256 channel pairs: the block's 9 taps are first
# gathered into 9 rows (a scalar transposing copy within L1), then G down the taps (3r rows) and G along them
# (r*r rows), each row one unit-stride loop over the block that LLVM vectorizes, so U is written one row run at
# a time. As one GEMM ((r*r, 9) @ (9, O*C), OpenBLAS, K = 9) these took, ResNet-18's weights, thread CPU ms,
# GEMM -> these loops (same process, load ~2.5): F(2x2) 512x512 forward 4.53 -> 3.37; F(4x4) 256x256 forward
# 2.10 -> 1.36, backward 1.91 -> 1.48; 128x128 forward 0.43 -> 0.19, backward 0.35 -> 0.22. F(2x2)'s backward
# at 512 channels stays a GEMM (3.48 against 4.10 here: 16 rows of dU streamed from memory per block).
_WEIGHT_BLOCK = 256


@njit(cache=True, fastmath=False)
def winograd_weight(w, g, u):
    """u (r*r, O, C) = G w G^T for every channel pair of w (O, C, 3, 3); g (r, 3) = G."""
    o_, c_ = w.shape[0], w.shape[1]
    r = g.shape[0]
    blk = _WEIGHT_BLOCK
    oc = o_ * c_
    wf = w.reshape(-1)
    uf = u.reshape(-1)
    wt = np.empty(9 * blk, w.dtype)
    tt = np.empty(3 * r * blk, w.dtype)
    for p0 in range(0, oc, blk):
        nb = min(blk, oc - p0)
        base = p0 * 9
        for t in range(9):  # the block's taps as 9 rows (scalar: a stride-9 gather)
            for i in range(nb):
                wt[uint64(t * blk + i)] = wf[uint64(base + 9 * i + t)]
        for a in range(r):  # (G w)[a, b] = sum_k G[a, k] w[k, b]
            ga0, ga1, ga2 = g[a, 0], g[a, 1], g[a, 2]
            for b in range(3):
                d = (3 * a + b) * blk
                # LLVM vectorizes this loop on x86-64 (one store stream)
                for i in range(nb):
                    tt[uint64(d + i)] = (
                        ga0 * wt[uint64(b * blk + i)]
                        + ga1 * wt[uint64((3 + b) * blk + i)]
                        + ga2 * wt[uint64((6 + b) * blk + i)]
                    )
        for a in range(r):  # U[a, d] = sum_k (G w)[a, k] G[d, k], written row run by row run
            s = 3 * a * blk
            for d in range(r):
                gd0, gd1, gd2 = g[d, 0], g[d, 1], g[d, 2]
                dst = (a * r + d) * oc + p0
                # LLVM vectorizes this loop on x86-64 (one store stream)
                for i in range(nb):
                    uf[uint64(dst + i)] = (
                        gd0 * tt[uint64(s + i)] + gd1 * tt[uint64(s + blk + i)] + gd2 * tt[uint64(s + 2 * blk + i)]
                    )


@njit(cache=True, fastmath=False)
def winograd_weight_grad(du, g, dw):
    """dw (O, C, 3, 3) = G^T dU G for every channel pair, the adjoint of winograd_weight; du (r*r, O, C)."""
    r = g.shape[0]
    o_, c_ = dw.shape[0], dw.shape[1]
    blk = _WEIGHT_BLOCK
    oc = o_ * c_
    duf = du.reshape(-1)
    dwf = dw.reshape(-1)
    tt = np.empty(3 * r * blk, dw.dtype)
    acc = np.empty(9 * blk, dw.dtype)
    for p0 in range(0, oc, blk):
        nb = min(blk, oc - p0)
        for a in range(r):  # (dU G)[a, b] = sum_d dU[a, d] G[d, b]
            for b in range(3):
                d0 = (3 * a + b) * blk
                s = a * r * oc + p0
                gb = g[0, b]
                # LLVM vectorizes these loops on x86-64
                for i in range(nb):
                    tt[uint64(d0 + i)] = gb * duf[uint64(s + i)]
                for e in range(1, r):
                    ge = g[e, b]
                    se = s + e * oc
                    for i in range(nb):
                        tt[uint64(d0 + i)] += ge * duf[uint64(se + i)]
        for t in range(9):
            for i in range(nb):
                acc[uint64(t * blk + i)] = 0.0
        for a in range(r):  # dw[k, b] = sum_a G[a, k] (dU G)[a, b]
            for k in range(3):
                gak = g[a, k]
                for b in range(3):
                    s = (3 * a + b) * blk
                    d0 = (3 * k + b) * blk
                    # LLVM vectorizes this loop on x86-64
                    for i in range(nb):
                        acc[uint64(d0 + i)] += gak * tt[uint64(s + i)]
        base = p0 * 9
        for i in range(nb):  # back to the weight's (O, C, 3, 3) layout (scalar: a stride-9 scatter)
            for t in range(9):
                dwf[uint64(base + 9 * i + t)] = acc[uint64(t * blk + i)]
