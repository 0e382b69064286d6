"""Parameter groups as torch.optim has them (issue 12): per-group weight decay (nanoGPT's decay / no-decay split),
lr written into param_groups taking effect at the next step, zero_grad(set_to_none=True) by default, torch's
constructor signatures (nanoGPT checks `'fused' in inspect.signature(AdamW).parameters`), the implementation flags
accepted, named parameters, and optimizer state_dicts moved between mpnn and torch mid-run."""

import inspect

import numpy as np
import pytest

import mpnn
from mpnn import nn, optim
from mpnn.core.tensor import Tensor

SHAPES = [(4, 3), (3,), (2, 4), (4,)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _grads(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def _groups(params, wd=0.1):
    """nanoGPT's split: weight decay for parameters of 2 or more dims, none for the rest."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _set_grads(params, grads, torch=None):
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g.copy()) if torch is not None else Tensor(g.copy())


LRS = [1e-2, 5e-3, 0.0, 2e-2, 1e-3]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("AdamW", dict(betas=(0.9, 0.95))),
        ("AdamW", dict(amsgrad=True, eps=1e-6)),
        ("Adam", dict(weight_decay=0.0)),
        ("Adam", dict(decoupled_weight_decay=True)),
        ("SGD", dict(momentum=0.9)),
        ("SGD", dict(momentum=0.9, nesterov=True)),
    ],
    ids=str,
)
def test_per_group_weight_decay_and_written_lr_match_torch(name, kwargs):
    torch = pytest.importorskip("torch")
    ours = _params()
    theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in ours]
    m_opt = getattr(optim, name)(_groups(ours), lr=LRS[0], **kwargs)
    t_opt = getattr(torch.optim, name)(_groups(theirs), lr=LRS[0], **kwargs)
    assert [sorted(g) for g in m_opt.param_groups] == [sorted(g) for g in t_opt.param_groups]
    for step, grads in enumerate(_grads(len(LRS))):
        for opt in (m_opt, t_opt):
            for g in opt.param_groups:  # nanoGPT's schedule: written into every group before the step
                g["lr"] = LRS[step]
        _set_grads(ours, grads)
        _set_grads(theirs, grads, torch)
        m_opt.step()
        t_opt.step()
        for p, q in zip(ours, theirs):
            np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=2e-5, atol=1e-6)


def test_a_written_lr_takes_effect_at_the_next_step_and_per_group():
    p, q = nn.Parameter(np.ones(2, dtype=np.float32)), nn.Parameter(np.ones(2, dtype=np.float32))
    opt = optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)
    for param in (p, q):
        param.grad = Tensor(np.ones(2, dtype=np.float32))
    opt.step()
    np.testing.assert_allclose(p.data, 0.9)
    np.testing.assert_allclose(q.data, 0.5)
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[1]["lr"] = 0.25
    opt.step()
    np.testing.assert_allclose(p.data, 0.9)
    np.testing.assert_allclose(q.data, 0.25)


def test_zero_grad_sets_to_none_by_default():
    params = _params()
    opt = optim.AdamW(params)
    assert inspect.signature(opt.zero_grad).parameters["set_to_none"].default is True
    _set_grads(params, _grads(1)[0])
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.data.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_signatures_and_group_keys_are_torchs(name):
    cls = getattr(optim, name)
    ours = inspect.signature(cls).parameters
    assert "fused" in ours and "foreach" in ours and "differentiable" in ours
    assert ours["fused"].kind is inspect.Parameter.KEYWORD_ONLY and ours["fused"].default is None
    torch = pytest.importorskip("torch")
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    assert [(n, p.kind, p.default) for n, p in ours.items()] == [(n, p.kind, p.default) for n, p in theirs.items()]
    m = cls([nn.Parameter(np.ones(2, dtype=np.float32))])
    t = getattr(torch.optim, name)([torch.nn.Parameter(torch.ones(2))])
    assert m.param_groups[0].keys() == t.param_groups[0].keys()
    assert {k: v for k, v in m.param_groups[0].items() if k != "params"} == {
        k: v for k, v in t.param_groups[0].items() if k != "params"
    }


def test_implementation_flags_are_accepted_and_change_nothing():
    results = []
    for flags in (dict(), dict(fused=True), dict(foreach=True), dict(capturable=True), dict(fused=False)):
        params = _params()
        opt = optim.AdamW(_groups(params), lr=1e-2, **flags)
        for grads in _grads(3):
            _set_grads(params, grads)
            opt.step()
        results.append([p.data.copy() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        optim.AdamW(_params(), fused=True, foreach=True)
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        optim.SGD(_params(), differentiable=True)
    opt = optim.SGD(_params())
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        opt.add_param_group({"params": [nn.Parameter(np.ones(1))], "differentiable": True})


def test_named_parameters_give_param_names_as_torch():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    opt = optim.AdamW(model.named_parameters(), lr=1e-3)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    named = dict(model.named_parameters())
    grouped = optim.AdamW(
        [
            {"params": [(n, p) for n, p in named.items() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named.items() if p.dim() < 2], "weight_decay": 0.0},
        ]
    )
    assert [g["param_names"] for g in grouped.param_groups] == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    with pytest.raises(ValueError, match="with/without names"):
        grouped.add_param_group({"params": [nn.Parameter(np.ones(1))]})
    torch = pytest.importorskip("torch")
    t_model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    t_opt = torch.optim.AdamW(t_model.named_parameters(), lr=1e-3)
    assert t_opt.param_groups[0]["param_names"] == opt.param_groups[0]["param_names"]


def test_optimizer_state_moves_between_mpnn_and_torch_mid_run():
    torch = pytest.importorskip("torch")
    ours = _params()
    theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in ours]
    m_opt = optim.AdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.95))
    t_opt = torch.optim.AdamW(_groups(theirs), lr=1e-2, betas=(0.9, 0.95))
    grads = _grads(6)
    for g in grads[:3]:  # three steps on mpnn only
        _set_grads(ours, g)
        m_opt.step()
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(torch.from_numpy(p.data))
    sd = m_opt.state_dict()
    t_opt.load_state_dict(
        {
            "state": {i: {k: torch.from_numpy(np.array(v)) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"],
        }
    )
    for g in grads[3:5]:  # two on torch
        _set_grads(theirs, g, torch)
        t_opt.step()
    tsd = t_opt.state_dict()
    back = optim.AdamW(_groups(ours), lr=1.0)
    back.load_state_dict(
        {
            "state": {i: {k: v.numpy() for k, v in s.items()} for i, s in tsd["state"].items()},
            "param_groups": tsd["param_groups"],
        }
    )
    assert back.param_groups[0]["lr"] == 1e-2 and back.param_groups[1]["weight_decay"] == 0.0
    for p, q in zip(ours, theirs):
        p.data[...] = q.detach().numpy()
    _set_grads(ours, grads[5])  # and the last on mpnn again
    back.step()
    _set_grads(theirs, grads[5], torch)
    t_opt.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=2e-5, atol=1e-6)
    assert back.state[ours[0]]["step"] == 6


def test_lr_scheduler_drives_every_group():
    params = _params()
    opt = optim.AdamW(_groups(params), lr=1.0)
    opt.param_groups[1]["lr"] = 0.5
    sched = optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.1 * (epoch + 1))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.1])
    assert mpnn.optim.AdamW is optim.AdamW
