"""The ops a PyTorch GPT file uses (issue 12): tril/triu, repeat, flip, roll, prod, logsumexp, cumsum, gather,
scatter, scatter_add, topk, sort, argsort, einsum, multinomial, the axis=/keepdims= aliases and cpu-only devices.

Each op: forward against NumPy, float64 finite-difference gradients (mpnn.core.gradcheck) including a 0-d or
degenerate case where the op allows one, and errors that name the op and the values. A causal attention built
from these ops is gradchecked as a whole. The tests at the end compare with PyTorch when it is installed."""

import numpy as np
import pytest

import mpnn
from mpnn.core import OpError, gradcheck, ops

RNG = np.random.default_rng(20240512)


def T(*shape, positive=False):
    arr = RNG.standard_normal(shape)
    if positive:
        arr = np.abs(arr) + 0.5
    return mpnn.Tensor(arr, dtype="float64", requires_grad=True)


def f64(values, requires_grad=True):
    return mpnn.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad)


def idx(values):
    return mpnn.tensor(np.asarray(values, dtype=np.int64))


def S():
    """A 0-d float64 leaf."""
    return f64(1.7)


# ----- movement: tril, triu, repeat, flip, roll, size ---------------------------------------------------------
@pytest.mark.parametrize("diagonal", [-2, -1, 0, 1, 3])
@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (2, 3, 4)])
def test_tril_triu_forward_and_gradient(shape, diagonal):
    x = T(*shape)
    np.testing.assert_array_equal(mpnn.tril(x, diagonal).data, np.tril(x.data, diagonal))
    np.testing.assert_array_equal(x.triu(diagonal=diagonal).data, np.triu(x.data, diagonal))
    assert gradcheck(lambda a: mpnn.tril(a, diagonal), [x])
    assert gradcheck(lambda a: a.triu(diagonal), [x])


def test_tril_of_ones_is_a_causal_mask_and_of_empty_is_empty():
    m = mpnn.tril(mpnn.ones(3, 3))
    np.testing.assert_array_equal(m.data, [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    assert mpnn.triu(mpnn.ones(0, 3)).shape == (0, 3)
    assert gradcheck(lambda a: a.tril(), [T(0, 3)])


def test_tril_triu_need_two_dims():
    with pytest.raises(OpError, match=r"tril: .*at least 2 dimensions.*\(3,\)"):
        mpnn.tril(mpnn.ones(3))
    with pytest.raises(OpError, match=r"triu: .*at least 2 dimensions.*\(\)"):
        mpnn.tensor(1.0).triu()


@pytest.mark.parametrize(
    "shape,sizes",
    [
        ((2, 3), (2, 1)),
        ((2, 3), (1, 3)),
        ((2, 3), (2, 2, 2)),
        ((3,), (4, 2)),
        ((2, 3), (0, 2)),
        ((), (3,)),
        ((), (2, 3)),
        ((2, 1), (1, 1)),
    ],
)
def test_repeat_forward_and_gradient(shape, sizes):
    x = T(*shape)
    out = x.repeat(*sizes)
    np.testing.assert_array_equal(out.data, np.tile(x.data.reshape((1,) * (len(sizes) - len(shape)) + shape), sizes))
    assert gradcheck(lambda a: a.repeat(*sizes), [x])
    assert x.repeat(sizes).shape == out.shape  # a tuple works as well as varargs


def test_repeat_gradient_sums_the_copies():
    x = f64([1.0, 2.0])
    x.repeat(3, 2).sum().backward()
    np.testing.assert_array_equal(x.grad.data, [6.0, 6.0])


def test_repeat_errors():
    with pytest.raises(OpError, match=r"repeat: number of repeat dims \(1.*smaller.*\(2: shape \(2, 3\)\)"):
        mpnn.ones(2, 3).repeat(2)
    with pytest.raises(OpError, match=r"repeat: repeats must be non-negative, got \(2, -1\)"):
        mpnn.ones(2, 3).repeat(2, -1)


@pytest.mark.parametrize("dims", [(0,), (1,), (-1,), (0, 1), (0, 2), ()])
def test_flip_forward_and_gradient(dims):
    x = T(2, 3, 4)
    out = mpnn.flip(x, dims)
    np.testing.assert_array_equal(out.data, np.flip(x.data, dims) if dims else x.data)
    assert not np.shares_memory(out.data, x.data)  # a copy, as torch.flip
    assert gradcheck(lambda a: a.flip(*dims), [x])
    np.testing.assert_array_equal(mpnn.flip(x, dims=list(dims)).data, out.data)
    np.testing.assert_array_equal(x.flip(dims=dims).data, out.data)


def test_flip_zero_dim_and_errors():
    s = S()
    assert mpnn.flip(s, (0,)).shape == () and gradcheck(lambda a: a.flip(0), [s])
    with pytest.raises(OpError, match=r"flip: dims \(0, 0\) name a dim more than once"):
        mpnn.ones(2, 3).flip(0, 0)
    with pytest.raises(OpError, match=r"flip: dim 2 is out of range for a tensor of 2 dimensions"):
        mpnn.ones(2, 3).flip(2)


@pytest.mark.parametrize(
    "shifts,dims", [(1, None), (-7, None), (1, 0), (2, -1), ((1, -2), (0, 1)), ((5, 1), (1, 1)), (0, 1)]
)
def test_roll_forward_and_gradient(shifts, dims):
    x = T(3, 4)
    out = mpnn.roll(x, shifts, dims)
    np.testing.assert_array_equal(out.data, np.roll(x.data, shifts, dims))
    assert out.shape == x.shape
    assert gradcheck(lambda a: a.roll(shifts, dims), [x])


def test_roll_zero_dim_and_errors():
    s = S()
    assert mpnn.roll(s, 3).shape == () and gradcheck(lambda a: a.roll(3), [s])
    with pytest.raises(OpError, match=r"roll: shifts and dims must align: 2 shifts \(1, 2\) for 1 dims \(0,\)"):
        mpnn.ones(2, 3).roll((1, 2), 0)
    with pytest.raises(OpError, match=r"roll: without dims, shifts must be one int"):
        mpnn.ones(2, 3).roll((1, 2))
    with pytest.raises(OpError, match=r"roll: dim 5 is out of range"):
        mpnn.ones(2, 3).roll(1, 5)
    with pytest.raises(OpError, match=r"roll: dims \(0,\) given but the tensor has no dimensions"):
        s.roll(1, 0)


def test_size_with_negative_dims():
    x = mpnn.ones(2, 3, 4)
    assert x.size() == (2, 3, 4)
    assert (x.size(0), x.size(-1), x.size(-2), x.size(-3)) == (2, 4, 3, 2)
    B, T_, C = x.size()
    assert (B, T_, C) == (2, 3, 4)
    with pytest.raises(IndexError):
        x.size(3)


# ----- reductions: prod, logsumexp, cumsum -------------------------------------------------------------------
@pytest.mark.parametrize("dim,keepdim", [(None, False), (0, False), (1, True), (-1, False)])
def test_prod_forward_and_gradient(dim, keepdim):
    x = T(3, 4)
    out = mpnn.prod(x, dim, keepdim) if dim is not None else mpnn.prod(x)
    ref = np.prod(x.data) if dim is None else np.prod(x.data, axis=dim, keepdims=keepdim)
    np.testing.assert_allclose(out.data, ref, rtol=1e-13)
    assert out.shape == np.shape(ref)
    assert gradcheck(lambda a: a.prod() if dim is None else a.prod(dim, keepdim), [x])


@pytest.mark.parametrize("values", [[2.0, 0.0, 3.0, 4.0], [0.0, 5.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0]])
def test_prod_gradient_is_exact_with_zeros(values):
    x = f64(values)
    x.prod().backward()
    expect = [np.prod(np.delete(values, i)) for i in range(len(values))]
    np.testing.assert_array_equal(x.grad.data, expect)  # no 0/0: the product of the others
    rows = f64([values, values[::-1]])
    assert gradcheck(lambda a: a.prod(1), [rows])
    assert gradcheck(lambda a: a.prod(0, keepdim=True), [rows])


def test_prod_zero_dim_empty_and_dtypes():
    s = S()
    assert mpnn.prod(s).shape == () and gradcheck(lambda a: a.prod(), [s])
    assert mpnn.prod(s, 0).shape == () and gradcheck(lambda a: a.prod(-1), [s])
    e = T(2, 0)
    np.testing.assert_array_equal(e.prod(1).data, [1.0, 1.0])
    assert gradcheck(lambda a: a.prod(1), [e])
    assert mpnn.tensor([1, 2, 3]).prod().dtype == np.int64 and mpnn.tensor([1, 2, 3]).prod().item() == 6
    assert mpnn.ones(2, dtype="float32").prod().dtype == np.float32
    with pytest.raises(OpError, match=r"prod: dim must be one int .*\(0, 1\)"):
        mpnn.ones(2, 3).prod((0, 1))
    with pytest.raises(OpError, match=r"prod: dim 2 is out of range for a tensor of 2 dimensions"):
        mpnn.ones(2, 3).prod(2)


def np_logsumexp(x, axis, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


@pytest.mark.parametrize("dim,keepdim", [(0, False), (1, True), (-1, False), ((0, 2), False), ((0, 1, 2), True)])
def test_logsumexp_forward_and_gradient(dim, keepdim):
    x = T(2, 3, 4)
    np.testing.assert_allclose(mpnn.logsumexp(x, dim, keepdim).data, np_logsumexp(x.data, dim, keepdim), rtol=1e-13)
    assert gradcheck(lambda a: a.logsumexp(dim, keepdim=keepdim), [x])


def test_logsumexp_is_stable():
    x = mpnn.tensor([[1000.0, 1000.0], [-1000.0, -1000.0]], requires_grad=True)  # float32
    out = x.logsumexp(1)
    np.testing.assert_allclose(out.data, [1000 + np.log(2), -1000 + np.log(2)], rtol=1e-6)
    out.sum().backward()
    np.testing.assert_allclose(x.grad.data, np.full((2, 2), 0.5))
    inf = mpnn.tensor([[-np.inf, -np.inf], [0.0, -np.inf]])
    np.testing.assert_array_equal(inf.logsumexp(-1).data, [-np.inf, 0.0])
    assert np.isneginf(mpnn.ones(2, 0).logsumexp(1).data).all()  # an empty sum: log 0
    y = f64([[1.0, -np.inf, 2.0]])
    assert gradcheck(lambda a: a.logsumexp(1), [y])  # exp(-inf) contributes, and gets, nothing


def test_logsumexp_zero_dim_and_errors():
    s = S()
    assert mpnn.logsumexp(s, 0).shape == () and gradcheck(lambda a: a.logsumexp(0), [s])
    assert mpnn.tensor([1, 2]).logsumexp(0).dtype.kind == "f"
    with pytest.raises(OpError, match=r"logsumexp: dim must be given"):
        mpnn.logsumexp(mpnn.ones(2))
    with pytest.raises(OpError, match=r"logsumexp: dim 3 is out of range for a tensor of 2 dimensions"):
        mpnn.ones(2, 3).logsumexp(3)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumsum_forward_and_gradient(dim):
    x = T(3, 4)
    np.testing.assert_allclose(mpnn.cumsum(x, dim).data, np.cumsum(x.data, axis=dim), rtol=1e-13)
    assert gradcheck(lambda a: a.cumsum(dim), [x])


def test_cumsum_zero_dim_dtypes_and_errors():
    s = S()
    assert mpnn.cumsum(s, 0).shape == () and gradcheck(lambda a: a.cumsum(-1), [s])
    assert gradcheck(lambda a: a.cumsum(1), [T(2, 0)])
    ints = mpnn.tensor([1, 2, 3], dtype="int32").cumsum(0)
    assert ints.dtype == np.int64 and ints.tolist() == [1, 3, 6]
    assert mpnn.tensor([1.0, 2.0]).cumsum(0, dtype="float64").dtype == np.float64
    x = f64([1.0, 2.0])
    x.cumsum(0, dtype="float32").sum().backward()
    assert x.grad.dtype == np.float64 and x.grad.tolist() == [2.0, 1.0]
    with pytest.raises(OpError, match=r"cumsum: dim must be one int, got None"):
        mpnn.ones(3).cumsum()
    with pytest.raises(OpError, match=r"cumsum: dim 2 is out of range for a tensor of 1 dimensions"):
        mpnn.ones(3).cumsum(2)


# ----- axis= and keepdims= aliases --------------------------------------------------------------------------------
ALIASED = ["sum", "mean", "max", "min", "amax", "amin", "prod", "std", "var", "argmax", "argmin", "logsumexp"]


def _value(r):
    return (r.values if isinstance(r, tuple) else r).data


@pytest.mark.parametrize("name", ALIASED)
def test_axis_and_keepdims_aliases(name):
    x = mpnn.tensor(RNG.standard_normal((3, 4)))
    fn = getattr(mpnn, name) if hasattr(mpnn, name) else getattr(ops, name)
    for axis in (0, 1, -1):
        want = _value(fn(x, dim=axis, keepdim=True))
        np.testing.assert_array_equal(_value(fn(x, axis=axis, keepdims=True)), want)
        np.testing.assert_array_equal(_value(getattr(x, name)(axis=axis, keepdims=True)), want)
        np.testing.assert_array_equal(_value(getattr(x, name)(axis=axis)), _value(getattr(x, name)(axis)))
    with pytest.raises(TypeError, match=rf"{name}\(\): got both dim=0 and its alias axis=1"):
        getattr(x, name)(dim=0, axis=1)
    with pytest.raises(TypeError, match=rf"{name}\(\): got both keepdim=True and its alias keepdims=True"):
        fn(x, 0, keepdim=True, keepdims=True)


def test_cumsum_axis_alias_and_gradient_through_aliases():
    x = T(3, 4)
    np.testing.assert_array_equal(mpnn.cumsum(x, axis=1).data, x.cumsum(1).data)
    np.testing.assert_array_equal(x.cumsum(axis=0).data, x.cumsum(0).data)
    assert gradcheck(lambda a: a.sum(axis=1, keepdims=True) * a.mean(axis=0), [x])


# ----- gather, scatter, scatter_add ---------------------------------------------------------------------------
def test_gather_forward_and_gradient():
    x = T(3, 4)
    index = np.array([[0, 0, 3], [1, 2, 1]])
    out = mpnn.gather(x, 1, idx(index))
    np.testing.assert_array_equal(out.data, np.take_along_axis(x.data[:2], index, axis=1))
    assert gradcheck(lambda a: a.gather(1, idx(index)), [x])  # repeated indices accumulate
    index0 = np.array([[2, 0, 1, 2]])
    np.testing.assert_array_equal(x.gather(0, idx(index0)).data, np.take_along_axis(x.data, index0, axis=0))
    assert gradcheck(lambda a: a.gather(-2, idx(index0)), [x])


def test_gather_picks_targets_like_cross_entropy():
    logits = T(4, 5)
    target = np.array([1, 0, 4, 4])
    picked = logits.log_softmax(-1).gather(1, idx(target[:, None])).squeeze(1)
    np.testing.assert_allclose(picked.data, logits.log_softmax(-1).data[np.arange(4), target])
    assert gradcheck(lambda a: -a.log_softmax(-1).gather(1, idx(target[:, None])).mean(), [logits])


def test_gather_zero_dim_and_empty():
    s = S()
    assert mpnn.gather(s, 0, idx(0)).shape == () and gradcheck(lambda a: a.gather(0, idx(0)), [s])
    assert gradcheck(lambda a: a.gather(1, mpnn.tensor(np.zeros((3, 0), np.int64))), [T(3, 4)])


def test_gather_errors_name_the_values():
    x = mpnn.ones(3, 4)
    with pytest.raises(OpError, match=r"gather: index 4 is out of bounds for dim 1 with size 4"):
        x.gather(1, idx([[4]]))
    with pytest.raises(OpError, match=r"gather: index -1 is out of bounds for dim 1 with size 4"):
        x.gather(1, idx([[-1]]))
    with pytest.raises(OpError, match=r"gather: index must be an integer tensor .*float32"):
        x.gather(1, mpnn.tensor([[1.0]]))
    with pytest.raises(
        OpError,
        match=r"gather: index must have as many dims as the input: index shape \(2,\), "
        r"input shape \(3, 4\)",
    ):
        x.gather(1, idx([0, 1]))
    with pytest.raises(
        OpError,
        match=r"gather: index of shape \(4, 1\) is larger than the input of shape \(3, 4\) "
        r"in dim 0",
    ):
        x.gather(1, idx([[0], [0], [0], [0]]))
    with pytest.raises(OpError, match=r"gather: dim 2 is out of range for a tensor of 2 dimensions"):
        x.gather(2, idx([[0]]))


def test_scatter_src_and_value_forward_and_gradient():
    x, src = T(3, 5), T(2, 4)
    index = np.array([[4, 0, 2], [1, 3, 0]])
    out = mpnn.scatter(x, 1, idx(index), src)
    ref = x.data.copy()
    for i in range(2):
        for j in range(3):
            ref[i, index[i, j]] = src.data[i, j]
    np.testing.assert_array_equal(out.data, ref)
    assert gradcheck(lambda a, b: mpnn.scatter(a, 1, idx(index), b), [x, src])
    filled = x.scatter(1, idx(index), value=-1.0)
    ref = x.data.copy()
    np.put_along_axis(ref[:2], index, -1.0, axis=1)
    np.testing.assert_array_equal(filled.data, ref)
    np.testing.assert_array_equal(x.scatter(1, idx(index), -1.0).data, ref)  # a number in src's place
    assert gradcheck(lambda a: a.scatter(1, idx(index), 2.5), [x])
    assert gradcheck(lambda b: mpnn.scatter(mpnn.zeros(3, 5, dtype="float64"), 0, idx([[2, 0, 1, 1]]), b), [src])


def test_scatter_zero_dim():
    s, v = S(), f64(-3.0)
    out = mpnn.scatter(s, 0, idx(0), v)
    assert out.shape == () and out.item() == -3.0
    assert gradcheck(lambda a, b: mpnn.scatter(a, 0, idx(0), b), [s, v])


def test_scatter_add_accumulates_repeated_indices():
    x, src = T(2, 3), T(2, 4)
    index = np.array([[0, 0, 2, 0], [1, 1, 1, 2]])
    out = mpnn.scatter_add(x, 1, idx(index), src)
    ref = x.data.copy()
    np.add.at(ref, (np.arange(2)[:, None], index), src.data)
    np.testing.assert_allclose(out.data, ref, rtol=1e-14)
    assert gradcheck(lambda a, b: a.scatter_add(1, idx(index), b), [x, src])
    s = S()
    assert gradcheck(lambda a, b: mpnn.scatter_add(a, 0, idx(0), b), [s, f64(2.0)])


def test_scatter_errors():
    x = mpnn.ones(3, 4)
    with pytest.raises(OpError, match=r"scatter: give src \(a tensor\) or value \(a number\)"):
        mpnn.scatter(x, 1, idx([[0]]))
    with pytest.raises(
        OpError,
        match=r"scatter: index of shape \(2, 1\) is larger than src of shape \(1, 1\) "
        r"in dim 0",
    ):
        mpnn.scatter(x, 1, idx([[0], [1]]), mpnn.ones(1, 1))
    with pytest.raises(OpError, match=r"scatter: src dtype float64 does not match the input's float32"):
        mpnn.scatter(x, 1, idx([[0]]), mpnn.ones(1, 1, dtype="float64"))
    with pytest.raises(OpError, match=r"scatter_add: index 4 is out of bounds for dim 1 with size 4"):
        mpnn.scatter_add(x, 1, idx([[4]]), mpnn.ones(1, 1))
    with pytest.raises(OpError, match=r"scatter: reduce='multiply' is not supported"):
        mpnn.scatter(x, 1, idx([[0]]), mpnn.ones(1, 1), reduce="multiply")


def test_scatter_in_place_equals_scatter_and_is_differentiable():
    x, src = T(3, 5), T(2, 4)
    index = np.array([[4, 0, 2], [1, 3, 0]])
    y = x.clone()
    version = y._version
    assert y.scatter_(1, idx(index), src) is y and y._version == version + 1
    np.testing.assert_array_equal(y.data, mpnn.scatter(x, 1, idx(index), src).data)
    assert gradcheck(lambda a, b: (a * 2).scatter_(1, idx(index), b), [x, src])
    assert gradcheck(lambda a: (a + 0).scatter_(1, idx(index), value=-1.0), [x])
    z = mpnn.zeros(2, 5, dtype="float64")
    z.scatter_(0, idx([[1, 0, 1]]), 7.0)  # a number in src's place, on a plain tensor
    np.testing.assert_array_equal(z.data, [[0, 7, 0, 0, 0], [7, 0, 7, 0, 0]])
    s = S()
    assert gradcheck(lambda a, b: a.clone().scatter_(0, idx(0), b), [s, f64(-3.0)])


def test_scatter_add_in_place_accumulates_and_writes_through_views():
    x, src = T(2, 3), T(2, 4)
    index = np.array([[0, 0, 2, 0], [1, 1, 1, 2]])
    y = x.clone().scatter_add_(1, idx(index), src)
    np.testing.assert_allclose(y.data, mpnn.scatter_add(x, 1, idx(index), src).data, rtol=1e-15)
    assert gradcheck(lambda a, b: a.clone().scatter_add_(1, idx(index), b), [x, src])

    def through_a_view(a, b):  # the write lands in the base; the base's gradient flows through the op
        base = a * 1
        base[1:].scatter_add_(1, idx(index[:1]), b[:1])
        return base

    assert gradcheck(through_a_view, [T(3, 3), src])
    base = mpnn.zeros(3, 3, dtype="float64")
    base[1:].scatter_add_(1, idx([[2, 2]]), mpnn.ones(1, 2, dtype="float64"))
    np.testing.assert_array_equal(base.data, [[0, 0, 0], [0, 0, 2], [0, 0, 0]])


def test_scatter_in_place_errors_and_leaf_refusal():
    x = mpnn.ones(3, 4)
    with pytest.raises(OpError, match=r"scatter_: give src \(a tensor\) or value \(a number\)"):
        x.scatter_(1, idx([[0]]))
    with pytest.raises(OpError, match=r"scatter_add_: index 4 is out of bounds for dim 1 with size 4"):
        x.scatter_add_(1, idx([[4]]), mpnn.ones(1, 1))
    with pytest.raises(OpError, match=r"scatter_add_: src dtype float64 does not match the tensor's float32"):
        x.scatter_add_(1, idx([[0]]), mpnn.ones(1, 1, dtype="float64"))
    with pytest.raises(OpError, match=r"scatter_: reduce='add' is not supported; use scatter_add_"):
        x.scatter_(1, idx([[0]]), mpnn.ones(1, 1), reduce="add")
    np.testing.assert_array_equal(x.data, np.ones((3, 4)))  # nothing was written by a refused call
    leaf = mpnn.ones(2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf tensor that requires grad is being used in an in-place"):
        leaf.scatter_(0, idx([[0, 1]]), 5.0)
    with mpnn.no_grad():
        leaf.scatter_(0, idx([[0, 1]]), 5.0)
    np.testing.assert_array_equal(leaf.data, [[5, 1], [1, 5]])


# ----- sort, argsort, topk --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("descending", [False, True])
def test_sort_forward_and_gradient(dim, descending):
    x = T(3, 4)
    values, indices = mpnn.sort(x, dim, descending)
    order = np.argsort(-x.data if descending else x.data, axis=dim, kind="stable")
    np.testing.assert_array_equal(indices.data, order)
    np.testing.assert_array_equal(values.data, np.take_along_axis(x.data, order, axis=dim))
    assert indices.dtype == np.int64 and not indices.requires_grad
    np.testing.assert_array_equal(x.argsort(dim, descending=descending).data, order)
    assert gradcheck(lambda a: a.sort(dim, descending=descending).values, [x])


def test_sort_is_stable_both_ways_and_puts_nan_last():
    x = mpnn.tensor([1.0, 2.0, 2.0, 1.0, np.nan, 2.0])
    r = x.sort()
    assert r.indices.tolist() == [0, 3, 1, 2, 5, 4]
    assert x.sort(descending=True).indices.tolist() == [4, 1, 2, 5, 0, 3]
    assert type(r).__name__ == "sort" and r._fields == ("values", "indices")
    assert mpnn.argsort(x, descending=True).tolist() == [4, 1, 2, 5, 0, 3]
    s = S()
    v, i = s.sort()
    assert v.shape == () and i.shape == () and i.item() == 0 and gradcheck(lambda a: a.sort(0).values, [s])


@pytest.mark.parametrize(
    "k,dim,largest", [(1, -1, True), (3, -1, True), (4, 1, False), (2, 0, True), (0, 1, True), (3, 0, False)]
)
def test_topk_forward_and_gradient(k, dim, largest):
    x = T(3, 4)
    values, indices = mpnn.topk(x, k, dim=dim, largest=largest)
    order = np.argsort(-x.data if largest else x.data, axis=dim, kind="stable")
    order = np.take(order, np.arange(k), axis=dim)
    np.testing.assert_array_equal(indices.data, order)
    np.testing.assert_array_equal(values.data, np.take_along_axis(x.data, order, axis=dim))
    assert gradcheck(lambda a: a.topk(k, dim, largest).values, [x])


def test_topk_ties_namedtuple_zero_dim_and_top_k_filter():
    r = mpnn.tensor([1.0, 2.0, 2.0, 1.0]).topk(2)
    assert r.indices.tolist() == [1, 2] and r.values.tolist() == [2.0, 2.0]
    assert type(r).__name__ == "topk" and r._fields == ("values", "indices")
    s = S()
    v, i = mpnn.topk(s, 1)
    assert v.shape == () and i.shape == () and gradcheck(lambda a: a.topk(1).values, [s])
    logits = T(2, 6)  # nanoGPT's sampling filter: keep the top k logits, -inf elsewhere

    def top_k(a):
        v, _ = mpnn.topk(a, 3)
        return a.masked_fill(a < v[:, [-1]], float("-inf")).softmax(-1)

    probs = top_k(logits)
    assert ((probs.data > 0).sum(1) == 3).all()
    assert gradcheck(top_k, [logits])


def test_topk_sort_errors():
    x = mpnn.ones(2, 3)
    with pytest.raises(OpError, match=r"topk: k \(4\) is out of range for dim -1 of size 3 \(shape \(2, 3\)\)"):
        x.topk(4)
    with pytest.raises(OpError, match=r"topk: k \(-1\) is out of range"):
        x.topk(-1)
    with pytest.raises(OpError, match=r"topk: dim 2 is out of range for a tensor of 2 dimensions"):
        x.topk(1, dim=2)
    with pytest.raises(OpError, match=r"sort: dim -3 is out of range for a tensor of 2 dimensions"):
        x.sort(-3)
    with pytest.raises(OpError, match=r"argsort: dim 2 is out of range"):
        x.argsort(2)


# ----- einsum -----------------------------------------------------------------------------------------------------
EINSUM = [
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)]),  # attention scores
    ("bhqk,bhkd->bhqd", [(2, 3, 4, 6), (2, 3, 6, 5)]),  # attention-weighted values
    ("bi,oi->bo", [(3, 4), (5, 4)]),  # a linear layer
    ("bti,oi->bto", [(2, 3, 4), (5, 4)]),
    ("ij->ji", [(3, 4)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,jk", [(2, 3), (3, 4)]),  # implicit output
    ("i,j->ij", [(3,), (4,)]),  # outer product
    ("i,i->", [(4,), (4,)]),  # dot
    ("ij->", [(3, 4)]),
    ("ij->j", [(3, 4)]),
    ("ii->i", [(3, 3)]),  # diagonal
    ("ii", [(3, 3)]),  # trace
    ("iij,j->i", [(3, 3, 2), (2,)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),  # three operands
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),  # broadcast batch
    ("b...d,bd->b...", [(2, 3, 4, 5), (2, 5)]),
    ("i,->i", [(3,), ()]),  # a 0-d operand
    ("->", [()]),
    ("ab,cd->", [(2, 3), (4, 5)]),  # letters only one operand has
    ("ij,jk->ik", [(2, 0), (0, 3)]),  # empty contraction: zeros
]


@pytest.mark.parametrize("equation,shapes", EINSUM, ids=[e for e, _ in EINSUM])
def test_einsum_forward_and_gradient(equation, shapes):
    xs = [T(*s) for s in shapes]
    out = mpnn.einsum(equation, *xs)
    ref = np.einsum(equation, *[x.data for x in xs])
    assert out.shape == np.shape(ref)
    np.testing.assert_allclose(out.data, ref, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda *a: mpnn.einsum(equation, *a), xs)
    if len(xs) > 1:  # one operand off the tape
        xs[0].requires_grad = False
        assert gradcheck(lambda *a: mpnn.einsum(equation, *a), xs)


def test_einsum_broadcasts_size_one_dims_and_sums_unlisted_ellipsis_as_torch():
    a, b = T(1, 3), T(4, 1)
    np.testing.assert_allclose(mpnn.einsum("ij,ij->ij", a, b).data, a.data * b.data)
    assert gradcheck(lambda x, y: mpnn.einsum("ij,ij->ij", x, y), [a, b])
    u, v = T(3), T(1)
    np.testing.assert_allclose(mpnn.einsum("i,i", u, v).data, np.sum(u.data) * v.data[0])
    assert gradcheck(lambda x, y: mpnn.einsum("i,i", x, y), [u, v])
    x = T(2, 3)
    np.testing.assert_allclose(mpnn.einsum("...i->i", x).data, x.data.sum(0))  # torch sums the '...' dims
    assert gradcheck(lambda t: mpnn.einsum("...i->i", t), [x])
    np.testing.assert_allclose(mpnn.einsum("ij->ji", [x]).data, x.data.T)  # operands as one list
    assert not np.shares_memory(mpnn.einsum("ij->ji", x).data, x.data)


def test_einsum_matches_matmul_and_linear():
    q, k = T(2, 3, 4, 5), T(2, 3, 6, 5)
    np.testing.assert_allclose(mpnn.einsum("bhqd,bhkd->bhqk", q, k).data, (q @ k.transpose(-2, -1)).data, rtol=1e-12)
    x, w = T(3, 4), T(5, 4)
    np.testing.assert_allclose(mpnn.einsum("bi,oi->bo", x, w).data, ops.linear(x, w).data, rtol=1e-12)


def test_einsum_errors():
    a, b = mpnn.ones(2, 3), mpnn.ones(4, 4)
    with pytest.raises(
        OpError,
        match=r"einsum: subscript j has size 4 for operand 1 which does not broadcast "
        r"with previously seen size 3",
    ):
        mpnn.einsum("ij,jk->ik", a, b)
    with pytest.raises(
        OpError,
        match=r"einsum: the number of subscripts in the equation \(3\) does not match the "
        r"number of dimensions \(2\) for operand 0",
    ):
        mpnn.einsum("bij", a)
    with pytest.raises(OpError, match=r"einsum: output subscript i appears more than once"):
        mpnn.einsum("ij->ii", a)
    with pytest.raises(OpError, match=r"einsum: output subscript k does not appear in the equation"):
        mpnn.einsum("ij->k", a)
    with pytest.raises(OpError, match=r"einsum: equation 'ij,jk' has subscripts for 2 operands but 1 were given"):
        mpnn.einsum("ij,jk", a)
    with pytest.raises(OpError, match=r"einsum: invalid subscript '1'"):
        mpnn.einsum("i1", a)
    with pytest.raises(OpError, match=r"einsum: operands have different dtypes \['float32', 'float64'\]"):
        mpnn.einsum("ij,jk", a, mpnn.ones(3, 2, dtype="float64"))
    with pytest.raises(OpError, match=r"einsum: needs at least one operand"):
        mpnn.einsum("ij")


# ----- multinomial ------------------------------------------------------------------------------------------------
def test_multinomial_repeats_under_manual_seed_and_uses_a_given_generator():
    p = mpnn.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 5.0, 2.0]])
    mpnn.manual_seed(7)
    a = mpnn.multinomial(p, 3)
    b = p.multinomial(5, replacement=True)
    mpnn.manual_seed(7)
    assert mpnn.multinomial(p, 3).tolist() == a.tolist()
    assert p.multinomial(5, replacement=True).tolist() == b.tolist()
    assert a.dtype == np.int64 and a.shape == (2, 3) and b.shape == (2, 5) and not a.requires_grad
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert mpnn.multinomial(p, 2, generator=g1).tolist() == mpnn.multinomial(p, 2, generator=g2).tolist()


def test_multinomial_frequencies_follow_unnormalized_weights():
    mpnn.manual_seed(0)
    w = mpnn.tensor([1.0, 0.0, 3.0, 6.0])  # sums to 10, not 1
    draws = mpnn.multinomial(w, 20000, replacement=True)
    assert draws.shape == (20000,)
    freq = np.bincount(draws.data, minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.3, 0.6], atol=0.015)
    assert freq[1] == 0  # a zero weight is never drawn


def test_multinomial_without_replacement():
    mpnn.manual_seed(1)
    w = mpnn.tensor([[0.0, 1.0, 1.0, 0.0, 2.0]] * 50)
    draws = mpnn.multinomial(w, 3)
    for row in draws.tolist():
        assert sorted(row) == [1, 2, 4]  # no repeats, never a zero weight
    first = np.bincount(draws.data[:, 0], minlength=5) / 50  # the first draw follows the weights
    assert first[4] > first[1] and first[4] > first[2]
    one = mpnn.multinomial(mpnn.tensor([0.0, 1.0, 0.0]), 1)
    assert one.tolist() == [1]


def test_multinomial_errors():
    with pytest.raises(OpError, match=r"multinomial: cannot sample 4 > 3 categories without replacement"):
        mpnn.multinomial(mpnn.tensor([0.2, 0.3, 0.5]), 4)
    with pytest.raises(OpError, match=r"multinomial: cannot sample 2 without replacement from a row with only 1"):
        mpnn.multinomial(mpnn.tensor([0.0, 0.3, 0.0]), 2)
    with pytest.raises(OpError, match=r"multinomial: num_samples must be a positive int, got 0"):
        mpnn.multinomial(mpnn.tensor([0.2, 0.8]), 0)
    with pytest.raises(OpError, match=r"multinomial: probability tensor contains either inf, nan or element < 0"):
        mpnn.multinomial(mpnn.tensor([0.2, -0.8]), 1)
    with pytest.raises(OpError, match=r"multinomial: invalid distribution: a row's weights sum to 0"):
        mpnn.multinomial(mpnn.tensor([[0.2, 0.8], [0.0, 0.0]]), 1, replacement=True)
    with pytest.raises(OpError, match=r"multinomial: prob_dist must be 1 or 2 dim, got shape \(\)"):
        mpnn.multinomial(mpnn.tensor(1.0), 1)
    with pytest.raises(TypeError, match=r"multinomial: generator must be an np.random.Generator"):
        mpnn.multinomial(mpnn.tensor([1.0]), 1, generator=3)


# ----- devices and dtypes on factories -------------------------------------------------------------------------
def test_factories_take_cpu_device_and_refuse_cuda_by_name():
    z = mpnn.zeros(2, 3, dtype=mpnn.float64, device="cpu")
    assert z.shape == (2, 3) and z.dtype == np.float64
    assert mpnn.arange(5, device="cpu").tolist() == [0, 1, 2, 3, 4]
    o = mpnn.ones(3)
    assert o.to("cpu") is o and o.cpu() is o and o.device == "cpu"
    assert mpnn.ones(2, device="cpu:0").shape == (2,)
    for make in (
        lambda: mpnn.zeros(2, device="cuda"),
        lambda: mpnn.arange(3, device="cuda:1"),
        lambda: mpnn.tensor([1.0], device="cuda"),
        lambda: mpnn.ones(2).to("cuda"),
        lambda: mpnn.ones(2).cuda(),
        lambda: mpnn.randn(2, device="mps"),
    ):
        with pytest.raises(RuntimeError, match=r"device '(cuda|cuda:1|mps)' is not available"):
            make()


# ----- a causal attention built from these ops ---------------------------------------------------------------
def causal_attention(q, k, v, use_einsum=False):
    """nanoGPT's attention: scores, a tril mask, softmax, weighted values."""
    T_ = q.size(-2)
    scale = 1.0 / np.sqrt(q.size(-1))
    if use_einsum:
        att = mpnn.einsum("bhqd,bhkd->bhqk", q, k) * scale
    else:
        att = (q @ k.transpose(-2, -1)) * scale
    mask = mpnn.tril(mpnn.ones(T_, T_)).view(1, 1, T_, T_)
    att = att.masked_fill(mask == 0, float("-inf"))
    att = att.softmax(dim=-1)
    return mpnn.einsum("bhqk,bhkd->bhqd", att, v) if use_einsum else att @ v


@pytest.mark.parametrize("use_einsum", [False, True])
def test_causal_attention_gradcheck(use_einsum):
    q, k, v = T(2, 2, 4, 3), T(2, 2, 4, 3), T(2, 2, 4, 3)
    out = causal_attention(q, k, v, use_einsum)
    # reference in NumPy: row i attends to keys 0..i
    s = q.data @ np.swapaxes(k.data, -1, -2) / np.sqrt(3)
    s = np.where(np.tril(np.ones((4, 4))) == 1, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.data, p @ v.data, rtol=1e-12)
    np.testing.assert_allclose(out.data[:, :, 0], v.data[:, :, 0], rtol=1e-12)  # the first query sees one key
    assert gradcheck(lambda a, b, c: causal_attention(a, b, c, use_einsum), [q, k, v])


def test_single_position_attention_is_degenerate_but_differentiable():
    q, k, v = T(1, 1, 1, 2), T(1, 1, 1, 2), T(1, 1, 1, 2)
    out = causal_attention(q, k, v, use_einsum=True)
    np.testing.assert_allclose(out.data, v.data)
    assert gradcheck(lambda a, b, c: causal_attention(a, b, c, use_einsum=True), [q, k, v])


# ----- against PyTorch, when installed (optional) ----------------------------------------------------------------
def _torch():
    return pytest.importorskip("torch")


def _both(torch, shapes, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in shapes]
    mine = [mpnn.tensor(a, dtype="float64", requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    return mine, theirs


TORCH_CASES = [
    ("tril", [(3, 4)], lambda m, a: m.tril(a, -1), lambda t, a: t.tril(a, -1)),
    ("triu", [(2, 3, 4)], lambda m, a: m.triu(a, 1), lambda t, a: t.triu(a, 1)),
    ("repeat", [(2, 3)], lambda m, a: a.repeat(2, 1, 3), lambda t, a: a.repeat(2, 1, 3)),
    ("flip", [(2, 3, 4)], lambda m, a: m.flip(a, (0, 2)), lambda t, a: t.flip(a, (0, 2))),
    ("roll", [(3, 4)], lambda m, a: m.roll(a, (1, -5), (0, 1)), lambda t, a: t.roll(a, (1, -5), (0, 1))),
    ("roll_flat", [(3, 4)], lambda m, a: m.roll(a, 5), lambda t, a: t.roll(a, 5)),
    ("prod", [(3, 4)], lambda m, a: m.prod(a, 1), lambda t, a: t.prod(a, 1)),
    ("prod_all", [(3, 4)], lambda m, a: m.prod(a), lambda t, a: t.prod(a)),
    ("logsumexp", [(2, 3, 4)], lambda m, a: m.logsumexp(a, (0, 2)), lambda t, a: t.logsumexp(a, (0, 2))),
    ("cumsum", [(3, 4)], lambda m, a: m.cumsum(a, -1), lambda t, a: t.cumsum(a, -1)),
    (
        "gather",
        [(3, 4)],
        lambda m, a: m.gather(a, 1, idx([[0, 0], [3, 1]])),
        lambda t, a: t.gather(a, 1, t.tensor([[0, 0], [3, 1]])),
    ),
    (
        "scatter",
        [(3, 4), (2, 2)],
        lambda m, a, b: m.scatter(a, 1, idx([[3, 0], [1, 2]]), b),
        lambda t, a, b: t.scatter(a, 1, t.tensor([[3, 0], [1, 2]]), b),
    ),
    (
        "scatter_add",
        [(3, 4), (2, 3)],
        lambda m, a, b: m.scatter_add(a, 1, idx([[3, 3, 0], [1, 1, 1]]), b),
        lambda t, a, b: t.scatter_add(a, 1, t.tensor([[3, 3, 0], [1, 1, 1]]), b),
    ),
    (
        "topk",
        [(3, 5)],
        lambda m, a: m.topk(a, 2, 0, largest=False).values,
        lambda t, a: t.topk(a, 2, 0, largest=False).values,
    ),
    (
        "sort",
        [(3, 5)],
        lambda m, a: m.sort(a, 1, descending=True).values,
        lambda t, a: t.sort(a, 1, descending=True).values,
    ),
    (
        "einsum_attn",
        [(2, 3, 4, 5), (2, 3, 6, 5)],
        lambda m, a, b: m.einsum("bhqd,bhkd->bhqk", a, b),
        lambda t, a, b: t.einsum("bhqd,bhkd->bhqk", a, b),
    ),
    (
        "einsum_bcast",
        [(2, 1, 3, 4), (5, 4, 2)],
        lambda m, a, b: m.einsum("...ij,...jk->...ik", a, b),
        lambda t, a, b: t.einsum("...ij,...jk->...ik", a, b),
    ),
    ("einsum_trace", [(3, 3)], lambda m, a: m.einsum("ii", a), lambda t, a: t.einsum("ii", a)),
    ("einsum_sum_ellipsis", [(2, 3)], lambda m, a: m.einsum("...i->i", a), lambda t, a: t.einsum("...i->i", a)),
    (
        "attention",
        [(2, 2, 4, 3)] * 3,
        lambda m, a, b, c: causal_attention(a, b, c),
        lambda t, a, b, c: t.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True),
    ),
]


@pytest.mark.parametrize("name,shapes,mine,theirs", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_against_torch(name, shapes, mine, theirs):
    torch = _torch()
    xs, ts = _both(torch, shapes)
    out, ref = mine(mpnn, *xs), theirs(torch, *ts)
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    w = np.random.default_rng(1).standard_normal(out.shape)
    (out * mpnn.tensor(w, dtype="float64")).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    for x, t in zip(xs, ts):
        np.testing.assert_allclose(x.grad.data, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_prod_gradient_with_zeros_against_torch():
    torch = _torch()
    values = np.array([[2.0, 0.0, 3.0], [0.0, 0.0, 4.0], [1.0, 2.0, 3.0]])
    x, t = f64(values), torch.tensor(values, requires_grad=True)
    x.prod(1).sum().backward()
    t.prod(1).sum().backward()
    np.testing.assert_array_equal(x.grad.data, t.grad.numpy())


def test_sort_topk_indices_against_torch():
    torch = _torch()
    data = np.array([[1.0, 2.0, 2.0, 1.0, 0.5], [3.0, 3.0, 3.0, -1.0, 3.0]])
    x, t = mpnn.tensor(data), torch.tensor(data)
    for descending in (False, True):
        assert (
            x.sort(-1, descending=descending).indices.tolist()
            == t.sort(dim=-1, descending=descending, stable=True).indices.tolist()
        )
    np.testing.assert_array_equal(x.topk(3).values.data, t.topk(3).values.numpy())


# ----- layer_norm's backward branches -------------------------------------------------------------------------
@pytest.mark.parametrize("need", ["input", "weight", "both"])
def test_layer_norm_backward_branches(need):
    """The kernel's three backward loops (input gradient only; weight and bias only, summed per row; both in one
    pass): float64 finite differences, and float32 gradients against float64 ones."""
    from mpnn.nn import functional as F

    arrays = [RNG.standard_normal(s) for s in ((3, 7, 24), (24,), (24,))]
    grads = {"input": (True, False), "weight": (False, True), "both": (True, True)}[need]

    def leaves(dtype):
        flags = (grads[0], grads[1], grads[1])
        return [mpnn.Tensor(a, dtype=dtype, requires_grad=f) for a, f in zip(arrays, flags)]

    assert gradcheck(lambda x, w, b: F.layer_norm(x, (24,), w, b), leaves("float64"))
    got = {}
    for dtype in ("float32", "float64"):
        x, w, b = leaves(dtype)
        (F.layer_norm(x, (24,), w, b) * mpnn.tensor(np.linspace(-1, 1, 24), dtype=dtype)).sum().backward()
        got[dtype] = [None if t.grad is None else t.grad.data for t in (x, w, b)]
    for g32, g64, req in zip(got["float32"], got["float64"], (grads[0], grads[1], grads[1])):
        assert (g32 is not None) == req and (g64 is not None) == req
        if req:
            assert g32.dtype == np.float32
            np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-5)
