"""batch_norm's Numba kernels: forward and backward, training and eval, against NumPy formulas, float64
finite differences and (when installed) torch."""

import numpy as np
import pytest

import mpnn
from mpnn.core.gradcheck import gradcheck
from mpnn.core.normalization import batch_norm

RNG = np.random.default_rng(13)


def _t(*shape, dtype=np.float64, scale=1.0, offset=0.0):
    return mpnn.Tensor((RNG.standard_normal(shape) * scale + offset).astype(dtype), requires_grad=True)


def _reference(x, w, b, g, mean, var, eps, training):
    """Forward and the three gradients from the textbook formulas, in float64 NumPy."""
    c = x.shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    bs = (1, c) + (1,) * (x.ndim - 2)
    n = x.size // c
    x, g = x.astype(np.float64), g.astype(np.float64)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(bs)) * inv.reshape(bs)
    out = xhat * w.reshape(bs) + b.reshape(bs)
    gw = (g * xhat).sum(axis=axes)
    gb = g.sum(axis=axes)
    dxhat = g * w.reshape(bs)
    if training:
        gx = (
            inv.reshape(bs) / n * (n * dxhat - dxhat.sum(axis=axes).reshape(bs) - xhat * gw.reshape(bs) * w.reshape(bs))
        )
    else:
        gx = dxhat * inv.reshape(bs)
    return out, gx, gw, gb


@pytest.mark.parametrize("shape", [(7, 3), (4, 5, 6), (3, 4, 5, 5), (32, 8, 4, 4), (2, 16, 9, 7)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_and_backward_match_the_formulas(shape, training, dtype):
    c = shape[1]
    x = _t(*shape, dtype=dtype, scale=2.0, offset=3.0)
    w, b = _t(c, dtype=dtype), _t(c, dtype=dtype)
    rm = RNG.standard_normal(c).astype(dtype)
    rv = (np.abs(RNG.standard_normal(c)) + 0.5).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    out = batch_norm(x, mpnn.Tensor(rm), mpnn.Tensor(rv), w, b, training=training, momentum=0.1, eps=1e-5)
    g = RNG.standard_normal(shape).astype(dtype)
    out.backward(mpnn.Tensor(g))
    ref, gx, gw, gb = _reference(x.data, w.data, b.data, g, rm0, rv0, 1e-5, training)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    assert out.data.dtype == dtype and x.grad.data.dtype == dtype and w.grad.data.dtype == dtype
    np.testing.assert_allclose(out.data, ref, **tol)
    np.testing.assert_allclose(x.grad.data, gx, **tol)
    np.testing.assert_allclose(w.grad.data, gw, **tol)
    np.testing.assert_allclose(b.grad.data, gb, **tol)
    axes = (0,) + tuple(range(2, len(shape)))
    n = x.data.size // c
    if training:  # running statistics: momentum toward the batch mean and the unbiased batch variance
        xd = x.data.astype(np.float64)
        np.testing.assert_allclose(rm, 0.9 * rm0 + 0.1 * xd.mean(axis=axes), **tol)
        np.testing.assert_allclose(rv, 0.9 * rv0 + 0.1 * xd.var(axis=axes) * n / (n - 1), **tol)
    else:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 5), (4, 3, 3, 5)])
def test_gradcheck_train_and_eval(shape):
    c = shape[1]
    x, w, b = _t(*shape, offset=1.0), _t(c), _t(c)
    assert gradcheck(lambda a, p, q: batch_norm(a, None, None, p, q, training=True), [x, w, b])
    rm, rv = mpnn.Tensor(RNG.standard_normal(c)), mpnn.Tensor(np.abs(RNG.standard_normal(c)) + 0.5)
    assert gradcheck(lambda a, p, q: batch_norm(a, rm, rv, p, q, training=False), [x, w, b])
    # without affine parameters, and with only the input needing a gradient
    assert gradcheck(lambda a: batch_norm(a, None, None, None, None, training=True), [x])


def test_no_input_gradient_and_strided_input():
    x = _t(4, 3, 5, 5)
    x.requires_grad = False
    w, b = _t(3), _t(3)
    xs = mpnn.Tensor(np.swapaxes(x.data, 2, 3))  # a strided (non-contiguous) input
    out = batch_norm(xs, None, None, w, b, training=True)
    out.backward(mpnn.Tensor(np.ones(out.shape)))
    assert xs.grad is None and w.grad is not None
    ref = _reference(xs.data, w.data, b.data, np.ones(out.shape), None, None, 1e-5, True)
    np.testing.assert_allclose(out.data, ref[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(b.grad.data, np.full(3, 4 * 25.0))


def test_large_mean_keeps_float32_precision():
    """Two-pass variance: a channel offset 1e4 with unit spread normalizes to unit spread in float32."""
    x = _t(16, 2, 8, 8, dtype=np.float32, offset=1e4)
    out = batch_norm(x, None, None, None, None, training=True)
    np.testing.assert_allclose(out.data.std(axis=(0, 2, 3)), 1.0, rtol=1e-3)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((8, 6, 5, 5)).astype(np.float32)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    results = []
    for lib in (mpnn, torch):
        m = lib.nn.BatchNorm2d(6)
        with lib.no_grad():
            m.weight.copy_(lib.from_numpy(np.linspace(0.5, 2.0, 6).astype(np.float32)))
            m.bias.copy_(lib.from_numpy(np.linspace(-1.0, 1.0, 6).astype(np.float32)))
        xt = lib.from_numpy(x.copy()).requires_grad_()
        out = m(xt)
        out.backward(lib.from_numpy(g))
        m.eval()
        ev = m(lib.from_numpy(x))
        results.append(
            [a.detach().numpy() for a in (out, xt.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, ev)]
        )
    for mine, theirs in zip(*results):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)
