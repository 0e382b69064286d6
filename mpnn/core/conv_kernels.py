"""Numba loops for convolution and pooling: im2col/col2im and the Winograd F(2x2, 3x3) transforms around
the BLAS GEMMs (mpnn.core.conv), and the pooling windows (mpnn.core.pool).

Every kernel takes C-contiguous float32 or float64 arrays, Python ints (int64) and bools, so each compiles
to at most two specializations (one per float dtype), cached on disk. Outputs are written in place.
Why Numba: a NumPy fancy-indexing im2col lost to oneDNN by 1.6x on wide layers and 6-10x on few channels
(DESIGN.md); these loops copy whole contiguous runs per kernel tap instead. For pooling, a NumPy
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
                        for ow in range(a, c0):
                            cf[uint64(d0 + ow)] = 0.0
                        if sw == 1:
                            for ow in range(c0, c1):
                                cf[uint64(d0 + ow)] = xf[uint64(s0 + ow)]
                        else:
                            for ow in range(c0, c1):
                                cf[uint64(d0 + ow)] = xf[uint64(s0 + ow * sw)]
                        for ow in range(c1, b):
                            cf[uint64(d0 + ow)] = 0.0
    for grp in range(groups):
        for r in range(taps, group_rows):
            cols[grp * group_rows + r] = 1.0


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
                            for ow in range(c0, c1):
                                df[uint64(d0 + ow)] += cf[uint64(s0 + ow)]
                        else:
                            for ow in range(c0, c1):
                                df[uint64(d0 + ow * sw)] += cf[uint64(s0 + ow)]


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
                    for ih in range(hlo[oh], hhi[oh]):
                        for iw in range(wlo[ow], whi[ow]):
                            plane[ih, iw] += share

# ----- Winograd F(2x2, 3x3): 3x3 convolutions with stride 1 and dilation 1 ---------------------------------
# The GEMM stage then runs 16 products (O, C) x (C, tiles) instead of (O, 9C) x (9C, 4*tiles): 2.25x fewer
# multiplies (Lavin & Gray 2015). A 2x2 output tile (th, tw) reads the 4x4 input patch whose corner is
# (2*th - ph, 2*tw - pw). Tile rows are numbered R = n*tiles_h + th across the batch; a chunk is the
# `rows` tile rows from r0. Each tile row has S = tiles_w + 1 slots, the last one a junk slot (zero in
# v, dm and dv), so that slot j + 1 is always tile j's right neighbour: every pass then runs as one long
# unit-stride loop over a whole (channels, T = rows*S) matrix, which LLVM vectorizes. Per-row loops of
# tiles_w iterations spent most of their time in loop set-up (measured 3-5x slower).
# v/m/dm/dv are (16, P) buffers: row 4a + b holds entry (a, b) of every tile's 4x4 block as a
# (channels, T) matrix in its first channels*T elements; P is padded off a multiple of 4 KiB because 16
# streams exactly 4 KiB-multiples apart all hit one L1 set (measured 4x slower).
#   B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]   G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]
#   A^T = [[1,1,1,0],[0,1,-1,-1]]   forward: Y = A^T [(G w G^T) * (B^T d B)] A


@njit(cache=True, fastmath=False)
def _split_ranges(offset, size, count):
    """For rows read as even[k] = row[2k + offset], odd[k] = row[2k + 1 + offset], k < count: the k ranges
    inside a row of this size, for even, for odd, and for both (the de-interleaving loop)."""
    lo_e, hi_e = _valid_range(offset, 2, size, count)
    lo_o, hi_o = _valid_range(offset + 1, 2, size, count)
    lo = max(lo_e, lo_o)
    return lo_e, hi_e, lo_o, hi_o, lo, max(min(hi_e, hi_o), lo)


@njit(cache=True, fastmath=False, inline="always")
def _load_split_row(src, s, even, odd, d, ranges, count):
    """even[d + k], odd[d + k] = src[s + 2k], src[s + 2k + 1] inside the row (see _split_ranges), else 0:
    a row with its zero border split into even and odd columns, so that later passes are unit-stride.
    Flat unsigned indices and ranges computed once per kernel: half the time of row views (measured)."""
    lo_e, hi_e, lo_o, hi_o, lo, hi = ranges
    for k in range(lo):
        even[uint64(d + k)] = 0.0
        odd[uint64(d + k)] = 0.0
    for k in range(lo, hi):  # both loads in one loop: LLVM makes the pair one de-interleaving load
        even[uint64(d + k)] = src[uint64(s + 2 * k)]
        odd[uint64(d + k)] = src[uint64(s + 2 * k + 1)]
    for k in range(hi, count):
        even[uint64(d + k)] = 0.0
        odd[uint64(d + k)] = 0.0
    for k in range(lo_e, min(lo, hi_e)):
        even[uint64(d + k)] = src[uint64(s + 2 * k)]
    for k in range(max(hi, lo_e), hi_e):
        even[uint64(d + k)] = src[uint64(s + 2 * k)]
    for k in range(lo_o, min(lo, hi_o)):
        odd[uint64(d + k)] = src[uint64(s + 2 * k + 1)]
    for k in range(max(hi, lo_o), hi_o):
        odd[uint64(d + k)] = src[uint64(s + 2 * k + 1)]


@njit(cache=True, fastmath=False)
def winograd_input(x, ph, pw, tiles_h, tiles_w, r0, rows, v):
    """v[4a + b, c*T + rr*S + tw] = (B^T d B)[a, b] for the 4x4 input patch d of tile (r0 + rr, tw)."""
    n_, c_, h_, w_ = x.shape
    slots = tiles_w + 1
    t_ = rows * slots
    size = c_ * t_
    xf = x.reshape(-1)
    vf = v.reshape(-1)
    p = v.shape[1]
    even = np.empty((4, size + 1), x.dtype)  # padded input columns 2k and 2k + 1 of the 4 patch rows
    odd = np.empty((4, size + 1), x.dtype)
    ef = even.reshape(-1)
    of = odd.reshape(-1)
    ranges = _split_ranges(-pw, w_, slots)
    for c in range(c_):  # channel-major, so that the rows read follow each other in memory
        for rr in range(rows):
            n, th = divmod(r0 + rr, tiles_h)
            j0 = c * t_ + rr * slots
            for a in range(4):
                ih = 2 * th - ph + a
                d = a * (size + 1) + j0
                if 0 <= ih < h_:
                    _load_split_row(xf, ((n * c_ + c) * h_ + ih) * w_ - pw, ef, of, d, ranges, slots)
                else:
                    for k in range(slots):
                        ef[uint64(d + k)] = 0.0
                        of[uint64(d + k)] = 0.0
    for a in range(4):
        even[a, size] = 0.0
        odd[a, size] = 0.0
    for j in range(size + 1):  # B^T down the columns, in place
        e0, e1, e2, e3 = even[0, j], even[1, j], even[2, j], even[3, j]
        even[0, j] = e0 - e2
        even[1, j] = e1 + e2
        even[2, j] = e2 - e1
        even[3, j] = e1 - e3
    for j in range(size + 1):
        o0, o1, o2, o3 = odd[0, j], odd[1, j], odd[2, j], odd[3, j]
        odd[0, j] = o0 - o2
        odd[1, j] = o1 + o2
        odd[2, j] = o2 - o1
        odd[3, j] = o1 - o3
    for a in range(4):  # then B along the rows: tile j's columns are even j, odd j, even j + 1, odd j + 1
        q = 4 * a * p
        for j in range(size):
            vf[uint64(q + j)] = even[a, j] - even[a, j + 1]
        q += p
        for j in range(size):
            vf[uint64(q + j)] = odd[a, j] + even[a, j + 1]
        q += p
        for j in range(size):
            vf[uint64(q + j)] = even[a, j + 1] - odd[a, j]
        q += p
        for j in range(size):
            vf[uint64(q + j)] = odd[a, j] - odd[a, j + 1]
    for k in range(16):  # junk slots to zero
        for j in range(tiles_w, size, slots):
            vf[uint64(k * p + j)] = 0.0


@njit(cache=True, fastmath=False)
def winograd_output(m, bias, tiles_h, tiles_w, r0, rows, out):
    """out[n, o, 2th + i, 2tw + j] = (A^T M A)[i, j] + bias[o] for the chunk's tiles (clipped to out)."""
    n_, o_, oh_, ow_ = out.shape
    slots = tiles_w + 1
    t_ = rows * slots
    size = o_ * t_
    mf = m.reshape(-1)
    of = out.reshape(-1)
    p = m.shape[1]
    u = np.empty((8, size), m.dtype)  # u[4i + b] = (A^T M)[i, b]
    for b in range(4):  # A^T down the columns
        q = b * p
        for j in range(size):
            u[b, j] = mf[uint64(q + j)] + mf[uint64(q + 4 * p + j)] + mf[uint64(q + 8 * p + j)]
        for j in range(size):
            u[4 + b, j] = mf[uint64(q + 4 * p + j)] - mf[uint64(q + 8 * p + j)] - mf[uint64(q + 12 * p + j)]
    for o in range(o_):  # then A along each row, interleaved into the output rows
        for rr in range(rows):
            n, th = divmod(r0 + rr, tiles_h)
            j0 = o * t_ + rr * slots
            bo = bias[o]
            for i in range(min(2, oh_ - 2 * th)):
                row = ((n * o_ + o) * oh_ + 2 * th + i) * ow_
                for k in range(ow_ // 2):
                    j = j0 + k
                    of[uint64(row + 2 * k)] = u[4 * i, j] + u[4 * i + 1, j] + u[4 * i + 2, j] + bo
                    of[uint64(row + 2 * k + 1)] = u[4 * i + 1, j] - u[4 * i + 2, j] - u[4 * i + 3, j] + bo
                if ow_ % 2:
                    j = j0 + ow_ // 2
                    of[uint64(row + ow_ - 1)] = u[4 * i, j] + u[4 * i + 1, j] + u[4 * i + 2, j] + bo


@njit(cache=True, fastmath=False)
def winograd_grad_output(g, tiles_h, tiles_w, r0, rows, dm, sums):
    """dm[4a + b, o*T + rr*S + tw] = (A dY A^T)[a, b] for tile (r0 + rr, tw)'s 2x2 output gradient dY
    (0 past the edge, and in the junk slots). Entry 5 = (1, 1) is the sum of the tile's dY, so the bias
    gradient is the sum of the float64 sums[o, :] that it is also added into (vectorized partial sums)."""
    n_, o_, oh_, ow_ = g.shape
    slots = tiles_w + 1
    t_ = rows * slots
    size = o_ * t_
    gf = g.reshape(-1)
    df = dm.reshape(-1)
    p = dm.shape[1]
    even = np.empty((2, size), g.dtype)  # columns 2tw and 2tw + 1 of the tile's 2 output-gradient rows
    odd = np.empty((2, size), g.dtype)
    ef = even.reshape(-1)
    of = odd.reshape(-1)
    ranges = _split_ranges(0, ow_, slots)
    for o in range(o_):  # channel-major, so that the rows read follow each other in memory
        for rr in range(rows):
            n, th = divmod(r0 + rr, tiles_h)
            j0 = o * t_ + rr * slots
            for i in range(2):
                oh = 2 * th + i
                d = i * size + j0
                if oh < oh_:  # slot tiles_w reads past the row: 0, the junk slot
                    _load_split_row(gf, ((n * o_ + o) * oh_ + oh) * ow_, ef, of, d, ranges, slots)
                else:
                    for k in range(slots):
                        ef[uint64(d + k)] = 0.0
                        of[uint64(d + k)] = 0.0
    # A = [[1, 0], [1, 1], [1, -1], [0, -1]] down the columns gives the block rows (ze, zo) =
    # (e0, o0), (e0 + e1, o0 + o1), (e0 - e1, o0 - o1), (-e1, -o1); A along each row then gives
    # (ze, ze + zo, ze - zo, -zo). Written out, one store stream per loop and no temporaries.
    for j in range(size):
        df[uint64(j)] = even[0, j]
    for j in range(size):
        df[uint64(p + j)] = even[0, j] + odd[0, j]
    for j in range(size):
        df[uint64(2 * p + j)] = even[0, j] - odd[0, j]
    for j in range(size):
        df[uint64(3 * p + j)] = -odd[0, j]
    for j in range(size):
        df[uint64(4 * p + j)] = even[0, j] + even[1, j]
    for o in range(o_):
        base = o * t_
        for k in range(t_):
            j = base + k
            total = (even[0, j] + even[1, j]) + (odd[0, j] + odd[1, j])
            df[uint64(5 * p + j)] = total
            sums[o, k] += total
    for j in range(size):
        df[uint64(6 * p + j)] = (even[0, j] + even[1, j]) - (odd[0, j] + odd[1, j])
    for j in range(size):
        df[uint64(7 * p + j)] = -(odd[0, j] + odd[1, j])
    for j in range(size):
        df[uint64(8 * p + j)] = even[0, j] - even[1, j]
    for j in range(size):
        df[uint64(9 * p + j)] = (even[0, j] - even[1, j]) + (odd[0, j] - odd[1, j])
    for j in range(size):
        df[uint64(10 * p + j)] = (even[0, j] - even[1, j]) - (odd[0, j] - odd[1, j])
    for j in range(size):
        df[uint64(11 * p + j)] = -(odd[0, j] - odd[1, j])
    for j in range(size):
        df[uint64(12 * p + j)] = -even[1, j]
    for j in range(size):
        df[uint64(13 * p + j)] = -even[1, j] - odd[1, j]
    for j in range(size):
        df[uint64(14 * p + j)] = -even[1, j] + odd[1, j]
    for j in range(size):
        df[uint64(15 * p + j)] = odd[1, j]


@njit(cache=True, fastmath=False)
def winograd_grad_input(dv, ph, pw, tiles_h, tiles_w, r0, rows, dx):
    """dx[n, c, 2th - ph + a, 2tw - pw + b] += (B dV B^T)[a, b] over the chunk's tiles (overlaps add up;
    positions in the padding are dropped). dv's junk slots must be 0."""
    n_, c_, h_, w_ = dx.shape
    slots = tiles_w + 1
    t_ = rows * slots
    size = c_ * t_
    vf = dv.reshape(-1)
    xf = dx.reshape(-1)
    p = dv.shape[1]
    # e[4a + b, 1 + j] = (B dV)[a, b] of tile j; e[:, 0] = 0 and the junk slots are 0, so that the left
    # neighbour j - 1 of a row's first tile contributes nothing
    e = np.empty((16, size + 1), dv.dtype)
    for b in range(4):  # B = [[1,0,0,0],[0,1,-1,1],[-1,1,1,0],[0,0,0,-1]] down the columns
        e[b, 0] = 0.0
        e[4 + b, 0] = 0.0
        e[8 + b, 0] = 0.0
        e[12 + b, 0] = 0.0
        q = b * p
        for j in range(size):
            e[b, 1 + j] = vf[uint64(q + j)]
        for j in range(size):
            e[4 + b, 1 + j] = vf[uint64(q + 4 * p + j)] - vf[uint64(q + 8 * p + j)] + vf[uint64(q + 12 * p + j)]
        for j in range(size):
            e[8 + b, 1 + j] = vf[uint64(q + 4 * p + j)] + vf[uint64(q + 8 * p + j)] - vf[uint64(q + j)]
        for j in range(size):
            e[12 + b, 1 + j] = -vf[uint64(q + 12 * p + j)]
    acc_even = np.empty(size, dv.dtype)  # input columns 2k - pw and 2k + 1 - pw of slot k
    acc_odd = np.empty(size, dv.dtype)
    lo_e, hi_e, lo_o, hi_o, lo, hi = _split_ranges(-pw, w_, slots)
    for a in range(4):  # then B along the rows; column 2k holds tile k's 0 and tile k - 1's 2
        r = 4 * a
        for j in range(size):
            acc_even[j] = e[r, 1 + j] - e[r, j] + e[r + 1, j] + e[r + 2, j]
        for j in range(size):
            acc_odd[j] = e[r + 1, 1 + j] - e[r + 2, 1 + j] + e[r + 3, 1 + j] - e[r + 3, j]
        for c in range(c_):
            for rr in range(rows):
                n, th = divmod(r0 + rr, tiles_h)
                ih = 2 * th - ph + a
                if ih < 0 or ih >= h_:
                    continue
                j0 = c * t_ + rr * slots
                row = ((n * c_ + c) * h_ + ih) * w_ - pw
                for k in range(lo, hi):  # even and odd in one loop: one interleaving store (vectorizes)
                    xf[uint64(row + 2 * k)] += acc_even[j0 + k]
                    xf[uint64(row + 2 * k + 1)] += acc_odd[j0 + k]
                for k in range(lo_e, min(lo, hi_e)):
                    xf[uint64(row + 2 * k)] += acc_even[j0 + k]
                for k in range(max(hi, lo_e), hi_e):
                    xf[uint64(row + 2 * k)] += acc_even[j0 + k]
                for k in range(lo_o, min(lo, hi_o)):
                    xf[uint64(row + 2 * k + 1)] += acc_odd[j0 + k]
                for k in range(max(hi, lo_o), hi_o):
                    xf[uint64(row + 2 * k + 1)] += acc_odd[j0 + k]


@njit(cache=True, fastmath=False)
def winograd_input_t(x, ph, pw, tiles_h, tiles_w, r0, rows, vt):
    """The input transform in (16, T, C) layout (channels innermost), for dU = dM @ V^T as a plain
    (non-transposed) GEMM: vt[4a + b, rr*S + tw, c] = (B^T d B)[a, b] of tile (r0 + rr, tw), channel c.
    Each tile row's 4 input rows are staged with channels innermost, so the transform vectorizes over
    channels."""
    n_, c_, h_, w_ = x.shape
    slots = tiles_w + 1
    wp = 2 * slots + 2
    lo = min(pw, wp)
    hi = min(pw + w_, wp)
    p = vt.shape[1]
    tf = vt.reshape(-1)
    xf = x.reshape(-1)
    stage = np.zeros(4 * wp * c_, x.dtype)  # [a, col, c]; border columns stay 0
    row = wp * c_
    for rr in range(rows):
        n, th = divmod(r0 + rr, tiles_h)
        for a in range(4):
            ih = 2 * th - ph + a
            if 0 <= ih < h_:
                for c in range(c_):
                    src = ((n * c_ + c) * h_ + ih) * w_ - pw
                    dst = a * row + c
                    for col in range(lo, hi):
                        stage[uint64(dst + col * c_)] = xf[uint64(src + col)]
            else:
                for e in range(a * row + lo * c_, a * row + hi * c_):
                    stage[uint64(e)] = 0.0
        for e in range(row):  # B^T down the rows, in place
            d0, d1 = stage[uint64(e)], stage[uint64(row + e)]
            d2, d3 = stage[uint64(2 * row + e)], stage[uint64(3 * row + e)]
            stage[uint64(e)] = d0 - d2
            stage[uint64(row + e)] = d1 + d2
            stage[uint64(2 * row + e)] = d2 - d1
            stage[uint64(3 * row + e)] = d1 - d3
        for a in range(4):  # then B along the row: tile k covers columns 2k .. 2k + 3
            for k in range(tiles_w):
                r = 4 * a * p + (rr * slots + k) * c_
                s = a * row + 2 * k * c_
                for c in range(c_):
                    s0, s1 = stage[uint64(s + c)], stage[uint64(s + c_ + c)]
                    s2, s3 = stage[uint64(s + 2 * c_ + c)], stage[uint64(s + 3 * c_ + c)]
                    tf[uint64(r + c)] = s0 - s2
                    tf[uint64(r + p + c)] = s1 + s2
                    tf[uint64(r + 2 * p + c)] = s2 - s1
                    tf[uint64(r + 3 * p + c)] = s1 - s3
        q = (rr * slots + tiles_w) * c_  # the junk slot
        for e in range(16):
            for c in range(c_):
                tf[uint64(e * p + q + c)] = 0.0
