"""Numba transforms of the stride-2 Winograd conv (conv_winograd_s2.py): a 3x3 stride-2 conv is a 2x2 stride-1
conv over the four phases (p, q) of its padded input, z[(p, q), c, i, j] = xpad[c, 2i + p, 2j + q], and that runs
as Winograd F(4x4, 2x2) on 5x5 patches of z. Transforms (Cook-Toom, points 0, 1, -1, 2, infinity; float32 error
~2e-6 of the largest output, the points 1/2, -1/2 or -2 in place of 2 measured 2.4-3.1e-6):

    A^T = [[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 0], [0, 1, -1, 8, 1]]
    G = [[1/2, 0], [-1/2, -1/2], [-1/6, 1/6], [1/6, 1/3], [0, 1]]
    B^T = [[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]]

A phase with p = 1 (q = 1) has one kernel row (column) only, and G's last row (the point at infinity) maps it to
0: at the transform points (4, b) only the phases p = 0 take part, at (a, 4) only q = 0, at (4, 4) only (0, 0).
Their GEMMs drop the other phases' channels: 81 C rows instead of 100 C over the 25 points (slots(), below).

Layouts: v (R, T) holds, for point t = 5a + b, the rows rows[t] .. rows[t] + K_t (K_t = C times the phases of t,
phase by phase, channels within), each T tiles wide (image by image, tile rows, tile columns); u holds point t's
(O, K_t) block at O * rows[t]; m and dm are (25, O, T). Every kernel takes C-contiguous float32 or float64 arrays.
"""

import numpy as np
from numba import njit, uint64


def slots():
    """(slot (25, 4), rows (26,)): slot[t, f] the position of phase f = 2p + q among point t's phases (-1: left
    out), rows[t] the first row of point t in v (rows[25] = 81 per channel); both per channel, times C."""
    slot = np.full((25, 4), -1, np.int64)
    rows = np.zeros(26, np.int64)
    for t in range(25):
        a, b = divmod(t, 5)
        k = 0
        for f in range(4):
            p, q = divmod(f, 2)
            if (a < 4 or p == 0) and (b < 4 or q == 0):
                slot[t, f] = k
                k += 1
        rows[t + 1] = rows[t] + k
    return slot, rows


@njit(cache=True, fastmath=False)
def _constants(dtype_of):
    """2, 3, 4 and 8 typed as the arrays' float dtype (a float64 literal would widen float32 math)."""
    c = np.empty(4, dtype_of.dtype)
    c[0], c[1], c[2], c[3] = 2.0, 3.0, 4.0, 8.0
    return c[0], c[1], c[2], c[3]


@njit(cache=True, fastmath=False, inline="always")
def _bt(d, two, three):
    """B^T times one column (or row) of 5."""
    d0, d1, d2, d3, d4 = d
    return two * (d0 - d2) - d1 + d3, d3 - d2 - two * d1, two * d1 - three * d2 + d3, d3 - d1, two * (d1 - d3) - d2 + d4


@njit(cache=True, fastmath=False, inline="always")
def _b(v, two, three):
    """B times one column (or row) of 5: the adjoint of _bt."""
    v0, v1, v2, v3, v4 = v
    return (
        two * v0,
        two * (v2 + v4 - v1) - v0 - v3,
        -(two * v0 + v1 + three * v2 + v4),
        v0 + v1 + v2 + v3 - two * v4,
        v4,
    )


@njit(cache=True, fastmath=False, inline="always")
def _at(m, two, four, eight):
    """A^T times one column (or row) of 5."""
    m0, m1, m2, m3, m4 = m
    return m0 + m1 + m2 + m3, m1 - m2 + two * m3, m1 + m2 + four * m3, m1 - m2 + eight * m3 + m4


@njit(cache=True, fastmath=False, inline="always")
def _a(y, two, four, eight):
    """A times one column (or row) of 4: the adjoint of _at."""
    y0, y1, y2, y3 = y
    return y0, y0 + y1 + y2 + y3, y0 - y1 + y2 - y3, y0 + two * y1 + four * y2 + eight * y3, y3


# Strided reads and writes of 4 or 5 entries, one each from rows `stride` apart (conv_kernels' _get6 and _put6 for
# F(4x4)): inlined, so each transform step stays one loop over the slots that LLVM vectorizes.
@njit(cache=True, fastmath=False, inline="always")
def _get4(f, i, stride):
    return f[uint64(i)], f[uint64(i + stride)], f[uint64(i + 2 * stride)], f[uint64(i + 3 * stride)]


@njit(cache=True, fastmath=False, inline="always")
def _get5(f, i, stride):
    return (
        f[uint64(i)],
        f[uint64(i + stride)],
        f[uint64(i + 2 * stride)],
        f[uint64(i + 3 * stride)],
        f[uint64(i + 4 * stride)],
    )


@njit(cache=True, fastmath=False, inline="always")
def _put4(f, i, stride, t):
    f[uint64(i)] = t[0]
    f[uint64(i + stride)] = t[1]
    f[uint64(i + 2 * stride)] = t[2]
    f[uint64(i + 3 * stride)] = t[3]


@njit(cache=True, fastmath=False, inline="always")
def _put5(f, i, stride, t):
    f[uint64(i)] = t[0]
    f[uint64(i + stride)] = t[1]
    f[uint64(i + 2 * stride)] = t[2]
    f[uint64(i + 3 * stride)] = t[3]
    f[uint64(i + 4 * stride)] = t[4]


# The transforms run on vectors of a chunk's images and tile columns: a chunk's slots are (tile row, tile column,
# image), image innermost, so that every transform step is one loop over a tile row's slots that LLVM vectorizes,
# between planes laid out (row, column mod 8, column div 8, image) (a patch's column 8 tw + e is then one run over
# tw and the images). ResNet-18's 64->128 layer, batch 32, chunks of 8 images (thread CPU): the input transform
# took 4.8-7 ms as scalar 5x5 transforms per (channel, image, tile), 4.4 vectorized over the 8 images alone
# (too short a loop for the vector body), 2.4 ms over the 32 slots of a tile row; the output transform 1.9-2.6 ->
# 1.75 -> 0.7 ms.


@njit(cache=True, fastmath=False)
def _destinations(slot, rows, c_, c, t_, junk, dst):
    """dst[25 f + t]: where point t's row of phase f for channel c starts in v (v's junk row where the point
    leaves the phase out)."""
    for f in range(4):
        for t in range(25):
            s = slot[t, f]
            dst[25 * f + t] = junk if s < 0 else ((rows[t] + s) * c_ + c) * t_


@njit(cache=True, fastmath=False)
def input_transform(x, ph, pw, tiles_h, tiles_w, slot, rows, v):
    """v[rows[t] C + slot[t, f] C + c, (th tiles_w + tw) N + n] = (B^T d B)[a, b] (t = 5a + b, N images in x)
    for the 5x5 patch d of phase f = 2p + q: d[i, j] = x[n, c, 8th + 2i + p - ph, 8tw + 2j + q - pw] (0 outside
    x). v has 81 C + 1 rows: the last one takes the (phase, point) pairs left out."""
    # Per tile row, the 10 padded input rows it reads go to pl first (all the chunk's images, ~25 KB at 16 images
    # on 32x32: it stays in L1), and each transform row goes straight to its row of v (5 write streams at a time).
    # ResNet-18's 64->128 layer, batch 32, chunks of 16 images: 3.1 ms through a whole padded plane (87 KB) and a
    # 100-row staging block copied out, 2.2 ms this way (and 1.28 -> 0.82 ms of it for the transposing copy once
    # its column offsets came from a table).
    n_, c_, h_, w_ = x.shape
    two, three, _, _ = _constants(x)
    L = tiles_w * n_  # a tile row's slots
    t_ = tiles_h * L
    bw = tiles_w + 1
    rl = 8 * bw * n_  # one plane row
    wp = 8 * tiles_w + 2
    pl = np.zeros(10 * rl, x.dtype)  # the columns outside x stay 0
    vf = v.reshape(-1)
    d = np.empty(25 * L, x.dtype)
    dst = np.empty(100, np.int64)
    ww = min(w_, wp - pw)
    xf = x.reshape(-1)
    pos = np.empty(ww, np.int64)  # where column s of x goes in a plane row
    for s in range(ww):
        pos[s] = (((s + pw) % 8) * bw + (s + pw) // 8) * n_
    for c in range(c_):
        _destinations(slot, rows, c_, c, t_, 81 * c_ * t_, dst)
        for th in range(tiles_h):
            for rr in range(10):  # padded rows 8 th .. 8 th + 9, transposed (scalar; with the column offsets
                r = 8 * th + rr - ph  # from a table and a flat x: 1.28 -> 0.82 ms on the 64->128 layer)
                if r < 0 or r >= h_:
                    pl[rr * rl : (rr + 1) * rl] = 0.0
                    continue
                for n in range(n_):
                    b0 = rr * rl + n
                    src = ((n * c_ + c) * h_ + r) * w_
                    for s in range(ww):
                        pl[uint64(b0 + pos[s])] = xf[uint64(src + s)]
            for f in range(4):
                p, q = f // 2, f % 2
                for j in range(5):  # B^T down each column j
                    e = q + 2 * j
                    o = p * rl + ((e % 8) * bw + e // 8) * n_
                    for i in range(L):  # LLVM vectorizes these loops over the slots on x86-64
                        _put5(d, j * L + i, 5 * L, _bt(_get5(pl, o + i, 2 * rl), two, three))
                for a in range(5):  # then B along the rows, into v
                    r0 = 5 * a * L
                    k = 25 * f + 5 * a
                    o0, o1, o2, o3, o4 = (
                        dst[k] + th * L,
                        dst[k + 1] + th * L,
                        dst[k + 2] + th * L,
                        dst[k + 3] + th * L,
                        dst[k + 4] + th * L,
                    )
                    for i in range(L):
                        e0, e1, e2, e3, e4 = _bt(_get5(d, r0 + i, L), two, three)
                        vf[uint64(o0 + i)] = e0
                        vf[uint64(o1 + i)] = e1
                        vf[uint64(o2 + i)] = e2
                        vf[uint64(o3 + i)] = e3
                        vf[uint64(o4 + i)] = e4


@njit(cache=True, fastmath=False)
def output_transform(m, bias, tiles_h, tiles_w, out):
    """out[n, o, 4th + i, 4tw + j] = (A^T M A)[i, j] + bias[o] for M[a, b] = m[5a + b, o, (th tiles_w + tw) N +
    n] (N images in out), clipped to out."""
    n_, o_, oh_, ow_ = out.shape
    two, _, four, eight = _constants(out)
    L = tiles_w * n_
    t_ = tiles_h * L
    mf = m.reshape(-1)
    of = out.reshape(-1)
    u = np.empty(20 * L, m.dtype)
    y = np.empty(16 * L, m.dtype)
    # where output column col lies in y's rows: offsets from a table into a flat out, instead of a div and a mod
    # per element into out[n, o, r, col] (same process, alternating, medians of 15, 128 and 256 channels: the
    # whole transform 1.77 -> 1.59 and 1.40 -> 1.12 ms; grad_output's gather the same way 1.44 -> 1.37, 1.67 -> 1.57)
    pos = np.empty(ow_, np.int64)
    for col in range(ow_):
        pos[col] = (col % 4) * L + (col // 4) * n_
    for o in range(o_):
        bo = bias[o]
        for th in range(tiles_h):
            for a in range(5):  # A along the rows, from m's rows (LLVM vectorizes the loops over the slots)
                s = (5 * a * o_ + o) * t_ + th * L
                st = o_ * t_
                for i in range(L):
                    _put4(u, 4 * a * L + i, L, _at(_get5(mf, s + i, st), two, four, eight))
            for j in range(4):  # then A^T down the columns
                for i in range(L):
                    y0, y1, y2, y3 = _at(_get5(u, j * L + i, 4 * L), two, four, eight)
                    _put4(y, j * L + i, 4 * L, (y0 + bo, y1 + bo, y2 + bo, y3 + bo))
            nr = min(4, oh_ - 4 * th)
            for n in range(n_):  # into NCHW rows (scalar)
                for r in range(nr):
                    dst = ((n * o_ + o) * oh_ + 4 * th + r) * ow_
                    src = 4 * r * L + n
                    for col in range(ow_):
                        of[uint64(dst + col)] = y[uint64(src + pos[col])]


@njit(cache=True, fastmath=False)
def grad_output(g, tiles_h, tiles_w, dm):
    """dm[5a + b, o, (th tiles_w + tw) N + n] = (A dY A^T)[a, b] for the tile's 4x4 output gradient dY (0 past
    the edge)."""
    n_, o_, oh_, ow_ = g.shape
    two, _, four, eight = _constants(g)
    L = tiles_w * n_
    t_ = tiles_h * L
    dmf = dm.reshape(-1)
    gf = g.reshape(-1)
    pos = np.empty(ow_, np.int64)  # where column col of dY goes in y's rows
    for col in range(ow_):
        pos[col] = (col % 4) * L + (col // 4) * n_
    tb = np.empty(25 * t_, g.dtype)
    z = np.empty(20 * L, g.dtype)
    y = np.zeros(16 * L, g.dtype)  # entries past the edge stay 0
    for o in range(o_):
        for th in range(tiles_h):
            nr = min(4, oh_ - 4 * th)
            if nr < 4 or ow_ < 4 * tiles_w:
                y[:] = 0.0
            for n in range(n_):  # from NCHW rows (scalar)
                for r in range(nr):
                    src = ((n * o_ + o) * oh_ + 4 * th + r) * ow_
                    dst = 4 * r * L + n
                    for col in range(ow_):
                        y[uint64(dst + pos[col])] = gf[uint64(src + col)]
            for r in range(4):  # A along the rows of dY: z[r, b] = (dY A^T)[r, b] (vectorized over the slots)
                for i in range(L):
                    _put5(z, 5 * r * L + i, L, _a(_get4(y, 4 * r * L + i, L), two, four, eight))
            for b in range(5):  # then A down the columns
                dst = b * t_ + th * L
                for i in range(L):
                    _put5(tb, dst + i, 5 * t_, _a(_get4(z, b * L + i, 5 * L), two, four, eight))
        for t in range(25):  # then the channel's 25 rows out one at a time (they lie O * T floats apart)
            dst = (t * o_ + o) * t_
            for i in range(t_):
                dmf[uint64(dst + i)] = tb[uint64(t * t_ + i)]


@njit(cache=True, fastmath=False)
def grad_input(dv, ph, pw, tiles_h, tiles_w, slot, rows, dx):
    """dx[n, c, 8th + 2i + p - ph, 8tw + 2j + q - pw] += (B dV B^T)[i, j] over the tiles and phases f = 2p + q
    (dV[a, b] = dv[rows[t] C + slot[t, f] C + c, (th tiles_w + tw) N + n] for t = 5a + b, 0 where slot is -1):
    input_transform's adjoint; dx is overwritten."""
    n_, c_, h_, w_ = dx.shape
    two, three, _, _ = _constants(dx)
    L = tiles_w * n_
    t_ = tiles_h * L
    bw = tiles_w + 1
    rl = 8 * bw * n_
    hp, wp = 8 * tiles_h + 2, 8 * tiles_w + 2
    pl = np.empty(hp * rl, dx.dtype)  # laid out as input_transform's
    dvf = dv.reshape(-1)
    tb = np.zeros(100 * t_, dx.dtype)  # rows (f, t) as in input_transform; those a point leaves out stay 0
    d = np.empty(25 * L, dx.dtype)
    hh, ww = min(h_, hp - ph), min(w_, wp - pw)
    dxf = dx.reshape(-1)
    pos = np.empty(ww, np.int64)  # where column s of dx lies in a plane row
    for s in range(ww):
        pos[s] = (((s + pw) % 8) * bw + (s + pw) // 8) * n_
    for c in range(c_):
        for t in range(25):  # the channel's 81 rows into tb first (they lie C * T floats apart)
            for f in range(4):
                if slot[t, f] >= 0:
                    src = ((rows[t] + slot[t, f]) * c_ + c) * t_
                    dst = (25 * f + t) * t_
                    for i in range(t_):
                        tb[uint64(dst + i)] = dvf[uint64(src + i)]
        pl[:] = 0.0
        for f in range(4):
            p, q = f // 2, f % 2
            for th in range(tiles_h):
                for a in range(5):  # B along the rows: (dV B^T)[a, j] (vectorized over the slots)
                    src = (25 * f + 5 * a) * t_ + th * L
                    r0 = 5 * a * L
                    for i in range(L):
                        _put5(d, r0 + i, L, _b(_get5(tb, src + i, t_), two, three))
                for j in range(5):  # then B down the columns, added into the padded plane
                    e = q + 2 * j
                    o = (8 * th + p) * rl + ((e % 8) * bw + e // 8) * n_
                    for i in range(L):
                        # the five loads written out: through _get5 this loop ran 1.27 -> 1.91 ms
                        e0, e1, e2, e3, e4 = _b(
                            (
                                d[uint64(j * L + i)],
                                d[uint64((5 + j) * L + i)],
                                d[uint64((10 + j) * L + i)],
                                d[uint64((15 + j) * L + i)],
                                d[uint64((20 + j) * L + i)],
                            ),
                            two,
                            three,
                        )
                        pl[uint64(o + i)] += e0
                        pl[uint64(o + 2 * rl + i)] += e1
                        pl[uint64(o + 4 * rl + i)] += e2
                        pl[uint64(o + 6 * rl + i)] += e3
                        pl[uint64(o + 8 * rl + i)] += e4
        for n in range(n_):  # back to NCHW (scalar)
            for r in range(hh):
                src = (r + ph) * rl + n
                dst = ((n * c_ + c) * h_ + r) * w_
                for s in range(ww):
                    dxf[uint64(dst + s)] = pl[uint64(src + pos[s])]


def weight_coefficients():
    """(taps (25, 4, 4), coef (25, 4, 4)): point t's entry for phase f is sum_i coef[t, f, i] w[taps[t, f, i]] over
    the flat 3x3 taps of w[o, c] (tap 9: a zero; coef 0 where the phase leaves the point out)."""
    g = np.array([[0.5, 0.0], [-0.5, -0.5], [-1.0 / 6.0, 1.0 / 6.0], [1.0 / 6.0, 1.0 / 3.0], [0.0, 1.0]])
    slot, _ = slots()
    taps = np.full((25, 4, 4), 9, np.int64)
    coef = np.zeros((25, 4, 4))
    for t in range(25):
        a, b = divmod(t, 5)
        for f in range(4):
            p, q = divmod(f, 2)
            for i in range(4):
                da, db = divmod(i, 2)
                if slot[t, f] >= 0 and 2 * da + p <= 2 and 2 * db + q <= 2:
                    taps[t, f, i] = 3 * (2 * da + p) + 2 * db + q
                    coef[t, f, i] = g[a, da] * g[b, db]
    return taps, coef


@njit(cache=True, fastmath=False)
def weight_transform(w, slot, rows, taps, coef, u):
    """u[O rows[t] C + o K_t + slot[t, f] C + c] = (G g G^T)[a, b] (t = 5a + b, K_t = C (rows[t + 1] - rows[t]))
    for the 2x2 kernel g of phase f = 2p + q: g[i, j] = w[o, c, 2i + p, 2j + q] (0 past the 3x3); taps and coef
    from weight_coefficients."""
    # Per output channel its (C, 9) taps go to a (10, C) block first (row 9: zeros) and every used (point, phase)
    # row is one vectorized run over C (ResNet-18's 128->256 layer: 5.1 ms with scalar 5x5 transforms per
    # channel pair, 0.6-0.9 ms this way).
    o_, c_ = w.shape[0], w.shape[1]
    uf = u.reshape(-1)
    wt = np.zeros((10, c_), w.dtype)
    cf = coef.astype(w.dtype)
    for o in range(o_):
        for c in range(c_):  # a stride-9 gather (scalar)
            for i in range(9):
                wt[i, c] = w[o, c, i // 3, i % 3]
        for t in range(25):
            k = c_ * (rows[t + 1] - rows[t])
            for f in range(4):
                s = slot[t, f]
                if s < 0:
                    continue
                dst = o_ * c_ * rows[t] + o * k + s * c_
                w0, w1, w2, w3 = wt[taps[t, f, 0]], wt[taps[t, f, 1]], wt[taps[t, f, 2]], wt[taps[t, f, 3]]
                c0, c1, c2, c3 = cf[t, f, 0], cf[t, f, 1], cf[t, f, 2], cf[t, f, 3]
                for c in range(c_):  # LLVM vectorizes this loop on x86-64
                    uf[uint64(dst + c)] = c0 * w0[c] + c1 * w1[c] + c2 * w2[c] + c3 * w3[c]


@njit(cache=True, fastmath=False)
def weight_grad(du, slot, rows, taps, coef, dw):
    """dw (O, C, 3, 3) from du (laid out as weight_transform's u): the adjoint of weight_transform."""
    o_, c_ = dw.shape[0], dw.shape[1]
    duf = du.reshape(-1)
    acc = np.empty((10, c_), dw.dtype)
    cf = coef.astype(dw.dtype)
    for o in range(o_):
        acc[:] = 0.0
        for t in range(25):
            k = c_ * (rows[t + 1] - rows[t])
            for f in range(4):
                s = slot[t, f]
                if s < 0:
                    continue
                src = o_ * c_ * rows[t] + o * k + s * c_
                for i in range(4):
                    tap = taps[t, f, i]
                    if tap == 9:
                        continue
                    ci = cf[t, f, i]
                    a = acc[tap]
                    for c in range(c_):  # LLVM vectorizes this loop on x86-64
                        a[c] += ci * duf[uint64(src + c)]
        for c in range(c_):  # back to the weight's (O, C, 3, 3) layout (scalar: a stride-9 scatter)
            for i in range(9):
                dw[o, c, i // 3, i % 3] = acc[i, c]
