"""The Checkpointer's loop form, `for step in ckpt.steps(total):` (restore first, save on the schedule after each
step's body), and launch/xor.py, which uses it: <= 10 lines of code, and it resumes under `mpnn launch`."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mpnn
from mpnn import nn
from mpnn.checkpoint.layout import step_name

ROOT = Path(__file__).resolve().parents[1]
XOR = ROOT / "launch" / "xor.py"


def _train(directory, total, stop_after=None):
    mpnn.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
    x, y = mpnn.tensor(np.arange(12.0, dtype=np.float32).reshape(4, 3) / 10), mpnn.tensor([[1.0], [0.0], [1.0], [0.0]])
    seen = []
    for step in mpnn.Checkpointer(model, opt, every=3, directory=directory).steps(total):
        seen.append(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if stop_after is not None and step + 1 == stop_after:
            break
    return seen, model.weight.numpy().copy()


def test_steps_saves_on_schedule_and_a_second_loop_continues_where_the_first_stopped(tmp_path):
    seen, _ = _train(tmp_path, 8, stop_after=7)  # a break: step 7 ran, but its checkpoint (not due) is not made
    assert seen == list(range(7))
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_name(3), step_name(6)]
    resumed, weight = _train(tmp_path, 8)
    assert resumed == [6, 7]  # from the checkpoint of step 6: steps 6 and 7 again
    whole, reference = _train(tmp_path / "fresh", 8)
    assert whole == list(range(8)) and np.array_equal(weight, reference)


def test_steps_refuses_a_bad_total(tmp_path):
    model = nn.Linear(1, 1)
    ckpt = mpnn.Checkpointer(model, mpnn.optim.SGD(model.parameters(), lr=0.1), directory=tmp_path)
    with pytest.raises(ValueError, match="total must be an integer >= 0, got -1"):
        next(ckpt.steps(-1))


def code_lines(path: Path) -> int:
    """Lines of code in a script, imports and docstrings aside."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        docstring = (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        )
        if isinstance(node, (ast.Import, ast.ImportFrom)) or docstring:
            skip.update(range(node.lineno, node.end_lineno + 1))
    lines = path.read_text().splitlines()
    return sum(
        1 for i, line in enumerate(lines, 1) if line.strip() and not line.strip().startswith("#") and i not in skip
    )


def test_xor_is_at_most_ten_lines_of_code():
    assert code_lines(XOR) <= 10


def _launch(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", "from mpnn.cli import main; main()", "launch", "-n", "1", "--log-dir", str(tmp_path)]
    return subprocess.run(cmd + list(args) + [str(XOR)], capture_output=True, text=True, env=env, timeout=120)


def test_xor_checkpoints_and_resumes_under_the_launcher(tmp_path):
    first = _launch(tmp_path, "--run-id", "first", "--checkpoint-every", "200")
    assert first.returncode == 0, first.stderr
    assert "predictions [0, 1, 1, 0]" in first.stdout
    checkpoints = sorted(p.name for p in (tmp_path / "first" / "checkpoints").iterdir())
    assert checkpoints == [step_name(200), step_name(400)]  # 500 is not a multiple of 200
    second = _launch(tmp_path, "--run-id", "second", "--resume", str(tmp_path / "first"), "--checkpoint-every", "50")
    assert second.returncode == 0, second.stderr
    assert "predictions [0, 1, 1, 0]" in second.stdout
    # resumed from step 400, so it saved only 450 and 500 (a fresh run would keep 400, 450 and 500)
    assert sorted(p.name for p in (tmp_path / "second" / "checkpoints").iterdir()) == [step_name(450), step_name(500)]
    assert first.stdout.splitlines()[-1] == second.stdout.splitlines()[-1]  # the same final loss, bit for bit
