"""The worked example plugin launch/grad_norms.py: on a real 2-worker run it logs, every `every` steps, each
parameter's averaged gradient norm, equal to the norm of the .grad the optimizer then uses."""

import json
from pathlib import Path

import numpy as np

import mpnn
from mpnn import nn
from mpnn.launch import run

REPO = Path(__file__).resolve().parents[1]


def _train(steps):
    comm = mpnn.init()
    mpnn.manual_seed(0)
    model = mpnn.DataParallel(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)))
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(comm.rank)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        model(mpnn.from_numpy(rng.standard_normal((4, 3)).astype(np.float32))).pow(2).sum().backward()
        norms.append({name: float(np.linalg.norm(p.grad.data)) for name, p in model.module.named_parameters()})
        opt.step()
    return norms


def test_grad_norms_logs_each_layers_averaged_gradient_norm(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # as the docstring's PYTHONPATH=. from the repository root
    norms = run(_train, n=2, args=(6,), log_dir=tmp_path, plugins=["launch.grad_norms:GradNorms:every=2"])
    run_dir = next(tmp_path.iterdir())
    events = [
        json.loads(line)
        for line in (run_dir / "worker-0.jsonl").read_text().splitlines()
        if '"event":"grad_norms"' in line
    ]
    assert [e["step"] for e in events] == [2, 4, 6]
    for event in events:
        expected = norms[event["step"] - 1]
        assert event["norms"].keys() == expected.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
        for name, value in expected.items():
            assert abs(event["norms"][name] - value) <= 1e-6 * max(1.0, value), name
    assert "step 4 gradient norms 0.weight" in (run_dir / "worker-0.log").read_text()
    assert "grad_norms" not in (run_dir / "worker-1.jsonl").read_text()
