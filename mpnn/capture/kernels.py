"""Numba kernels that replay forms use where NumPy needs several passes or a dtype-mixing loop."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

from mpnn.core.activation_kernels import relu_backward, relu_forward  # eager relu's own loops, shared
from mpnn.core.fpenv import flush_denormals_begin, flush_denormals_end
from mpnn.optim.kernels import adam_moments


@njit(cache=True, error_model="numpy")
def bias_relu(o2, b, out):
    """A linear layer's epilogue and the ReLU after it in one pass: o2 += b (row-wise, as np.add(o2, b, out=o2)),
    out = np.maximum(o2, 0); the same float operations as the two NumPy calls (21 us -> 4 on (100, 256))."""
    n, m = o2.shape
    zero = out.dtype.type(0)
    for i in range(n):
        for j in range(m):
            v = o2[i, j] + b[j]
            o2[i, j] = v
            out[i, j] = v if (v > 0 or v != v) else zero


@njit(cache=True, error_model="numpy")
def bias_relu_add(o2, b, out, other, total, relu_first):
    """bias_relu, then the residual add of its output that follows: total = out + other (or other + out, the
    operands in eager's order) in the same pass, the same float operations as bias_relu and np.add. Measured on the
    MNIST-1D MLP's (100, 256) block, warm: bias_relu 3.3 us + np.add 3.6 us, this 5.3 us (a pass and a NumPy call
    less)."""
    n, m = o2.shape
    zero = out.dtype.type(0)
    for i in range(n):
        for j in range(m):
            v = o2[i, j] + b[j]
            o2[i, j] = v
            a = v if (v > 0 or v != v) else zero
            out[i, j] = a
            total[i, j] = a + other[i, j] if relu_first else other[i, j] + a


@njit(cache=True, error_model="numpy")
def bias_add(o2, b):
    """o2 += b row-wise, as np.add(o2, b, out=o2): the same float additions. A linear layer's epilogue without a
    ReLU after it; measured on the MNIST-1D models' last layer ((100, 10)), warm: NumPy's broadcast add 1.7 us,
    this 0.5 us."""
    n, m = o2.shape
    for i in range(n):
        for j in range(m):
            o2[i, j] = o2[i, j] + b[j]


@njit(cache=True, error_model="numpy")
def relu_backward_colsum(g, act, dx, colsum):
    """dx = g * (act > 0) (relu_backward's multiply by 1 or 0) and colsum = dx.sum(axis=0) added row after row as
    column_sum adds: the ReLU's backward and the bias gradient of the linear layer before it in one pass, so the
    same bits as the two kernels. Measured on the MNIST-1D MLP's (100, 256) layers, warm: the two kernels 3.1 +
    1.6 us, this 4.3 us, and one Python form (the ReLU's backward) less in the reverse pass."""
    n, m = g.shape
    one = g.dtype.type(1)
    zero = g.dtype.type(0)
    for j in range(m):
        v = g[0, j] * (one if act[0, j] > 0 else zero)
        dx[0, j] = v
        colsum[j] = v
    for i in range(1, n):
        for j in range(m):
            v = g[i, j] * (one if act[i, j] > 0 else zero)
            dx[i, j] = v
            colsum[j] += v


@njit(cache=True, error_model="numpy")
def cross_entropy_forward(rows, labels, ignore_index, grad):
    """Softmax cross-entropy of (N, C) logits against integer labels: returns (the summed loss in float64, the
    count of labels not ignored, the first row whose label is out of range or -1) and leaves softmax - onehot in
    grad (zero rows for ignored labels), the gradient of the summed loss.

    Eager computes the same quantities in float32 NumPy passes (max, exp, sum, log, a pairwise sum over rows); this
    sums in float64, so the loss and gradients agree to ~1e-7 relative, not bit for bit. The exponentials of z =
    x - max (float32, as eager's) run as one flat pass over all rows (_exp_nonpositive, float64, ~1e-12 relative,
    then rounded to float32) that LLVM vectorizes: a call of math's exp per entry kept it scalar. Measured on the
    MNIST-1D step's (100, 10) logits, warm: 6.9 -> 3.7 us."""
    n, c = rows.shape
    total = 0.0
    count = 0
    zero = grad.dtype.type(0)
    for i in range(n):  # labels, row maxima, z into grad
        lab = labels[i]
        if lab == ignore_index:
            continue
        if lab < 0 or lab >= c:
            return total, count, i
        m = rows[i, 0]
        for j in range(1, c):
            if rows[i, j] > m:
                m = rows[i, j]
        for j in range(c):
            grad[i, j] = rows[i, j] - m
    flat = grad.reshape(-1)
    for q in range(n * c):  # LLVM vectorizes this loop (float64 lanes)
        flat[q] = _exp_nonpositive(np.float64(flat[q]))
    for i in range(n):
        lab = labels[i]
        if lab == ignore_index:
            for j in range(c):
                grad[i, j] = zero
            continue
        s = 0.0
        for j in range(c):
            s += np.float64(grad[i, j])  # each e in the logits' dtype, as eager's np.exp(z); the sum in float64
        m = rows[i, 0]
        for j in range(1, c):
            if rows[i, j] > m:
                m = rows[i, j]
        total += math.log(s) - np.float64(rows[i, lab] - m)
        inv = 1.0 / s
        for j in range(c):  # softmax - onehot in float64, rounded once
            grad[i, j] = np.float64(grad[i, j]) * inv - (1.0 if j == lab else 0.0)
        count += 1
    return total, count, -1


@njit(cache=True, inline="always")
def _exp_nonpositive(z):
    """exp(z) for the z = x - max of a softmax (z <= 0, or NaN), in float64 without a libm call, so that a loop of
    it vectorizes: exp(z / 256) by its Taylor polynomial to the 12th power (|z / 256| <= 0.43: truncation under
    3e-15), squared 8 times (relative error ~1e-12 at the end); 0 below -110 (float32's exp is 0 there), NaN kept."""
    y = max(z, -110.0) * 0.00390625
    p = 1.0 + y * (1.0 + y * (0.5 + y * (1.0 / 6 + y * (1.0 / 24 + y * (1.0 / 120 + y * (1.0 / 720 + y * (
        1.0 / 5040 + y * (1.0 / 40320 + y * (1.0 / 362880 + y * (1.0 / 3628800 + y * (1.0 / 39916800 + y * (
            1.0 / 479001600))))))))))))  # fmt: skip
    for _ in range(8):
        p = p * p
    if z != z:
        return z
    return p if not (z < -110.0) else 0.0


@njit(cache=True, error_model="numpy")
def scale_into(src, s, dst):
    """dst = src * s over flat arrays."""
    for i in range(src.shape[0]):
        dst[i] = src[i] * s


@njit(cache=True, error_model="numpy")
def column_sum(g, out):
    """out = g.sum(axis=0) for a C-contiguous 2-d g, adding row after row as NumPy does along a non-contiguous
    axis: the same bits."""
    n, m = g.shape
    for j in range(m):
        out[j] = g[0, j]
    for i in range(1, n):
        for j in range(m):
            out[j] += g[i, j]


@njit(cache=True, error_model="numpy")
def swap_relu(src, dst, act):
    """A conv's epilogue and the ReLU after it in one pass: dst[j, i, :] = src[i, j, :] (conv_kernels.
    swap_leading_axes) and act = np.maximum(dst, 0) (relu_forward's bits)."""
    a_, b_, t_ = src.shape
    zero = act.dtype.type(0)
    for i in range(a_):
        for j in range(b_):
            for k in range(t_):
                v = src[i, j, k]
                dst[j, i, k] = v
                act[j, i, k] = v if (v > 0 or v != v) else zero


@njit(cache=True, error_model="numpy")
def swap_relu_backward(g, act, dst):
    """The ReLU's backward and the transposing copy at the start of the conv's backward in one pass:
    dst[j, i, :] = g[i, j, :] * (act[i, j, :] > 0), the same float multiply by 1 or 0 as relu_backward."""
    a_, b_, t_ = g.shape
    one = g.dtype.type(1)
    zero = g.dtype.type(0)
    for i in range(a_):
        for j in range(b_):
            for k in range(t_):
                dst[j, i, k] = g[i, j, k] * (one if act[i, j, k] > 0 else zero)


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def matmul_abt(a, b, out):
    """out = a @ b.T for C-contiguous a (M, K) and b (N, K): dot products of rows, in 4 x 4 tiles whose 16 sums
    LLVM vectorizes along K (reassociated, so not NumPy's bits: within a few 1e-7 of the largest entry). For the
    weight gradient of the MNIST-1D convs (M = 25 channels, N = 76 taps + bias, K = 500-1000 positions) OpenBLAS
    packs poorly: (25 x 1000) @ (1000 x 76) 80 -> 41 us, K = 500 40 -> 23 us."""
    m, k = a.shape
    n = b.shape[0]
    zero = out.dtype.type(0)
    m4 = m - m % 4
    n4 = n - n % 4
    for i0 in range(0, m4, 4):
        a0, a1, a2, a3 = a[i0], a[i0 + 1], a[i0 + 2], a[i0 + 3]
        for j0 in range(0, n4, 4):
            b0, b1, b2, b3 = b[j0], b[j0 + 1], b[j0 + 2], b[j0 + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
            for q in range(k):
                x0, x1, x2, x3 = a0[q], a1[q], a2[q], a3[q]
                y0, y1, y2, y3 = b0[q], b1[q], b2[q], b3[q]
                s00 += x0 * y0
                s01 += x0 * y1
                s02 += x0 * y2
                s03 += x0 * y3
                s10 += x1 * y0
                s11 += x1 * y1
                s12 += x1 * y2
                s13 += x1 * y3
                s20 += x2 * y0
                s21 += x2 * y1
                s22 += x2 * y2
                s23 += x2 * y3
                s30 += x3 * y0
                s31 += x3 * y1
                s32 += x3 * y2
                s33 += x3 * y3
            out[i0, j0], out[i0, j0 + 1], out[i0, j0 + 2], out[i0, j0 + 3] = s00, s01, s02, s03
            out[i0 + 1, j0], out[i0 + 1, j0 + 1], out[i0 + 1, j0 + 2], out[i0 + 1, j0 + 3] = s10, s11, s12, s13
            out[i0 + 2, j0], out[i0 + 2, j0 + 1], out[i0 + 2, j0 + 2], out[i0 + 2, j0 + 3] = s20, s21, s22, s23
            out[i0 + 3, j0], out[i0 + 3, j0 + 1], out[i0 + 3, j0 + 2], out[i0 + 3, j0 + 3] = s30, s31, s32, s33
    for i in range(m):  # the rows and columns past the last whole tile
        ai = a[i]
        for j in range(n4 if i < m4 else 0, n):
            bj = b[j]
            s = zero
            for q in range(k):
                s += ai[q] * bj[q]
            out[i, j] = s


@njit(cache=True, error_model="numpy")
def pack_weight_bias(w3, b2, wg):
    """wg[g, o, :T] = w3[g, o], wg[g, o, T] = b2[g, o]: a conv's weight with its bias column for the im2col GEMM,
    copied in one call (values only, so the same bits). Measured on the MNIST-1D CNN's (1, 25, 75) weight, warm: the
    two NumPy slice assignments 1.0 us, this 0.4 us (three convs a step; inside the step, after Adam wrote the
    weights, the NumPy pair read 3-5 us with the profiler's timers)."""
    ng, no, nt = w3.shape
    for g in range(ng):
        for o in range(no):
            for t in range(nt):
                wg[g, o, t] = w3[g, o, t]
            wg[g, o, nt] = b2[g, o]


@njit(cache=True, fastmath=False, inline="always")
def _fill_bias_rows(cf, groups, taps, group_rows, nt):
    """Ones in each group's rows past its taps (the bias rows) of the flat columns cf, rows of nt."""
    one = cf.dtype.type(1)
    for grp in range(groups):
        for r in range(taps, group_rows):
            row = (grp * group_rows + r) * nt
            for q in range(nt):
                cf[uint64(row + q)] = one


@njit(cache=True, fastmath=False, inline="always")
def _gather_rows(xf, c_, n_, l_, c_step, n_step, kw, sw, pw, dw, groups, cols):
    """The columns (R, N, T) of a 1-d conv over whole rows from the flat input xf, whose row of channel c and sample n
    starts at c * c_step + n * n_step: the taps and output positions outside, the samples inside (im2col_rows and
    im2col_channel_major, one loop nest)."""
    t_ = cols.shape[2]
    cg = c_ // groups
    taps = cg * kw
    group_rows = cols.shape[0] // groups
    cf = cols.reshape(-1)
    zero = cols.dtype.type(0)
    nt = n_ * t_
    for c in range(c_):
        grp = c // cg
        for j in range(kw):
            r = grp * group_rows + (c - grp * cg) * kw + j
            for t in range(t_):
                pos = t * sw - pw + j * dw
                d = r * nt + t
                if 0 <= pos < l_:
                    src = c * c_step + pos
                    for n in range(n_):
                        cf[uint64(d + n * t_)] = xf[uint64(src + n * n_step)]
                else:
                    for n in range(n_):
                        cf[uint64(d + n * t_)] = zero
    _fill_bias_rows(cf, groups, taps, group_rows, nt)


@njit(cache=True, fastmath=False, inline="always")
def _scatter_rows(cols, c_, n_, l_, c_step, n_step, kw, sw, pw, dw, groups, df):
    """The adjoint of _gather_rows: each column entry added into the flat df at the input element it came from,
    by tap within each element (conv_kernels.col2im's order, so its sums)."""
    t_ = cols.shape[2]
    cg = c_ // groups
    group_rows = cols.shape[0] // groups
    cf = cols.reshape(-1)
    nt = n_ * t_
    for c in range(c_):
        grp = c // cg
        for j in range(kw):
            r = grp * group_rows + (c - grp * cg) * kw + j
            for t in range(t_):
                pos = t * sw - pw + j * dw
                if 0 <= pos < l_:
                    d = c * c_step + pos
                    s0 = r * nt + t
                    for n in range(n_):
                        df[uint64(d + n * n_step)] += cf[uint64(s0 + n * t_)]


@njit(cache=True, fastmath=False)
def im2col_rows(x, kw, sw, pw, dw, groups, cols):
    """conv_kernels.im2col for a 1-d conv over whole rows (kh = 1, one input row, p0 = 0, T = the output length),
    x as (N, C, L), cols (R, N, T), the same values: with the loops over taps and output positions outside and the
    samples inside, so the innermost loop runs N long instead of T (a few positions: the core's loop pays its setup
    per run of T). Measured, warm, float32, core -> this: the MNIST-1D CNN's (100, 25, 19) -> T 10: 35 -> 25 us,
    (100, 25, 10) -> T 5: 30 -> 12 us, (100, 1, 40) -> T 19: 6.1 -> 3.3 us; but (100, 25, 19) stride 1 (T 19):
    31 -> 48, and rows 4 KiB apart 5-10x slower (cache-set conflicts): the replay times both on its first calls and
    keeps the faster (see replay._pick)."""
    n_, c_, l_ = x.shape
    _gather_rows(x.reshape(-1), c_, n_, l_, l_, c_ * l_, kw, sw, pw, dw, groups, cols)


@njit(cache=True, fastmath=False)
def col2im_rows(cols, kw, sw, pw, dw, groups, dx):
    """conv_kernels.col2im for the same 1-d convs as im2col_rows (dx as (N, C, L), accumulated into), samples
    innermost. Every element of dx gets its contributions in the core's order (by tap), so the same sums. Measured,
    warm, float32, core -> this: (75, 100, 10) columns into (100, 25, 19): 33 -> 31 us; (75, 100, 5) into
    (100, 25, 10): 24.5 -> 16 us; rows 4 KiB apart up to 40x slower: chosen by timing, as im2col_rows."""
    n_, c_, l_ = dx.shape
    _scatter_rows(cols, c_, n_, l_, l_, c_ * l_, kw, sw, pw, dw, groups, dx.reshape(-1))


@njit(cache=True, error_model="numpy")
def relu_in_place(a):
    """a = np.maximum(a, 0) over a flat array, relu_forward's bits. relu_forward(a, a) runs its scalar loop (LLVM's
    vector loop is guarded by a no-overlap check, which the same array fails): (50000,) float32 16 -> 2.1 us."""
    zero = a.dtype.type(0)
    for i in range(a.shape[0]):
        v = a[i]
        a[i] = v if (v > 0 or v != v) else zero


@njit(cache=True, fastmath=False)
def im2col_channel_major(x, kw, sw, pw, dw, groups, cols):
    """im2col_rows's columns (R, N, T) from a channel-major input x (C, N, L): the same values, read from the
    layout a one-tile conv's GEMM leaves its result in (replay.fuse hands a conv -> ReLU -> conv chain's middle
    activation over in it, without the transposing copies to and from (N, C, L)); the samples' rows lie one row
    apart instead of C rows."""
    c_, n_, l_ = x.shape
    _gather_rows(x.reshape(-1), c_, n_, l_, n_ * l_, l_, kw, sw, pw, dw, groups, cols)


@njit(cache=True, fastmath=False)
def col2im_channel_major(cols, kw, sw, pw, dw, groups, dx):
    """col2im_rows into a channel-major dx (C, N, L), accumulated into: every element gets its contributions in
    the core col2im's order (by tap), so the same sums in the layout im2col_channel_major reads."""
    c_, n_, l_ = dx.shape
    _scatter_rows(cols, c_, n_, l_, n_ * l_, l_, kw, sw, pw, dw, groups, dx.reshape(-1))


@njit(cache=True, fastmath=False, inline="always")
def _phase_tap(off, t_):
    """For a stride-2 tap at input offset off (j * dw - pw): the phase it reads (0: even positions, 1: odd), its
    shift in that phase's positions, and the output positions [lo, hi) whose input lies inside the row."""
    p = off & 1
    s = (off - p) >> 1
    lo = min(max(0, -s), t_)
    hi = max(min(t_, t_ - s), lo)
    return p, s, lo, hi


@njit(cache=True, fastmath=False, inline="always")
def _zero_row_ends(cf, d0, n_, t_, lo, hi):
    """Zero positions [0, lo) and [hi, T) of each of the N rows of T that start at cf[d0]."""
    zero = cf.dtype.type(0)
    for n in range(n_):
        d = d0 + n * t_
        for t in range(lo):
            cf[uint64(d + t)] = zero
        for t in range(hi, t_):
            cf[uint64(d + t)] = zero


@njit(cache=True, fastmath=False)
def im2col_channel_major_s2(x, kw, pw, dw, groups, cols, phases):
    """im2col_channel_major for stride 2 over rows of twice the output length or one less (L = 2T or 2T - 1: the
    usual k3 s2 p1 downsampling conv): the same columns, by phases. Each channel's (N, L) block is split into its
    even and odd positions (phases, (2, N*T) scratch: one interleaved read that LLVM vectorizes, where a stride-2
    gather stays scalar), and each tap's row is then one shifted contiguous copy of a phase across all samples,
    the positions past a row's ends zeroed after. MNIST-1D CNN, float32, warm: (25, 100, 20) -> T 10 22.5 -> 10.6
    us, (25, 100, 10) -> T 5 10.9 -> 8.2."""
    c_, n_, l_ = x.shape
    t_ = cols.shape[2]
    cg = c_ // groups
    taps = cg * kw
    group_rows = cols.shape[0] // groups
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    zero = cols.dtype.type(0)
    nt = n_ * t_
    even = phases[0]
    odd = phases[1]
    for c in range(c_):
        base = c * n_ * l_
        if l_ == 2 * t_:
            for q in range(nt):
                even[uint64(q)] = xf[uint64(base + 2 * q)]
                odd[uint64(q)] = xf[uint64(base + 2 * q + 1)]
        else:  # L = 2T - 1: row by row, each row's odd phase one short (its last entry a zero, read as padding)
            for n in range(n_):
                src0 = base + n * l_
                dst0 = n * t_
                for u in range(t_ - 1):
                    even[uint64(dst0 + u)] = xf[uint64(src0 + 2 * u)]
                    odd[uint64(dst0 + u)] = xf[uint64(src0 + 2 * u + 1)]
                even[uint64(dst0 + t_ - 1)] = xf[uint64(src0 + 2 * t_ - 2)]
                odd[uint64(dst0 + t_ - 1)] = zero
        grp = c // cg
        for j in range(kw):
            r = grp * group_rows + (c - grp * cg) * kw + j
            p, s, lo, hi = _phase_tap(j * dw - pw, t_)
            src = even if p == 0 else odd
            d0 = r * nt
            for q in range(max(0, -s), min(nt, nt - s)):
                cf[uint64(d0 + q)] = src[uint64(q + s)]
            _zero_row_ends(cf, d0, n_, t_, lo, hi)
    _fill_bias_rows(cf, groups, taps, group_rows, nt)


@njit(cache=True, fastmath=False)
def col2im_channel_major_s2(cols, kw, pw, dw, groups, dx, phases):
    """col2im_channel_major for im2col_channel_major_s2's convs, writing dx (C, N, L) whole (not accumulating):
    each channel's phases (2, N*T scratch) start at 0 and take their taps' rows in tap order, each as one shifted
    contiguous add, then interleave into dx. The entries of cols that no input position takes (past a row's ends)
    are zeroed first, in place (cols is the replay's scratch), so the long adds carry +0.0 across row seams, which
    changes no sum that starts at +0.0 (it never becomes -0.0): the same sums in the same order as col2im's.
    (75, 100, 10) into (25, 100, 20): 28.1 -> 13.1 us; (75, 100, 5) into (25, 100, 10): 14.0 -> 9.2."""
    c_, n_, l_ = dx.shape
    t_ = cols.shape[2]
    cg = c_ // groups
    group_rows = cols.shape[0] // groups
    cf = cols.reshape(-1)
    df = dx.reshape(-1)
    zero = dx.dtype.type(0)
    nt = n_ * t_
    even = phases[0]
    odd = phases[1]
    for c in range(c_):
        for q in range(nt):
            even[uint64(q)] = zero
            odd[uint64(q)] = zero
        grp = c // cg
        for j in range(kw):
            r = grp * group_rows + (c - grp * cg) * kw + j
            p, s, lo, hi = _phase_tap(j * dw - pw, t_)
            dst = even if p == 0 else odd
            d0 = r * nt
            _zero_row_ends(cf, d0, n_, t_, lo, hi)
            for q in range(max(0, -s), min(nt, nt - s)):
                dst[uint64(q + s)] += cf[uint64(d0 + q)]
        base = c * n_ * l_
        if l_ == 2 * t_:
            for q in range(nt):
                df[uint64(base + 2 * q)] = even[uint64(q)]
                df[uint64(base + 2 * q + 1)] = odd[uint64(q)]
        else:  # L = 2T - 1: the odd phase's last entry of each row lies past the row (what it summed is dropped)
            for n in range(n_):
                dst0 = base + n * l_
                src0 = n * t_
                for u in range(t_ - 1):
                    df[uint64(dst0 + 2 * u)] = even[uint64(src0 + u)]
                    df[uint64(dst0 + 2 * u + 1)] = odd[uint64(src0 + u)]
                df[uint64(dst0 + 2 * t_ - 2)] = even[uint64(src0 + t_ - 1)]


ADAM_CHUNK = 8


@njit(cache=True, fastmath=False, error_model="numpy")
def adam_update_all(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    maximize,
    step_size,
    bc2_sqrt,
    reciprocal,
):
    """mpnn.optim.kernels.adam_update (no AMSGrad) over up to ADAM_CHUNK parameters of a group in one call: tuples
    of ADAM_CHUNK flat arrays (padded with empty ones, so that one compiled specialization per dtype serves every
    model and the warm-up covers it), one step count, so one step_size and bias correction. The same float
    operations in the same order per element as adam_update, so the same bits. Measured, the MNIST-1D MLP's replayed
    Adam step (6 parameters, 79k entries): ~40-49 us in the kernels (memory- and divide-bound either way), the Python
    around them 19.6 -> 6.9 us with one call per group (capture/optim.py); the loop body is adam_update's, which
    LLVM vectorizes (packed sqrt and div, 8 float32 lanes on x86-64).

    reciprocal (mpnn.compile's fuse=True): bc2_sqrt holds 1 / sqrt(1 - beta2^t) and the denominator is
    sqrt(v) * bc2_sqrt + eps, one packed division per element instead of two (the loop is bound by them): within an
    ulp of the quotient, not Adam.step's bits. Measured, 79k float32 entries, warm: 32.5 -> 24.2 us."""
    fp_control = flush_denormals_begin()  # see mpnn.core.fpenv: denormal moments cost ~25x here
    for k in range(len(params)):
        param, grad, exp_avg, exp_avg_sq = params[k], grads[k], exp_avgs[k], exp_avg_sqs[k]
        one = param.dtype.type(1)
        decay = one - lr * weight_decay
        for i in range(param.shape[0]):
            p, m, v = adam_moments(param[i], grad[i], exp_avg[i], exp_avg_sq[i], one, decay, beta1, beta2,
                                   weight_decay, decoupled, maximize)  # fmt: skip
            exp_avg[i] = m
            exp_avg_sq[i] = v
            if reciprocal:
                param[i] = p - step_size * m / (math.sqrt(v) * bc2_sqrt + eps)
            else:
                param[i] = p - step_size * m / (math.sqrt(v) / bc2_sqrt + eps)
    flush_denormals_end(fp_control)


def warmup() -> None:
    """Compile (or load from Numba's cache) every kernel above on float32 and float64, as the launcher's warm-up
    does before workers start (concurrent cache=True compiles can race)."""
    for dt in (np.float32, np.float64):
        a = np.linspace(-1, 1, 12).astype(dt)
        o = np.empty_like(a)
        relu_forward(a, o)
        relu_backward(a, a, o)
        relu_in_place(o)
        scale_into(a, dt(0.5), o)
        m = a.reshape(3, 4)
        column_sum(m, np.empty(4, dt))
        bias_relu(m.copy(), np.ones(4, dt), np.empty_like(m))
        bias_add(m.copy(), np.ones(4, dt))
        bias_relu_add(m.copy(), np.ones(4, dt), np.empty_like(m), m, np.empty_like(m), True)
        relu_backward_colsum(m, m, np.empty_like(m), np.empty(4, dt))
        cross_entropy_forward(m, np.array([0, 3, -100]), -100, np.empty_like(m))
        c = a.reshape(2, 3, 2)
        swap_relu(c, np.empty((3, 2, 2), dt), np.empty((3, 2, 2), dt))
        swap_relu_backward(c, c, np.empty((3, 2, 2), dt))
        matmul_abt(m, np.ones((5, 4), dt), np.empty((3, 5), dt))
        pack_weight_bias(c, np.ones((2, 3), dt), np.empty((2, 3, 3), dt))
        x3 = a.reshape(2, 1, 6)
        im2col_rows(x3, 3, 2, 1, 1, 1, np.empty((4, 2, 3), dt))
        col2im_rows(np.ones((3, 2, 3), dt), 3, 2, 1, 1, 1, np.zeros((2, 1, 6), dt))
        im2col_channel_major(a.reshape(1, 2, 6), 3, 2, 1, 1, 1, np.empty((4, 2, 3), dt))
        col2im_channel_major(np.ones((3, 2, 3), dt), 3, 2, 1, 1, 1, np.zeros((1, 2, 6), dt))
        im2col_channel_major_s2(a.reshape(1, 2, 6), 3, 1, 1, 1, np.empty((4, 2, 3), dt), np.empty((2, 6), dt))
        col2im_channel_major_s2(np.ones((3, 2, 3), dt), 3, 1, 1, 1, np.zeros((1, 2, 6), dt), np.empty((2, 6), dt))
        z = (np.zeros(3, dt),) * ADAM_CHUNK
        one = dt(1)
        adam_update_all(z, z, z, z, one, one, one, one, one, False, False, one, one, False)
