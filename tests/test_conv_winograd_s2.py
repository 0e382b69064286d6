"""The stride-2 Winograd conv (mpnn/core/conv_winograd_s2.py): forward against a direct float64 reference on odd
shapes and chunk seams, float64 finite-difference gradients, the weight transform against its float64 definition
(and its adjoint), and which convs the selection hands it."""

import numpy as np
import pytest

from mpnn.core import conv as conv_module
from mpnn.core import conv_winograd_s2, conv_winograd_s2_kernels, gradcheck, no_grad
from mpnn.core.conv import conv2d
from test_conv_pool import leaf

RNG = np.random.default_rng(11)
GEOM = (3, 3, 2, 2, 1, 1, 1, 1, 1)


def randn(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


def ref_conv_s2(x, w, b):
    """3x3, stride 2, padding 1, in float64: one einsum per kernel tap."""
    n, c, h, wd = x.shape
    oh, ow = (h - 1) // 2 + 1, (wd - 1) // 2 + 1
    xp = np.zeros((n, c, h + 2, wd + 2))
    xp[:, :, 1 : h + 1, 1 : wd + 1] = x
    out = np.zeros((n, w.shape[0], oh, ow))
    for a in range(3):
        for e in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, a : a + 2 * oh : 2, e : e + 2 * ow : 2], w[:, :, a, e])
    return out if b is None else out + b[:, None, None]


def _problem(x_shape, w_shape, geom, out_hw):
    return conv_module.ConvProblem(np.zeros(x_shape), np.zeros(w_shape), None, geom, *out_hw, False)


@pytest.fixture
def forced(monkeypatch):
    """The stride-2 Winograd for any channel count and width, in chunks of 5 tiles (one or two images)."""
    monkeypatch.setattr(conv_module, "_WINOGRAD_S2_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_S2_MIN_WIDTH", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_S2_TILES", 5)


SHAPES = [  # (n, c, o, h, w): odd and even sizes, partial tiles, a map smaller than one tile, batch 1 and 3
    (1, 5, 3, 9, 9),
    (3, 7, 4, 10, 13),
    (3, 6, 5, 17, 8),
    (1, 3, 2, 1, 2),
    (2, 9, 4, 16, 15),
    (3, 2, 3, 24, 7),
]


@pytest.mark.parametrize("n, c, o, h, w", SHAPES)
def test_forward_matches_direct_reference(forced, n, c, o, h, w):
    """float64 to 1e-12 of the largest output, float32 to 1e-5 (it measured 1-3e-6), with and without a weight
    that wants a gradient (forward keeps its transformed input then), with and without bias."""
    x, wt, b = randn(n, c, h, w), randn(o, c, 3, 3), randn(o)
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    assert conv_module.select(_problem(x.shape, wt.shape, GEOM, (oh, ow))).name == "winograd-s2"
    ref = ref_conv_s2(x, wt, b)
    scale = np.abs(ref).max()
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        xs, ws, bs = (a.astype(dtype) for a in (x, wt, b))
        out = conv2d(leaf(xs), leaf(ws), leaf(bs), 2, 1)
        assert out.data.dtype == dtype
        np.testing.assert_allclose(out.data, ref, rtol=0, atol=tol * scale)
        with no_grad():
            out = conv2d(leaf(xs), leaf(ws), None, 2, 1)
        np.testing.assert_allclose(out.data, ref - b[:, None, None], rtol=0, atol=tol * scale)


@pytest.mark.parametrize("n, c, o, h, w", [(1, 5, 3, 9, 9), (3, 2, 3, 10, 7), (2, 3, 2, 5, 12)])
def test_gradcheck_float64(forced, n, c, o, h, w):
    """dx, dw and db against float64 finite differences, all together and each alone."""
    x, wt, b = randn(n, c, h, w), randn(o, c, 3, 3), randn(o)
    gradcheck(lambda a, ww, bb: conv2d(a, ww, bb, 2, 1), [leaf(x), leaf(wt), leaf(b)])
    gradcheck(lambda ww: conv2d(leaf(x, False), ww, None, 2, 1), [leaf(wt)])
    gradcheck(lambda a: conv2d(a, leaf(wt, False), None, 2, 1), [leaf(x)])
    gradcheck(lambda bb: conv2d(leaf(x, False), leaf(wt, False), bb, 2, 1), [leaf(b)])


def test_backward_recomputes_what_forward_did_not_keep():
    """A forward that kept nothing (no weight gradient expected) still gives the right dw in backward, chunked."""
    x, wt = randn(3, 4, 11, 9), randn(5, 4, 3, 3)
    g = randn(3, 5, 6, 5)
    algorithm = conv_winograd_s2.WinogradS2()
    settings = conv_module.settings_now()._replace(winograd_s2_tiles=7)
    problem = conv_module.ConvProblem(x, wt, None, GEOM, 6, 5, False)
    out = np.empty((3, 5, 6, 5))
    state = algorithm.forward(problem, out, settings)
    dx, dw, db = algorithm.backward(state, g, True, True, False)
    xt, wtt = leaf(x), leaf(wt)
    with conv_module_only(conv_module.ALGORITHMS[-1]):
        conv2d(xt, wtt, None, 2, 1).backward(g)
    assert db is None
    np.testing.assert_allclose(dx, xt.grad.data, rtol=0, atol=1e-12 * np.abs(xt.grad.data).max())
    np.testing.assert_allclose(dw, wtt.grad.data, rtol=0, atol=1e-12 * np.abs(wtt.grad.data).max())


class conv_module_only:
    """Run conv2d through one algorithm inside a with block."""

    def __init__(self, algorithm):
        self.algorithm = algorithm

    def __enter__(self):
        self.saved = conv_module.ALGORITHMS
        conv_module.ALGORITHMS = (self.algorithm,)

    def __exit__(self, *exc):
        conv_module.ALGORITHMS = self.saved


@pytest.mark.parametrize("o, c", [(1, 1), (3, 5), (7, 64)])
def test_weight_transform_matches_definition_and_is_adjoint(o, c):
    """weight_transform against U[t] = (G g G^T) of each phase's 2x2 kernel built in float64 from its definition
    (the phases' channels left out where a point drops them), and weight_grad its exact adjoint."""
    k = conv_winograd_s2_kernels
    slot, rows = k.slots()
    taps, coef = k.weight_coefficients()
    g = np.array([[0.5, 0.0], [-0.5, -0.5], [-1 / 6, 1 / 6], [1 / 6, 1 / 3], [0.0, 1.0]])
    for dtype, tol in ((np.float64, 1e-14), (np.float32, 2e-7)):
        w = randn(o, c, 3, 3, dtype=dtype)
        u = np.full(81 * o * c, np.nan, dtype)
        k.weight_transform(w, slot, rows, taps, coef, u)
        w64 = w.astype(np.float64)
        for f in range(4):
            p, q = divmod(f, 2)
            w2 = np.zeros((o, c, 2, 2))
            for i in range(2):
                for j in range(2):
                    if 2 * i + p <= 2 and 2 * j + q <= 2:
                        w2[:, :, i, j] = w64[:, :, 2 * i + p, 2 * j + q]
            full = np.einsum("ai,ocij,bj->aboc", g, w2, g).reshape(25, o, c)
            for t in range(25):
                kt = c * (rows[t + 1] - rows[t])
                block = u[o * c * rows[t] : o * c * rows[t] + o * kt].reshape(o, kt)
                if slot[t, f] < 0:
                    assert np.abs(full[t]).max() == 0  # a point leaves out only phases it maps to 0
                    continue
                got = block[:, slot[t, f] * c : (slot[t, f] + 1) * c]
                np.testing.assert_allclose(got, full[t], rtol=0, atol=tol * np.abs(full).max())
        assert not np.isnan(u).any()
        if dtype == np.float64:
            du = randn(81 * o * c)
            dw = np.full((o, c, 3, 3), np.nan)
            k.weight_grad(du, slot, rows, taps, coef, dw)
            assert np.isclose(np.vdot(u, du), np.vdot(w, dw), rtol=1e-12)


def test_selection_takes_resnet_stride2_shapes_only():
    """Default rule: ResNet-18's 3x3 stride-2 convs on 32x32 and 16x16 inputs take winograd-s2; its 8x8 one (a 4x4
    output, one tile an image) and other geometries do not."""
    s2 = [a for a in conv_module.ALGORITHMS if a.name == "winograd-s2"][0]
    for c, o, h in ((64, 128, 32), (128, 256, 16)):
        assert conv_module.select(_problem((32, c, h, h), (o, c, 3, 3), GEOM, (h // 2, h // 2))) is s2
    names = {
        "narrow": ((32, 256, 8, 8), (512, 256, 3, 3), GEOM, (4, 4)),
        "few channels": ((32, 32, 32, 32), (64, 32, 3, 3), GEOM, (16, 16)),
        "stride 1": ((32, 64, 32, 32), (64, 64, 3, 3), (3, 3, 1, 1, 1, 1, 1, 1, 1), (32, 32)),
        "dilation 2": ((32, 64, 32, 32), (128, 64, 3, 3), (3, 3, 2, 2, 2, 2, 2, 2, 1), (16, 16)),
        "groups 2": ((32, 64, 32, 32), (128, 32, 3, 3), (3, 3, 2, 2, 1, 1, 1, 1, 2), (16, 16)),
        "padding 0": ((32, 64, 33, 33), (128, 64, 3, 3), (3, 3, 2, 2, 0, 0, 1, 1, 1), (16, 16)),
        "5x5": ((32, 64, 32, 32), (128, 64, 5, 5), (5, 5, 2, 2, 2, 2, 1, 1, 1), (16, 16)),
        "stride (2, 1)": ((32, 64, 32, 32), (128, 64, 3, 3), (3, 3, 2, 1, 1, 1, 1, 1, 1), (16, 32)),
    }
    for label, args in names.items():
        assert conv_module.select(_problem(*args)).name != "winograd-s2", label


def test_resnet_shape_float32_against_float64():
    """ResNet-18's 128->256 16x16 stride-2 layer (batch 2) by the default rule in float32: forward and gradients
    against float64 im2col (im2col's float32 error there: ~5e-7 of the largest value; this one's ~4e-6, as
    F(4x4, 3x3)'s)."""
    x, w = randn(2, 128, 16, 16), randn(256, 128, 3, 3) / np.sqrt(128 * 9)
    assert conv_module.select(_problem(x.shape, w.shape, GEOM, (8, 8))).name == "winograd-s2"
    xs, ws = leaf(x.astype(np.float32)), leaf(w.astype(np.float32))
    out = conv2d(xs, ws, None, 2, 1)
    ref = ref_conv_s2(x, w, None)
    np.testing.assert_allclose(out.data, ref, rtol=0, atol=2e-5 * np.abs(ref).max())  # measured 3-5e-6
    g = randn(*out.shape)
    out.backward(g.astype(np.float32))
    x64, w64 = leaf(x), leaf(w)
    with conv_module_only(conv_module.ALGORITHMS[-1]):  # the reference gradients through im2col
        conv2d(x64, w64, None, 2, 1).backward(g)
    for low, high in ((xs.grad.data, x64.grad.data), (ws.grad.data, w64.grad.data)):
        assert low.dtype == np.float32
        np.testing.assert_allclose(low, high, rtol=0, atol=2e-5 * np.abs(high).max())  # measured 1-4e-6
    assert ws.grad.data.flags.c_contiguous and ws.grad.data.shape == w.shape
