"""Every differentiable op of mpnn's public surface on 0-d tensors, where PyTorch defines it for 0-d.

A 0-d tensor is the case a NumPy-backed engine gets wrong most easily: NumPy turns 0-d results into scalars,
reduces "axis 0" of a 0-d array differently, and a backward that reshapes to (1,) still broadcasts silently.
So each case runs the op on float64 leaves (0-d, or 0-d broadcast against (2, 3)) and checks the output's
shape (PyTorch's), dtype and value (NumPy in float64), then ``gradcheck`` (float64 finite differences), and
that every leaf's .grad came back with the leaf's own shape."""

import math

import numpy as np
import pytest

import mpnn
from mpnn.core import gradcheck
from mpnn.nn import functional as F

X = 0.7  # positive, away from every kink used below
XN = -0.6
Y = -0.4
M = [[0.5, -1.2, 0.9], [1.7, -0.3, 0.2]]  # no entry equals X or Y: maximum/minimum have no ties
P = [[0.5, 1.2, 0.9], [1.7, 0.3, 2.2]]  # positive: a base for pow
W = [[0.1, -0.2, 0.3], [0.4, 0.5, -0.6], [0.7, -0.8, 0.9], [1.0, 1.1, -1.2]]


def _erf(a):
    return np.vectorize(math.erf)(a)


def _gelu(a):
    return a * 0.5 * (1 + _erf(a / math.sqrt(2)))


def _gelu_tanh(a):
    return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _bce_logits(a, t):
    return np.maximum(a, 0) - a * t + np.log1p(np.exp(-np.abs(a)))


CASES = []


def case(name, fn, args, shape, ref):
    """fn(*leaves) -> Tensor; args: the leaves' values (all float64, all requiring grad); ref(*arrays)."""
    CASES.append(pytest.param(fn, args, shape, ref, id=name))


# ----- elementwise unary on a 0-d tensor ---------------------------------------------------------------------
case("neg", lambda a: -a, [X], (), lambda a: -a)
case("neg_method", lambda a: a.neg(), [X], (), lambda a: -a)
case("exp", lambda a: a.exp(), [X], (), np.exp)
case("mpnn_exp", mpnn.exp, [X], (), np.exp)
case("log", lambda a: a.log(), [X], (), np.log)
case("mpnn_log", mpnn.log, [X], (), np.log)
case("sqrt", lambda a: a.sqrt(), [X], (), np.sqrt)
case("mpnn_sqrt", mpnn.sqrt, [X], (), np.sqrt)
case("abs_pos", lambda a: a.abs(), [X], (), np.abs)
case("abs_neg", lambda a: abs(a), [XN], (), np.abs)
case("mpnn_abs", mpnn.abs, [XN], (), np.abs)
case("relu_pos", lambda a: a.relu(), [X], (), lambda a: np.maximum(a, 0))
case("relu_neg", F.relu, [XN], (), lambda a: np.maximum(a, 0))
case("mpnn_relu", mpnn.relu, [X], (), lambda a: np.maximum(a, 0))
case("sigmoid", lambda a: a.sigmoid(), [X], (), _sigmoid)
case("F_sigmoid", F.sigmoid, [XN], (), _sigmoid)
case("tanh", lambda a: a.tanh(), [X], (), np.tanh)
case("F_tanh", F.tanh, [XN], (), np.tanh)
case("gelu", lambda a: a.gelu(), [X], (), _gelu)
case("F_gelu_none", lambda a: F.gelu(a, approximate="none"), [XN], (), _gelu)
case("F_gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), [XN], (), _gelu_tanh)
case("gelu_tanh_method", lambda a: a.gelu(approximate="tanh"), [X], (), _gelu_tanh)
case("leaky_relu_neg", lambda a: F.leaky_relu(a, 0.2), [XN], (), lambda a: 0.2 * a)
case("leaky_relu_pos", lambda a: a.leaky_relu(0.2), [X], (), lambda a: a)
case("clip_inside", lambda a: a.clip(-0.5, 1.0), [X], (), lambda a: a)
case("clip_above", lambda a: a.clip(-0.5, 0.5), [X], (), lambda a: np.clip(a, -0.5, 0.5))
case("clip_min_only", lambda a: a.clip(min=1.0), [X], (), lambda a: np.maximum(a, 1.0))
case("clip_max_only", lambda a: a.clip(max=1.0), [X], (), lambda a: np.minimum(a, 1.0))
case("clamp_method", lambda a: a.clamp(-0.5, 0.5), [XN], (), lambda a: np.clip(a, -0.5, 0.5))
case("mpnn_clamp", lambda a: mpnn.clamp(a, min=0.0), [X], (), lambda a: np.maximum(a, 0.0))
case("mpnn_clip", lambda a: mpnn.clip(a, max=0.0), [XN], (), lambda a: np.minimum(a, 0.0))
case(
    "clamp_tensor_bounds",
    lambda a, lo, hi: a.clamp(lo, hi),
    [X, -0.2, 0.5],
    (),
    lambda a, lo, hi: np.minimum(np.maximum(a, lo), hi),
)
case("clone", lambda a: a.clone(), [X], (), lambda a: a)
case("contiguous", lambda a: a.contiguous(), [X], (), lambda a: a)
case("to_float64", lambda a: a.to(mpnn.float64), [X], (), lambda a: a)
case("to_float64_by_name", lambda a: a.to("float64"), [X], (), lambda a: a)
case("double", lambda a: a.double(), [X], (), lambda a: a)
case("type_as", lambda a: a.type_as(mpnn.tensor(np.zeros(2))), [X], (), lambda a: a)
case("pow_2", lambda a: a**2, [X], (), lambda a: a**2)
case("pow_half", lambda a: a.pow(0.5), [X], (), np.sqrt)
case("rpow", lambda a: 2.0**a, [X], (), lambda a: 2.0**a)
case("radd", lambda a: 1.0 + a, [X], (), lambda a: 1.0 + a)
case("rsub", lambda a: 1.0 - a, [X], (), lambda a: 1.0 - a)
case("rmul", lambda a: 3.0 * a, [X], (), lambda a: 3.0 * a)
case("rdiv", lambda a: 2.0 / a, [X], (), lambda a: 2.0 / a)
case("dropout_eval", lambda a: F.dropout(a, 0.5, training=False), [X], (), lambda a: a)
case("dropout_p0", lambda a: mpnn.dropout(a, 0.0), [X], (), lambda a: a)

# ----- elementwise binary: 0-d with 0-d, and 0-d broadcast against (2, 3) in both orders -----------------------
BINARY = [
    ("add", lambda a, b: a + b, np.add),
    ("add_method", lambda a, b: a.add(b), np.add),
    ("sub", lambda a, b: a - b, np.subtract),
    ("sub_method", lambda a, b: a.sub(b), np.subtract),
    ("mul", lambda a, b: a * b, np.multiply),
    ("mul_method", lambda a, b: a.mul(b), np.multiply),
    ("div", lambda a, b: a / b, np.divide),
    ("div_method", lambda a, b: a.div(b), np.divide),
    ("maximum", mpnn.maximum, np.maximum),
    ("maximum_method", lambda a, b: a.maximum(b), np.maximum),
    ("max_other", lambda a, b: a.max(b), np.maximum),
    ("minimum", mpnn.minimum, np.minimum),
    ("minimum_method", lambda a, b: a.minimum(b), np.minimum),
    ("min_other", lambda a, b: a.min(b), np.minimum),
]
for _name, _fn, _ref in BINARY:
    case(f"{_name}-0d_0d", _fn, [X, Y], (), _ref)
    case(f"{_name}-0d_2x3", _fn, [X, M], (2, 3), _ref)
    case(f"{_name}-2x3_0d", _fn, [M, Y], (2, 3), _ref)

case("pow-0d_0d", lambda a, b: a**b, [X, Y], (), np.power)
case("pow_method-0d_0d", lambda a, b: a.pow(b), [X, Y], (), np.power)
case("pow-0d_base_2x3_exponent", lambda a, b: a**b, [X, M], (2, 3), np.power)
case("pow-2x3_base_0d_exponent", lambda a, b: a**b, [P, Y], (2, 3), np.power)

_T0 = mpnn.tensor(True)
_F0 = mpnn.tensor(False)
_CM = np.array([[True, False, True], [False, False, True]])
case("where-0d_cond_true", lambda a, b: mpnn.where(_T0, a, b), [X, Y], (), lambda a, b: a)
case("where-0d_cond_false", lambda a, b: mpnn.where(_F0, a, b), [X, Y], (), lambda a, b: b)
case("where-0d_cond_0d_2x3", lambda a, b: mpnn.where(_T0, a, b), [X, M], (2, 3), lambda a, b: np.where(True, a, b))
case(
    "where-2x3_cond_0d_2x3",
    lambda a, b: mpnn.where(mpnn.tensor(_CM), a, b),
    [X, M],
    (2, 3),
    lambda a, b: np.where(_CM, a, b),
)
case(
    "where-2x3_cond_2x3_0d",
    lambda a, b: mpnn.where(mpnn.tensor(_CM), a, b),
    [M, Y],
    (2, 3),
    lambda a, b: np.where(_CM, a, b),
)
case("masked_fill-0d_mask_true", lambda a: a.masked_fill(_T0, 0.25), [X], (), lambda a: np.float64(0.25))
case("masked_fill-0d_mask_false", lambda a: a.masked_fill(_F0, 0.25), [X], (), lambda a: a)

# ----- reductions of a 0-d tensor ------------------------------------------------------------------------------
case("sum", lambda a: a.sum(), [X], (), np.sum)
case("mpnn_sum", mpnn.sum, [X], (), np.sum)
case("sum_dim0", lambda a: a.sum(0), [X], (), lambda a: a)
case("sum_dim-1", lambda a: a.sum(-1), [X], (), lambda a: a)
case("sum_dim0_keepdim", lambda a: a.sum(0, keepdim=True), [X], (), lambda a: a)
case("mean", lambda a: a.mean(), [X], (), np.mean)
case("mpnn_mean", mpnn.mean, [X], (), np.mean)
case("mean_dim0", lambda a: a.mean(0), [X], (), lambda a: a)
case("mean_dim-1_keepdim", lambda a: a.mean(-1, keepdim=True), [X], (), lambda a: a)
case("max", lambda a: a.max(), [X], (), np.max)
case("mpnn_max", mpnn.max, [X], (), np.max)
case("max_dim0_values", lambda a: a.max(0).values, [X], (), lambda a: a)
case("max_dim0_keepdim_values", lambda a: a.max(0, keepdim=True)[0], [X], (), lambda a: a)
case("min", lambda a: a.min(), [X], (), np.min)
case("mpnn_min", mpnn.min, [X], (), np.min)
case("min_dim-1_values", lambda a: a.min(-1).values, [X], (), lambda a: a)
case("amax", lambda a: a.amax(), [X], (), np.max)
case("amax_dim0", lambda a: a.amax(0), [X], (), lambda a: a)
case("mpnn_amax_dim-1", lambda a: mpnn.amax(a, -1), [X], (), lambda a: a)
case("amin", lambda a: a.amin(), [X], (), np.min)
case("amin_dim0", lambda a: a.amin(0), [X], (), lambda a: a)
case("mpnn_amin_keepdim", lambda a: mpnn.amin(a, 0, keepdim=True), [X], (), lambda a: a)
case("var_correction0", lambda a: a.var(correction=0), [X], (), lambda a: np.var(a))

# ----- softmax / log_softmax along the only dim a 0-d tensor has ----------------------------------------------
case("softmax_dim0", lambda a: mpnn.softmax(a, dim=0), [X], (), lambda a: np.float64(1.0))
case("softmax_dim-1", lambda a: F.softmax(a, dim=-1), [XN], (), lambda a: np.float64(1.0))
case("log_softmax_dim0", lambda a: mpnn.log_softmax(a, dim=0), [X], (), lambda a: np.float64(0.0))
case("log_softmax_dim-1", lambda a: F.log_softmax(a, dim=-1), [XN], (), lambda a: np.float64(0.0))
case("softmax_dim0_times_x", lambda a: mpnn.softmax(a, dim=0) * a, [X], (), lambda a: a)

# ----- shape ops -------------------------------------------------------------------------------------------------
case("reshape_1", lambda a: a.reshape(1), [X], (1,), lambda a: a.reshape(1))
case("reshape_1_and_back", lambda a: a.reshape(1).reshape(()), [X], (), lambda a: a)
case("reshape_minus1", lambda a: a.reshape(-1), [X], (1,), lambda a: a.reshape(1))
case("reshape_1x1", lambda a: mpnn.reshape(a, (1, 1)), [X], (1, 1), lambda a: a.reshape(1, 1))
case("view_1_and_back", lambda a: a.view(1).view(()), [X], (), lambda a: a)
case("flatten", lambda a: a.flatten(), [X], (1,), lambda a: a.reshape(1))
case("F_flatten", F.flatten, [X], (1,), lambda a: a.reshape(1))
case("unsqueeze0", lambda a: a.unsqueeze(0), [X], (1,), lambda a: a.reshape(1))
case("unsqueeze-1", lambda a: mpnn.unsqueeze(a, -1), [X], (1,), lambda a: a.reshape(1))
case("squeeze", lambda a: a.squeeze(), [X], (), lambda a: a)
case("squeeze0", lambda a: a.squeeze(0), [X], (), lambda a: a)
case("unsqueeze_squeeze", lambda a: a.unsqueeze(0).squeeze(0), [X], (), lambda a: a)
case("expand3", lambda a: a.expand(3), [X], (3,), lambda a: np.full(3, a))
case("expand2x3", lambda a: a.expand(2, 3), [X], (2, 3), lambda a: np.full((2, 3), a))
case("expand_tuple", lambda a: a.expand((2, 3)), [X], (2, 3), lambda a: np.full((2, 3), a))
case("t", lambda a: a.t(), [X], (), lambda a: a)
case("getitem_none", lambda a: a[None], [X], (1,), lambda a: a.reshape(1))
case("getitem_ellipsis", lambda a: a[...], [X], (), lambda a: a)
case("getitem_empty_tuple", lambda a: a[()], [X], (), lambda a: a)
case("getitem_none_ellipsis_none", lambda a: a[None, ..., None], [X], (1, 1), lambda a: a.reshape(1, 1))
case("stack", lambda a, b: mpnn.stack([a, b]), [X, Y], (2,), lambda a, b: np.stack([a, b]))
case("stack_dim-1", lambda a, b: mpnn.stack([a, b], dim=-1), [X, Y], (2,), lambda a, b: np.stack([a, b]))
case(
    "cat_unsqueezed",
    lambda a, b: mpnn.cat([a.unsqueeze(0), b.unsqueeze(0)]),
    [X, Y],
    (2,),
    lambda a, b: np.stack([a, b]),
)

# ----- losses and embedding -----------------------------------------------------------------------------------
case("mse_loss", F.mse_loss, [X, Y], (), lambda a, b: (a - b) ** 2)
case("mse_loss_sum", lambda a, b: F.mse_loss(a, b, reduction="sum"), [X, Y], (), lambda a, b: (a - b) ** 2)
case("mse_loss_none", lambda a, b: F.mse_loss(a, b, reduction="none"), [X, Y], (), lambda a, b: (a - b) ** 2)
case("l1_loss", lambda a: F.l1_loss(a, mpnn.tensor(np.asarray(Y))), [X], (), lambda a: np.abs(a - Y))
case(
    "bce_with_logits",
    lambda a: F.binary_cross_entropy_with_logits(a, mpnn.tensor(np.asarray(0.3))),
    [X],
    (),
    lambda a: _bce_logits(a, 0.3),
)
case(
    "bce_with_logits_none",
    lambda a: F.binary_cross_entropy_with_logits(a, mpnn.tensor(np.asarray(0.8)), reduction="none"),
    [XN],
    (),
    lambda a: _bce_logits(a, 0.8),
)
case("embedding_0d_index", lambda w: F.embedding(mpnn.tensor(2), w), [W], (3,), lambda w: w[2])


@pytest.mark.parametrize("fn,args,shape,ref", CASES)
def test_zero_dim_op(fn, args, shape, ref):
    arrays = [np.asarray(a, dtype=np.float64) for a in args]
    leaves = [mpnn.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*leaves)
    assert isinstance(out, mpnn.Tensor)
    assert out.shape == shape, f"shape {out.shape}, torch gives {shape}"
    assert out.dtype == np.float64
    assert out.requires_grad
    expected = np.asarray(ref(*arrays), dtype=np.float64)
    assert expected.shape == shape  # the reference itself agrees with torch's shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-10, atol=1e-12)
    assert gradcheck(fn, leaves)
    for k, leaf in enumerate(leaves):
        assert leaf.grad is not None, f"input {k} got no gradient"
        assert leaf.grad.shape == leaf.shape, f"input {k}: grad shape {leaf.grad.shape}, leaf {leaf.shape}"
        assert leaf.grad.dtype == np.float64


def test_zero_dim_max_min_with_dim_return_index_zero():
    x = mpnn.tensor(np.asarray(X), requires_grad=True)
    for fn in (lambda a: a.max(0), lambda a: a.min(-1), lambda a: mpnn.max(a, 0, keepdim=True)):
        values, indices = fn(x)
        assert values.shape == () and indices.shape == ()
        assert indices.dtype == np.int64 and indices.item() == 0
        np.testing.assert_allclose(values.data, X)


def test_zero_dim_backward_values_by_hand():
    """Spot values worked out by hand, so a gradcheck that agreed with a wrong forward cannot hide."""
    x = mpnn.tensor(np.asarray(0.5), requires_grad=True)
    y = mpnn.tensor(np.asarray(2.0), requires_grad=True)
    (x**y).backward()  # d/dx x^y = y x^(y-1) = 1; d/dy = x^y ln x = 0.25 ln 0.5
    np.testing.assert_allclose(x.grad.data, 1.0)
    np.testing.assert_allclose(y.grad.data, 0.25 * math.log(0.5))
    assert x.grad.shape == () and y.grad.shape == ()

    m = mpnn.tensor(np.array(P), requires_grad=True)
    s = mpnn.tensor(np.asarray(3.0), requires_grad=True)
    (m * s).sum().backward()  # the 0-d operand's gradient is the sum over the broadcast
    assert s.grad.shape == ()
    np.testing.assert_allclose(s.grad.data, np.sum(P))
    np.testing.assert_allclose(m.grad.data, np.full((2, 3), 3.0))
