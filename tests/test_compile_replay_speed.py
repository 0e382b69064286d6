"""mpnn.compile's faster replay paths give the same answers as eager: the Adam step of a whole group in one Numba call
(capture/optim.py's _adam_at_once over kernels.adam_update_all), the fused linear and conv epilogues, gradient
buffers handed to .grad, the 1-d gathers with the samples innermost, and conv -> ReLU -> conv chains that hand their
activation over channel-major (replay.fuse)."""

import time

import numpy as np
import pytest

import mpnn
from mpnn import nn
from mpnn.capture import kernels as CK
from mpnn.capture import optim as capture_optim
from steps import backward_fns, step_names, train_step


def _batches(n, seed=0, batch=12, features=8, classes=4):
    rng = np.random.default_rng(seed)
    return [
        (
            mpnn.from_numpy(rng.standard_normal((batch, features)).astype(np.float32)),
            mpnn.from_numpy(rng.integers(0, classes, batch)),
        )
        for _ in range(n)
    ]


def _deep_mlp():
    """Twelve parameters used by the step (more than one ADAM_CHUNK) and two that never get a gradient."""
    layers = [nn.Linear(8, 16), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    layers.append(nn.Linear(16, 4))
    return nn.Sequential(*layers), nn.Linear(3, 3)  # the spare: in the optimizer, never in the step (.grad None)


def _adam_run(compiled, fuse, late_param=False, steps=7):
    mpnn.manual_seed(0)
    model, spare = _deep_mlp()
    params = list(model.parameters())
    groups = [
        {"params": params[:3], "weight_decay": 1e-3},
        {"params": params[3:] + list(spare.parameters()), "lr": 3e-3, "decoupled_weight_decay": True,
         "weight_decay": 1e-2, "betas": (0.8, 0.95)},
    ]  # fmt: skip
    opt = mpnn.optim.Adam(groups, lr=1e-2)
    if late_param:  # one parameter's Adam state two steps ahead of the others: a group of mixed step counts
        p = params[5]
        opt.state[p] = {"step": 2, "exp_avg": np.full(p.data.shape, 0.01, np.float32),
                        "exp_avg_sq": np.full(p.data.shape, 1e-4, np.float32)}  # fmt: skip

    step = train_step(model, opt)

    fn = mpnn.compile(step, fuse=fuse) if compiled else step
    losses = [fn(x, y).data.copy() for x, y in _batches(steps)]
    return losses, [p.data.copy() for p in params + list(spare.parameters())], opt, fn


@pytest.mark.parametrize("fuse", [False, True])
def test_adam_group_in_one_call_gives_eager_bits(monkeypatch, fuse):
    """Two groups (L2 decay; decoupled decay with other betas and lr), 12 parameters with gradients (3 in the first
    group, 9 in the second: two calls of ADAM_CHUNK, the second padded) and two without: every parameter and Adam
    state equals eager's bit for bit after 7 steps, and the replayed steps went through adam_update_all, not one
    call per parameter."""
    calls = {"all": 0, "one": 0}
    real_all, real_one = capture_optim.adam_update_all, capture_optim.adam_update

    def count_all(*a):
        calls["all"] += 1
        assert all(len(t) == CK.ADAM_CHUNK for t in a[:4])
        assert a[-1] is fuse  # the reciprocal bias correction under fuse=True only
        return real_all(*a)

    def count_one(*a):
        calls["one"] += 1
        return real_one(*a)

    monkeypatch.setattr(capture_optim, "adam_update_all", count_all)
    monkeypatch.setattr(capture_optim, "adam_update", count_one)
    eager = _adam_run(False, fuse)
    compiled = _adam_run(True, fuse)
    assert compiled[3].eager_reason is None and compiled[3].stats["hits"] == 6
    assert calls == {"all": 6 * 3, "one": 0}  # 3 + 9 parameters: 1 + 2 calls per replayed step
    if not fuse:
        for a, b in zip(eager[0], compiled[0]):
            assert a.tobytes() == b.tobytes()
    for a, b in zip(eager[1], compiled[1]):
        assert a.tobytes() == b.tobytes() if not fuse else np.allclose(a, b, rtol=1e-4, atol=1e-6)
    se, sc = eager[2].state, compiled[2].state
    pe, pc = list(eager[2].state), list(compiled[2].state)
    assert len(pe) == len(pc) == 12
    for a, b in zip(pe, pc):
        assert se[a]["step"] == sc[b]["step"] == 7
        if not fuse:
            for k in ("exp_avg", "exp_avg_sq"):
                assert se[a][k].tobytes() == sc[b][k].tobytes()


def test_adam_group_of_mixed_step_counts_takes_the_per_parameter_path(monkeypatch):
    """A parameter whose state is steps ahead of its group's: the step goes parameter by parameter (each its own
    bias corrections); eager's bits."""
    calls = {"all": 0, "one": 0}
    real_all, real_one = capture_optim.adam_update_all, capture_optim.adam_update
    monkeypatch.setattr(capture_optim, "adam_update_all", lambda *a: (calls.__setitem__("all", calls["all"] + 1),
                                                                     real_all(*a))[1])  # fmt: skip
    monkeypatch.setattr(capture_optim, "adam_update", lambda *a: (calls.__setitem__("one", calls["one"] + 1),
                                                                 real_one(*a))[1])  # fmt: skip
    eager = _adam_run(False, False, late_param=True)
    compiled = _adam_run(True, False, late_param=True)
    assert compiled[3].eager_reason is None
    assert calls["all"] == 0 and calls["one"] == 6 * 12  # one group mixed: the general path for the whole step
    for a, b in zip(eager[1], compiled[1]):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(eager[2].state.values(), compiled[2].state.values()):
        assert a["step"] == b["step"]


def test_adam_update_all_equals_adam_update_per_parameter():
    """The kernel itself: every flag combination, float32 and float64, chunks with empty padding."""
    from mpnn.optim.kernels import adam_update

    rng = np.random.default_rng(3)
    for dt in (np.float32, np.float64):
        t = np.dtype(dt).type
        for decoupled, maximize, wd in ((False, False, 0.0), (False, True, 1e-2), (True, False, 1e-2)):
            sizes = [5, 1, 300, 17]
            ps = [rng.standard_normal(n).astype(dt) for n in sizes]
            gs = [rng.standard_normal(n).astype(dt) for n in sizes]
            ms = [rng.standard_normal(n).astype(dt) * 0.1 for n in sizes]
            vs = [rng.random(n).astype(dt) * 0.01 for n in sizes]
            want = [[a.copy() for a in arrs] for arrs in (ps, ms, vs)]
            scal = (t(1e-2), t(0.9), t(0.999), t(1e-8), t(wd))
            for i in range(len(sizes)):
                adam_update(want[0][i], gs[i], want[1][i], want[2][i], np.empty(0, dt), *scal, decoupled, False,
                            maximize, t(0.05), t(0.03))  # fmt: skip
            pad = (np.empty(0, dt),) * (CK.ADAM_CHUNK - len(sizes))
            before = [a.copy() for a in ps]
            rec = [a.copy() for a in ps], [a.copy() for a in ms], [a.copy() for a in vs]
            CK.adam_update_all(tuple(ps) + pad, tuple(gs) + pad, tuple(ms) + pad, tuple(vs) + pad, *scal, decoupled,
                               maximize, t(0.05), t(0.03), False)  # fmt: skip
            for got, exp in zip((ps, ms, vs), want):
                for a, b in zip(got, exp):
                    assert a.tobytes() == b.tobytes()
            # fuse=True's form: the reciprocal of the bias correction, within an ulp or two of each update
            CK.adam_update_all(tuple(rec[0]) + pad, tuple(gs) + pad, tuple(rec[1]) + pad, tuple(rec[2]) + pad, *scal,
                               decoupled, maximize, t(0.05), t(1 / 0.03), True)  # fmt: skip
            for a, b, p0 in zip(rec[0], want[0], before):
                step_got, step_want = a.astype(np.float64) - p0, b.astype(np.float64) - p0
                tol = 4 * np.finfo(dt).eps * (np.abs(step_want) + np.abs(p0))
                assert np.all(np.abs(step_got - step_want) <= tol)
            for got, exp in zip(rec[1:], want[1:]):  # the moments do not depend on it
                for a, b in zip(got, exp):
                    assert a.tobytes() == b.tobytes()


# ----- leaf gradients handed over without a copy ----------------------------------------------------------------
def _mlp_run(compiled, keep="none", zero="none", steps=5, fuse=False, kind="mlp"):
    """A 3-layer MLP (kind "mlp") or two strided conv1d + ReLU and a linear layer ("cnn") with SGD; keep: what the
    caller holds from each step's .grad ("none", "tensor", "view"); zero: zero_grad() with set_to_none ("none"),
    with zeros in place ("zeros"), or never ("never": .grad accumulates over the steps)."""
    mpnn.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    else:
        model = nn.Sequential(
            nn.Conv1d(1, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Conv1d(5, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(12, 4),
        )  # fmt: skip
    opt = mpnn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(x, y):
        if zero == "none":
            opt.zero_grad()
        elif zero == "zeros":
            opt.zero_grad(set_to_none=False)
        if kind == "cnn":
            x = x.reshape(x.shape[0], 1, 8)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    fn = mpnn.compile(step, fuse=fuse) if compiled else step
    held, values = [], []
    for x, y in _batches(steps, seed=4):
        fn(x, y)
        values.append([p.grad.data.copy() for p in model.parameters()])
        if keep == "tensor":
            held.append([p.grad for p in model.parameters()])
        elif keep == "view":
            held.append([p.grad.data[1:] for p in model.parameters()])
    return values, held, [p.data.copy() for p in model.parameters()], fn


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("keep", ["none", "tensor", "view"])
@pytest.mark.parametrize("zero", ["none", "zeros", "never"])
def test_leaf_gradients_handed_over_stay_the_callers(keep, zero, kind):
    """A linear or conv form's weight and bias gradient buffers become the parameters' .grad without a copy; at
    the next backward a buffer still referenced (the .grad itself when zero_grad kept it, a tensor or a view the
    caller kept) is left to its holder and the form writes a fresh one. Every step's gradients, what the caller
    kept of earlier steps, and the parameters equal eager's bit for bit."""
    eager = _mlp_run(False, keep, zero, kind=kind)
    compiled = _mlp_run(True, keep, zero, kind=kind)
    assert compiled[3].eager_reason is None and compiled[3].stats["hits"] == 4
    for ga, gb in zip(eager[0], compiled[0]):
        for a, b in zip(ga, gb):
            assert a.tobytes() == b.tobytes()
    for ha, hb in zip(eager[1], compiled[1]):  # what was kept still holds its own step's values
        for a, b in zip(ha, hb):
            a, b = getattr(a, "data", a), getattr(b, "data", b)
            assert a.tobytes() == b.tobytes()
    for a, b in zip(eager[2], compiled[2]):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_leaf_gradients_are_handed_over_without_a_copy(monkeypatch, kind):
    """The usual step (zero_grad, backward, step; nothing kept): no parameter's gradient goes through
    accumulate_leaf's copy in replay, and each .grad is the same buffer from step to step."""
    from mpnn.capture import program

    copies = []
    real = program.accumulate_leaf
    monkeypatch.setattr(program, "accumulate_leaf", lambda t, g: (copies.append(t), real(t, g))[1])
    mpnn.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    else:
        model = nn.Sequential(nn.Conv1d(1, 5, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(20, 4))
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)

    def step(x, y):
        opt.zero_grad()
        if kind == "cnn":
            x = x.reshape(x.shape[0], 1, 8)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    fn = mpnn.compile(step)
    addresses = []
    for x, y in _batches(5):
        fn(x, y)
        addresses.append([p.grad.data.ctypes.data for p in model.parameters()])
    assert fn.stats["hits"] == 4
    assert copies == []  # (the capture's own backward is eager's: autograd.accumulate_leaf)
    assert all(a == addresses[1] for a in addresses[2:])


# ----- a linear layer's backward applies the ReLU's mask ------------------------------------------------------------
class _Branchy(nn.Module):
    """linear -> relu in three settings: the usual one; a linear output also read by a second op (no mask fusion:
    the ReLU keeps its own backward); a bias that does not require grad (the mask without the column sums)."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)
        if case == "frozen_bias":
            self.b.bias.requires_grad_(False)

    def forward(self, x):
        h = self.a(x).relu()
        z = self.b(h)
        r = z.relu()
        if self.case == "shared":
            r = r + z * 0.5
        return self.c(r * 1.0 + h[:, :16])


def _branchy_run(case, compiled, steps=4):
    mpnn.manual_seed(0)
    model = _Branchy(case)
    opt = mpnn.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    step = train_step(model, opt)

    fn = mpnn.compile(step, fuse=False) if compiled else step
    out = []
    for x, y in _batches(steps, seed=5):
        loss = fn(x, y)
        out.append([loss.data.copy()] + [p.grad.data.copy() for p in model.parameters() if p.requires_grad])
    return out, [p.data.copy() for p in model.parameters()], fn


def _replayed_backward_forms(fn):
    return [f.__qualname__ for f in backward_fns(fn)]


@pytest.mark.parametrize("case", ["usual", "shared", "frozen_bias"])
def test_linear_backward_with_the_relu_mask_gives_eager_bits(case):
    eager = _branchy_run(case, False)
    compiled = _branchy_run(case, True)
    fn = compiled[2]
    assert fn.eager_reason is None and fn.stats["hits"] == 3
    for a, b in zip(eager[0], compiled[0]):
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes()
    for a, b in zip(eager[1], compiled[1]):
        assert a.tobytes() == b.tobytes()
    forms = _replayed_backward_forms(fn)
    # the ReLU after layer a always passes through; the one after b only where b's output has one reader
    assert forms.count("_pass_through") == (1 if case == "shared" else 2)


# ----- a residual add fused into the linear layer's epilogue --------------------------------------------------------
class _Residual(nn.Module):
    """h + relu(linear(h)) with the ReLU's output as the add's first or second operand, or an op between the ReLU
    and the add (not fused), and a second residual block reading the first's sum."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.inp = nn.Linear(8, 16)
        self.b1 = nn.Linear(16, 16)
        self.b2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x).relu()
        r = self.b1(h).relu()
        if self.order == "relu_first":
            h = r + h
        elif self.order == "relu_second":
            h = h + r
        else:
            h = h + r * 1.0
        h = h + self.b2(h).relu()
        return self.out(h)


@pytest.mark.parametrize("order", ["relu_first", "relu_second", "op_between"])
def test_residual_add_fused_into_the_epilogue_gives_eager_bits(order):
    mpnn.manual_seed(0)
    model_e, model_c = _Residual(order), None
    mpnn.manual_seed(0)
    model_c = _Residual(order)

    def make(model):
        opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)

        step = train_step(model, opt)

        return step

    se, fn = make(model_e), mpnn.compile(make(model_c), fuse=False)
    for x, y in _batches(4, seed=6):
        assert se(x, y).data.tobytes() == fn(x, y).data.tobytes()
        for a, b in zip(model_e.parameters(), model_c.parameters()):
            assert a.grad.data.tobytes() == b.grad.data.tobytes()
            assert a.data.tobytes() == b.data.tobytes()
    assert fn.eager_reason is None and fn.stats["hits"] == 3
    prog = next(iter(fn._cache.values()))
    fused = [s for s in prog.steps if "bias_relu_add" in s.__code__.co_names]
    assert len(fused) == (1 if order == "op_between" else 2)


# ----- the fused cross-entropy's exponentials ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_cross_entropy_exponentials_over_wide_logits(dtype):
    """kernels.cross_entropy_forward's flat pass of exponentials (exp(z / 256) ** 256 in float64): over logits
    spread up to 300 apart (z down to -300: float32's exp is 0 below -104, denormal above), the loss and
    softmax - onehot within 1e-6 relative of a float64 reference; a NaN logit makes its row's loss and gradient
    NaN as eager's; -inf logits give 0 probability; ignored rows give zero gradients."""
    rng = np.random.default_rng(7)
    n, c = 64, 13
    x = (rng.standard_normal((n, c)) * rng.choice([0.1, 3.0, 60.0, 300.0], size=(n, 1))).astype(dtype)
    labels = rng.integers(0, c, n)
    grad = np.empty_like(x)
    total, count, bad = CK.cross_entropy_forward(x, labels, -100, grad)
    x64 = x.astype(np.float64)
    z = x64 - x64.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    want = -logp[np.arange(n), labels].sum()
    onehot = np.eye(c)[labels]
    assert bad == -1 and count == n
    assert abs(total - want) <= 1e-6 * abs(want)
    assert np.abs(grad - (np.exp(logp) - onehot)).max() <= 1e-6
    x[0, 2], x[1, 4], x[2, :] = np.nan, -np.inf, -np.inf
    x[2, 1] = 0.5
    labels[3] = -100
    total, count, bad = CK.cross_entropy_forward(x, labels, -100, grad)
    assert np.isnan(total) and count == n - 1 and bad == -1
    assert np.isnan(grad[0]).all()
    assert grad[1, 4] == 0.0 and np.isfinite(grad[1]).all()
    assert grad[2].tolist() == (np.eye(c)[1] - np.eye(c)[labels[2]]).tolist()
    assert not grad[3].any()
    eager = mpnn.nn.functional.cross_entropy(mpnn.from_numpy(x[:1]), mpnn.from_numpy(labels[:1]))
    assert np.isnan(eager.data)


def test_leaf_gradients_handed_over_with_two_backward_passes_in_a_step():
    """Two reverse passes in one step (retain_graph, then a second loss): the first hands the form's buffers to
    the leaves, the second finds them held by the .grad and writes fresh ones, which accumulate_leaf adds in; the
    gradients and parameters equal eager's bit for bit."""

    def run(compiled):
        mpnn.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = mpnn.optim.SGD(model.parameters(), lr=0.05)

        def step(x, y):
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward(retain_graph=True)
            (out * out).mean().backward()
            opt.step()
            return loss

        fn = mpnn.compile(step, fuse=False) if compiled else step
        grads = []
        for x, y in _batches(4, seed=8):
            fn(x, y)
            grads.append([p.grad.data.copy() for p in model.parameters()])
        return grads, [p.data.copy() for p in model.parameters()], fn

    eager, compiled = run(False), run(True)
    assert compiled[2].eager_reason is None and compiled[2].stats["hits"] == 3
    for ga, gb in zip(eager[0], compiled[0]):
        for a, b in zip(ga, gb):
            assert a.tobytes() == b.tobytes()
    for a, b in zip(eager[1], compiled[1]):
        assert a.tobytes() == b.tobytes()


# ----- 1-d convs: the gather and scatter with the samples innermost ------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_rows_and_channel_major_im2col_and_col2im_equal_the_core_kernels(seed):
    """kernels.im2col_rows / col2im_rows, and im2col_channel_major / col2im_channel_major over the (C, N, L)
    transpose, against conv_kernels.im2col / col2im over random 1-d geometries (stride, padding, dilation, groups, a
    bias row or not): the same columns and the same sums, bit for bit."""
    from mpnn.core import conv_kernels

    rng = np.random.default_rng(seed)
    for _ in range(8):
        groups = int(rng.choice([1, 2, 3]))
        c = groups * int(rng.integers(1, 4))
        k, s, d, p = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(0, 3))
        n, length = int(rng.integers(1, 6)), int(rng.integers(d * (k - 1) + 1, 20))
        t = (length + 2 * p - d * (k - 1) - 1) // s + 1
        if t < 1:
            continue
        x = rng.standard_normal((n, c, 1, length)).astype(np.float32)
        x_cm = np.ascontiguousarray(x.reshape(n, c, length).transpose(1, 0, 2))
        for bias in (0, 1):
            rows = (c // groups * k + bias) * groups
            want, got = np.full((rows, n, t), 7, np.float32), np.full((rows, n, t), 9, np.float32)
            conv_kernels.im2col(x, 1, k, 1, s, 0, p, 1, d, groups, 0, t, want)
            CK.im2col_rows(x.reshape(n, c, length), k, s, p, d, groups, got)
            assert want.tobytes() == got.tobytes()
            got = np.full((rows, n, t), 9, np.float32)
            CK.im2col_channel_major(x_cm, k, s, p, d, groups, got)
            assert want.tobytes() == got.tobytes()
        dcols = rng.standard_normal((c // groups * k * groups, n, t)).astype(np.float32)
        want, got = np.zeros((n, c, 1, length), np.float32), np.zeros((n, c, length), np.float32)
        conv_kernels.col2im(dcols, 1, k, 1, s, 0, p, 1, d, groups, 0, t, want)
        CK.col2im_rows(dcols, k, s, p, d, groups, got)
        assert want.tobytes() == got.tobytes()
        got = np.zeros((c, n, length), np.float32)
        CK.col2im_channel_major(dcols, k, s, p, d, groups, got)
        assert np.ascontiguousarray(want.reshape(n, c, length).transpose(1, 0, 2)).tobytes() == got.tobytes()


def test_pick_times_both_then_keeps_the_faster():
    from mpnn.capture.replay import _pick

    calls = []

    def slow():
        calls.append("slow")
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 2e-4:
            pass

    def fast():
        calls.append("fast")

    for first in (slow, fast):
        calls.clear()
        pick = _pick(first, fast if first is slow else slow, trials=3)
        for _ in range(20):
            pick()
        assert calls[:8].count("slow") == calls[:8].count("fast") == 4  # alternating while timing
        assert calls[8:] == ["fast"] * 12


@pytest.mark.parametrize("choice", ["core", "rows"])
@pytest.mark.parametrize("geometry", [(2, 1, 1, 1), (1, 2, 2, 1), (3, 0, 1, 2), (2, 1, 1, 3)])
def test_conv1d_replay_with_either_gather_gives_eager_bits(geometry, choice, monkeypatch):
    """A conv1d -> ReLU -> conv1d -> ReLU -> linear net (stride, padding, dilation, groups of the second conv),
    input requiring grad: 14 Adam steps (past the timing calls), with the replay's gather and scatter forced to the
    core kernels or to the rows kernels; losses, gradients (the input's too) and parameters bit for bit with eager."""
    from mpnn.capture import replay

    stride, pad, dil, groups = geometry
    picked = []
    monkeypatch.setattr(replay, "_pick", lambda a, b, trials=4: picked.append(b) or (a if choice == "core" else b))

    def run(compiled):
        mpnn.manual_seed(0)
        c1 = nn.Conv1d(2, 6, 3, stride=stride, padding=pad, dilation=dil)
        c2 = nn.Conv1d(6, 6, 3, stride=stride, padding=pad, dilation=dil, groups=groups)
        length = 40
        for _ in range(2):
            length = (length + 2 * pad - dil * 2 - 1) // stride + 1
        head = nn.Linear(6 * length, 4)
        params = list(c1.parameters()) + list(c2.parameters()) + list(head.parameters())
        opt = mpnn.optim.Adam(params, lr=1e-2)

        def step(x, y):
            opt.zero_grad()
            h = c2(c1(x).relu()).relu()
            loss = nn.functional.cross_entropy(head(h.reshape(h.shape[0], -1)), y)
            loss.backward()
            opt.step()
            return loss

        fn = mpnn.compile(step, fuse=False) if compiled else step
        rng = np.random.default_rng(9)
        out = []
        for _ in range(14):
            x = mpnn.from_numpy(rng.standard_normal((5, 2, 40)).astype(np.float32)).requires_grad_()
            y = mpnn.from_numpy(rng.integers(0, 4, 5))
            loss = fn(x, y)
            out.append([loss.data.copy(), x.grad.data.copy()] + [p.grad.data.copy() for p in params])
        return out, [p.data.copy() for p in params], fn

    eager, compiled = run(False), run(True)
    assert compiled[2].eager_reason is None and compiled[2].stats["hits"] == 13
    for a, b in zip(eager[0], compiled[0]):
        for u, v in zip(a, b):
            assert u.tobytes() == v.tobytes()
    for a, b in zip(eager[1], compiled[1]):
        assert a.tobytes() == b.tobytes()
    assert len(picked) == 4  # both convs' gather and scatter were eligible


# ----- conv -> ReLU -> conv chains: the activation handed over channel-major ---------------------------------------
_CHANNEL_MAJOR = "_conv_im2col.<locals>.relu_channel_major.<locals>.forward_relu_channel_major"


@pytest.mark.parametrize("seed", range(4))
def test_stride_two_channel_major_kernels_by_phases_equal_the_general_ones(seed):
    """kernels.im2col_channel_major_s2 / col2im_channel_major_s2 (stride 2, rows of 2T or 2T - 1) against the general
    channel-major kernels over random taps, dilations, paddings, groups and bias rows, with signed zeros in the
    input and in the column gradients: the same columns and the same sums, bit for bit (the phase scratch and dx
    start as garbage; the scatter writes dx whole)."""
    rng = np.random.default_rng(seed)
    cases = 0
    while cases < 25:
        groups, n = int(rng.choice([1, 2])), int(rng.integers(1, 5))
        c = groups * int(rng.integers(1, 4))
        k, d, p, length = (
            int(rng.integers(1, 5)),
            int(rng.integers(1, 3)),
            int(rng.integers(0, 4)),
            int(rng.integers(1, 16)),
        )
        if length + 2 * p < d * (k - 1) + 1:
            continue
        t = (length + 2 * p - d * (k - 1) - 1) // 2 + 1
        if length not in (2 * t, 2 * t - 1):
            continue
        cases += 1
        x = rng.standard_normal((c, n, length))
        x[np.abs(x) < 0.3] = -0.0
        for bias in (0, 1):
            rows = (c // groups * k + bias) * groups
            want, got = np.full((rows, n, t), 7.0), np.full((rows, n, t), 9.0)
            CK.im2col_channel_major(x, k, 2, p, d, groups, want)
            CK.im2col_channel_major_s2(x, k, p, d, groups, got, np.full((2, n * t), 5.0))
            assert want.tobytes() == got.tobytes()
        dcols = rng.standard_normal((c // groups * k * groups, n, t))
        dcols[np.abs(dcols) < 0.5] = -0.0
        want, got = np.zeros((c, n, length)), np.full((c, n, length), 3.0)
        CK.col2im_channel_major(dcols, k, 2, p, d, groups, want)
        CK.col2im_channel_major_s2(dcols.copy(), k, p, d, groups, got, np.full((2, n * t), 5.0))
        assert want.tobytes() == got.tobytes()


def _conv_chain_run(compiled, geometry, dtype, returns="loss", steps=6):
    """conv1d -> ReLU -> conv1d -> ReLU -> conv1d -> ReLU -> linear (the middle conv with the given stride, padding,
    dilation, groups; the last without bias), input requiring grad, SGD with momentum; returns per step the loss,
    the input's and every parameter's gradient (and, per `returns`, the first ReLU's output or the first conv's),
    then the final parameters and the step function."""
    stride, pad, dil, groups = geometry
    mpnn.manual_seed(0)
    c1 = nn.Conv1d(2, 6, 3, stride=2, padding=1).to(dtype)
    c2 = nn.Conv1d(6, 6, 3, stride=stride, padding=pad, dilation=dil, groups=groups).to(dtype)
    c3 = nn.Conv1d(6, 4, 2, bias=False).to(dtype)
    length = (40 + 2 - 3) // 2 + 1
    length = (length + 2 * pad - dil * 2 - 1) // stride + 1
    length -= 1
    head = nn.Linear(4 * length, 3).to(dtype)
    params = [p for m in (c1, c2, c3, head) for p in m.parameters()]
    opt = mpnn.optim.SGD(params, lr=0.05, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        a1 = c1(x)
        h1 = a1.relu()
        h = c3(c2(h1).relu()).relu()
        loss = nn.functional.cross_entropy(head(h.reshape(h.shape[0], -1)), y)
        loss.backward()
        opt.step()
        return {"loss": loss, "relu": (loss, h1), "conv": (loss, a1)}[returns]

    fn = mpnn.compile(step, fuse=False) if compiled else step
    rng = np.random.default_rng(5)
    out = []
    for _ in range(steps):
        x = mpnn.from_numpy(rng.standard_normal((7, 2, 40)).astype(dtype)).requires_grad_()
        y = mpnn.from_numpy(rng.integers(0, 3, 7))
        res = fn(x, y)
        res = res if isinstance(res, tuple) else (res,)
        out.append([r.data.copy() for r in res] + [x.grad.data.copy()] + [p.grad.data.copy() for p in params])
    return out, [p.data.copy() for p in params], fn


def _assert_same_bits(eager, compiled):
    for a, b in zip(eager[0], compiled[0]):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()
    for a, b in zip(eager[1], compiled[1]):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "geometry", [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 3), (3, 1, 1, 1), (2, 1, 1, 2), (2, 2, 2, 1)]
)
def test_conv_chain_hands_over_channel_major_with_eager_bits(geometry, dtype):
    """The three convs hand their activations over channel-major (two hand-offs; the last ReLU feeds a reshape, so
    it keeps the (N, O, L) layout): losses, the input's and every parameter's gradient and the parameters after 6
    steps bit for bit with eager, fuse=False (the hand-off reorders no arithmetic)."""
    eager, compiled = _conv_chain_run(False, geometry, dtype), _conv_chain_run(True, geometry, dtype)
    fn = compiled[2]
    assert fn.eager_reason is None and fn.stats["hits"] == 5
    assert step_names(fn).count(_CHANNEL_MAJOR) == 2
    _assert_same_bits(eager, compiled)


@pytest.mark.parametrize("returns", ["relu", "conv"])
def test_conv_chain_keeps_what_the_step_returns(returns):
    """A step that returns the first ReLU's output (or the first conv's, which the ReLU reads) keeps that hand-off
    in the (N, O, L) layout: the returned activation, like everything else, equals eager's bit for bit; the second
    hand-off still runs channel-major."""
    geometry = (1, 1, 1, 1)
    eager = _conv_chain_run(False, geometry, np.float32, returns)
    compiled = _conv_chain_run(True, geometry, np.float32, returns)
    assert compiled[2].eager_reason is None
    assert step_names(compiled[2]).count(_CHANNEL_MAJOR) == 1
    _assert_same_bits(eager, compiled)


@pytest.mark.parametrize("where", ["module attribute", "list", "closure"])
def test_conv_chain_keeps_activations_the_step_stores(where):
    """A step that stores the first ReLU's output (on a module, in a list, in a closure's cell) reads it after each
    replay as after each eager step: that hand-off keeps the (N, O, L) layout (whose array replay refreshes), the
    second still runs channel-major; the stored activation equals eager's, step by step, bit for bit."""

    def run(compiled):
        mpnn.manual_seed(0)
        c1, c2, c3 = (nn.Conv1d(i, 4, 3, stride=2, padding=1) for i in (1, 4, 4))
        head = nn.Linear(20, 3)
        params = [p for m in (c1, c2, c3, head) for p in m.parameters()]
        opt = mpnn.optim.SGD(params, lr=0.1)
        stored, cell = [], [None]

        def keep(h):
            if where == "module attribute":
                c1.last = h
            elif where == "list":
                stored.append(h)
            else:
                cell[0] = h

        def last():
            return {"module attribute": lambda: c1.last, "list": lambda: stored[-1], "closure": lambda: cell[0]}[
                where
            ]()

        def step(x, y):
            opt.zero_grad()
            h1 = c1(x).relu()
            keep(h1)
            h = c3(c2(h1).relu()).relu()
            loss = nn.functional.cross_entropy(head(h.reshape(h.shape[0], -1)), y)
            loss.backward()
            opt.step()
            return loss

        fn = mpnn.compile(step) if compiled else step
        rng = np.random.default_rng(4)
        out = []
        for _ in range(4):
            x = mpnn.from_numpy(rng.standard_normal((6, 1, 40)).astype(np.float32))
            loss = fn(x, mpnn.from_numpy(rng.integers(0, 3, 6)))
            out.append([loss.data.copy(), last().data.copy()])
        return out, [p.data.copy() for p in params], fn

    eager, compiled = run(False), run(True)
    assert compiled[2].eager_reason is None and step_names(compiled[2]).count(_CHANNEL_MAJOR) == 1
    for a, b in zip(eager[0], compiled[0]):
        assert a[1].tobytes() == b[1].tobytes()  # the stored activation, refreshed by each replay
    assert np.allclose(eager[0][-1][0], compiled[0][-1][0], rtol=1e-5)  # (fuse=True: matmul_abt reassociates)


def test_conv_chain_with_a_second_reader_stays_in_the_usual_layout():
    """The first ReLU's output read twice (by the next conv and by a sum added to the loss): no hand-off there, the
    same bits as eager."""

    def run(compiled):
        mpnn.manual_seed(0)
        c1, c2 = nn.Conv1d(1, 4, 3, stride=2, padding=1), nn.Conv1d(4, 4, 3, stride=2, padding=1)
        head = nn.Linear(40, 3)
        params = [p for m in (c1, c2, head) for p in m.parameters()]
        opt = mpnn.optim.Adam(params, lr=1e-2)

        def step(x, y):
            opt.zero_grad()
            h1 = c1(x).relu()
            h = c2(h1).relu()
            loss = nn.functional.cross_entropy(head(h.reshape(h.shape[0], -1)), y) + 1e-3 * h1.sum()
            loss.backward()
            opt.step()
            return loss

        fn = mpnn.compile(step, fuse=False) if compiled else step
        rng = np.random.default_rng(2)
        out = []
        for _ in range(5):
            x = mpnn.from_numpy(rng.standard_normal((6, 1, 40)).astype(np.float32))
            loss = fn(x, mpnn.from_numpy(rng.integers(0, 3, 6)))
            out.append([loss.data.copy()] + [p.grad.data.copy() for p in params])
        return out, [p.data.copy() for p in params], fn

    eager, compiled = run(False), run(True)
    assert compiled[2].eager_reason is None and _CHANNEL_MAJOR not in step_names(compiled[2])
    _assert_same_bits(eager, compiled)


def test_conv_chain_backward_takes_strided_gradients_alike():
    """The two conv backward forms at a channel-major hand-off, called with their usual gradient and with a strided
    copy of it (which their fast paths decline): the general paths convert to and from (N, O, L) and give the same
    bits."""
    compiled = _conv_chain_run(True, (1, 1, 1, 1), np.float64, steps=2)
    fn = compiled[2]
    convs = [f for f in backward_fns(fn) if f.__qualname__ == "_conv_im2col.<locals>.backward"]
    assert len(convs) == 3  # newest first: conv3, conv2, conv1
    rng = np.random.default_rng(0)
    for bwd, out_ch, length in ((convs[1], 6, 20), (convs[2], 6, 20)):  # conv2, conv1: 6 channels, length 20
        g = rng.standard_normal((out_ch, 7, length))  # channel-major, as the next conv hands it back
        fast = [None if a is None else a.copy() for a in bwd(g.copy())]
        strided = np.empty((out_ch, 7, 2 * length))[:, :, ::2]
        strided[...] = g
        general = bwd(strided)
        for a, b in zip(fast, general):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == b.shape and a.tobytes() == b.tobytes()


def test_conv_chain_in_a_forward_without_gradients():
    """A compiled no_grad forward of the MNIST-1D CNN (an evaluation step): both hand-offs channel-major, the logits
    bit for bit with eager's on new inputs each call."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch", "mnist1d.py")
    spec = importlib.util.spec_from_file_location("mnist1d_example_chain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mpnn.manual_seed(0)
    model = module.MODELS["cnn"]()
    model.eval()

    def evaluate(x):
        with mpnn.no_grad():
            return model(x)

    fn = mpnn.compile(evaluate)
    rng = np.random.default_rng(8)
    for _ in range(4):
        x = mpnn.from_numpy(rng.standard_normal((30, 40)).astype(np.float32))
        assert fn(x).data.tobytes() == evaluate(x).data.tobytes()
    assert fn.eager_reason is None and fn.stats["hits"] == 3
    assert step_names(fn).count(_CHANNEL_MAJOR) == 2
