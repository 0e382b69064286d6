"""Every elementwise, reduction, shape, indexing and matmul op: float64 finite-difference gradients,
forward values against NumPy, broadcasting, non-contiguous inputs, size-1 dims, and clear errors."""

import numpy as np
import pytest

import mpnn
from mpnn.core import OpError, gradcheck, ops
from mpnn.core.activation import dropout, log_softmax, softmax
from mpnn.core.indexing import embedding
from mpnn.core.loss import binary_cross_entropy_with_logits, cross_entropy, l1_loss, mse_loss, nll_loss
from mpnn.core.normalization import batch_norm, layer_norm

RNG = np.random.default_rng(1234)


def T(*shape, positive=False, noncontig=False, away_from=None):
    """A float64 leaf tensor; optionally positive, a non-contiguous (transposed) view, or kept away from
    a kink (|x - k| > 0.05) so finite differences do not straddle it."""
    if noncontig:
        arr = RNG.standard_normal(shape[::-1]).T
    else:
        arr = RNG.standard_normal(shape)
    if positive:
        arr = np.abs(arr) + 0.5
    if away_from is not None:
        arr = np.where(np.abs(arr - away_from) < 0.05, arr + 0.1, arr)
    t = mpnn.Tensor(arr, dtype="float64", requires_grad=True)
    if noncontig:
        t.data = arr  # keep the strided view (Tensor() may have copied)
        assert not t.data.flags.c_contiguous
    return t


SHAPE_PAIRS = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((2, 1, 4), (3, 1)),
    ((1,), (2, 3)),
    ((), (2, 2)),
    ((2, 3, 1), (1, 1, 5)),
]


@pytest.mark.arm64
@pytest.mark.parametrize("fn", [ops.add, ops.sub, ops.mul, ops.div, ops.maximum, ops.minimum], ids=lambda f: f.__name__)
@pytest.mark.parametrize("sa,sb", SHAPE_PAIRS)
def test_binary_broadcast_gradients(fn, sa, sb):
    a, b = T(*sa), T(*sb, positive=fn is ops.div)
    assert gradcheck(fn, [a, b])
    np.testing.assert_allclose(
        fn(a, b).data,
        {
            "add": np.add,
            "sub": np.subtract,
            "mul": np.multiply,
            "div": np.divide,
            "maximum": np.maximum,
            "minimum": np.minimum,
        }[fn.__name__](a.data, b.data),
    )


def test_binary_on_noncontiguous_inputs():
    a, b = T(3, 4, noncontig=True), T(3, 4, noncontig=True)
    for fn in (ops.add, ops.mul, ops.sub):
        assert gradcheck(fn, [a, b])


def test_pow_both_operands_and_scalar_exponent():
    a, b = T(3, 4, positive=True), T(3, 4)
    assert gradcheck(ops.pow, [a, b])
    assert gradcheck(lambda x: x**3, [T(2, 3)])
    assert gradcheck(lambda x: 2.0**x, [T(2, 3)])
    assert gradcheck(lambda x: x**0.5, [T(4, positive=True)])


def test_operators_with_python_numbers_keep_dtype():
    x = mpnn.tensor([1.0, 2.0])
    for y in (x + 1, 1 + x, x * 2.5, 2.5 * x, x - 1, 1 - x, x / 2, 2 / x, x**2, -x):
        assert y.dtype == np.float32
    np.testing.assert_allclose((1 - x).data, [0.0, -1.0])
    np.testing.assert_allclose((2 / x).data, [2.0, 1.0])


def test_maximum_tie_splits_gradient():
    a = mpnn.tensor([1.0, 2.0], requires_grad=True)
    b = mpnn.tensor([1.0, 3.0], requires_grad=True)
    ops.maximum(a, b).sum().backward()
    np.testing.assert_allclose(a.grad.data, [0.5, 0.0])
    np.testing.assert_allclose(b.grad.data, [0.5, 1.0])


UNARY = [
    ("neg", ops.neg, {}),
    ("exp", ops.exp, {}),
    ("log", ops.log, {"positive": True}),
    ("sqrt", ops.sqrt, {"positive": True}),
    ("abs", ops.abs, {"away_from": 0.0}),
    ("relu", ops.relu, {"away_from": 0.0}),
    ("leaky_relu", lambda x: ops.leaky_relu(x, 0.2), {"away_from": 0.0}),
    ("sigmoid", ops.sigmoid, {}),
    ("tanh", ops.tanh, {}),
    ("gelu", ops.gelu, {}),
    ("gelu_tanh", lambda x: ops.gelu(x, approximate="tanh"), {}),
    ("clip", lambda x: ops.clip(x, -0.5, 0.7), {"away_from": 0.7}),
    ("clip_min", lambda x: ops.clip(x, min=-0.5), {"away_from": -0.5}),
    ("clone", ops.clone, {}),
]


@pytest.mark.arm64
@pytest.mark.parametrize("name,fn,kw", UNARY, ids=[u[0] for u in UNARY])
@pytest.mark.parametrize("shape", [(3, 4), (1,), (2, 1, 3)])
def test_unary_gradients(name, fn, kw, shape):
    x = T(*shape, **kw)
    if name.startswith("clip"):
        x.data = np.where(np.abs(x.data + 0.5) < 0.05, x.data + 0.1, x.data)
    assert gradcheck(fn, [x])


def test_unary_noncontiguous():
    for fn in (ops.exp, ops.tanh, ops.sigmoid, ops.gelu, ops.relu):
        assert gradcheck(fn, [T(3, 4, noncontig=True)])


@pytest.mark.arm64
@pytest.mark.parametrize("dtype, bits", [(np.float32, np.uint32), (np.float64, np.uint64)])
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_relu_kernels_keep_numpys_bits(dtype, bits):
    """relu's one-pass loops give np.maximum(x, 0)'s bits (-0.0 to 0.0, NaN kept, infinities, subnormals) and the
    backward g * (out > 0)'s (a gradient of -0.0 or NaN where the output is 0 or NaN); strided inputs and
    gradients, and integer inputs, take NumPy's path with the same results."""
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([-0.0, 0.0, np.nan, -np.nan, np.inf, -np.inf, tiny, -tiny, 3.0, -2.0, 0.5, -7.0], dtype)
    g = np.array([1.0, -0.0, 2.0, np.nan, -3.0, 4.0, -0.0, np.nan, 5.0, np.inf, -1.0, 6.0], dtype)
    for shape, strided in (((12,), False), ((3, 4), False), ((4, 3), True)):  # inf * 0: NaN, as intended
        xs = x.reshape(3, 4).T if strided else x.reshape(shape)
        gs = g.reshape(3, 4).T if strided else g.reshape(shape)
        t = mpnn.from_numpy(xs).requires_grad_()
        assert t.data.flags.c_contiguous != strided
        out = ops.relu(t)
        assert out.data.view(bits).tolist() == np.maximum(xs, 0).view(bits).tolist()
        out.backward(mpnn.from_numpy(gs))
        assert t.grad.data.view(bits).tolist() == (gs * (np.maximum(xs, 0) > 0)).view(bits).tolist()
    ints = mpnn.tensor(np.array([-2, 0, 3]))
    assert ops.relu(ints).data.tolist() == [0, 0, 3] and ops.relu(ints).data.dtype == np.int64


@pytest.mark.arm64
def test_unary_forward_values():
    x = np.linspace(-3, 3, 13)
    t = mpnn.Tensor(x, dtype="float64")
    np.testing.assert_allclose(ops.sigmoid(t).data, 1 / (1 + np.exp(-x)))
    np.testing.assert_allclose(ops.leaky_relu(t, 0.1).data, np.where(x > 0, x, 0.1 * x))
    from math import erf

    np.testing.assert_allclose(ops.gelu(t).data, [v * 0.5 * (1 + erf(v / np.sqrt(2))) for v in x], rtol=1e-12)
    big = mpnn.tensor([-1000.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_allclose(ops.sigmoid(big).data, [0.0, 1.0])


@pytest.mark.parametrize("dim,keepdim", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
def test_sum_mean_gradients(dim, keepdim):
    x = T(2, 3, 4)
    assert gradcheck(lambda a: ops.sum(a, dim, keepdim), [x])
    assert gradcheck(lambda a: ops.mean(a, dim, keepdim), [x])
    np.testing.assert_allclose(ops.sum(x, dim, keepdim).data, x.data.sum(axis=dim, keepdims=keepdim))
    np.testing.assert_allclose(ops.mean(x, dim, keepdim).data, x.data.mean(axis=dim, keepdims=keepdim))


def test_var_std():
    x = T(3, 5)
    np.testing.assert_allclose(ops.var(x, 1).data, x.data.var(axis=1, ddof=1))
    np.testing.assert_allclose(ops.std(x, 0, correction=0).data, x.data.std(axis=0))
    assert gradcheck(lambda a: ops.var(a, 1), [x])


@pytest.mark.parametrize("fn,np_fn,arg", [(ops.max, np.max, np.argmax), (ops.min, np.min, np.argmin)])
def test_max_min_values_indices_and_gradients(fn, np_fn, arg):
    x = T(3, 5)
    v, i = fn(x, 1)
    np.testing.assert_allclose(v.data, np_fn(x.data, axis=1))
    np.testing.assert_array_equal(i.data, arg(x.data, axis=1))
    assert i.dtype == np.int64
    assert gradcheck(lambda a: fn(a, 1)[0], [x])
    assert gradcheck(lambda a: fn(a, 0, keepdim=True).values, [x])
    assert gradcheck(lambda a: fn(a), [x])
    assert fn(x).shape == ()


def test_amax_shares_ties():
    x = mpnn.tensor([[1.0, 3.0, 3.0]], requires_grad=True)
    ops.amax(x, 1).sum().backward()
    np.testing.assert_allclose(x.grad.data, [[0.0, 0.5, 0.5]])
    assert gradcheck(lambda a: ops.amax(a, (0, 1)), [T(2, 3)])


def test_shape_ops_gradients_and_values():
    x = T(2, 3, 4)
    cases = [
        (lambda a: a.reshape(4, 6), x.data.reshape(4, 6)),
        (lambda a: a.view(-1), x.data.reshape(-1)),
        (lambda a: a.transpose(0, 2), x.data.swapaxes(0, 2)),
        (lambda a: a.permute(2, 0, 1), x.data.transpose(2, 0, 1)),
        (lambda a: a.flatten(1), x.data.reshape(2, 12)),
        (lambda a: a.unsqueeze(1), x.data[:, None]),
        (lambda a: a.unsqueeze(-1), x.data[..., None]),
        (lambda a: a.T, x.data.T),
    ]
    for fn, expected in cases:
        np.testing.assert_array_equal(fn(x).data, expected)
        assert gradcheck(fn, [x])


def test_squeeze_expand():
    x = T(2, 1, 3, 1)
    assert ops.squeeze(x).shape == (2, 3)
    assert ops.squeeze(x, 1).shape == (2, 3, 1)
    assert ops.squeeze(x, 0).shape == (2, 1, 3, 1)  # not size 1: unchanged, as torch
    assert gradcheck(lambda a: ops.squeeze(a, (1, 3)), [x])
    y = T(3, 1)
    e = y.expand(2, 3, 4)
    assert e.shape == (2, 3, 4)
    assert gradcheck(lambda a: a.expand(2, -1, 4), [y])


def test_cat_stack_split_chunk():
    a, b, c = T(2, 3), T(4, 3), T(2, 3)
    np.testing.assert_array_equal(ops.cat([a, b], 0).data, np.concatenate([a.data, b.data]))
    assert gradcheck(lambda p, q: ops.cat([p, q], 0), [a, b])
    assert gradcheck(lambda p, q: ops.stack([p, q], 1), [a, c])
    np.testing.assert_array_equal(ops.stack([a, c], -1).data, np.stack([a.data, c.data], -1))
    parts = ops.split(b, 3, 0)
    assert [p.shape for p in parts] == [(3, 3), (1, 3)]
    assert gradcheck(lambda q: ops.split(q, [1, 3], 0), [b])
    assert [p.shape for p in ops.chunk(b, 2, 0)] == [(2, 3), (2, 3)]
    assert gradcheck(lambda q: ops.chunk(q, 3, 1)[1] * 2, [b])


def test_indexing_basic_and_integer_arrays():
    x = T(4, 5)
    cases = [
        (1, x.data[1]),
        ((slice(1, 3), 2), x.data[1:3, 2]),
        ((Ellipsis, None, -1), x.data[..., None, -1]),
        (np.array([0, 2, 2]), x.data[[0, 2, 2]]),
        ((np.array([0, 1, 1]), np.array([4, 0, 0])), x.data[[0, 1, 1], [4, 0, 0]]),
        (x.data > 0, x.data[x.data > 0]),
        ((slice(None), mpnn.tensor([3, 1])), x.data[:, [3, 1]]),
    ]
    for idx, expected in cases:
        np.testing.assert_array_equal(x[idx].data, expected)
        assert gradcheck(lambda a, idx=idx: a[idx], [x])
    y = mpnn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y[np.array([0, 0, 2])].sum().backward()
    np.testing.assert_array_equal(y.grad.data, [2.0, 0.0, 1.0])  # repeated index accumulates


def test_where_masked_fill():
    x, y = T(3, 4), T(4)
    cond = x.data > 0
    np.testing.assert_array_equal(ops.where(cond, x, y).data, np.where(cond, x.data, y.data))
    assert gradcheck(lambda a, b: ops.where(cond, a, b), [x, y])
    assert gradcheck(lambda a: a.masked_fill(cond, 0.0), [x])


@pytest.mark.arm64
@pytest.mark.parametrize(
    "sa,sb",
    [
        ((3, 4), (4, 5)),
        ((2, 3, 4), (4, 5)),
        ((4,), (4, 5)),
        ((3, 4), (4,)),
        ((4,), (4,)),
        ((2, 1, 3, 4), (5, 4, 2)),
        ((1, 4), (4, 1)),
    ],
)
def test_matmul_gradients(sa, sb):
    a, b = T(*sa), T(*sb)
    np.testing.assert_allclose(ops.matmul(a, b).data, np.matmul(a.data, b.data))
    assert gradcheck(ops.matmul, [a, b])


def test_matmul_noncontiguous_and_linear():
    a, b = T(3, 4, noncontig=True), T(4, 2, noncontig=True)
    assert gradcheck(ops.matmul, [a, b])
    x, w, bias = T(5, 3), T(4, 3), T(4)
    np.testing.assert_allclose(ops.linear(x, w, bias).data, x.data @ w.data.T + bias.data)
    assert gradcheck(ops.linear, [x, w, bias])
    assert gradcheck(lambda p, q: ops.linear(p, q), [T(2, 5, 3), w])


@pytest.mark.arm64
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_log_softmax(dim):
    x = T(3, 4, 2)
    e = np.exp(x.data - x.data.max(axis=dim, keepdims=True))
    ref = e / e.sum(axis=dim, keepdims=True)
    np.testing.assert_allclose(softmax(x, dim).data, ref)
    np.testing.assert_allclose(log_softmax(x, dim).data, np.log(ref))
    assert gradcheck(lambda a: softmax(a, dim), [x])
    assert gradcheck(lambda a: log_softmax(a, dim), [x])
    big = mpnn.tensor([[1000.0, 0.0]])
    assert np.isfinite(log_softmax(big, 1).data).all()


def test_dropout_scales_and_masks():
    mpnn.manual_seed(0)
    x = mpnn.ones(1000, 50, requires_grad=True)
    y = dropout(x, 0.3)
    kept = y.data != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y.data[kept], 1 / 0.7, rtol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.data, y.data)
    assert dropout(x, 0.3, training=False) is x

    def reseeded_dropout(a):  # the same mask on every finite-difference evaluation
        mpnn.manual_seed(5)
        return dropout(a, 0.4)

    assert gradcheck(reseeded_dropout, [T(4, 6)])
    with pytest.raises(OpError, match="dropout"):
        dropout(x, 1.5)


def test_embedding_gradient_and_padding():
    w = T(6, 3)
    idx = np.array([[0, 2], [2, 5]])
    np.testing.assert_array_equal(embedding(idx, w).data, w.data[idx])
    assert gradcheck(lambda a: embedding(idx, a), [w])
    w.grad = None
    embedding(idx, w, padding_idx=2).sum().backward()
    np.testing.assert_array_equal(w.grad.data[2], 0)
    np.testing.assert_array_equal(w.grad.data[0], 1)
    with pytest.raises(OpError, match="index 6 is out of range for an embedding of 6 rows"):
        embedding(np.array([6]), w)


@pytest.mark.arm64
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 4, 4)])
def test_batch_norm_train_and_eval(shape):
    x = T(*shape)
    c = shape[1]
    w, b = T(c), T(c)
    rm, rv = np.zeros(c), np.ones(c)
    out = batch_norm(x, mpnn.Tensor(rm), mpnn.Tensor(rv), w, b, training=True, momentum=0.1)
    axes = (0,) + tuple(range(2, len(shape)))
    mean, var = x.data.mean(axis=axes), x.data.var(axis=axes)
    bs = (1, c) + (1,) * (len(shape) - 2)
    np.testing.assert_allclose(
        out.data,
        (x.data - mean.reshape(bs)) / np.sqrt(var.reshape(bs) + 1e-5) * w.data.reshape(bs) + b.data.reshape(bs),
        rtol=1e-10,
    )
    n = x.data.size // c
    np.testing.assert_allclose(rm, 0.1 * mean)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var * n / (n - 1))
    assert gradcheck(lambda a, p, q: batch_norm(a, None, None, p, q, training=True), [x, w, b])
    rmt, rvt = mpnn.Tensor(RNG.standard_normal(c)), mpnn.Tensor(np.abs(RNG.standard_normal(c)) + 0.5)
    assert gradcheck(lambda a, p, q: batch_norm(a, rmt, rvt, p, q, training=False), [x, w, b])


@pytest.mark.arm64
def test_layer_norm():
    x, w, b = T(3, 4, 5), T(4, 5), T(4, 5)
    out = layer_norm(x, (4, 5), w, b)
    m = x.data.mean(axis=(1, 2), keepdims=True)
    v = x.data.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out.data, (x.data - m) / np.sqrt(v + 1e-5) * w.data + b.data, rtol=1e-10)
    assert gradcheck(lambda a, p, q: layer_norm(a, (4, 5), p, q), [x, w, b])
    assert gradcheck(lambda a: layer_norm(a, 5), [T(2, 5, noncontig=True)])


def _ref_ce(x, y, w=None, eps=0.0, ignore=-100):
    c = x.shape[1]
    logp = x - x.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    w = np.ones(c) if w is None else w
    valid = y != ignore
    ys = np.where(valid, y, 0)
    nll = -w[ys] * logp[np.arange(len(y)), ys] * valid
    smooth = -(logp * w).sum(1) / c * valid
    return ((1 - eps) * nll + eps * smooth).sum() / (w[ys] * valid).sum()


@pytest.mark.arm64
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy(eps, weighted):
    x = T(6, 4)
    y = np.array([0, 3, 1, 1, 2, -100])
    w = np.abs(RNG.standard_normal(4)) + 0.5 if weighted else None
    out = cross_entropy(x, mpnn.tensor(y), weight=w, label_smoothing=eps)
    np.testing.assert_allclose(out.data, _ref_ce(x.data, y, w, eps), rtol=1e-10)
    assert gradcheck(lambda a: cross_entropy(a, y, weight=w, label_smoothing=eps), [x])
    assert gradcheck(lambda a: cross_entropy(a, y, reduction="sum"), [x])
    assert gradcheck(lambda a: cross_entropy(a, y, reduction="none"), [x])


def test_cross_entropy_spatial_and_probabilities():
    x = T(2, 3, 4)
    y = RNG.integers(0, 3, size=(2, 4))
    ref = _ref_ce(np.moveaxis(x.data, 1, -1).reshape(-1, 3), y.reshape(-1))
    np.testing.assert_allclose(cross_entropy(x, y).data, ref, rtol=1e-10)
    assert gradcheck(lambda a: cross_entropy(a, y), [x])
    probs = np.abs(RNG.standard_normal((5, 3)))
    probs /= probs.sum(1, keepdims=True)
    z = T(5, 3)
    assert gradcheck(lambda a: cross_entropy(a, mpnn.Tensor(probs)), [z])


def test_nll_mse_l1_bce():
    x = T(5, 3)
    y = np.array([0, 2, 1, 1, 0])
    np.testing.assert_allclose(nll_loss(x, y).data, -x.data[np.arange(5), y].mean())
    assert gradcheck(lambda a: nll_loss(a, y, weight=np.array([1.0, 2.0, 0.5])), [x])
    t = T(5, 3)
    np.testing.assert_allclose(mse_loss(x, t).data, ((x.data - t.data) ** 2).mean())
    assert gradcheck(mse_loss, [x, t])
    assert gradcheck(lambda a, b: l1_loss(a, b, reduction="sum"), [x, t])
    target = mpnn.Tensor(RNG.random((5, 3)), requires_grad=True, dtype="float64")
    pw = np.array([1.0, 2.0, 3.0])
    sig = 1 / (1 + np.exp(-x.data))
    ref = -(pw * target.data * np.log(sig) + (1 - target.data) * np.log(1 - sig)).mean()
    np.testing.assert_allclose(binary_cross_entropy_with_logits(x, target, pos_weight=pw).data, ref)
    assert gradcheck(lambda a, b: binary_cross_entropy_with_logits(a, b, pos_weight=pw), [x, target])
    assert gradcheck(lambda a, b: binary_cross_entropy_with_logits(a, b, reduction="none"), [x, target])


# ----- bad input: one clear error naming the op and the shapes ----------------------------------
def test_errors_name_op_and_shapes():
    a, b = mpnn.ones(2, 3), mpnn.ones(4, 5)
    with pytest.raises(OpError, match=r"add: shapes \(2, 3\) and \(4, 5\) do not broadcast"):
        a + b
    with pytest.raises(OpError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) cannot be multiplied"):
        a @ b
    with pytest.raises(OpError, match=r"reshape: cannot reshape a tensor of shape \(2, 3\)"):
        a.reshape(4, 2)
    with pytest.raises(OpError, match=r"cat: cannot concatenate shapes"):
        ops.cat([a, b], 0)
    with pytest.raises(OpError, match="linear: input of shape"):
        ops.linear(a, mpnn.ones(4, 5))
    with pytest.raises(OpError, match="linear: input dtype int64 does not match weight dtype float32"):
        ops.linear(mpnn.tensor([[1, 2, 3]]), mpnn.ones(4, 3))
    with pytest.raises(OpError, match="matmul: operands have different dtypes float32 and float64"):
        a @ mpnn.ones(3, 2, dtype="float64")
    with pytest.raises(OpError, match=r"cross_entropy: target label 7 is out of range for 3 classes"):
        cross_entropy(mpnn.ones(2, 3), mpnn.tensor([0, 7]))
    with pytest.raises(OpError, match=r"cross_entropy: target of shape \(3,\) does not match"):
        cross_entropy(mpnn.ones(2, 3), mpnn.tensor([0, 1, 2]))
    with pytest.raises(OpError, match=r"cross_entropy: probability target of shape \(2,\) must match"):
        cross_entropy(mpnn.ones(2, 3), np.array([0.5, 1.0], dtype=np.float32).reshape(2))
    with pytest.raises(OpError, match="mse_loss: input of shape"):
        mse_loss(mpnn.ones(4, 1), mpnn.ones(4))
    with pytest.raises(OpError, match="sum: dim 3 is out of range"):
        a.sum(3)
    with pytest.raises(OpError, match="batch_norm: weight has shape"):
        batch_norm(mpnn.ones(4, 3), None, None, mpnn.ones(2), None, training=True)
    with pytest.raises(OpError, match="index"):
        a[5]


def test_backward_errors():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"scalar output.*shape \(2,\)"):
        (x * 2).backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        mpnn.tensor([1.0]).backward()
    with pytest.raises(TypeError, match="only floating-point"):
        mpnn.tensor([1, 2], requires_grad=True)
    (x * 2).backward(mpnn.tensor([1.0, 3.0]))
    np.testing.assert_array_equal(x.grad.data, [2.0, 6.0])
