"""Optimizers step by step against NumPy re-implementations of torch.optim's documented algorithms;
state_dict round trips; bad input; learning-rate schedules."""

import copy
import math

import numpy as np
import pytest

from mpnn import nn, optim
from mpnn.core.random import manual_seed
from mpnn.core.serialize import load, save
from mpnn.core.tensor import Tensor
from mpnn.nn import functional as F
from mpnn.optim import lr_scheduler as sched

SHAPES = [(3, 4), (5,), (4, 3)]
STEPS = 5


# ----- NumPy references, written from the algorithm boxes in torch.optim's documentation -------------
def sgd_reference(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    p, buf, out = p.copy(), None, []
    for g in grads:
        g = -g if maximize else g.copy()
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
        out.append(p.copy())
    return out


def adam_reference(
    p, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False
):
    b1, b2 = betas
    p, m, v, vmax, out = p.copy(), np.zeros_like(p), np.zeros_like(p), np.zeros_like(p), []
    for t, g in enumerate(grads, start=1):
        g = -g if maximize else g.copy()
        if decoupled:
            p = p - lr * weight_decay * p
        elif weight_decay != 0:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        if amsgrad:
            vmax = np.maximum(vmax, v)
            v_hat = vmax / (1 - b2**t)
        else:
            v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p.copy())
    return out


def _params_and_grads(dtype, seed=0):
    """Three parameters (one stored column-major) and STEPS gradients each (one of them strided)."""
    rng = np.random.default_rng(seed)
    starts = [rng.standard_normal(s) for s in SHAPES]
    params = [nn.Parameter(s.astype(dtype)) for s in starts]
    params[2].data = np.asfortranarray(params[2].data)
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]
    return starts, params, grads


def _run(opt, params, grads, dtype):
    arrays = [p.data for p in params]
    history = []
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            g = g.astype(dtype)
            p.grad = Tensor(g.T.copy().T if i == 0 else g)  # param 0 gets a column-major gradient
        opt.step()
        history.append([p.data.copy() for p in params])
    assert all(p.data is a for p, a in zip(params, arrays))  # updated in place
    return history


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    dict(lr=0.1, momentum=0.5, maximize=True),
    dict(lr=0.1, weight_decay=0.5, maximize=True),
]
ADAM_CASES = [
    dict(lr=0.01),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=0.02, amsgrad=True),
    dict(lr=0.01, amsgrad=True, weight_decay=0.05, maximize=True),
]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-11), (np.float32, 2e-5)])
@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_matches_the_documented_algorithm(kwargs, dtype, rtol):
    starts, params, grads = _params_and_grads(dtype)
    history = _run(optim.SGD(params, **kwargs), params, grads, dtype)
    for i, start in enumerate(starts):
        ref = sgd_reference(start, [g[i] for g in grads], **kwargs)
        for step in range(STEPS):
            np.testing.assert_allclose(history[step][i], ref[step], rtol=rtol, atol=rtol, err_msg=f"p{i} step {step}")


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-5)])
@pytest.mark.parametrize(
    "cls,kwargs",
    [(optim.Adam, k) for k in ADAM_CASES]
    + [(optim.AdamW, dict(lr=0.01)), (optim.AdamW, dict(lr=0.02, weight_decay=0.3, amsgrad=True))],
    ids=str,
)
def test_adam_and_adamw_match_the_documented_algorithm(cls, kwargs, dtype, rtol):
    starts, params, grads = _params_and_grads(dtype, seed=1)
    history = _run(cls(params, **kwargs), params, grads, dtype)
    full = dict(kwargs, decoupled=cls is optim.AdamW)
    if cls is optim.AdamW:
        full.setdefault("weight_decay", 1e-2)
    for i, start in enumerate(starts):
        ref = adam_reference(start, [g[i] for g in grads], **full)
        for step in range(STEPS):
            np.testing.assert_allclose(history[step][i], ref[step], rtol=rtol, atol=rtol, err_msg=f"p{i} step {step}")


def test_parameters_without_grad_are_skipped_and_groups_have_their_own_lr():
    a, b, c = (nn.Parameter(np.ones(2)) for _ in range(3))
    opt = optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 1.0}], lr=0.1, momentum=0.9)
    a.grad = Tensor(np.ones(2))
    c.grad = Tensor(np.ones(2))
    opt.step()
    np.testing.assert_allclose(a.data, 0.9)
    np.testing.assert_array_equal(b.data, 1.0)
    np.testing.assert_allclose(c.data, 0.0)
    assert b not in opt.state and opt.param_groups[1]["momentum"] == 0.9
    opt.zero_grad()
    assert a.grad is None and c.grad is None
    d = nn.Parameter(np.ones(1))
    opt.add_param_group({"params": d, "lr": 0.5})
    assert opt.param_groups[2]["params"] == [d] and opt.param_groups[2]["lr"] == 0.5


def test_step_runs_the_closure_and_training_reduces_the_loss():
    manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((64, 3)).astype(np.float32))
    y = Tensor(x.data @ np.array([[1.0], [-2.0], [0.5]], dtype=np.float32))
    opt = optim.Adam(model.parameters(), lr=0.01)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(150):
        last = opt.step(closure).item()
    assert last < 0.05 * first


# ----- state_dict ----------------------------------------------------------------------------------
def _model_and_grads(seed=0):
    manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    rng = np.random.default_rng(seed)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in model.parameters()] for _ in range(6)]
    return model, grads


def _step(model, opt, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = Tensor(g.copy())
    opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: optim.Adam(ps, lr=0.01, amsgrad=True, weight_decay=0.1),
        lambda ps: optim.AdamW(ps, lr=0.01),
        lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ],
)
def test_state_dict_round_trip_through_a_file_gives_identical_next_steps(make, tmp_path):
    model, grads = _model_and_grads()
    opt = make(model.parameters())
    for g in grads[:3]:
        _step(model, opt, g)
    save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ck")
    ck = load(tmp_path / "ck")

    resumed, _ = _model_and_grads(seed=1)  # different weights until loaded
    resumed.load_state_dict(ck["model"])
    opt2 = make(resumed.parameters())
    opt2.param_groups[0]["lr"] = 123.0  # overwritten by the load
    opt2.load_state_dict(ck["optim"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for g in grads[3:]:
        _step(model, opt, g)
        _step(resumed, opt2, g)
        for p, q in zip(model.parameters(), resumed.parameters()):
            np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_layout_is_pytorchs():
    model, grads = _model_and_grads()
    params = list(model.parameters())
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.01)
    _step(model, opt, grads[0])
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert sd["param_groups"][1]["lr"] == 0.5 and sd["param_groups"][0]["betas"] == (0.9, 0.999)
    state0 = sd["state"][0]
    assert sorted(state0) == ["exp_avg", "exp_avg_sq", "step"]
    assert state0["step"].dtype == np.float32 and float(state0["step"]) == 1.0
    assert state0["exp_avg"].shape == params[0].shape and state0["exp_avg"] is not opt.state[params[0]]["exp_avg"]


def test_load_state_dict_refuses_mismatches_naming_them():
    model, grads = _model_and_grads()
    opt = optim.Adam(model.parameters())
    _step(model, opt, grads[0])
    sd = opt.state_dict()
    two_groups = optim.Adam([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    with pytest.raises(ValueError, match="has 1 parameter groups, this optimizer has 2"):
        two_groups.load_state_dict(sd)
    fewer = optim.Adam(list(model.parameters())[:3])
    with pytest.raises(ValueError, match="group 0 has 4 parameters in the loaded state dict but 3"):
        fewer.load_state_dict(sd)
    bad = copy.deepcopy(sd)
    bad["state"][1]["exp_avg"] = np.zeros(7)
    fresh = optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 1 has shape \(7,\) but the parameter has shape"):
        fresh.load_state_dict(bad)
    assert not fresh.state  # nothing half-loaded
    bad = copy.deepcopy(sd)
    bad["state"][9] = bad["state"][0]
    with pytest.raises(ValueError, match="parameter index 9"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        fresh.load_state_dict({"state": {}})
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="beta parameter at index 1: 1.5"):
        fresh.load_state_dict(bad)


# ----- bad input ----------------------------------------------------------------------------------
def test_bad_hyperparameters_and_params_are_named():
    p = nn.Parameter(np.ones(2))
    with pytest.raises(ValueError, match="invalid lr value: -0.1"):
        optim.SGD([p], lr=-0.1)
    with pytest.raises(ValueError, match="invalid lr value: -1"):
        optim.Adam([p], lr=-1)
    with pytest.raises(ValueError, match="beta parameter at index 0: 1.0"):
        optim.AdamW([p], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="beta parameter at index 1: -0.1"):
        optim.Adam([p], betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="invalid eps value: -1e-08"):
        optim.Adam([p], eps=-1e-8)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="invalid weight_decay value: nan"):
        optim.SGD([p], lr=0.1, weight_decay=float("nan"))
    with pytest.raises(TypeError, match="parameter 1 of group 0 is a ndarray"):
        optim.SGD([p, np.ones(2)], lr=0.1)
    x = nn.Parameter(np.ones(2))
    with pytest.raises(ValueError, match="non-leaf Tensor"):
        optim.SGD([x * 2.0], lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(TypeError, match="got a Parameter"):
        optim.SGD(p, lr=0.1)
    opt = optim.SGD([p], lr=0.1)
    p.grad = Tensor(np.ones(3))
    with pytest.raises(ValueError, match=r"parameter 0 has shape \(2,\) but its .grad has shape \(3,\)"):
        opt.step()


# ----- schedules ----------------------------------------------------------------------------------
def _opt(lr=1.0):
    return optim.SGD([nn.Parameter(np.ones(1))], lr=lr)


def _lrs(opt, scheduler, n):
    seen = []
    for _ in range(n):
        seen.append(opt.param_groups[0]["lr"])
        assert scheduler.get_last_lr() == [opt.param_groups[0]["lr"]]
        opt.step()
        scheduler.step()
    return seen


def test_simple_schedules_follow_their_formulas():
    opt = _opt(0.5)
    assert _lrs(opt, sched.StepLR(opt, step_size=3, gamma=0.1), 8) == pytest.approx(
        [0.5 * 0.1 ** (t // 3) for t in range(8)]
    )
    opt = _opt(2.0)
    assert _lrs(opt, sched.CosineAnnealingLR(opt, T_max=4, eta_min=0.5), 7) == pytest.approx(
        [0.5 + 1.5 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(7)]
    )
    opt = _opt(1.0)
    assert _lrs(opt, sched.LinearWarmup(opt, warmup_steps=4, start_factor=0.2), 6) == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    )
    opt = _opt(1.0)
    assert _lrs(opt, sched.ExponentialLR(opt, gamma=0.5), 4) == pytest.approx([1, 0.5, 0.25, 0.125])
    opt = _opt(3.0)
    assert _lrs(opt, sched.LambdaLR(opt, lambda t: 1 / (t + 1)), 3) == pytest.approx([3.0, 1.5, 1.0])


def test_warmup_then_cosine_with_sequential_lr():
    opt = _opt(1.0)
    warm = sched.LinearWarmup(opt, warmup_steps=3, start_factor=0.25)
    cos = sched.CosineAnnealingLR(opt, T_max=4)
    s = sched.SequentialLR(opt, [warm, cos], milestones=[3])
    expected = [0.25, 0.5, 0.75] + [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert _lrs(opt, s, 8) == pytest.approx(expected)


def test_chained_schedules_multiply_and_state_dict_resumes():
    opt = _opt(1.0)
    chain = sched.ChainedScheduler([sched.StepLR(opt, 2, gamma=0.5), sched.LinearWarmup(opt, 2, start_factor=0.5)])
    first = _lrs(opt, chain, 3)
    assert first == pytest.approx([0.5, 0.75, 0.5])
    saved = chain.state_dict()
    rest = _lrs(opt, chain, 3)

    opt2 = _opt(1.0)
    chain2 = sched.ChainedScheduler([sched.StepLR(opt2, 2, gamma=0.5), sched.LinearWarmup(opt2, 2, start_factor=0.5)])
    chain2.load_state_dict(saved)
    opt2.param_groups[0]["lr"] = chain2.get_last_lr()[0]
    assert _lrs(opt2, chain2, 3) == pytest.approx(rest)
    with pytest.raises(ValueError, match="states of 2 schedulers"):
        chain2.load_state_dict({k: v for k, v in saved.items() if k != "_schedulers"})


def test_schedule_state_dict_goes_through_a_checkpoint_and_bad_settings_are_named(tmp_path):
    opt = _opt(1.0)
    s = sched.StepLR(opt, step_size=2)
    _lrs(opt, s, 3)
    save(s.state_dict(), tmp_path / "s")
    opt2 = _opt(1.0)
    s2 = sched.StepLR(opt2, step_size=2)
    s2.load_state_dict(load(tmp_path / "s"))
    assert s2.last_epoch == 3 and s2.get_last_lr() == s.get_last_lr()
    with pytest.raises(ValueError, match="step_size must be a positive integer, got 0"):
        sched.StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="start_factor must be in"):
        sched.LinearWarmup(opt, 5, start_factor=0.0)
    with pytest.raises(ValueError, match="milestones"):
        sched.SequentialLR(opt, [sched.StepLR(opt, 1), sched.StepLR(opt, 1)], milestones=[])
    with pytest.raises(ValueError, match="different optimizer"):
        sched.SequentialLR(opt, [sched.StepLR(opt, 1), sched.StepLR(_opt(), 1)], milestones=[2])
    with pytest.raises(TypeError, match="not an Optimizer"):
        sched.StepLR("adam", 1)
