"""The tape's semantics, checked against what PyTorch does: a tensor reused at different depths of one graph,
in-place ops (and the version counter that makes them safe), leaves that must not be written in place, a graph
freed by backward, grad mode (decorators, set_grad_enabled, per thread), 0-d tensors, and the small
torch-shaped conveniences (expand with -1, bool sums, .to / .cpu / iteration / format, randint, hooks).

Every expected value here is worked out by hand or with NumPy in float64; PyTorch is not imported."""

import threading

import numpy as np
import pytest

import mpnn
from mpnn.core import OpError, gradcheck
from mpnn.nn import functional as F


def f64(values, requires_grad=True):
    return mpnn.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


@pytest.fixture(autouse=True)
def grad_mode_restored():
    """A failing grad-mode test must not leave recording off for the tests after it."""
    yield
    if not mpnn.is_grad_enabled():
        mpnn.enable_grad().__enter__()


X3 = [0.1, 0.5, 1.0]


# ----- a. one tensor reaching the output along paths of different lengths ------------------------------------
def test_reuse_x_plus_exp_x():
    x = f64(X3)
    (x + x.exp()).sum().backward()
    np.testing.assert_allclose(x.grad.data, 1 + np.exp(X3), rtol=1e-12)


def test_reuse_exp_x_plus_x():
    x = f64(X3)
    (x.exp() + x).sum().backward()
    np.testing.assert_allclose(x.grad.data, 1 + np.exp(X3), rtol=1e-12)


def test_reuse_x_times_sigmoid_x():
    x = f64(X3)
    (x * x.sigmoid()).sum().backward()
    v = np.asarray(X3)
    s = sigmoid(v)
    np.testing.assert_allclose(x.grad.data, s + v * s * (1 - s), rtol=1e-12)


def test_reuse_normalize_by_sum():
    x = f64(X3)
    w = np.array([1.0, 2.0, 3.0])
    y = x / x.sum(-1, keepdim=True)
    (y * mpnn.tensor(w)).sum().backward()
    v = np.asarray(X3)
    s = v.sum()
    np.testing.assert_allclose(y.data, v / s, rtol=1e-12)
    # d/dx_j sum_i w_i x_i / S = w_j / S - sum_i w_i x_i / S^2
    np.testing.assert_allclose(x.grad.data, w / s - (w * v).sum() / s**2, rtol=1e-12)
    assert gradcheck(lambda a: a / a.sum(-1, keepdim=True), [f64(X3)])


def test_reuse_softmax_written_by_hand():
    def softmax(a):
        e = (a - a.max()).exp()
        return e / e.sum()

    x = f64(X3)
    w = np.array([0.3, -1.0, 2.0])
    y = softmax(x)
    (y * mpnn.tensor(w)).sum().backward()
    v = np.asarray(X3)
    s = np.exp(v - v.max()) / np.exp(v - v.max()).sum()
    np.testing.assert_allclose(y.data, s, rtol=1e-12)
    np.testing.assert_allclose(x.grad.data, s * (w - (w * s).sum()), rtol=1e-10, atol=1e-14)
    assert gradcheck(softmax, [f64(X3)])


def _residual_mlp_inputs():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4))
    w = rng.standard_normal((4, 4)) * 0.5
    b = rng.standard_normal(4) * 0.1
    return x, w, b


def _residual_mlp_numpy(x, w, b, depth=3):
    h, pre = x, []
    for _ in range(depth):
        z = h @ w.T + b
        pre.append(z)
        h = h + np.maximum(z, 0)
    return h, np.concatenate([p.ravel() for p in pre])


def test_reuse_residual_mlp_block():
    """h = h + relu(linear(h)) three times with one shared weight: h and W both reach the output along paths
    of several lengths."""
    xn, wn, bn = _residual_mlp_inputs()
    ref, pre = _residual_mlp_numpy(xn, wn, bn)
    assert np.abs(pre).min() > 1e-3  # the test's own precondition: no pre-activation sits on relu's kink

    def block(x, w, b):
        h = x
        for _ in range(3):
            h = h + F.relu(F.linear(h, w, b))
        return h

    x, w, b = f64(xn), f64(wn), f64(bn)
    np.testing.assert_allclose(block(x, w, b).data, ref, rtol=1e-12)
    assert gradcheck(block, [x, w, b])


# ----- b. in-place ops ----------------------------------------------------------------------------------------
INPLACE = [
    ("add_", lambda t: t.add_(2.0), [3.0, 4.0, 5.0]),
    ("add_tensor", lambda t: t.add_(mpnn.tensor([1.0, 1.0, 1.0])), [2.0, 3.0, 4.0]),
    ("sub_", lambda t: t.sub_(0.5), [0.5, 1.5, 2.5]),
    ("mul_", lambda t: t.mul_(3.0), [3.0, 6.0, 9.0]),
    ("mul_tensor", lambda t: t.mul_(mpnn.tensor([2.0, 0.0, -1.0])), [2.0, 0.0, -3.0]),
    ("div_", lambda t: t.div_(2.0), [0.5, 1.0, 1.5]),
    ("copy_", lambda t: t.copy_(mpnn.tensor([7.0, 8.0, 9.0])), [7.0, 8.0, 9.0]),
    ("copy_float64_source", lambda t: t.copy_(f64([0.25, 0.5, 0.75], requires_grad=False)), [0.25, 0.5, 0.75]),
    ("fill_", lambda t: t.fill_(4.0), [4.0, 4.0, 4.0]),
    ("zero_", lambda t: t.zero_(), [0.0, 0.0, 0.0]),
    ("clamp_min_max", lambda t: t.clamp_(min=1.5, max=2.5), [1.5, 2.0, 2.5]),
    ("clamp_min", lambda t: t.clamp_(min=2.5), [2.5, 2.5, 3.0]),
    ("clamp_max", lambda t: t.clamp_(max=1.5), [1.0, 1.5, 1.5]),
]


@pytest.mark.parametrize("name,op,expected", INPLACE, ids=[c[0] for c in INPLACE])
def test_inplace_method_updates_same_object_and_buffer(name, op, expected):
    t = mpnn.tensor([1.0, 2.0, 3.0])
    buf = t.data
    tail = t[1:]  # a view taken before the write sees it (shared storage, as in torch)
    out = op(t)
    assert out is t
    assert t.dtype == np.float32
    np.testing.assert_allclose(t.data, expected)
    assert np.shares_memory(t.data, buf)
    np.testing.assert_allclose(buf, expected)
    np.testing.assert_allclose(tail.data, expected[1:])


def _iadd(t, v):
    t += v
    return t


def _isub(t, v):
    t -= v
    return t


def _imul(t, v):
    t *= v
    return t


def _idiv(t, v):
    t /= v
    return t


AUGMENTED = [
    ("iadd_number", _iadd, 1.0, [2.0, 3.0, 4.0]),
    ("iadd_tensor", _iadd, [0.5, 0.5, 0.5], [1.5, 2.5, 3.5]),
    ("isub_number", _isub, 1.0, [0.0, 1.0, 2.0]),
    ("isub_tensor", _isub, [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]),
    ("imul_number", _imul, 2.0, [2.0, 4.0, 6.0]),
    ("imul_tensor", _imul, [3.0, 2.0, 1.0], [3.0, 4.0, 3.0]),
    ("idiv_number", _idiv, 4.0, [0.25, 0.5, 0.75]),
    ("idiv_tensor", _idiv, [1.0, 4.0, 2.0], [1.0, 0.5, 1.5]),
]


@pytest.mark.parametrize("name,op,operand,expected", AUGMENTED, ids=[c[0] for c in AUGMENTED])
def test_augmented_assignment_is_in_place(name, op, operand, expected):
    t = mpnn.tensor([1.0, 2.0, 3.0])
    alias, buf = t, t.data
    if isinstance(operand, list):
        operand = mpnn.tensor(operand)
    result = op(t, operand)
    assert result is alias
    assert alias.dtype == np.float32
    np.testing.assert_allclose(alias.data, expected)
    assert np.shares_memory(alias.data, buf)
    np.testing.assert_allclose(buf, expected)


def test_augmented_assignment_keeps_integer_dtype():
    t = mpnn.tensor([1, 2, 3])
    alias = t
    t += 2
    t *= 3
    t -= 1
    assert t is alias
    assert t.dtype == np.int64
    np.testing.assert_array_equal(t.data, [8, 11, 14])


def test_inplace_on_a_strided_view_writes_the_base():
    base = mpnn.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    col = base[:, 1]
    col.mul_(10.0)
    np.testing.assert_allclose(base.data, [[1.0, 20.0, 3.0], [4.0, 50.0, 6.0]])
    row = base[1]
    row += 1.0
    np.testing.assert_allclose(base.data, [[1.0, 20.0, 3.0], [5.0, 51.0, 7.0]])


def test_sgd_step_written_with_augmented_assignment_updates_parameters():
    w = mpnn.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    b = mpnn.tensor([0.5, -0.5], requires_grad=True)
    params = [w, b]
    ((w * 2).sum() + (b * b).sum()).backward()
    np.testing.assert_allclose(w.grad.data, [[2.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(b.grad.data, [1.0, -1.0])
    bufs = [p.data for p in params]
    lr = 0.1
    with mpnn.no_grad():
        for p in params:
            p -= lr * p.grad
    assert params[0] is w and params[1] is b
    np.testing.assert_allclose(w.data, [[0.8, 1.8], [2.8, 3.8]], rtol=1e-6)
    np.testing.assert_allclose(b.data, [0.4, -0.4], rtol=1e-6)
    for p, buf in zip(params, bufs):
        assert np.shares_memory(p.data, buf)
        assert p.requires_grad and p.is_leaf and p.grad_fn is None


# ----- c. saved tensors and the version counter ---------------------------------------------------------------
def test_setitem_on_a_saved_tensor_makes_backward_raise():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    z = y * y  # mul saves y
    y[0] = 100.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_add_inplace_on_a_saved_tensor_makes_backward_raise():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    z = y * y
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_inplace_on_a_saved_output_makes_backward_raise():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = x.exp()  # exp saves its output
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inplace_on_a_tensor_backward_does_not_need_is_fine():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    z = y + 1  # add saves nothing
    y.add_(5)
    np.testing.assert_allclose(z.data, [3.0, 5.0])
    np.testing.assert_allclose(y.data, [7.0, 9.0])
    z.sum().backward()
    np.testing.assert_allclose(x.grad.data, [2.0, 2.0])


def test_inplace_then_use_is_differentiable():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    y.add_(1)
    (y * y).sum().backward()
    # y = 2x + 1, d/dx sum y^2 = 2 y * 2
    np.testing.assert_allclose(x.grad.data, [12.0, 20.0])


def test_setitem_on_a_non_leaf_is_differentiable():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = x * 3
    y[0] = 0.0
    np.testing.assert_allclose(y.data, [0.0, 6.0])
    y.sum().backward()
    np.testing.assert_allclose(x.grad.data, [0.0, 3.0])


def test_setitem_value_that_requires_grad_gets_its_gradient():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = x * 1
    v = mpnn.tensor(5.0, requires_grad=True)
    y[1] = v * 2
    np.testing.assert_allclose(y.data, [1.0, 10.0])
    y.sum().backward()
    assert v.grad is not None and v.grad.shape == ()
    np.testing.assert_allclose(v.grad.data, 2.0)
    np.testing.assert_allclose(x.grad.data, [1.0, 0.0])


def test_inplace_through_a_view_of_a_non_leaf():
    x = mpnn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * 1
    v = y[1:]
    v.mul_(3)
    np.testing.assert_allclose(y.data, [1.0, 6.0, 9.0])
    y.sum().backward()
    np.testing.assert_allclose(x.grad.data, [1.0, 3.0, 3.0])


def test_backward_from_the_view_written_in_place():
    x = mpnn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * 1
    v = y[1:]
    v.mul_(3)
    (v * v).sum().backward()  # v = 3 x[1:], d/dx sum v^2 = 2 v * 3
    np.testing.assert_allclose(x.grad.data, [0.0, 36.0, 54.0])


def test_version_counter_counts_inplace_ops_and_is_shared_with_views():
    t = mpnn.tensor([1.0, 2.0, 3.0, 4.0])
    assert isinstance(t._version, int)
    assert t._version == 0
    t.add_(1)
    assert t._version == 1
    _ = t + 1  # out of place: no bump
    assert t._version == 1
    tail = t[1:]
    assert tail._version == 1
    tail.mul_(2)
    assert tail._version == 2 and t._version == 2
    r = t.reshape(2, 2)
    r[0, 0] = 5.0
    assert r._version == 3 and t._version == 3 and tail._version == 3
    t += 1
    assert t._version == 4 and r._version == 4
    t[0] = 0.0
    assert t._version == 5 and tail._version == 5
    with mpnn.no_grad():
        t.zero_()
    assert t._version == 6
    np.testing.assert_allclose(t.data, 0.0)


def test_version_counter_of_a_non_leaf_and_its_view():
    x = mpnn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * 2
    v0 = y._version
    v = y[1:]
    v.add_(1)
    assert y._version == v0 + 1 and v._version == v0 + 1


# ----- d. a leaf that requires grad cannot be written in place (outside no_grad) ------------------------------
def _copy_leaf(a):
    a.copy_(mpnn.tensor([0.0, 0.0, 0.0, 0.0]))


def _iadd_leaf(a):
    a += 1


def _setitem_leaf(a):
    a[0] = 9.0


def _reshape_view_setitem(a):
    a.reshape(2, 2)[0, 0] = 9.0


LEAF_WRITES = [
    ("setitem", _setitem_leaf, [9.0, 2.0, 3.0, 4.0]),
    ("add_", lambda a: a.add_(1), [2.0, 3.0, 4.0, 5.0]),
    ("iadd", _iadd_leaf, [2.0, 3.0, 4.0, 5.0]),
    ("zero_", lambda a: a.zero_(), [0.0, 0.0, 0.0, 0.0]),
    ("fill_", lambda a: a.fill_(7.0), [7.0, 7.0, 7.0, 7.0]),
    ("copy_", _copy_leaf, [0.0, 0.0, 0.0, 0.0]),
    ("reshape_view_setitem", _reshape_view_setitem, [9.0, 2.0, 3.0, 4.0]),
    ("slice_view_add_", lambda a: a[0:2].add_(1), [2.0, 3.0, 3.0, 4.0]),
]


@pytest.mark.parametrize("name,write,_", LEAF_WRITES, ids=[c[0] for c in LEAF_WRITES])
def test_inplace_on_a_leaf_that_requires_grad_raises(name, write, _):
    a = mpnn.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        write(a)
    np.testing.assert_allclose(a.data, [1.0, 2.0, 3.0, 4.0])  # refused before writing


@pytest.mark.parametrize("name,write,expected", LEAF_WRITES, ids=[c[0] for c in LEAF_WRITES])
def test_inplace_on_a_leaf_under_no_grad_is_allowed(name, write, expected):
    a = mpnn.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    alias = a
    with mpnn.no_grad():
        write(a)
    np.testing.assert_allclose(alias.data, expected)
    assert alias.requires_grad and alias.is_leaf
    (alias * alias).sum().backward()
    np.testing.assert_allclose(alias.grad.data, 2 * np.asarray(expected))


# ----- e. a graph is freed by backward -------------------------------------------------------------------------
def test_second_backward_through_a_freed_graph_raises():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward()
    np.testing.assert_allclose(x.grad.data, [2.0, 4.0])
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()
    np.testing.assert_allclose(x.grad.data, [2.0, 4.0])


def test_retain_graph_allows_a_second_backward():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    np.testing.assert_allclose(x.grad.data, [2.0, 4.0])
    y.backward()
    np.testing.assert_allclose(x.grad.data, [4.0, 8.0])


def test_non_leaf_grad_is_none_unless_retained():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    h = x * 2
    k = x * 3
    h.retain_grad()
    assert x.is_leaf is True
    assert h.is_leaf is False and k.is_leaf is False
    ((h * h).sum() + k.sum()).backward()
    np.testing.assert_allclose(h.grad.data, [4.0, 8.0])  # 2h
    assert k.grad is None
    np.testing.assert_allclose(x.grad.data, [11.0, 19.0])  # 8x + 3
    assert h.is_leaf is False and k.is_leaf is False  # backward frees buffers, not the grad_fn
    assert h.grad_fn is not None


def test_result_of_ops_on_tensors_without_grad_is_a_leaf():
    y = mpnn.tensor([1.0, 2.0]) * 2
    assert y.is_leaf is True and y.requires_grad is False and y.grad_fn is None


# ----- f. grad mode -------------------------------------------------------------------------------------------
def test_enable_grad_decorator_records_inside_no_grad():
    seen = []

    @mpnn.enable_grad()
    def double(a):
        seen.append(mpnn.is_grad_enabled())
        return a * 2

    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    with mpnn.no_grad():
        y = double(x)
        assert mpnn.is_grad_enabled() is False
    assert seen == [True]
    assert y.requires_grad is True and y.grad_fn is not None
    y.sum().backward()
    np.testing.assert_allclose(x.grad.data, [2.0, 2.0])


def test_no_grad_decorator_stops_recording():
    @mpnn.no_grad()
    def double(a):
        assert mpnn.is_grad_enabled() is False
        return a * 2

    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    y = double(x)
    assert mpnn.is_grad_enabled() is True
    assert y.requires_grad is False and y.grad_fn is None


def test_set_grad_enabled_as_a_function_call():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    try:
        mpnn.set_grad_enabled(False)
        assert mpnn.is_grad_enabled() is False
        assert (x * 2).requires_grad is False
        mpnn.set_grad_enabled(True)
        assert mpnn.is_grad_enabled() is True
        assert (x * 2).requires_grad is True
    finally:
        mpnn.enable_grad().__enter__()


def test_set_grad_enabled_as_a_context_manager():
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    with mpnn.set_grad_enabled(False):
        assert mpnn.is_grad_enabled() is False
        assert (x * 2).requires_grad is False
    assert mpnn.is_grad_enabled() is True
    with mpnn.no_grad():
        with mpnn.set_grad_enabled(True):
            assert (x * 2).requires_grad is True
        assert mpnn.is_grad_enabled() is False
    assert mpnn.is_grad_enabled() is True


def test_set_grad_enabled_as_a_decorator():
    @mpnn.set_grad_enabled(False)
    def double(a):
        assert mpnn.is_grad_enabled() is False
        return a * 2

    assert mpnn.is_grad_enabled() is True  # decorating does not change the mode
    x = mpnn.tensor([1.0, 2.0], requires_grad=True)
    assert double(x).requires_grad is False
    assert mpnn.is_grad_enabled() is True
    assert (x * 2).requires_grad is True


def test_grad_mode_is_thread_local_no_grad_in_another_thread():
    entered, release = threading.Event(), threading.Event()

    def worker():
        with mpnn.no_grad():
            entered.set()
            release.wait(10)

    th = threading.Thread(target=worker)
    th.start()
    try:
        assert entered.wait(10)
        assert mpnn.is_grad_enabled() is True
        x = mpnn.tensor([1.0, 2.0], requires_grad=True)
        y = x * 2
        assert y.requires_grad is True and y.grad_fn is not None
    finally:
        release.set()
        th.join(10)
    assert mpnn.is_grad_enabled() is True


def test_grad_mode_is_thread_local_new_thread_starts_enabled():
    seen = {}

    def worker():
        seen["enabled"] = mpnn.is_grad_enabled()
        x = mpnn.tensor([1.0, 2.0], requires_grad=True)
        seen["records"] = (x * 2).requires_grad

    with mpnn.no_grad():
        th = threading.Thread(target=worker)
        th.start()
        th.join(10)
        assert mpnn.is_grad_enabled() is False
    assert seen == {"enabled": True, "records": True}


def test_queued_backward_callbacks_are_per_thread():
    """A callback queued by a backward on one thread runs at the end of that thread's backward, never another's;
    a thread that never queued one takes nothing (hooks' per-thread queue with a class default)."""
    from mpnn import hooks

    ran = []
    taken = {}

    def worker():
        taken["fresh"] = hooks.take_queued_callbacks()
        x = mpnn.tensor([1.0, 2.0], requires_grad=True)
        y = (x * 3).sum()
        hooks.queue_callback(lambda: ran.append(threading.current_thread().name))
        y.backward()
        taken["after"] = hooks.take_queued_callbacks()

    hooks.queue_callback(lambda: ran.append("main"))  # pending on this thread until its next backward
    th = threading.Thread(target=worker, name="worker")
    th.start()
    th.join(10)
    assert taken == {"fresh": [], "after": []} and ran == ["worker"]
    x = mpnn.tensor([1.0], requires_grad=True)
    (x * 2).sum().backward()
    assert ran == ["worker", "main"] and hooks.take_queued_callbacks() == []


# ----- g. 0-d tensors through the tape --------------------------------------------------------------------------
S2 = sigmoid(2.0)
ZERO_DIM = [
    ("neg", lambda x: -x, -2.0, -1.0),
    ("exp", lambda x: x.exp(), np.exp(2.0), np.exp(2.0)),
    ("log", lambda x: x.log(), np.log(2.0), 0.5),
    ("sqrt", lambda x: x.sqrt(), np.sqrt(2.0), 0.5 / np.sqrt(2.0)),
    ("relu", lambda x: x.relu(), 2.0, 1.0),
    ("sigmoid", lambda x: x.sigmoid(), S2, S2 * (1 - S2)),
    ("abs", lambda x: x.abs(), 2.0, 1.0),
    ("tanh", lambda x: x.tanh(), np.tanh(2.0), 1 - np.tanh(2.0) ** 2),
    ("softmax", lambda x: mpnn.softmax(x, dim=0), 1.0, 0.0),
    ("log_softmax", lambda x: mpnn.log_softmax(x, dim=0), 0.0, 0.0),
    ("mul_self", lambda x: x * x, 4.0, 4.0),
    ("add_one", lambda x: x + 1, 3.0, 1.0),
    ("sum", lambda x: x.sum(), 2.0, 1.0),
    ("mean", lambda x: x.mean(), 2.0, 1.0),
]


@pytest.mark.parametrize("name,fn,value,grad", ZERO_DIM, ids=[c[0] for c in ZERO_DIM])
def test_zero_dim_backward(name, fn, value, grad):
    x = mpnn.tensor(2.0, requires_grad=True)
    assert x.shape == () and x.dtype == np.float32
    y = fn(x)
    assert y.shape == ()
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.data, value, rtol=1e-6, atol=1e-7)
    y.backward()
    assert x.grad is not None
    assert x.grad.shape == ()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad.data, grad, rtol=1e-5, atol=1e-7)


# ----- h. expand -----------------------------------------------------------------------------------------------
def test_expand_refuses_minus_one_in_a_new_leading_dim():
    x = mpnn.tensor([1.0, 2.0, 3.0])
    with pytest.raises((OpError, RuntimeError)):
        x.expand(-1, 3)


def test_expand_minus_one_keeps_an_existing_dim():
    x = mpnn.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x.expand(2, -1)
    assert y.shape == (2, 3)
    np.testing.assert_allclose(y.data, [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    (y * mpnn.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    np.testing.assert_allclose(x.grad.data, [5.0, 7.0, 9.0])


# ----- i. integer and bool sums ---------------------------------------------------------------------------------
def test_bool_sum_counts_as_int64():
    s = mpnn.tensor([True, True, False, True]).sum()
    assert s.dtype == np.int64
    assert s.shape == ()
    assert s.item() == 3


def test_bool_sum_along_a_dim_is_int64():
    s = mpnn.tensor([[True, False], [True, True]]).sum(0)
    assert s.dtype == np.int64
    np.testing.assert_array_equal(s.data, [2, 1])


def test_counting_matches():
    a = mpnn.tensor([1, 2, 3, 4, 5])
    b = mpnn.tensor([1, 0, 3, 0, 5])
    n = (a == b).sum().item()
    assert n == 3 and isinstance(n, int)


def test_int32_sum_promotes_to_int64():
    t = mpnn.tensor(np.array([2_000_000_000, 2_000_000_000], dtype=np.int32))
    assert t.dtype == np.int32
    s = t.sum()
    assert s.dtype == np.int64
    assert s.item() == 4_000_000_000


# ----- j. device, iteration, format, randint ------------------------------------------------------------------
def test_to_none_keeps_dtype():
    t = mpnn.tensor([1, 2, 3])
    u = t.to(None)
    assert u.dtype == np.int64
    np.testing.assert_array_equal(u.data, [1, 2, 3])


def test_to_cpu_returns_the_tensor_itself():
    t = mpnn.tensor([1.0, 2.0])
    assert t.to("cpu") is t
    assert t.cpu() is t
    np.testing.assert_allclose(t.cpu().data, [1.0, 2.0])


def test_to_cuda_raises_naming_cuda():
    t = mpnn.tensor([1.0, 2.0])
    with pytest.raises(Exception, match="(?i)cuda"):
        t.to("cuda")


def test_iterating_a_tensor_yields_rows():
    t = mpnn.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    rows = list(iter(t))
    assert len(rows) == 3
    for i, r in enumerate(rows):
        assert isinstance(r, mpnn.Tensor)
        assert r.shape == (2,)
        np.testing.assert_allclose(r.data, t.data[i])
    (rows[0] * 1 + rows[2] * 3).sum().backward()
    np.testing.assert_allclose(t.grad.data, [[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])


def test_iterating_a_zero_dim_tensor_raises_type_error():
    with pytest.raises(TypeError):
        list(iter(mpnn.tensor(1.0)))
    with pytest.raises(TypeError):
        for _ in mpnn.tensor(1.0):
            pass


def test_format_spec_on_a_one_element_tensor():
    assert f"{mpnn.tensor(3.14159):.2f}" == "3.14"
    assert format(mpnn.tensor(7), "03d") == "007"


def test_randint_high_and_size():
    mpnn.manual_seed(0)
    t = mpnn.randint(10, (5,))
    assert t.shape == (5,)
    assert t.dtype == np.int64
    big = mpnn.randint(10, (2000,))
    assert big.data.min() == 0 and big.data.max() == 9


def test_randint_low_high_size():
    mpnn.manual_seed(0)
    t = mpnn.randint(3, 10, (5,))
    assert t.shape == (5,)
    assert t.dtype == np.int64
    big = mpnn.randint(3, 10, (2000,))
    assert big.data.min() == 3 and big.data.max() == 9


# ----- k. cat with a bad dim -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, -3, 5])
def test_cat_bad_dim_raises_op_error(dim):
    a, b = mpnn.tensor([[1.0, 2.0]]), mpnn.tensor([[3.0, 4.0]])
    with pytest.raises(OpError):
        mpnn.cat([a, b], dim=dim)


# ----- l. hooks -----------------------------------------------------------------------------------------------
def test_register_hook_on_a_non_leaf_sees_the_incoming_gradient():
    x = f64([1.0, 2.0, 3.0])
    h = x * 2
    seen = []
    h.register_hook(lambda g: seen.append(np.array(np.asarray(g), dtype=np.float64)))
    (h * h).sum().backward()
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], [4.0, 8.0, 12.0])  # 2h
    np.testing.assert_allclose(x.grad.data, [8.0, 16.0, 24.0])


def test_register_hook_receives_a_tensor():
    x = f64([1.0, 2.0])
    h = x * 2
    kinds = []
    h.register_hook(lambda g: kinds.append(isinstance(g, mpnn.Tensor)))
    h.sum().backward()
    assert kinds == [True]


def test_register_hook_sees_the_summed_gradient_of_a_reused_tensor_once():
    x = f64(X3)
    h = x * 2
    seen = []
    h.register_hook(lambda g: seen.append(np.array(np.asarray(g), dtype=np.float64)))
    (h + h.exp()).sum().backward()
    hv = 2 * np.asarray(X3)
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], 1 + np.exp(hv), rtol=1e-12)
    np.testing.assert_allclose(x.grad.data, 2 * (1 + np.exp(hv)), rtol=1e-12)


def test_register_hook_return_value_replaces_the_gradient():
    x = f64([1.0, 2.0, 3.0])
    h = x * 2
    h.register_hook(lambda g: g * 0 + 1)  # a Tensor
    (h * h).sum().backward()
    np.testing.assert_allclose(x.grad.data, [2.0, 2.0, 2.0])

    x2 = f64([1.0, 2.0, 3.0])
    h2 = x2 * 2
    h2.register_hook(lambda g: np.full(np.shape(g), 10.0))  # a NumPy array
    (h2 * h2).sum().backward()
    np.testing.assert_allclose(x2.grad.data, [20.0, 20.0, 20.0])


def test_register_hook_returning_none_keeps_the_gradient():
    x = f64([1.0, 2.0])
    h = x * 3
    h.register_hook(lambda g: None)
    (h * h).sum().backward()
    np.testing.assert_allclose(x.grad.data, [18.0, 36.0])  # 2h * 3


def test_register_hook_on_a_leaf_replaces_what_is_accumulated():
    x = f64([1.0, 2.0])
    x.register_hook(lambda g: g * 10)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.data, [20.0, 40.0])


def test_register_hook_handle_removes_it():
    x = f64([1.0, 2.0])
    h = x * 2
    handle = h.register_hook(lambda g: g * 0)
    handle.remove()
    h.sum().backward()
    np.testing.assert_allclose(x.grad.data, [2.0, 2.0])


def test_post_accumulate_hook_fires_once_per_leaf_per_backward():
    x = f64(X3)
    w = f64([0.2, -0.3, 0.4])
    calls = {"x": [], "w": []}
    x.register_post_accumulate_grad_hook(lambda t: calls["x"].append(np.array(t.grad.data)))
    w.register_post_accumulate_grad_hook(lambda t: calls["w"].append(np.array(t.grad.data)))
    v, wv = np.asarray(X3), np.array([0.2, -0.3, 0.4])
    gx = 1 + np.exp(v) + 2 * v + wv
    gw = v + np.exp(wv)
    (x + x.exp() + x * x + x * w + w.exp()).sum().backward()
    assert len(calls["x"]) == 1 and len(calls["w"]) == 1
    np.testing.assert_allclose(calls["x"][0], gx, rtol=1e-12)  # fired after the last contribution
    np.testing.assert_allclose(calls["w"][0], gw, rtol=1e-12)
    (x + x.exp() + x * x + x * w + w.exp()).sum().backward()
    assert len(calls["x"]) == 2 and len(calls["w"]) == 2
    np.testing.assert_allclose(calls["x"][1], 2 * gx, rtol=1e-12)
    np.testing.assert_allclose(calls["w"][1], 2 * gw, rtol=1e-12)


def test_conv_saves_its_input_not_its_output():
    """A residual block writes into a conv's result (out += identity): allowed, as in torch; writing into the conv's
    input before backward is caught."""
    conv = mpnn.nn.Conv2d(3, 4, 3, padding=1)
    x = mpnn.tensor(np.random.default_rng(0).standard_normal((2, 3, 5, 5)), requires_grad=True, dtype="float32")
    h = conv(x)
    h += 1.0
    h.relu_()
    h.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    y = x * 1
    out = conv(y)
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
