"""The 1x1 conv algorithm (mpnn/core/conv_pointwise.py): forward against a float64 reference over the subsampled input
(conv2d and conv1d, strides 1, 2, 3 and unequal, odd sizes), float64 finite-difference gradients, a residual block
whose 1x1 stride-2 shortcut and 3x3 stride-2 conv read one input, a compiled training step against eager, and which
convs the selection hands it."""

import numpy as np
import pytest

import mpnn
from mpnn import nn
from mpnn.core import conv as conv_module
from mpnn.core import conv_pointwise, gradcheck, no_grad
from mpnn.core.conv import conv1d, conv2d
from steps import step_names, train_step
from test_conv_pool import leaf

RNG = np.random.default_rng(17)


def randn(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


def ref_pointwise(x, w, b, sh, sw):
    """1x1, no padding, stride (sh, sw), in float64: an einsum over the subsampled input."""
    out = np.einsum("nchw,oc->nohw", x.astype(np.float64)[:, :, ::sh, ::sw], w.astype(np.float64)[:, :, 0, 0])
    return out if b is None else out + b.astype(np.float64)[:, None, None]


def _problem(x_shape, w_shape, geom, out_hw):
    return conv_module.ConvProblem(np.zeros(x_shape), np.zeros(w_shape), None, geom, *out_hw, False)


def _geom(sh, sw):
    return (1, 1, sh, sw, 0, 0, 1, 1, 1)


@pytest.fixture
def forced(monkeypatch):
    """Pointwise for maps of any size."""
    monkeypatch.setattr(conv_module, "_POINTWISE_MIN_POSITIONS", 1)


SHAPES = [  # (n, c, o, h, w, sh, sw)
    (1, 1, 3, 17, 15, 1, 1),
    (3, 5, 4, 17, 15, 2, 2),
    (3, 64, 5, 17, 15, 3, 3),
    (1, 5, 64, 17, 15, 1, 2),
    (3, 5, 1, 16, 9, 2, 1),
    (1, 64, 64, 9, 12, 2, 2),
]


@pytest.mark.parametrize("n, c, o, h, w, sh, sw", SHAPES)
def test_conv2d_forward_matches_reference(forced, n, c, o, h, w, sh, sw):
    """float64 to 1e-12 of the largest output, float32 to 1e-5; with and without bias, with a weight that wants a
    gradient (forward keeps its subsample) and under no_grad."""
    x, wt, b = randn(n, c, h, w), randn(o, c, 1, 1), randn(o)
    oh, ow = (h - 1) // sh + 1, (w - 1) // sw + 1
    assert conv_module.select(_problem(x.shape, wt.shape, _geom(sh, sw), (oh, ow))).name == "pointwise"
    for bias in (b, None):
        ref = ref_pointwise(x, wt, bias, sh, sw)
        scale = np.abs(ref).max()
        for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
            xs, ws = x.astype(dtype), wt.astype(dtype)
            bs = None if bias is None else bias.astype(dtype)
            out = conv2d(leaf(xs), leaf(ws), None if bs is None else leaf(bs), (sh, sw))
            assert out.data.dtype == dtype and out.data.shape == (n, o, oh, ow)
            np.testing.assert_allclose(out.data, ref, rtol=0, atol=tol * scale)
            with no_grad():
                out = conv2d(leaf(xs), leaf(ws), None if bs is None else leaf(bs), (sh, sw))
            np.testing.assert_allclose(out.data, ref, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("n, c, o, length, s", [(1, 1, 3, 17, 1), (3, 5, 4, 17, 2), (3, 64, 5, 16, 3), (1, 5, 1, 9, 2)])
def test_conv1d_forward_matches_reference(forced, n, c, o, length, s):
    """conv1d with kernel 1 arrives as height 1 and takes the same path; unbatched (C, L) input too."""
    x, wt, b = randn(n, c, length), randn(o, c, 1), randn(o)
    lo = (length - 1) // s + 1
    assert conv_module.select(_problem((n, c, 1, length), (o, c, 1, 1), _geom(1, s), (1, lo))).name == "pointwise"
    ref = ref_pointwise(x[:, :, None], wt[:, :, None], b, 1, s)[:, :, 0]
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        out = conv1d(leaf(x.astype(dtype)), leaf(wt.astype(dtype)), leaf(b.astype(dtype)), s)
        assert out.data.dtype == dtype
        np.testing.assert_allclose(out.data, ref, rtol=0, atol=tol * np.abs(ref).max())
    out = conv1d(leaf(x[0]), leaf(wt), None, s)
    np.testing.assert_allclose(out.data, ref[0] - b[:, None], rtol=0, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("n, c, o, h, w, s", [(1, 3, 2, 7, 5, 1), (3, 2, 3, 7, 5, 2), (2, 3, 2, 9, 8, (1, 2))])
def test_gradcheck_float64(forced, n, c, o, h, w, s):
    """dx, dw and db against float64 finite differences, all together and each alone."""
    x, wt, b = randn(n, c, h, w), randn(o, c, 1, 1), randn(o)
    gradcheck(lambda a, ww, bb: conv2d(a, ww, bb, s), [leaf(x), leaf(wt), leaf(b)])
    gradcheck(lambda ww: conv2d(leaf(x, False), ww, None, s), [leaf(wt)])
    gradcheck(lambda a: conv2d(a, leaf(wt, False), None, s), [leaf(x)])
    gradcheck(lambda bb: conv2d(leaf(x, False), leaf(wt, False), bb, s), [leaf(b)])
    gradcheck(lambda a, ww: conv1d(a, ww, None, 2), [leaf(x[:, :, 0]), leaf(wt[:, :, 0])])


@pytest.mark.parametrize("s", [1, 2])
def test_backward_recomputes_the_subsample_forward_did_not_keep(s):
    """A forward told no weight gradient would be wanted keeps no subsample; a backward asked for dw anyway
    recomputes it. Gradients C-contiguous, shaped like the input and the weight."""
    x, wt, g = randn(3, 4, 11, 9), randn(5, 4, 1, 1), randn(3, 5, 10 // s + 1, 8 // s + 1)
    algorithm = conv_pointwise.Pointwise()
    problem = conv_module.ConvProblem(x, wt, None, _geom(s, s), *g.shape[2:], False)
    state = algorithm.forward(problem, np.empty(g.shape), conv_module.settings_now())
    dx, dw, db = algorithm.backward(state, g, True, True, True)
    want_dw = np.einsum("nohw,nchw->oc", g, x[:, :, ::s, ::s])[:, :, None, None]
    want_dx = np.zeros_like(x)
    want_dx[:, :, ::s, ::s] = np.einsum("nohw,oc->nchw", g, wt[:, :, 0, 0])
    np.testing.assert_allclose(dw, want_dw, rtol=0, atol=1e-12 * np.abs(want_dw).max())
    np.testing.assert_allclose(dx, want_dx, rtol=0, atol=1e-12 * np.abs(want_dx).max())
    np.testing.assert_allclose(db, g.sum(axis=(0, 2, 3)), rtol=1e-12)
    assert dx.flags.c_contiguous and dw.flags.c_contiguous and dx.shape == x.shape and dw.shape == wt.shape


def test_residual_block_with_shortcut_gradchecks(monkeypatch):
    """A 1x1 stride-2 shortcut (forced to Pointwise) and a 3x3 stride-2 conv read the same input; their sum's
    gradients against float64 finite differences."""
    monkeypatch.setattr(conv_module, "_POINTWISE_MIN_POSITIONS", 4)
    x, w3, w1, b1 = randn(2, 3, 7, 6), randn(4, 3, 3, 3), randn(4, 3, 1, 1), randn(4)
    assert conv_module.select(_problem(x.shape, w1.shape, _geom(2, 2), (4, 3))).name == "pointwise"

    def block(a, wa, wb, bb):
        return (conv2d(a, wa, None, 2, 1).relu() + conv2d(a, wb, bb, 2)).tanh()

    gradcheck(block, [leaf(x), leaf(w3), leaf(w1), leaf(b1)])


def test_two_pointwise_convs_in_a_chain_gradcheck(forced):
    """Two stride-2 1x1 convs one after the other: each backward reads its own forward's subsample (a state kept
    per call, not a per-thread scratch array that the second forward would overwrite)."""
    x, w1, w2 = randn(2, 3, 9, 7), randn(4, 3, 1, 1), randn(5, 4, 1, 1)

    def chain(a, wa, wb):
        return conv2d(conv2d(a, wa, None, 2).tanh(), wb, None, 2)

    gradcheck(chain, [leaf(x), leaf(w1), leaf(w2)])


def test_selection_rule():
    """Default threshold: 1x1 convs with >= 64 output positions a sample, unpadded, ungrouped take pointwise
    (ResNet-18's 64->128 and 128->256 shortcuts, a ResNet-50 bottleneck's 256->64 56x56 stride 1); other geometries
    and smaller maps (ResNet-18's 256->512 shortcut on 8x8 input: 16 positions) do not."""
    takes = {
        "resnet18 shortcut 64->128": ((32, 64, 32, 32), (128, 64, 1, 1), _geom(2, 2), (16, 16)),
        "resnet18 shortcut 128->256": ((32, 128, 16, 16), (256, 128, 1, 1), _geom(2, 2), (8, 8)),
        "bottleneck 256->64": ((8, 256, 56, 56), (64, 256, 1, 1), _geom(1, 1), (56, 56)),
        "conv1d": ((4, 8, 1, 300), (8, 8, 1, 1), _geom(1, 1), (1, 300)),
        "dilation 2": ((2, 4, 32, 32), (8, 4, 1, 1), (1, 1, 1, 1, 0, 0, 2, 2, 1), (32, 32)),
    }
    for label, args in takes.items():
        assert conv_module.select(_problem(*args)).name == "pointwise", label
    others = {
        "padding 1": ((2, 4, 32, 32), (8, 4, 1, 1), (1, 1, 1, 1, 1, 1, 1, 1, 1), (34, 34)),
        # a top (left) padding of 1 that stride 3 leaves the output size of unpadded input
        "padding (1, 0), stride (3, 1)": ((2, 4, 49, 32), (8, 4, 1, 1), (1, 1, 3, 1, 1, 0, 1, 1, 1), (17, 32)),
        "padding (0, 1), stride (1, 3)": ((2, 4, 32, 49), (8, 4, 1, 1), (1, 1, 1, 3, 0, 1, 1, 1, 1), (32, 17)),
        "bottom padding": ((2, 4, 32, 32), (8, 4, 1, 1), _geom(1, 1), (33, 32)),
        "right padding": ((2, 4, 32, 32), (8, 4, 1, 1), _geom(1, 1), (32, 33)),
        "groups 2": ((2, 4, 32, 32), (8, 2, 1, 1), (1, 1, 1, 1, 0, 0, 1, 1, 2), (32, 32)),
        "kernel 3": ((2, 4, 32, 32), (8, 4, 3, 3), (3, 3, 1, 1, 0, 0, 1, 1, 1), (30, 30)),
        "kernel 1x3": ((2, 4, 32, 32), (8, 4, 1, 3), (1, 3, 1, 1, 0, 0, 1, 1, 1), (32, 30)),
        "resnet18 shortcut 256->512": ((32, 256, 8, 8), (512, 256, 1, 1), _geom(2, 2), (4, 4)),
        "63 positions": ((2, 4, 9, 7), (8, 4, 1, 1), _geom(1, 1), (9, 7)),
    }
    for label, args in others.items():
        assert conv_module.select(_problem(*args)).name != "pointwise", label
    settings = conv_module.settings_now()._replace(pointwise_min_positions=16)
    assert conv_module.select(_problem(*others["resnet18 shortcut 256->512"]), settings).name == "pointwise"


class _Net(nn.Module):
    """conv 3x3 -> ReLU -> a 1x1 stride-2 conv (Pointwise) -> mean -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.short = nn.Conv2d(8, 6, 1, stride=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.short(self.conv(x).relu()).relu()
        return self.fc(h.mean((2, 3)))


def test_compiled_training_step_equals_eager(forced):
    """An SGD step compiled with mpnn.compile replays the Pointwise forward and backward generically: parameters
    after 4 steps within 1e-6 relative of eager's."""
    rng = np.random.default_rng(3)
    batches = [
        (rng.standard_normal((3, 3, 9, 7)).astype(np.float32), rng.integers(0, 4, 3).astype(np.int64)) for _ in range(4)
    ]
    results = []
    for compiled in (False, True):
        mpnn.manual_seed(0)
        model = _Net()
        opt = mpnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = train_step(model, opt)
        fn = mpnn.compile(step) if compiled else step
        for x, y in batches:
            fn(mpnn.from_numpy(x.copy()), mpnn.from_numpy(y))
        results.append([p.data.copy() for p in model.parameters()])
    assert fn.eager_reason is None and fn.stats["hits"] == 3
    assert "_conv.<locals>.forward" in step_names(fn)  # the generic replay form: Pointwise.forward over its problem
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())
