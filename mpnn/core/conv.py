"""conv1d and conv2d (PyTorch semantics) as Numba transforms around float32/float64 BLAS GEMMs.

This module validates the arguments, brings every conv to one NCHW problem (conv_algorithm.ConvProblem;
conv1d is conv2d with a height of 1: same kernels, same specializations) and runs the first algorithm of
ALGORITHMS that applies, forward now and backward when the tape asks. Each algorithm is a class beside this
file. im2col and the Winograd ones cut their work into chunks whose arrays fit in L2, so that the Numba writes
and the GEMM reads stay in cache, and mostly recompute in backward what they gathered in forward, so that a conv
holds on to little beyond its input (what each keeps is said below and in its file). Selection order, first
match wins:
    1. WinogradF4x4 (conv_winograd.py): 3x3, stride 1, dilation 1, ungrouped, at least _WINOGRAD_MIN_CHANNELS
       input and output channels and _WINOGRAD_MIN_WIDTH output columns. 4x fewer multiplies than im2col
       (the benchmark layer: ~17 ms forward+backward against im2col's ~27 ms of GEMMs alone), at the price
       of float32 rounding (~5e-6 of the largest output; oneDNN trains with the same F(4x4, 3x3)).
    2. WinogradF2x2 (conv_winograd2.py): the 3x3 stride-1 ungrouped convs narrower than _WINOGRAD_MIN_WIDTH,
       from _WINOGRAD2_MIN_CHANNELS channels (ResNet-18's 512 channels on 4x4 maps): 2.25x fewer multiplies,
       no junk slots, the whole batch in one chunk.
    3. WinogradS2 (conv_winograd_s2.py): 3x3 stride-2 padding-1 ungrouped undilated convs from
       _WINOGRAD_S2_MIN_CHANNELS input channels and _WINOGRAD_S2_MIN_WIDTH output columns: the four phases of the
       input as 4C channels of a 2x2 stride-1 conv, run as F(4x4, 2x2), 0.56x the multiplies of im2col.
    4. Pointwise (conv_pointwise.py): 1x1, unpadded, ungrouped convs of any stride with at least
       _POINTWISE_MIN_POSITIONS output positions a sample: one batched GEMM over the input (stride 1: no copy)
       or its strided subsample, no im2col gather; it keeps that subsample (a quarter of the input at stride
       2) for backward when the weight wants a gradient.
    5. Im2colGemm (conv_im2col.py): any geometry. The kernel taps of a tile of output positions become the
       columns of one GEMM; a bias rides in it as a row of ones; a weight larger than the tile budget gets
       tiles of up to twice its bytes, so that it streams once.
The tunables below stay module constants (tests patch them); SETTINGS hands them to the algorithms live.
"""

from __future__ import annotations

import numpy as np

from mpnn.core.conv_algorithm import ConvProblem, ConvSettings
from mpnn.core.conv_im2col import Im2colGemm
from mpnn.core.conv_pointwise import Pointwise
from mpnn.core.conv_winograd import WinogradF4x4
from mpnn.core.conv_winograd2 import WinogradF2x2
from mpnn.core.conv_winograd_s2 import WinogradS2
from mpnn.core.errors import OpError
from mpnn.core.tensor import as_tensor, is_grad_enabled, make_result

# Measured (3x3, 32->64, 64x64 maps, one thread): 512-1024-column tiles run the GEMMs at 140-175 GFLOP/s,
# and an im2col that stays in L2 copies ~100 GB/s against ~15 GB/s once it spills to memory. ResNet-18's
# strided convs (batch 32, forward+backward ms, 1 / 2 / 4 MiB): 3x3 64->128 32->16 47 / 42 / 40, 3x3 128->256
# 16->8 38.5 / 36 / 36, the 3->64 stem 8.9 / 8.6 / 9.9, 1x1 64->128 9.0 / 8.8 / 8.0 (L2 is 2 MiB a core here).
_TILE_BYTES = 2 << 20
# Winograd chunks of ~72 tile slots (4 tile rows of a 64-wide map) ran forward+backward ~1 ms (6%) faster
# than 51 or 128 on the benchmark layer (the work arrays stay in L2; the GEMMs run at 130-155 GFLOP/s).
# Against im2col (forward+backward, batch 16-32, 8-128 channels): it won from 8 channels and 8 output
# columns on (1.5-2.0x; 1.0x at 8 channels, 8x8; 1.1-1.25x with 3-4 channels on 32x32 maps) and lost or
# tied on maps 4-6 wide (0.7-1.0x: a tile row's junk slot and 6x6 patches over 4-6 columns waste most
# of the work).
_WINOGRAD_TILES = 72
_WINOGRAD_MIN_CHANNELS = 8
_WINOGRAD_MIN_WIDTH = 8
# F(2x2, 3x3) on maps narrower than that, from 64 channels (conv_winograd2.py: ResNet-18's 512-channel layer on
# 4x4 maps, batch 32, forward+backward ~40 ms against im2col's ~57; torch 51)
_WINOGRAD2_MIN_CHANNELS = 64
# The stride-2 Winograd (conv_winograd_s2.py) in chunks of about 256 tile slots (16 images of ResNet-18's 32x32
# input, the whole batch of 32 on 16x16). It takes ResNet-18's 64->128 32x32 and 128->256 16x16 convs (batch 32,
# benchmarks/resnet18.py --layers, two runs each, thread CPU ms, im2col -> it: forward 14.8/14.7 -> 14.2/14.0 and
# 14.1/13.8 -> 15.7/13.6, backward 31.6/32.8 -> 26.1/25.1 and 28.6/30.2 -> 21.3/24.4; side by side in one
# process, medians of 11: forward 14.6 -> 13.6, 13.9 -> 12.7) but not its 256->512 conv on 8x8 inputs: a 4x4
# output is one tile an image, and the transformed weight (81/16 x the weight's 4.7 MB) is read for 32 GEMM
# columns (forward 19.9 against im2col's 14.2, backward 46.8 against 27.6), hence the width of 8. Off ResNet-18
# (batch 32, medians of 5, im2col -> it, forward / backward): 256->512 16x16 53.5 -> 40.4 / 112 -> 93, 64->64
# 64x64 44.5 -> 34.0 / 107 -> 75, 64->128 16x16 (8 output columns) 4.7 -> 4.4 / 10.0 -> 9.0.
_WINOGRAD_S2_TILES = 256
_WINOGRAD_S2_MIN_CHANNELS = 64
_WINOGRAD_S2_MIN_WIDTH = 8
# The 1x1 algorithm (conv_pointwise.py) runs one GEMM per sample (O, C) @ (C, oh*ow); below this many output
# positions im2col, which puts several samples in one GEMM, is faster: per-sample GEMMs (512 x 256) @ (256 x 16)
# (ResNet-18's 256->512 shortcut on 8x8 input, batch 32) took 1.86 ms against im2col's 1.82 for the whole layer.
# Side by side later (AMD EPYC Zen 4, one thread, medians of 15, two runs, im2col -> pointwise, ms): that 8x8 layer
# (16 positions) forward+backward 6.03 -> 7.69 and 6.97 -> 8.18, but the 128->256 shortcut on 16x16 input (64
# positions) forward 2.63 -> 1.96 and 2.20 -> 1.64, forward+backward 8.32 -> 6.74 and 9.68 -> 7.41: hence 64.
_POINTWISE_MIN_POSITIONS = 64
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
WINOGRAD = WinogradF4x4()
ALGORITHMS = (
    WINOGRAD,
    WinogradF2x2(),
    WinogradS2(),
    Pointwise(),
    Im2colGemm(),
)  # the selection order: the first that applies runs; the last always does
_new_problem = tuple.__new__  # ConvProblem without a Python-level __new__ frame (see conv_algorithm)


class _LiveSettings:
    """ConvSettings' attributes, read from this module's constants at each access (tests patch them)."""

    __slots__ = ()

    @property
    def tile_bytes(self):
        return _TILE_BYTES

    @property
    def winograd_tiles(self):
        return _WINOGRAD_TILES

    @property
    def winograd_min_channels(self):
        return _WINOGRAD_MIN_CHANNELS

    @property
    def winograd_min_width(self):
        return _WINOGRAD_MIN_WIDTH

    @property
    def winograd2_min_channels(self):
        return _WINOGRAD2_MIN_CHANNELS

    @property
    def winograd_s2_tiles(self):
        return _WINOGRAD_S2_TILES

    @property
    def winograd_s2_min_channels(self):
        return _WINOGRAD_S2_MIN_CHANNELS

    @property
    def winograd_s2_min_width(self):
        return _WINOGRAD_S2_MIN_WIDTH

    @property
    def pointwise_min_positions(self):
        return _POINTWISE_MIN_POSITIONS


SETTINGS = _LiveSettings()


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """1-D convolution of (N, C, L) or (C, L) input with weight (O, C/groups, k), as torch.nn.functional."""
    return _conv("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution of (N, C, H, W) or (C, H, W) input with weight (O, C/groups, kH, kW), as torch."""
    return _conv("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)


def _ints(op, name, value, n, minimum):
    """value as a tuple of n Python ints >= minimum (an int is repeated)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value),) * n
    elif (
        isinstance(value, (tuple, list))
        and len(value) == n
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
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
        raise OpError(
            op,
            f"input {x.shape} has {channels} channels but weight {w.shape} with groups={groups} "
            f"expects {in_per_group * groups}",
        )
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
            raise OpError(
                op,
                f"kernel {tuple(kernel)} (dilation {dilation}) spans more than the padded input: "
                f"input {x.shape}, padding {padding!r}",
            )
        out_sizes.append((size + lo + hi - span) // s + 1)

    if nd == 1:  # a height of 1: the 2-D kernels with (1, k) taps
        x4 = x.reshape((x.shape[0] if batched else 1, channels, 1, spatial[0]))
        w4 = w.reshape(out_ch, in_per_group, 1, kernel[0])
        geom = (1, kernel[0], 1, stride[0], 0, pad_lo[0], 1, dilation[0], groups)
        oh, ow = 1, out_sizes[0]
    else:
        x4 = x if batched else x[None]
        w4 = w
        geom = (kernel[0], kernel[1], stride[0], stride[1], pad_lo[0], pad_lo[1], dilation[0], dilation[1], groups)
        oh, ow = out_sizes
    x4 = np.ascontiguousarray(x4)
    out = np.empty((x4.shape[0], out_ch, oh, ow), x4.dtype)
    if x4.size == 0 or out.size == 0:
        return _empty_conv(op, input, weight, bias, x4, out, out_sizes, batched)
    problem = _new_problem(ConvProblem, (x4, w4, b, geom, oh, ow, weight.requires_grad and is_grad_enabled()))
    algorithm = select(problem)
    state = algorithm.forward(problem, out, SETTINGS)
    out_shape = (out_ch, *out_sizes) if not batched else (x4.shape[0], out_ch, *out_sizes)
    out = out.reshape(out_shape)

    parents = (input, weight) if bias is None else (input, weight, bias)
    need_b = bias is not None and bias.requires_grad

    def backward(g):
        g4 = np.ascontiguousarray(g).reshape(x4.shape[0], out_ch, oh, ow)
        dx, dw, db = algorithm.backward(state, g4, input.requires_grad, weight.requires_grad, need_b)
        dx = None if dx is None else dx.reshape(x.shape)
        dw = None if dw is None else dw.reshape(w.shape)
        return (dx, dw) if bias is None else (dx, dw, db)

    # backward reads the input and weight (through the algorithm's state), never the output: an in-place write
    # to the result (out += identity in a residual block) is fine, as in torch
    return make_result(out, parents, backward, op, saved=(input, weight))


def _empty_conv(op, input, weight, bias, x4, out, out_sizes, batched):
    """A conv over an empty batch (or no channels): every product is an empty sum, so the output is the bias and
    the input and weight gradients are zeros, as torch's. No algorithm runs: their chunk loops assume a sample (an
    empty batch crashed F(4x4)'s backward and left im2col's and the stride-2 Winograd's weight gradients unwritten)."""
    out_ch = out.shape[1]
    out[...] = 0.0 if bias is None else bias.data.reshape(1, out_ch, 1, 1)
    out = out.reshape((x4.shape[0], out_ch, *out_sizes) if batched else (out_ch, *out_sizes))
    parents = (input, weight) if bias is None else (input, weight, bias)

    def backward(g):
        dx = np.zeros(input.data.shape, input.data.dtype) if input.requires_grad else None
        dw = np.zeros(weight.data.shape, weight.data.dtype) if weight.requires_grad else None
        if bias is None:
            return (dx, dw)
        g3 = np.asarray(g).reshape(x4.shape[0], out_ch, out.size // max(1, x4.shape[0] * out_ch))
        db = g3.sum(axis=(0, 2)).astype(bias.data.dtype) if bias.requires_grad else None
        return (dx, dw, db)

    return make_result(out, parents, backward, op, saved=(input, weight))


def select(problem, settings=SETTINGS):
    """The first algorithm of ALGORITHMS that applies to `problem` (a ConvProblem)."""
    for algorithm in ALGORITHMS:
        if algorithm.applies(problem, settings):
            return algorithm
    raise LookupError(f"no conv algorithm applies to geometry {problem.geom}")  # unreachable: im2col always does


def settings_now():
    """The tunables as they are now, fixed in a ConvSettings."""
    return ConvSettings(
        _TILE_BYTES,
        _WINOGRAD_TILES,
        _WINOGRAD_MIN_CHANNELS,
        _WINOGRAD_MIN_WIDTH,
        _WINOGRAD2_MIN_CHANNELS,
        _WINOGRAD_S2_TILES,
        _WINOGRAD_S2_MIN_CHANNELS,
        _WINOGRAD_S2_MIN_WIDTH,
        _POINTWISE_MIN_POSITIONS,
    )


def _winograd_fits(geom, channels, out_ch, ow):
    """Whether Winograd takes a conv of this geometry (geom as ConvProblem's), channels and output width."""
    return WINOGRAD.fits(geom, channels, out_ch, ow, SETTINGS)
