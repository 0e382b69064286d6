"""conv1d and conv2d (PyTorch semantics) as Numba transforms around float32/float64 BLAS GEMMs.

Two algorithms, both cut into chunks whose work arrays fit in L2 so that the Numba writes and the GEMM
reads stay in cache, and both recompute in backward what they gathered in forward, so that a conv holds on
to its input only, as torch's does:
- im2col: the kernel taps of a tile of output positions become the columns of one GEMM. A tile holds one
  sample's slice of positions (its GEMM lands straight in NCHW) or, for small maps, several whole samples
  (then one transposing copy). A bias rides in the GEMM as a row of ones (forward adds it, backward sums
  it for free).
- Winograd F(4x4, 3x3) for 3x3, stride 1, dilation 1, ungrouped convs with enough channels: 4x fewer
  multiplies than im2col, whose three GEMMs alone (~27 ms on the 32->64, 64x64, batch 8 benchmark) took
  longer than torch's (oneDNN) whole forward+backward (~23 ms). F(2x2, 3x3) (2.25x) came to ~21.5 ms
  there, F(4x4, 3x3) to ~17 ms (kernels alone, one thread). Its price is float32 rounding: ~5e-6 of the
  largest output against ~3e-7 for F(2x2, 3x3) (interpolation points up to +-2); MKL-DNN (oneDNN) trains
  with the same F(4x4, 3x3).
conv1d is conv2d with a height of 1 (same kernels, same specializations).
"""
from __future__ import annotations

import functools
import threading

import numpy as np

from mpnn.core import conv_kernels as K
from mpnn.core.errors import OpError
from mpnn.core.tensor import as_tensor, is_grad_enabled, make_result

# Measured (3x3, 32->64, 64x64 maps, one thread): 512-1024-column tiles run the GEMMs at 140-175 GFLOP/s,
# and an im2col that stays in L2 copies ~100 GB/s against ~15 GB/s once it spills to memory.
_TILE_BYTES = 1 << 20
# Winograd chunks of ~72 tile slots (4 tile rows of a 64-wide map) ran forward+backward ~1 ms (6%) faster
# than 51 or 128 on the benchmark layer (the work arrays stay in L2; the GEMMs run at 130-155 GFLOP/s).
# Against im2col (forward+backward, batch 16-32, 8-128 channels): it won from 8 channels and 8 output
# columns on (1.5-2.0x; 1.0x at 8 channels, 8x8; 1.1-1.25x with 3-4 channels on 32x32 maps) and lost or
# tied on maps 4-6 wide (0.7-1.0x: a tile row's junk slot and 6x6 patches over 4-6 columns waste most
# of the work).
_WINOGRAD_TILES = 72
_WINOGRAD_MIN_CHANNELS = 8
_WINOGRAD_MIN_WIDTH = 8
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_local = threading.local()


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """1-D convolution of (N, C, L) or (C, L) input with weight (O, C/groups, k), as torch.nn.functional."""
    return _conv("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution of (N, C, H, W) or (C, H, W) input with weight (O, C/groups, kH, kW), as torch."""
    return _conv("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)


def _scratch(slot, shape, dtype):
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


def _ints(op, name, value, n, minimum):
    """value as a tuple of n Python ints >= minimum (an int is repeated)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value),) * n
    elif isinstance(value, (tuple, list)) and len(value) == n and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        out = tuple(int(v) for v in value)
    else:
        raise OpError(op, f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    if min(out) < minimum:
        raise OpError(op, f"{name} must be >= {minimum}, got {value!r}")
    return out


def _padding(op, padding, n, kernel, dilation, stride):
    """(before, after) padding per spatial dim from an int, a tuple, "valid" or "same" (torch's split)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n, (0,) * n
        if padding != "same":
            raise OpError(op, f'padding must be an int, a tuple, "valid" or "same", got {padding!r}')
        if any(s != 1 for s in stride):
            raise OpError(op, f'padding="same" needs stride 1, got stride {stride}')
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    before = _ints(op, "padding", padding, n, 0)
    return before, before


def _check_float(op, name, data):
    if data.dtype not in _FLOATS:
        raise OpError(op, f"{name} must be float32 or float64, got {data.dtype} (shape {data.shape})")


def _conv(op, nd, input, weight, bias, stride, padding, dilation, groups):
    input, weight = as_tensor(input), as_tensor(weight)
    x, w = input.data, weight.data
    batched = x.ndim == nd + 2
    if x.ndim not in (nd + 1, nd + 2):
        layout = "(N, C, L) or (C, L)" if nd == 1 else "(N, C, H, W) or (C, H, W)"
        raise OpError(op, f"expected input of shape {layout}, got {x.shape}")
    if w.ndim != nd + 2:
        raise OpError(op, f"expected weight of {nd + 2} dims (out, in/groups, *kernel), got {w.shape}")
    _check_float(op, "input", x)
    _check_float(op, "weight", w)
    if w.dtype != x.dtype:
        raise OpError(op, f"input is {x.dtype} but weight is {w.dtype}")
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise OpError(op, f"groups must be a positive int, got {groups!r}")
    groups = int(groups)
    out_ch, in_per_group = w.shape[0], w.shape[1]
    channels = x.shape[1] if batched else x.shape[0]
    if out_ch % groups:
        raise OpError(op, f"groups={groups} does not divide the {out_ch} output channels of weight {w.shape}")
    if channels != in_per_group * groups:
        raise OpError(op, f"input {x.shape} has {channels} channels but weight {w.shape} with groups={groups} "
                          f"expects {in_per_group * groups}")
    b = None
    if bias is not None:
        bias = as_tensor(bias)
        b = bias.data
        if b.shape != (out_ch,) or b.dtype != x.dtype:
            raise OpError(op, f"bias must be {x.dtype} of shape ({out_ch},), got {b.dtype} {b.shape}")

    kernel = w.shape[2:]
    stride = _ints(op, "stride", stride, nd, 1)
    dilation = _ints(op, "dilation", dilation, nd, 1)
    pad_lo, pad_hi = _padding(op, padding, nd, kernel, dilation, stride)
    spatial = x.shape[-nd:]
    out_sizes = []
    for size, k, s, d, lo, hi in zip(spatial, kernel, stride, dilation, pad_lo, pad_hi):
        span = d * (k - 1) + 1
        if size + lo + hi < span:
            raise OpError(op, f"kernel {tuple(kernel)} (dilation {dilation}) spans more than the padded input: "
                              f"input {x.shape}, padding {padding!r}")
        out_sizes.append((size + lo + hi - span) // s + 1)

    if nd == 1:  # a height of 1: the 2-D kernels with (1, k) taps
        x4 = x.reshape((x.shape[0] if batched else 1, channels, 1, spatial[0]))
        w4 = w.reshape(out_ch, in_per_group, 1, kernel[0])
        geom = (1, kernel[0], 1, stride[0], 0, pad_lo[0], 1, dilation[0], groups)
        oh, ow = 1, out_sizes[0]
    else:
        x4 = x if batched else x[None]
        w4 = w
        geom = (kernel[0], kernel[1], stride[0], stride[1], pad_lo[0], pad_lo[1], dilation[0], dilation[1],
                groups)
        oh, ow = out_sizes
    x4 = np.ascontiguousarray(x4)
    out = np.empty((x4.shape[0], out_ch, oh, ow), x4.dtype)
    if _winograd_fits(geom, channels, out_ch, ow):
        u = _winograd_weight(w4)
        _winograd_forward(x4, u, b, geom[4], geom[5], out)
        grads = lambda g4, nx, nw, nb: _winograd_backward(g4, x4, u, geom[4], geom[5], nx, nw, nb)  # noqa: E731
    else:
        plan = _plan(x4.shape[0], (channels * w4.shape[2] * w4.shape[3] + groups) * x4.dtype.itemsize, oh * ow,
                     _TILE_BYTES)
        keep = len(plan) == 1 and weight.requires_grad and is_grad_enabled()
        cols = _forward(x4, w4, b, geom, ow, plan, out.reshape(x4.shape[0], out_ch, oh * ow), keep)
        grads = lambda g4, nx, nw, nb: _backward(g4.reshape(g4.shape[0], out_ch, oh * ow), x4, w4,  # noqa: E731
                                                 geom, ow, plan, nx, nw, nb, cols)
    out_shape = (out_ch, *out_sizes) if not batched else (x4.shape[0], out_ch, *out_sizes)
    out = out.reshape(out_shape)

    parents = (input, weight) if bias is None else (input, weight, bias)
    need_b = bias is not None and bias.requires_grad

    def backward(g):
        g4 = np.ascontiguousarray(g).reshape(x4.shape[0], out_ch, oh, ow)
        dx, dw, db = grads(g4, input.requires_grad, weight.requires_grad, need_b)
        dx = None if dx is None else dx.reshape(x.shape)
        dw = None if dw is None else dw.reshape(w.shape)
        return (dx, dw) if bias is None else (dx, dw, db)

    return make_result(out, parents, backward, op)


@functools.lru_cache(maxsize=256)
def _plan(n, per_position, positions, tile_bytes):
    """Tiles (n0, n1, p0, p1): samples n0..n1 and output positions p0..p1, each tile's columns ~_TILE_BYTES
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


def _forward(x4, w4, b, geom, ow, plan, out, keep):
    """out (N, O, L) = conv(x4) tile by tile: im2col (Numba) then one GEMM (BLAS) per tile and group.
    keep (single-tile plans only): return the columns for backward instead of recomputing them there
    (they fit in _TILE_BYTES; it saved ~30 us of 250 on the MNIST-1D layers)."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geom
    wg = _grouped_weight(w4, b, groups)
    g_, og, rows = wg.shape
    out_ch = out.shape[1]
    for n0, n1, p0, p1 in plan:
        nb, t = n1 - n0, p1 - p0
        shape = (g_ * rows, nb, t)
        cols = np.empty(shape, x4.dtype) if keep else _scratch("cols", shape, x4.dtype)
        kept = cols
        K.im2col(x4[n0:n1], kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow, cols)
        cols = cols.reshape(g_, rows, nb * t)
        if nb == 1:  # the GEMM writes this sample's positions in place: (O, t) is a strided block of out
            np.matmul(wg, cols, out=out[n0, :, p0:p1].reshape(g_, og, t))
        else:  # several whole samples in one GEMM, then (O, nb, L) -> (nb, O, L)
            res = _scratch("res", (g_, og, nb * t), x4.dtype)
            np.matmul(wg, cols, out=res)
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
    dwt = np.zeros((groups, rows, og), dtype) if need_w else None
    wt = w4.reshape(groups, og, taps).transpose(0, 2, 1) if need_x else None
    for n0, n1, p0, p1 in plan:
        nb, t = n1 - n0, p1 - p0
        if nb == 1:
            gc = g3[n0, :, p0:p1].reshape(groups, og, t)
        else:
            gc = _scratch("grad", (out_ch, nb, t), dtype)
            K.swap_leading_axes(g3[n0:n1], gc)
            gc = gc.reshape(groups, og, nb * t)
        if need_w and kept is not None:
            cols = kept.reshape(groups, -1, nb * t)[:, :rows]
        elif need_w:
            cols = _scratch("cols", (groups * rows, nb, t), dtype)
            K.im2col(x4[n0:n1], kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow, cols)
            cols = cols.reshape(groups, rows, nb * t)
        if need_w:
            # cols @ g^T (taps, O) measured ~20% faster in OpenBLAS than g @ cols^T (O, taps)
            if len(plan) == 1:
                np.matmul(cols, gc.transpose(0, 2, 1), out=dwt)
            else:
                part = _scratch("dw", dwt.shape, dtype)
                np.matmul(cols, gc.transpose(0, 2, 1), out=part)
                dwt += part
        if need_x:
            dcols = _scratch("dcols", (groups, taps, nb * t), dtype)
            np.matmul(wt, gc, out=dcols)
            K.col2im(dcols.reshape(groups * taps, nb, t), kh, kw, sh, sw, ph, pw, dh, dw, groups, p0, ow,
                     dx[n0:n1])
    dw = None
    if need_w:
        dw = dwt[:, :taps, :].transpose(0, 2, 1).reshape(w4.shape)
        if need_b:
            db = dwt[:, taps, :].reshape(out_ch)
    return dx, dw, db


# ----- Winograd F(4x4, 3x3) ---------------------------------------------------------------------------------
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_GG = np.kron(_G, _G)  # (36, 9): entry 6a + b of G w G^T from the 9 taps of w, for all channel pairs in one GEMM
_WINOGRAD_BLOCK = 36  # entries of a tile's transformed 6x6 block


def _winograd_fits(geom, channels, out_ch, ow):
    """3x3, stride 1, dilation 1, one group, and enough channels and width for the transforms to pay."""
    kh, kw, sh, sw, _, _, dh, dw, groups = geom
    return ((kh, kw, sh, sw, dh, dw, groups) == (3, 3, 1, 1, 1, 1, 1) and ow >= _WINOGRAD_MIN_WIDTH
            and min(channels, out_ch) >= _WINOGRAD_MIN_CHANNELS)


def _winograd_weight(w4):
    """U (36, O, C): entry 6a + b of G w G^T for every (out, in) channel pair. One GEMM: a batched
    np.matmul of 6x3 matrices per channel pair took ~3 ms at 128x128 channels."""
    o, c = w4.shape[:2]
    return (_GG.astype(w4.dtype) @ w4.reshape(o * c, 9).T).reshape(_WINOGRAD_BLOCK, o, c)


def _winograd_buffer(slot, channels, tiles, dtype):
    """A (36, P) work buffer and its (36, channels, tiles) GEMM view; P*itemsize is 64 bytes past a
    multiple of 4 KiB so that the rows the kernels stream together fall in different L1 sets."""
    itemsize = np.dtype(dtype).itemsize
    page = 4096 // itemsize
    p = -(-channels * tiles // page) * page + 64 // itemsize
    buf = _scratch(slot, (_WINOGRAD_BLOCK, p), dtype)
    return buf, buf[:, :channels * tiles].reshape(_WINOGRAD_BLOCK, channels, tiles)


def _winograd_chunks(n, out_h, out_w):
    """(tiles_h, tiles_w, [(r0, rows)]): chunks of whole tile rows, ~_WINOGRAD_TILES tile slots each
    (a tile row has tiles_w + 1 slots, see conv_kernels)."""
    tiles_h, tiles_w = (out_h + 3) // 4, (out_w + 3) // 4
    step = max(1, _WINOGRAD_TILES // (tiles_w + 1))
    total = n * tiles_h
    return tiles_h, tiles_w, [(r, min(step, total - r)) for r in range(0, total, step)]


def _winograd_forward(x4, u, b, ph, pw, out):
    """out (N, O, OH, OW) = conv(x4) + b: per chunk input transform (Numba), 36 GEMMs (BLAS), output transform."""
    n, c = x4.shape[:2]
    o = u.shape[1]
    tiles_h, tiles_w, chunks = _winograd_chunks(n, out.shape[2], out.shape[3])
    bias = b if b is not None else np.zeros(o, x4.dtype)
    height = None
    for r0, rows in chunks:
        if rows != height:  # the work buffers change only for the last, shorter chunk
            height, t = rows, rows * (tiles_w + 1)
            vbuf, v = _winograd_buffer("v", c, t, x4.dtype)
            mbuf, m = _winograd_buffer("m", o, t, x4.dtype)
        K.winograd_input(x4, ph, pw, tiles_h, tiles_w, r0, rows, vbuf)
        np.matmul(u, v, out=m)
        K.winograd_output(mbuf, bias, tiles_h, tiles_w, r0, rows, out)


def _winograd_backward(g4, x4, u, ph, pw, need_x, need_w, need_b):
    """Gradients of the Winograd conv for output gradient g4 (N, O, OH, OW), chunk by chunk:
    dM = A dY A^T, then dU += dM V^T and dV = U^T dM (BLAS), dx from B dV B^T, dw = G^T dU G.
    The bias gradient is summed from dM's entry 7 = (1, 1), which is the sum of each tile's dY."""
    dtype = x4.dtype
    n, c = x4.shape[:2]
    o = u.shape[1]
    if not (need_x or need_w):
        return None, None, (g4.sum(axis=(0, 2, 3)) if need_b else None)
    tiles_h, tiles_w, chunks = _winograd_chunks(n, g4.shape[2], g4.shape[3])
    dx = np.zeros(x4.shape, dtype) if need_x else None
    du = np.zeros((_WINOGRAD_BLOCK, o, c), dtype) if need_w else None
    sums = np.zeros((o, chunks[0][1] * (tiles_w + 1)))  # the bias gradient's partial sums (float64)
    ut = u.transpose(0, 2, 1)
    part = _scratch("du", (_WINOGRAD_BLOCK, o, c), dtype)
    height = None
    for r0, rows in chunks:
        if rows != height:  # the work buffers change only for the last, shorter chunk
            height, t = rows, rows * (tiles_w + 1)
            dmbuf, dm = _winograd_buffer("dm", o, t, dtype)
            vtbuf, vt = _winograd_buffer("v", t, c, dtype)  # (36, T, C): channels innermost
            dvbuf, dv = _winograd_buffer("dv", c, t, dtype)
        K.winograd_grad_output(g4, tiles_h, tiles_w, r0, rows, dmbuf, sums)
        if need_w:
            # V^T laid out (T, C) makes dM @ V^T a plain NN product: OpenBLAS ran it at ~160-175 GFLOP/s
            # against ~90 for the NT product on a (C, T) layout (measured, 100-130-tile chunks)
            K.winograd_input_t(x4, ph, pw, tiles_h, tiles_w, r0, rows, vtbuf)
            np.matmul(dm, vt, out=part)
            du += part
        if need_x:
            np.matmul(ut, dm, out=dv)
            K.winograd_grad_input(dvbuf, ph, pw, tiles_h, tiles_w, r0, rows, dx)
    dw = None
    if need_w:
        dw = (du.reshape(_WINOGRAD_BLOCK, o * c).T @ _GG.astype(dtype)).reshape(o, c, 3, 3)
    return dx, dw, (sums.sum(axis=1).astype(dtype) if need_b else None)
