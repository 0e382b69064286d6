"""conv1d/conv2d (im2col and Winograd paths), pooling and pad: forward values against straightforward NumPy
references written here, float64 finite-difference gradients, and clear errors for bad input."""

import numpy as np
import pytest

from mpnn.core import OpError, Tensor, gradcheck
from mpnn.core import conv as conv_module
from mpnn.core.conv import conv1d, conv2d
from mpnn.core.pad import pad
from mpnn.core.pool import adaptive_avg_pool2d, avg_pool1d, avg_pool2d, max_pool1d, max_pool2d

RNG = np.random.default_rng(7)


def leaf(arr, requires_grad=True):
    """A float64 (or the array's float dtype) leaf that keeps the given array, strided views included."""
    t = Tensor(np.zeros(1), requires_grad=requires_grad)
    t.data = arr
    return t


def randn(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


# ----- references ---------------------------------------------------------------------------------------------
def ref_conv2d(x, w, b, stride, pad_lo, pad_hi, dilation, groups):
    """Direct convolution: zero-pad, then for every output position an einsum over (channel, tap)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.zeros((n, c, h + pad_lo[0] + pad_hi[0], wd + pad_lo[1] + pad_hi[1]))
    xp[:, :, pad_lo[0] : pad_lo[0] + h, pad_lo[1] : pad_lo[1] + wd] = x
    oh = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    og = o // groups
    out = np.zeros((n, o, oh, ow))
    for g in range(groups):
        for i in range(oh):
            for j in range(ow):
                r0, c0 = i * stride[0], j * stride[1]
                patch = xp[
                    :,
                    g * cg : (g + 1) * cg,
                    r0 : r0 + dilation[0] * (kh - 1) + 1 : dilation[0],
                    c0 : c0 + dilation[1] * (kw - 1) + 1 : dilation[1],
                ]
                out[:, g * og : (g + 1) * og, i, j] = np.einsum("nckl,ockl->no", patch, w[g * og : (g + 1) * og])
    if b is not None:
        out += b[None, :, None, None]
    return out


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ----- conv forward -------------------------------------------------------------------------------------------
CONV2D_GRID = [
    # (N, C, H, W, O, kernel, stride, padding, dilation, groups, bias)
    (2, 4, 7, 9, 6, (3, 2), (1, 2), (1, 0), (1, 2), 2, True),
    (3, 3, 8, 8, 4, (3, 3), 1, 1, 1, 1, True),  # 3x3 stride 1: Winograd once channels allow (forced below)
    (1, 2, 5, 6, 2, (2, 3), (2, 1), (2, 1), (2, 1), 1, False),
    (2, 6, 6, 5, 3, (1, 1), 1, 0, 1, 3, True),
    (2, 16, 6, 9, 16, (3, 3), 1, 1, 1, 1, True),  # Winograd by the default rule
    (2, 4, 9, 8, 4, (3, 3), 2, 1, 2, 2, False),
    (1, 2, 4, 4, 3, (4, 4), 1, 0, 1, 1, True),  # the kernel covers the whole input
]


@pytest.mark.parametrize("case", CONV2D_GRID)
@pytest.mark.parametrize("batched", [True, False])
def test_conv2d_matches_reference(case, batched):
    n, c, h, w_, o, k, s, p, d, g, with_bias = case
    x, w = randn(n, c, h, w_), randn(o, c // g, *k)
    b = randn(o) if with_bias else None
    if not batched:
        x = x[:1]
    out = conv2d(leaf(x[0] if not batched else x), leaf(w), None if b is None else leaf(b), s, p, d, g)
    want = ref_conv2d(x, w, b, pair(s), pair(p), pair(p), pair(d), g)
    np.testing.assert_allclose(out.data, want if batched else want[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "n,c,length,o,k,s,p,d,g",
    [
        (100, 1, 40, 25, 5, 2, 1, 1, 1),  # the MNIST-1D CNN's layers
        (100, 25, 19, 25, 3, 2, 1, 1, 1),
        (3, 4, 11, 6, 3, 1, 2, 2, 2),
        (2, 3, 7, 3, 7, 1, 0, 1, 3),
    ],
)
@pytest.mark.parametrize("batched", [True, False])
def test_conv1d_matches_reference(n, c, length, o, k, s, p, d, g, batched):
    x, w, b = randn(n, c, length), randn(o, c // g, k), randn(o)
    xs = x if batched else x[0]
    out = conv1d(leaf(xs), leaf(w), leaf(b), s, p, d, g)
    want = ref_conv2d(x[:, :, None, :], w[:, :, None, :], b, (1, s), (0, p), (0, p), (1, d), g)[:, :, 0, :]
    np.testing.assert_allclose(out.data, want if batched else want[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel,dilation", [((4, 4), 1), ((3, 2), (2, 1)), ((2, 5), 1)])
def test_conv2d_same_and_valid_padding(kernel, dilation):
    x, w = randn(2, 3, 7, 8), randn(4, 3, *kernel)
    dil = pair(dilation)
    total = [dd * (kk - 1) for kk, dd in zip(kernel, dil)]
    lo = tuple(t // 2 for t in total)
    hi = tuple(t - t // 2 for t in total)  # torch puts the odd extra on the bottom/right
    same = conv2d(leaf(x), leaf(w), None, 1, "same", dilation)
    assert same.shape == (2, 4, 7, 8)
    np.testing.assert_allclose(same.data, ref_conv2d(x, w, None, (1, 1), lo, hi, dil, 1), atol=1e-10)
    valid = conv2d(leaf(x), leaf(w), None, 1, "valid", dilation)
    np.testing.assert_allclose(valid.data, ref_conv2d(x, w, None, (1, 1), (0, 0), (0, 0), dil, 1), atol=1e-10)


def test_algorithm_choice_covers_both_paths():
    """The grid above runs both algorithms: Winograd for wide-enough 3x3 stride-1 ungrouped convs."""
    fits = conv_module._winograd_fits
    assert fits((3, 3, 1, 1, 1, 1, 1, 1, 1), 16, 16, 9)  # the "default rule" grid case
    assert fits((3, 3, 1, 1, 1, 1, 1, 1, 1), 32, 64, 64)  # the benchmark's layer
    assert not fits((3, 3, 1, 1, 1, 1, 1, 1, 1), 3, 16, 32)  # too few channels
    assert not fits((3, 3, 1, 1, 1, 1, 1, 1, 1), 64, 64, 4)  # too narrow
    assert not fits((3, 3, 2, 2, 1, 1, 1, 1, 1), 64, 64, 32)  # strided
    assert not fits((3, 3, 1, 1, 1, 1, 1, 1, 2), 64, 64, 32)  # grouped


def _problem(x_shape, w_shape, geom, out_hw):
    x4, w4 = np.zeros(x_shape), np.zeros(w_shape)
    return conv_module.ConvProblem(x4, w4, None, geom, *out_hw, False)


def test_algorithm_registry_order_and_selection():
    """ALGORITHMS is the selection order: Winograd F(4x4) where it applies, F(2x2) on wide channels and narrow
    maps, the stride-2 Winograd, Pointwise for unpadded 1x1 convs on large maps, im2col (which always applies) last."""
    names = ["winograd-f4x4", "winograd-f2x2", "winograd-s2", "pointwise", "im2col"]
    assert [a.name for a in conv_module.ALGORITHMS] == names
    im2col, f2 = conv_module.ALGORITHMS[-1], conv_module.ALGORITHMS[1]
    resnet_last = _problem((32, 512, 4, 4), (512, 512, 3, 3), (3, 3, 1, 1, 1, 1, 1, 1, 1), (4, 4))
    assert conv_module.select(resnet_last) is f2
    narrow_few = _problem((32, 32, 4, 4), (32, 32, 3, 3), (3, 3, 1, 1, 1, 1, 1, 1, 1), (4, 4))
    assert conv_module.select(narrow_few) is im2col  # under _WINOGRAD2_MIN_CHANNELS
    resnet_strided = _problem((32, 256, 8, 8), (512, 256, 3, 3), (3, 3, 2, 2, 1, 1, 1, 1, 1), (4, 4))
    assert conv_module.select(resnet_strided) is im2col
    benchmark_layer = _problem((8, 32, 64, 64), (64, 32, 3, 3), (3, 3, 1, 1, 1, 1, 1, 1, 1), (64, 64))
    strided = _problem((8, 32, 64, 64), (64, 32, 3, 3), (3, 3, 2, 2, 1, 1, 1, 1, 1), (32, 32))
    mnist1d = _problem((100, 1, 1, 40), (25, 1, 1, 5), (1, 5, 1, 2, 0, 1, 1, 1, 1), (1, 19))
    assert conv_module.select(benchmark_layer) is conv_module.WINOGRAD
    assert conv_module.select(strided) is im2col
    assert conv_module.select(mnist1d) is im2col
    assert all(im2col.applies(p, conv_module.SETTINGS) for p in (benchmark_layer, strided, mnist1d))
    assert conv_module.select(benchmark_layer, conv_module.settings_now()._replace(winograd_min_width=65)) is im2col


@pytest.mark.parametrize("index", [0, 1, 4])  # 2 and 3 (stride-2 Winograd, Pointwise) have files of their own
def test_each_algorithm_alone_matches_reference(monkeypatch, index):
    """Each algorithm, made the only one, computes a conv all can take (forward and all three gradients)."""
    algorithm = conv_module.ALGORITHMS[index]
    monkeypatch.setattr(conv_module, "ALGORITHMS", (algorithm,))
    if algorithm.name == "winograd-f2x2":  # F(2x2) takes the maps F(4x4) leaves, at any channel count here
        monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_WIDTH", 100)
        monkeypatch.setattr(conv_module, "_WINOGRAD2_MIN_CHANNELS", 1)
    x, w, b = randn(2, 8, 9, 10), randn(8, 8, 3, 3), randn(8)
    assert conv_module.select(_problem(x.shape, w.shape, (3, 3, 1, 1, 1, 1, 1, 1, 1), (9, 10))) is algorithm
    out = conv2d(leaf(x), leaf(w), leaf(b), 1, 1)
    np.testing.assert_allclose(out.data, ref_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), (1, 1), 1), atol=1e-10)
    gradcheck(lambda a, ww, bb: conv2d(a, ww, bb, 1, 1), [leaf(randn(1, 8, 5, 9)), leaf(w), leaf(b)])


def test_winograd_path_forced_and_chunked_matches_reference(monkeypatch):
    """Few channels and many small chunks: the Winograd transforms' edges, odd sizes and chunk seams."""
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_WIDTH", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_TILES", 5)
    # 4x4 tiles: widths and heights off a multiple of 4, a map smaller than one tile, padding 0-3
    for n, c, h, w_, o, p in [
        (2, 3, 7, 9, 4, 1),
        (3, 2, 8, 6, 3, 0),
        (1, 3, 6, 7, 2, 2),
        (2, 2, 13, 11, 3, 1),
        (1, 2, 3, 3, 2, 1),
        (2, 3, 9, 9, 2, 3),
    ]:
        x, w, b = randn(n, c, h, w_), randn(o, c, 3, 3), randn(o)
        assert conv_module._winograd_fits((3, 3, 1, 1, p, p, 1, 1, 1), c, o, w_ + 2 * p - 2)
        out = conv2d(leaf(x), leaf(w), leaf(b), 1, p)
        np.testing.assert_allclose(out.data, ref_conv2d(x, w, b, (1, 1), (p, p), (p, p), (1, 1), 1), atol=1e-10)


def test_im2col_tiles_split_samples_and_positions(monkeypatch):
    """A tile budget smaller than one sample's columns: tiles cut output rows mid-way."""
    monkeypatch.setattr(conv_module, "_TILE_BYTES", 700)
    x, w, b = randn(3, 4, 9, 8), randn(6, 2, 3, 2), randn(6)
    out = conv2d(leaf(x), leaf(w), leaf(b), (2, 1), (1, 2), (2, 1), 2)
    np.testing.assert_allclose(out.data, ref_conv2d(x, w, b, (2, 1), (1, 2), (1, 2), (2, 1), 2), atol=1e-10)
    gradcheck(
        lambda a, ww, bb: conv2d(a, ww, bb, (2, 1), (1, 2), (2, 1), 2),
        [leaf(randn(2, 4, 5, 4)), leaf(randn(4, 2, 3, 2)), leaf(randn(4))],
    )


@pytest.mark.parametrize("winograd", [False, True])
def test_conv2d_float32_close_to_float64(winograd):
    """float32 output and gradients within 1e-4 of the largest value: Winograd F(4x4, 3x3) rounds more
    (interpolation points up to +-2) than im2col, but not by that much."""
    x, w, b = randn(2, 32, 12, 12), randn(64, 32, 3, 3) / 17, randn(64)
    stride = 1 if winograd else 2
    assert conv_module._winograd_fits((3, 3, stride, stride, 1, 1, 1, 1, 1), 32, 64, 12 // stride) == winograd
    out = conv2d(leaf(x.astype(np.float32)), leaf(w.astype(np.float32)), leaf(b.astype(np.float32)), stride, 1)
    assert out.dtype == np.float32
    want = ref_conv2d(x, w, b, (stride,) * 2, (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(out.data, want, rtol=1e-4, atol=1e-4)
    g = randn(*out.shape)
    grads = []
    for dtype in (np.float32, np.float64):
        leaves = [leaf(a.astype(dtype)) for a in (x, w, b)]
        conv2d(*leaves, stride, 1).backward(g.astype(dtype))
        grads.append([t.grad.data for t in leaves])
    for low, high in zip(*grads):
        assert low.dtype == np.float32
        np.testing.assert_allclose(low, high, rtol=0, atol=1e-4 * np.abs(high).max())


# ----- conv gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, c, o, h, w, padding",
    [
        (2, 3, 4, 4, 4, 1),
        (3, 5, 2, 5, 7, 1),
        (2, 4, 3, 6, 5, 0),
        (1, 2, 2, 3, 3, 1),
        (2, 2, 3, 2, 3, 2),
        (1, 1, 1, 1, 1, 1),
    ],
)
def test_winograd_f2x2_matches_reference_and_gradcheck(monkeypatch, n, c, o, h, w, padding):
    """F(2x2, 3x3) forced on odd sizes, partial tiles, padding 0-2 and 1x1 maps: forward against the direct
    reference, gradients against float64 finite differences, each gradient alone too."""
    monkeypatch.setattr(conv_module, "_WINOGRAD2_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_WIDTH", 100)
    x, wt, b = randn(n, c, h, w), randn(o, c, 3, 3), randn(o)
    oh, ow = h + 2 * padding - 2, w + 2 * padding - 2
    assert conv_module.select(_problem(x.shape, wt.shape, (3, 3, 1, 1, padding, padding, 1, 1, 1), (oh, ow))).name == (
        "winograd-f2x2"
    )
    out = conv2d(leaf(x), leaf(wt), leaf(b), 1, padding)
    ref = ref_conv2d(x, wt, b, (1, 1), (padding,) * 2, (padding,) * 2, (1, 1), 1)
    np.testing.assert_allclose(out.data, ref, atol=1e-10)
    gradcheck(lambda a, ww, bb: conv2d(a, ww, bb, 1, padding), [leaf(x), leaf(wt), leaf(b)])
    gradcheck(lambda ww: conv2d(leaf(x, False), ww, None, 1, padding), [leaf(wt)])
    gradcheck(lambda a: conv2d(a, leaf(wt, False), None, 1, padding), [leaf(x)])


@pytest.mark.parametrize("o, c", [(1, 1), (3, 5), (17, 300), (64, 64)])
@pytest.mark.parametrize("f", ["f2x2", "f4x4"])
def test_winograd_weight_transforms_match_the_kron_product_and_are_adjoint(o, c, f):
    """conv_kernels.winograd_weight (U = G w G^T, blocks of 256 channel pairs: 17 x 300 crosses block seams
    mid-row) equals the (r*r, 9) Kronecker product applied to every pair, and winograd_weight_grad is its exact
    adjoint (<U(w), dU> = <w, U^T(dU)>), which is what makes the weight gradient right; float64 and float32."""
    from mpnn.core import conv_kernels, conv_winograd, conv_winograd2

    mod = conv_winograd2 if f == "f2x2" else conv_winograd
    g = mod._G
    r = g.shape[0]
    gg = np.kron(g, g)
    for dtype, tol in ((np.float64, 1e-13), (np.float32, 2e-6)):
        w, du = randn(o, c, 3, 3, dtype=dtype), randn(r * r, o, c, dtype=dtype)
        u = np.full((r * r, o, c), np.nan, dtype)
        conv_kernels.winograd_weight(w, g.astype(dtype), u)
        ref = (gg @ w.astype(np.float64).reshape(o * c, 9).T).reshape(r * r, o, c)
        np.testing.assert_allclose(u, ref, rtol=0, atol=tol * np.abs(ref).max())
        dw = np.full((o, c, 3, 3), np.nan, dtype)
        conv_kernels.winograd_weight_grad(du, g.astype(dtype), dw)
        ref_dw = (du.astype(np.float64).reshape(r * r, o * c).T @ gg).reshape(o, c, 3, 3)
        np.testing.assert_allclose(dw, ref_dw, rtol=0, atol=tol * np.abs(ref_dw).max())
        if dtype == np.float64:
            assert np.isclose(np.vdot(u, du), np.vdot(w, dw), rtol=1e-12)


def test_resnet_shapes_each_path_matches_reference_float32():
    """ResNet-18's strided and small-map shapes (channels scaled down, batch 4) by the default rule, float32,
    against the float64 reference: 3x3 stride 2, 1x1 stride 2 (Pointwise on 8x8 outputs, im2col on 4x4), F(2x2) on
    4x4 maps."""
    cases = [  # (C, O, H, kernel, stride, padding, expected algorithm)
        (16, 32, 16, 3, 2, 1, "im2col"),
        (16, 32, 16, 1, 2, 0, "pointwise"),
        (16, 32, 8, 1, 2, 0, "im2col"),
        (64, 64, 4, 3, 1, 1, "winograd-f2x2"),
        (64, 64, 8, 3, 1, 1, "winograd-f4x4"),
    ]
    for c, o, h, k, s, p, name in cases:
        x, w = randn(4, c, h, h), randn(o, c, k, k) / np.sqrt(c * k * k)
        oh = (h + 2 * p - k) // s + 1
        assert conv_module.select(_problem(x.shape, w.shape, (k, k, s, s, p, p, 1, 1, 1), (oh, oh))).name == name
        xs, ws = leaf(x.astype(np.float32)), leaf(w.astype(np.float32))
        out = conv2d(xs, ws, None, s, p)
        np.testing.assert_allclose(out.data, ref_conv2d(x, w, None, (s, s), (p, p), (p, p), (1, 1), 1), atol=1e-4)
        g = randn(*out.shape)
        out.backward(g.astype(np.float32))
        x64, w64 = leaf(x), leaf(w)
        conv2d(x64, w64, None, s, p).backward(g)
        for low, high in ((xs.grad.data, x64.grad.data), (ws.grad.data, w64.grad.data)):
            assert low.dtype == np.float32
            np.testing.assert_allclose(low, high, rtol=0, atol=1e-4 * np.abs(high).max())
        # the weight's gradient is C-contiguous like the weight, so an optimizer step reads it without a copy
        assert ws.grad.data.flags.c_contiguous and ws.grad.data.shape == w.shape


@pytest.mark.parametrize(
    "n, c, o, h, w, k, s, p, g, name",
    [
        (1, 6, 8, 9, 7, 3, 2, 1, 1, "im2col"),  # batch 1, odd sizes, stride 2: one tile of one sample
        (3, 6, 4, 8, 8, 3, 2, 1, 2, "im2col"),  # groups: one product per group, several samples a tile
        (2, 8, 8, 7, 9, 3, 1, 1, 1, "winograd-f4x4"),  # odd sizes: the F(4x4) path keeps its own GEMMs
        (2, 5, 3, 5, 3, 3, 1, 1, 1, "winograd-f2x2"),  # odd channels, partial tiles
        (1, 4, 6, 4, 4, 3, 1, 0, 1, "winograd-f2x2"),  # no padding, batch 1
    ],
)
def test_conv_gemms_through_own_kernel_float32(monkeypatch, n, c, o, h, w, k, s, p, g, name):
    """The conv GEMMs routed through mpnn's own float32 kernel (conv_algorithm.gemm -> linalg._mm) even at
    tiny sizes: forward and both gradients in float32 against the float64 reference."""
    from mpnn.core import linalg

    monkeypatch.setattr(linalg, "_OWN_GEMM_MIN_FLOPS", 0)
    monkeypatch.setattr(conv_module, "_WINOGRAD2_MIN_CHANNELS", 1)
    x, wt, b = randn(n, c, h, w), randn(o, c // g, k, k) / np.sqrt(c * k * k), randn(o)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    assert conv_module.select(_problem(x.shape, wt.shape, (k, k, s, s, p, p, 1, 1, g), (oh, ow))).name == name
    x32, w32, b32 = (leaf(a.astype(np.float32)) for a in (x, wt, b))
    out = conv2d(x32, w32, b32, s, p, 1, g)
    ref = ref_conv2d(x, wt, b, (s, s), (p, p), (p, p), (1, 1), g)
    np.testing.assert_allclose(out.data, ref, atol=1e-5 * np.abs(ref).max())
    gy = randn(*out.shape)
    out.backward(gy.astype(np.float32))
    x64, w64, b64 = leaf(x), leaf(wt), leaf(b)
    conv2d(x64, w64, b64, s, p, 1, g).backward(gy)
    for low, high in ((x32, x64), (w32, w64), (b32, b64)):
        np.testing.assert_allclose(low.grad.data, high.grad.data, atol=1e-5 * np.abs(high.grad.data).max())


def test_im2col_one_sample_tiles_from_256_positions(monkeypatch):
    """Maps of >= 256 output positions take one sample a tile (the GEMM writes NCHW directly); fewer positions
    still pack several samples a tile. Float32 forward and gradients against the float64 reference, both ways."""
    from mpnn.core import conv_im2col

    plans = []
    real = conv_im2col._plan
    monkeypatch.setattr(conv_im2col, "_plan", lambda *args: plans.append(real(*args)) or plans[-1])
    for h, stride, one in ((16, 1, True), (31, 2, True), (15, 2, False)):
        x, wt, bias = randn(3, 3, h, h), randn(5, 3, 3, 3), randn(5)
        x32, w32, b32 = (leaf(v.astype(np.float32)) for v in (x, wt, bias))
        out = conv2d(x32, w32, b32, stride, 1)
        assert all((tile[1] - tile[0] == 1) == one for tile in plans[-1]), plans[-1]
        ref = ref_conv2d(x, wt, bias, (stride,) * 2, (1, 1), (1, 1), (1, 1), 1)
        np.testing.assert_allclose(out.data, ref, atol=1e-5 * np.abs(ref).max())
        gy = randn(*out.shape)
        out.backward(gy.astype(np.float32))
        x64, w64, b64 = leaf(x), leaf(wt), leaf(bias)
        conv2d(x64, w64, b64, stride, 1).backward(gy)
        for low, high in ((x32, x64), (w32, w64), (b32, b64)):
            np.testing.assert_allclose(low.grad.data, high.grad.data, atol=1e-5 * np.abs(high.grad.data).max())


def test_im2col_large_weight_takes_one_tile():
    """A weight past the tile budget gets tiles of up to twice its bytes: ResNet-18's 256->512 stride-2 conv
    at batch 32 runs as one GEMM over the whole batch (the weight streams once)."""
    from mpnn.core.conv_im2col import _plan

    per_position = (256 * 9 + 1) * 4
    budget = max(conv_module._TILE_BYTES, 2 * 512 * 256 * 9 * 4)
    assert _plan(32, per_position, 16, budget) == ((0, 32, 0, 16),)
    assert len(_plan(32, per_position, 16, conv_module._TILE_BYTES)) > 1


@pytest.mark.parametrize(
    "n, c, o, h, w, kernel, stride, padding",
    [
        (2, 3, 4, 7, 9, (3, 3), (2, 2), (1, 1)),  # odd sizes, stride 2: ResNet's strided conv
        (1, 2, 3, 5, 5, (3, 3), (1, 1), (1, 1)),  # batch 1, stride 1: the stem's geometry
        (2, 3, 2, 9, 8, (3, 3), (3, 3), (2, 2)),  # stride 3 (= kernel), padding past the first phase
        (3, 2, 3, 6, 7, (5, 3), (2, 1), (2, 0)),  # unequal kernel, stride and padding per axis
        (1, 1, 2, 4, 4, (3, 3), (2, 2), (0, 0)),  # no padding, one channel
        (2, 2, 2, 2, 3, (2, 2), (2, 2), (1, 1)),  # output wider than the input's reach, padding on both sides
    ],
)
def test_im2col_planes_path(monkeypatch, n, c, o, h, w, kernel, stride, padding):
    """The padded-plane gather and scatter (conv_kernels.im2col_planes / col2im_planes, whole-sample tiles of
    ungrouped undilated convs): columns equal im2col's bit for bit, the scatter adds what col2im adds, float64
    gradients pass gradcheck, float32 forward and gradients match the float64 reference."""
    from mpnn.core import conv_kernels

    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 10**6)
    monkeypatch.setattr(conv_module, "_WINOGRAD2_MIN_CHANNELS", 10**6)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    x = randn(n, c, h, w)
    for dtype in (np.float64, np.float32):
        xd = x.astype(dtype)
        a = np.full((c * kh * kw + 1, n, oh * ow), np.nan, dtype)
        b = np.full_like(a, np.nan)
        conv_kernels.im2col(xd, kh, kw, sh, sw, ph, pw, 1, 1, 1, 0, ow, a)
        conv_kernels.im2col_planes(xd, kh, kw, sh, sw, ph, pw, ow, b)
        np.testing.assert_array_equal(a, b)
        # col2im_planes adds the same sums into dx as col2im (the adjoint, up to the order of the additions)
        cols = randn(c * kh * kw, n, oh * ow).astype(dtype)
        dx1, dx2 = (np.full(x.shape, 0.5, dtype) for _ in range(2))
        conv_kernels.col2im(cols, kh, kw, sh, sw, ph, pw, 1, 1, 1, 0, ow, dx1)
        conv_kernels.col2im_planes(cols, kh, kw, sh, sw, ph, pw, ow, dx2)
        np.testing.assert_allclose(dx1, dx2, rtol=1e-6, atol=1e-6)
    calls = []
    for name in ("im2col_planes", "col2im_planes"):
        real = getattr(conv_kernels, name)
        monkeypatch.setattr(conv_kernels, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    wt, bias = randn(o, c, kh, kw), randn(o)
    gradcheck(lambda a, ww, bb: conv2d(a, ww, bb, stride, padding), [leaf(x), leaf(wt), leaf(bias)])
    assert set(calls) == {"im2col_planes", "col2im_planes"}, "the conv did not take the padded-plane kernels"
    x32, w32, b32 = (leaf(v.astype(np.float32)) for v in (x, wt, bias))
    out = conv2d(x32, w32, b32, stride, padding)
    ref = ref_conv2d(x, wt, bias, stride, padding, padding, (1, 1), 1)
    np.testing.assert_allclose(out.data, ref, atol=1e-5 * np.abs(ref).max())
    gy = randn(*out.shape)
    out.backward(gy.astype(np.float32))
    x64, w64, b64 = leaf(x), leaf(wt), leaf(bias)
    conv2d(x64, w64, b64, stride, padding).backward(gy)
    for low, high in ((x32, x64), (w32, w64), (b32, b64)):
        np.testing.assert_allclose(low.grad.data, high.grad.data, atol=1e-5 * np.abs(high.grad.data).max())


def test_conv2d_gradcheck_im2col_with_groups_stride_dilation():
    gradcheck(
        lambda a, w, b: conv2d(a, w, b, (2, 1), (1, 2), (1, 2), 2),
        [leaf(randn(2, 4, 5, 6)), leaf(randn(4, 2, 3, 2)), leaf(randn(4))],
    )


def test_conv2d_gradcheck_winograd(monkeypatch):
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_WIDTH", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_TILES", 4)
    gradcheck(lambda a, w, b: conv2d(a, w, b, 1, 1), [leaf(randn(2, 2, 5, 6)), leaf(randn(3, 2, 3, 3)), leaf(randn(3))])
    gradcheck(lambda a, w: conv2d(a, w, None, 1, 0), [leaf(randn(1, 2, 6, 5)), leaf(randn(2, 2, 3, 3))])
    gradcheck(lambda a, w: conv2d(a, w, None, 1, 2), [leaf(randn(1, 1, 3, 2)), leaf(randn(1, 1, 3, 3))])


def test_conv2d_gradcheck_winograd_default_rule():
    """8 channels, maps 9-10 wide: Winograd by the default rule, with partial 4x4 tiles on both edges
    and several tile rows per chunk; then each of input, weight and bias alone."""
    assert conv_module._winograd_fits((3, 3, 1, 1, 1, 1, 1, 1, 1), 8, 8, 10)
    gradcheck(
        lambda a, w, b: conv2d(a, w, b, 1, 1), [leaf(randn(2, 8, 9, 10)), leaf(randn(8, 8, 3, 3)), leaf(randn(8))]
    )
    x, w, b = randn(1, 8, 10, 9), randn(8, 8, 3, 3), randn(8)
    gradcheck(lambda ww: conv2d(leaf(x, False), ww, leaf(b, False), 1, 1), [leaf(w)])
    gradcheck(lambda a, bb: conv2d(a, leaf(w, False), bb, 1, 1), [leaf(x), leaf(b)])
    gradcheck(lambda bb: conv2d(leaf(x, False), leaf(w, False), bb, 1, 1), [leaf(b)])


def test_conv2d_gradcheck_winograd_multirow_chunks(monkeypatch):
    """F(4x4) chunks of several tile rows with three tiles a row, the last chunk shorter: slots go column by
    column within a chunk (the junk slots last, left out of the GEMMs), so a mix-up of rows, slots or chunk
    seams shows here; float64 finite differences for input, weight and bias, and the forward against the
    direct reference."""
    from mpnn.core import conv_winograd

    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_TILES", 9)  # 9 // (3 tiles + 1 junk slot) = 2 rows a chunk
    for n, c, h, w_, o, rows in [(1, 2, 11, 9, 3, [2, 1]), (2, 3, 9, 10, 2, [2, 2, 2])]:
        _, tiles_w, chunks = conv_winograd._winograd_chunks(n, h, w_, 9)
        assert tiles_w == 3 and [r for _, r in chunks] == rows
        x, wt, b = randn(n, c, h, w_), randn(o, c, 3, 3), randn(o)
        out = conv2d(leaf(x), leaf(wt), leaf(b), 1, 1)
        np.testing.assert_allclose(out.data, ref_conv2d(x, wt, b, (1, 1), (1, 1), (1, 1), (1, 1), 1), atol=1e-10)
        gradcheck(lambda a, ww, bb: conv2d(a, ww, bb, 1, 1), [leaf(x), leaf(wt), leaf(b)])


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("n, h", [(7, 13), (20, 6)])
def test_conv2d_gradcheck_winograd_long_chunks(monkeypatch, padding, n, h):
    """Chunks of at least conv_kernels._GATHER_BY_TILE_ROWS tile rows, where the F(4x4) transforms' gathers
    and scatters run over the tile rows innermost (a chunk starts mid-image, the last one is shorter, tile
    rows at the top and bottom edges have patch rows outside the input, and the width is off a multiple of
    4), in one pass (13 rows high: 4 tile rows an image) or in blocks of 8 tile rows (6 high, 2 tile rows an
    image: more than 8 images a chunk): float64 finite differences for input, weight and bias, and the
    forward against the direct reference."""
    from mpnn.core import conv_kernels, conv_winograd

    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    c, w_, o = 2, 10, 3
    oh, ow = h + 2 * padding - 2, w_ + 2 * padding - 2
    slots = (ow + 3) // 4 + 1
    monkeypatch.setattr(conv_module, "_WINOGRAD_TILES", 17 * slots)  # 17 tile rows a chunk
    _, _, chunks = conv_winograd._winograd_chunks(n, oh, ow, 17 * slots)
    rows = [r for _, r in chunks]
    assert rows[0] >= conv_kernels._GATHER_BY_TILE_ROWS and len(rows) >= 2 and rows[-1] < rows[0]
    x, wt, b = randn(n, c, h, w_), randn(o, c, 3, 3), randn(o)
    out = conv2d(leaf(x), leaf(wt), leaf(b), 1, padding)
    ref = ref_conv2d(x, wt, b, (1, 1), (padding, padding), (padding, padding), (1, 1), 1)
    np.testing.assert_allclose(out.data, ref, atol=1e-10)
    gradcheck(lambda a, ww, bb: conv2d(a, ww, bb, 1, padding), [leaf(x), leaf(wt), leaf(b)])


def test_conv2d_gradcheck_noncontiguous_unbatched_and_size_one_dims():
    transposed = randn(2, 3, 6, 5).transpose(0, 1, 3, 2)  # (2, 3, 5, 6) strided view
    assert not transposed.flags.c_contiguous
    gradcheck(lambda a, w: conv2d(a, w, None, 1, 1), [leaf(transposed), leaf(randn(2, 3, 3, 3))])
    gradcheck(
        lambda a, w, b: conv2d(a, w, b, 1, "same"), [leaf(randn(2, 4, 5)), leaf(randn(3, 2, 2, 2)), leaf(randn(3))]
    )
    gradcheck(lambda a, w, b: conv2d(a, w, b), [leaf(randn(1, 1, 1, 4)), leaf(randn(1, 1, 1, 2)), leaf(randn(1))])


def test_conv2d_gradients_with_some_inputs_frozen():
    """Only the weight (bias frozen: the kept columns' bias row is dropped), then only input and bias."""
    x, w, b = randn(3, 2, 4, 5), randn(4, 2, 3, 3), randn(4)
    gradcheck(lambda ww: conv2d(leaf(x, False), ww, leaf(b, False), 1, 1), [leaf(w)])
    gradcheck(lambda a, bb: conv2d(a, leaf(w, False), bb, 2, 1), [leaf(x), leaf(b)])


def test_conv1d_gradcheck():
    gradcheck(lambda a, w, b: conv1d(a, w, b, 2, 1, 2, 2), [leaf(randn(2, 4, 9)), leaf(randn(6, 2, 3)), leaf(randn(6))])
    gradcheck(lambda a, w, b: conv1d(a, w, b, 2, 1), [leaf(randn(3, 8)), leaf(randn(2, 3, 5)), leaf(randn(2))])
    strided = randn(7, 3).T  # (3, 7) unbatched, non-contiguous
    gradcheck(lambda a, w: conv1d(a, w, None, 1, "same"), [leaf(strided), leaf(randn(2, 3, 4))])


# ----- pooling ------------------------------------------------------------------------------------------------
def ref_pool2d(x, kernel, stride, padding, dilation, ceil_mode, reduce):
    """Windows by PyTorch's output-size rule; reduce(values, taps_in_padded_input) per window."""
    n, c, h, w = x.shape
    sizes = []
    for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation):
        out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        sizes.append(out)
    out = np.zeros((n, c, *sizes))
    for i in range(sizes[0]):
        for j in range(sizes[1]):
            rows = [i * stride[0] - padding[0] + t * dilation[0] for t in range(kernel[0])]
            cols = [j * stride[1] - padding[1] + t * dilation[1] for t in range(kernel[1])]
            inside = [(r, q) for r in rows for q in cols if 0 <= r < h and 0 <= q < w]
            vals = np.stack([x[:, :, r, q] for r, q in inside], axis=-1)
            out[:, :, i, j] = reduce(vals, rows, cols)
    return out


def avg_reduce(kernel, stride, padding, h, w, count_include_pad, divisor_override=None):
    def reduce(vals, rows, cols):
        if divisor_override:
            return vals.sum(-1) / divisor_override
        if count_include_pad:  # the window clipped to the padded input
            nr = min(rows[-1] + 1, h + padding[0]) - rows[0]
            nc = min(cols[-1] + 1, w + padding[1]) - cols[0]
            return vals.sum(-1) / (nr * nc)
        return vals.mean(-1)

    return reduce


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,ceil_mode",
    [
        ((2, 2), (2, 2), (0, 0), (1, 1), False),
        ((3, 3), (2, 2), (1, 1), (1, 1), False),
        ((3, 2), (2, 1), (1, 1), (2, 1), False),
        ((3, 3), (2, 2), (0, 0), (1, 1), True),
        ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ],
)
def test_max_pool2d_matches_reference_with_ties(kernel, stride, padding, dilation, ceil_mode):
    x = leaf(np.round(randn(2, 3, 9, 8)))  # many ties
    out, idx = max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    want = ref_pool2d(x.data, kernel, stride, padding, dilation, ceil_mode, lambda v, r, c: v.max(-1))
    np.testing.assert_array_equal(out.data, want)
    # each index points at a maximum, the first one in window order (row-major), and only it gets gradient
    plane = x.data.reshape(2, 3, -1)
    flat_idx = idx.data.reshape(2, 3, -1)
    np.testing.assert_array_equal(np.take_along_axis(plane, flat_idx, -1), want.reshape(2, 3, -1))
    h, w = x.shape[2:]
    for nn, cc, i, j in np.ndindex(*out.shape):
        r0, c0 = i * stride[0] - padding[0], j * stride[1] - padding[1]
        taps = [(r0 + a * dilation[0], c0 + b * dilation[1]) for a in range(kernel[0]) for b in range(kernel[1])]
        inside = [(r, q) for r, q in taps if 0 <= r < h and 0 <= q < w]
        maxima = [r * w + q for r, q in inside if x.data[nn, cc, r, q] == want[nn, cc, i, j]]
        assert idx.data[nn, cc, i, j] == maxima[0]
    g = randn(*out.shape)
    out.backward(g)
    expect = np.zeros_like(plane)
    for nn in range(2):
        for cc in range(3):
            np.add.at(expect[nn, cc], flat_idx[nn, cc], g[nn, cc].ravel())
    np.testing.assert_allclose(x.grad.data, expect.reshape(x.shape))


def test_max_pool_first_maximum_wins_ties():
    x = leaf(np.array([[[[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]]]]))
    out, idx = max_pool2d(x, (2, 3), return_indices=True)
    assert out.data.ravel().tolist() == [3.0] and idx.data.ravel().tolist() == [1]
    out.backward(np.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(x.grad.data, [[[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]])
    y = leaf(np.array([[2.0, 5.0, 5.0, 1.0, 5.0]]))
    out1, idx1 = max_pool1d(y, 3, 2, 1, return_indices=True)
    assert out1.data.tolist() == [[5.0, 5.0, 5.0]] and idx1.data.tolist() == [[1, 1, 4]]


@pytest.mark.parametrize(
    "kernel,stride,padding,ceil_mode,count_include_pad,divisor",
    [
        ((2, 2), (2, 2), (0, 0), False, True, None),
        ((3, 3), (2, 2), (1, 1), False, True, None),
        ((3, 3), (2, 2), (1, 1), False, False, None),
        ((3, 3), (2, 2), (1, 1), True, True, None),  # the last window hangs past the padding
        ((3, 2), (2, 1), (1, 1), True, False, None),
        ((3, 2), (1, 2), (0, 1), False, True, 5),
    ],
)
def test_avg_pool2d_matches_reference(kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    x = randn(2, 3, 9, 8)
    out = avg_pool2d(leaf(x), kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    reduce = avg_reduce(kernel, stride, padding, 9, 8, count_include_pad, divisor)
    np.testing.assert_allclose(out.data, ref_pool2d(x, kernel, stride, padding, (1, 1), ceil_mode, reduce), rtol=1e-12)


def test_pool1d_match_reference_and_unbatched():
    x = randn(2, 3, 11)
    x4 = x[:, :, None, :]
    out = max_pool1d(leaf(x), 3, 2, 1, 2, True)
    want = ref_pool2d(x4, (1, 3), (1, 2), (0, 1), (1, 2), True, lambda v, r, c: v.max(-1))[:, :, 0]
    np.testing.assert_array_equal(out.data, want)
    out = avg_pool1d(leaf(x), 4, 3, 2, True, False)
    reduce = avg_reduce((1, 4), (1, 3), (0, 2), 1, 11, False)
    np.testing.assert_allclose(out.data, ref_pool2d(x4, (1, 4), (1, 3), (0, 2), (1, 1), True, reduce)[:, :, 0])
    np.testing.assert_array_equal(max_pool1d(leaf(x[0]), 2).data, max_pool1d(leaf(x), 2).data[0])
    np.testing.assert_array_equal(max_pool2d(leaf(x4[0]), (1, 2), 1).data, max_pool2d(leaf(x4), (1, 2), 1).data[0])
    np.testing.assert_allclose(avg_pool2d(leaf(x4[1]), (1, 3)).data, avg_pool2d(leaf(x4), (1, 3)).data[1])


@pytest.mark.parametrize("output_size", [1, 3, (4, 5), (None, 3), (9, 8), (12, 11), (7, None)])
def test_adaptive_avg_pool2d_matches_reference(output_size):
    x = randn(2, 3, 9, 8)
    sizes = pair(output_size)
    oh, ow = (9 if sizes[0] is None else sizes[0]), (8 if sizes[1] is None else sizes[1])
    want = np.zeros((2, 3, oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, r1 = (i * 9) // oh, -((-(i + 1) * 9) // oh)
            c0, c1 = (j * 8) // ow, -((-(j + 1) * 8) // ow)
            want[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    np.testing.assert_allclose(adaptive_avg_pool2d(leaf(x), output_size).data, want, rtol=1e-12)
    np.testing.assert_allclose(adaptive_avg_pool2d(leaf(x[0]), output_size).data, want[0], rtol=1e-12)


def distinct(*shape):
    """Values at least 0.01 apart, shuffled: no ties, so a max's finite differences stay in one window."""
    return RNG.permutation(np.arange(np.prod(shape)) * 0.01 + 0.3).reshape(shape)


def test_pool_gradchecks():
    gradcheck(lambda a: max_pool2d(a, 3, 2, 1, 1, True), [leaf(distinct(2, 2, 5, 6))])
    gradcheck(lambda a: max_pool2d(a, (2, 2), 1, 0, (2, 1)), [leaf(distinct(1, 2, 5, 4).transpose(0, 1, 3, 2))])
    gradcheck(lambda a: max_pool1d(a, 2), [leaf(distinct(3, 7))])
    gradcheck(lambda a: avg_pool2d(a, 3, 2, 1, True, False), [leaf(randn(2, 2, 5, 6))])
    gradcheck(lambda a: avg_pool2d(a, (2, 3), 1, (1, 0), False, True, 4), [leaf(randn(1, 1, 4, 5))])
    gradcheck(lambda a: avg_pool1d(a, 3, 2, 1, True, True), [leaf(randn(2, 3, 8).transpose(1, 0, 2))])
    gradcheck(lambda a: adaptive_avg_pool2d(a, (3, 4)), [leaf(randn(2, 5, 7))])
    gradcheck(lambda a: adaptive_avg_pool2d(a, 1), [leaf(randn(1, 2, 1, 3))])


# ----- pad ----------------------------------------------------------------------------------------------------
NUMPY_MODE = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "shape,widths",
    [
        ((2, 3, 5), (2, 3)),
        ((2, 3, 4, 5), (1, 2, 3, 1)),
        ((3, 4, 5), (0, 2, 1, 1)),
        ((1, 2, 3, 4, 5), (1, 2, 2, 1, 1, 1)),
    ],
)
def test_pad_matches_numpy(mode, shape, widths):
    x = randn(*shape)
    pairs = [(widths[2 * i], widths[2 * i + 1]) for i in reversed(range(len(widths) // 2))]
    numpy_widths = [(0, 0)] * (len(shape) - len(pairs)) + pairs
    kwargs = {"constant_values": 1.5} if mode == "constant" else {}
    out = pad(leaf(x), widths, mode, 1.5 if mode == "constant" else None)
    np.testing.assert_array_equal(out.data, np.pad(x, numpy_widths, NUMPY_MODE[mode], **kwargs))
    gradcheck(lambda a: pad(a, widths, mode), [leaf(randn(*shape))])


def test_pad_negative_widths_crop():
    x = randn(2, 4, 6)
    np.testing.assert_array_equal(pad(leaf(x), (-1, 2, 1, -2)).data, np.pad(x[:, :2, 1:], [(0, 0), (1, 0), (0, 2)]))
    row = leaf(np.arange(5.0)[None, None])
    assert pad(row, (-1, 2), "circular").data.ravel().tolist() == [1, 2, 3, 4, 1, 2]
    assert pad(row, (2, -1), "reflect").data.ravel().tolist() == [2, 1, 0, 1, 2, 3]
    gradcheck(lambda a: pad(a, (-1, 2), "circular"), [leaf(randn(2, 3, 5))])
    gradcheck(lambda a: pad(a, (2, -1, -1, 1)), [leaf(randn(1, 3, 4))])


# ----- bad input ----------------------------------------------------------------------------------------------
def raises(fn, *parts):
    with pytest.raises(OpError) as info:
        fn()
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_conv_bad_input_errors():
    x, w = leaf(randn(2, 4, 6, 6)), leaf(randn(8, 4, 3, 3))
    raises(lambda: conv2d(leaf(randn(4, 6)), w), "conv2d", "(4, 6)")
    raises(lambda: conv2d(x, leaf(randn(8, 4, 3))), "conv2d", "weight", "(8, 4, 3)")
    raises(lambda: conv2d(x, leaf(randn(8, 3, 3, 3))), "conv2d", "(2, 4, 6, 6)", "(8, 3, 3, 3)", "channels")
    raises(lambda: conv2d(x, leaf(randn(9, 2, 3, 3)), groups=2), "conv2d", "groups=2", "9")
    raises(lambda: conv2d(x, leaf(randn(8, 2, 3, 3)), groups=3), "conv2d", "groups=3")
    raises(lambda: conv2d(x, leaf(randn(8, 4, 7, 7))), "conv2d", "(7, 7)", "(2, 4, 6, 6)")
    raises(lambda: conv2d(x, leaf(randn(8, 4, 4, 4)), dilation=2, padding=0), "conv2d", "dilation")
    raises(lambda: conv2d(leaf(np.ones((2, 4, 6, 6), np.int64), False), w), "conv2d", "int64", "float32")
    raises(lambda: conv2d(leaf(randn(2, 4, 6, 6, dtype=np.float32)), w), "conv2d", "float32", "float64")
    raises(lambda: conv2d(x, w, leaf(randn(4))), "conv2d", "bias", "(4,)")
    raises(lambda: conv2d(x, w, stride=0), "conv2d", "stride")
    raises(lambda: conv2d(x, w, stride=(1, 2, 3)), "conv2d", "stride", "(1, 2, 3)")
    raises(lambda: conv2d(x, w, stride=2, padding="same"), "conv2d", "same", "stride")
    raises(lambda: conv2d(x, w, padding="full"), "conv2d", "full")
    raises(lambda: conv1d(leaf(randn(2, 4, 6, 6)), leaf(randn(8, 4, 3))), "conv1d", "(N, C, L)", "(2, 4, 6, 6)")
    raises(lambda: conv1d(leaf(randn(4, 2)), leaf(randn(8, 4, 3))), "conv1d", "(4, 2)")


def test_pool_and_pad_bad_input_errors():
    x = leaf(randn(2, 3, 6, 6))
    raises(lambda: max_pool2d(leaf(randn(6, 6)), 2), "max_pool2d", "(6, 6)")
    raises(lambda: max_pool2d(x, 2, padding=2), "max_pool2d", "half the kernel")
    raises(lambda: max_pool2d(x, 7), "max_pool2d", "too small", "(2, 3, 6, 6)")
    raises(lambda: avg_pool2d(leaf(np.ones((2, 3, 6, 6), np.int32), False), 2), "avg_pool2d", "int32")
    raises(lambda: avg_pool2d(x, 2, divisor_override=0), "avg_pool2d", "divisor_override")
    raises(lambda: avg_pool1d(x, 2), "avg_pool1d", "(2, 3, 6, 6)")
    raises(lambda: max_pool1d(leaf(randn(2, 3, 5)), 0), "max_pool1d", "kernel_size")
    raises(lambda: adaptive_avg_pool2d(x, (2, -1)), "adaptive_avg_pool2d", "output_size")
    raises(lambda: pad(x, (1, 2, 3)), "pad", "even")
    raises(lambda: pad(leaf(randn(3)), (1, 1, 1, 1)), "pad", "(3,)")
    raises(lambda: pad(x, (6, 0, 0, 0), "reflect"), "pad", "reflect", "smaller", "(2, 3, 6, 6)")
    raises(lambda: pad(x, (7, 0, 0, 0), "circular"), "pad", "circular", "at most")
    raises(lambda: pad(x, (1, 1), "mirror"), "pad", "mirror")
    raises(lambda: pad(x, (1, 1, 1, 1), "reflect", 2.0), "pad", "value")
    raises(lambda: pad(leaf(randn(5)), (1, 1), "replicate"), "pad", "replicate", "(5,)")
    raises(lambda: pad(x, (-4, -3)), "pad", "size -1")


@pytest.mark.parametrize(
    "c, k, s, p",
    [
        (64, 3, 1, 1),  # Winograd F(4x4) (its backward indexed the first of no chunks)
        (64, 3, 2, 1),  # the stride-2 Winograd (its weight gradient was left unwritten)
        (4, 3, 1, 1),  # im2col (likewise)
        (64, 1, 2, 0),  # Pointwise
    ],
)
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(c, k, s, p):
    """A batch of 0 samples, as torch: an empty output, zero weight and bias gradients, an empty input gradient;
    nothing left unwritten (the gradients are checked to be exact zeros, not whatever np.empty held)."""
    x = leaf(np.zeros((0, c, 16, 16), np.float32))
    w = leaf(RNG.standard_normal((8, c, k, k)).astype(np.float32))
    b = leaf(RNG.standard_normal(8).astype(np.float32))
    out = conv2d(x, w, b, s, p)
    oh = (16 + 2 * p - k) // s + 1
    assert out.shape == (0, 8, oh, oh)
    (out * 2.0).sum().backward()
    assert x.grad.shape == x.shape
    np.testing.assert_array_equal(w.grad.data, np.zeros(w.shape, np.float32))
    np.testing.assert_array_equal(b.grad.data, np.zeros(8, np.float32))


def test_no_input_channels_gives_the_bias():
    """A conv over zero input channels sums nothing: its output is the bias, its bias gradient the summed output
    gradient; conv1d too."""
    x = leaf(np.zeros((2, 0, 5, 6)))
    w, b = leaf(np.zeros((3, 0, 3, 3))), leaf(np.array([1.0, -2.0, 0.5]))
    out = conv2d(x, w, b, 1, 1)
    np.testing.assert_array_equal(out.data, np.broadcast_to(b.data.reshape(1, 3, 1, 1), (2, 3, 5, 6)))
    g = RNG.standard_normal(out.shape)
    out.backward(g)
    np.testing.assert_allclose(b.grad.data, g.sum(axis=(0, 2, 3)))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and not np.abs(w.grad.data).any()
    out1 = conv1d(leaf(np.zeros((0, 2, 7))), leaf(np.ones((4, 2, 3))), None, 1, 1)
    assert out1.shape == (0, 4, 7)
