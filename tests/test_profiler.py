"""mpnn.profiler (op times, torch.profiler's table, Chrome trace merged by `mpnn telemetry trace`) and
`mpnn launch --profile` (py-spy flame graphs per rank; one line and an unprofiled run when py-spy is missing or may
not attach)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

import mpnn
import mpnn.nn.functional as F
from mpnn import nn
from mpnn.core import autograd, optrace
from mpnn.launch import profiling
from mpnn.telemetry.cli import telemetry as telemetry_cli
from mpnn.telemetry.profiles import find_profiles

STEPS = 3
REPO = Path(__file__).resolve().parents[1]


def _train(steps=STEPS):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
    x = mpnn.randn(4, 8)
    with mpnn.profiler.profile(record_shapes=True) as prof:
        for _ in range(steps):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    return prof


def test_table_lists_forward_and_backward_of_each_op():
    prof = _train()
    rows = {r.key: r for r in prof.key_averages()}
    for name in ("linear", "relu", "sum", "linear_backward", "relu_backward", "sum_backward"):
        assert rows[name].count == STEPS, name
        assert 0 < rows[name].self_ns <= rows[name].total_ns
    table = prof.table(sort_by="self_time", row_limit=20)
    lines = table.splitlines()
    assert lines[1].split() == "Name Self CPU % Self CPU CPU total % CPU total CPU time avg # of Calls".split()
    assert lines[0].startswith("-") and lines[-1].startswith("Self CPU time total: ")
    body = [line.split() for line in lines[3:-2]]
    assert {cells[0] for cells in body} >= {"linear", "relu", "linear_backward", "relu_backward"}
    self_us = [float(cells[2].rstrip("us").rstrip("m")) * (1000 if "ms" in cells[2] else 1) for cells in body]
    assert self_us == sorted(self_us, reverse=True)  # sorted by self time
    assert all(cells[-1] == str(STEPS) for cells in body)
    assert len(prof.table(row_limit=2).splitlines()) == 3 + 2 + 2
    by_shape = prof.table(group_by_input_shape=True)
    assert "Input Shapes" in by_shape and "[[4, 8], [16, 8], [16]]" in by_shape
    with pytest.raises(ValueError, match="sort_by"):
        prof.table(sort_by="nonsense")


def test_self_time_excludes_nested_ops():
    x = mpnn.randn(5, 7, requires_grad=True)
    with mpnn.profiler.profile() as prof:
        F.mse_loss(x, mpnn.zeros(5, 7)).backward()
    rows = {r.key: r for r in prof.key_averages()}
    loss = rows["mse_loss"]
    nested = [e for e in prof.events() if e.depth == 1]
    assert nested, "mse_loss is composed of ops: they nest under it"
    assert loss.self_ns == loss.total_ns - sum(e.total_ns for e in nested if e.kind == "op")


def test_nothing_is_wrapped_when_not_profiling():
    """Zero cost when off: every op function and Node.apply are the very objects they were, everywhere."""
    from mpnn.core import linalg, ops

    def references():
        return {
            (name, key): value
            for name, module in list(sys.modules.items())
            if name == "mpnn" or name.startswith("mpnn.")
            for key, value in vars(module).items()
            if callable(value)
        }

    originals = optrace.op_functions()
    before, apply = references(), autograd.Node.apply
    assert not any(hasattr(f, "__wrapped__") for f in originals.values())
    with mpnn.profiler.profile():
        assert hasattr(ops.linear, "__wrapped__") and ops.linear.__wrapped__ is linalg.linear.__wrapped__
        assert F.linear is ops.linear and autograd.Node.apply is not apply
        assert optrace.is_active()
        with pytest.raises(RuntimeError, match="already recording"):
            mpnn.profiler.profile().start()
    after = references()
    assert autograd.Node.apply is apply and not optrace.is_active()
    changed = [key for key, value in before.items() if after.get(key) is not value]
    assert changed == []
    assert F.linear is linalg.linear and not hasattr(F.linear, "__wrapped__")


def _check_nesting(events):
    """Within one (pid, tid), every two X events are disjoint or one holds the other."""
    by_thread = {}
    for e in events:
        if e["ph"] == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    eps = 1e-3  # us: the ns readings printed as floats
    for slices in by_thread.values():
        stack = []
        for e in sorted(slices, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"] + eps:
                stack.pop()
            if stack:
                assert e["ts"] + e["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + eps, (e, stack[-1])
            stack.append(e)
    return by_thread


def test_chrome_trace_is_valid_and_nested(tmp_path):
    prof = _train()
    path = prof.export_chrome_trace(tmp_path / "ops.trace.json")
    data = json.loads(path.read_text())
    assert data["otherData"]["mpnn_profiler"] == 1
    events = data["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(prof.events())
    assert all(e["dur"] >= 0 and e["ts"] >= 0 and "Input Dims" in e["args"] for e in slices)
    assert {e["cat"] for e in slices} == {"cpu_op", "backward"}
    by_thread = _check_nesting(events)
    assert len(by_thread) == 1  # all on this thread
    assert sum(e["name"] == "linear" for e in slices) == STEPS


def test_telemetry_trace_merges_op_traces(tmp_path):
    import time

    prof = _train()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    now = time.time()
    lines = [{"t": now + i * 0.01, "rank": 0, "step": i, "step_s": 0.01, "loss": 1.0} for i in range(1, 4)]
    (run_dir / "worker-0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prof.export_chrome_trace(run_dir / "ops-0.trace.json")
    elsewhere = prof.export_chrome_trace(tmp_path / "extra.trace.json")
    result = CliRunner().invoke(telemetry_cli, ["trace", str(run_dir), "--ops", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert "ops-0.trace.json" in result.output and "extra.trace.json" in result.output
    trace = json.loads((run_dir / "trace.json").read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "step" in names and any(n.startswith("ops (ops-0") for n in names)
    ops = [e for e in trace["traceEvents"] if e["ph"] == "X" and e.get("cat") in ("cpu_op", "backward")]
    assert len(ops) == 2 * len(prof.events()) and all(e["pid"] == 0 and e["tid"] >= 1000 for e in ops)
    _check_nesting(trace["traceEvents"])
    # the op slices sit on the run's clock: the profile ran before the steps written above
    steps = [e for e in trace["traceEvents"] if e["ph"] == "X" and e.get("cat") == "step"]
    assert max(e["ts"] + e["dur"] for e in ops) <= min(e["ts"] for e in steps) + 1e3
    show = CliRunner().invoke(telemetry_cli, ["show", str(run_dir)])
    assert "op traces" in show.output and "ops-0.trace.json" in show.output
    bad = tmp_path / "bad.trace.json"
    bad.write_text("{}")
    result = CliRunner().invoke(telemetry_cli, ["trace", str(run_dir), "--ops", str(bad)])
    assert result.exit_code != 0 and "not an op trace" in result.output


TINY = """
import mpnn
from mpnn import nn
mpnn.init()
model = mpnn.DataParallel(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)))
opt = mpnn.optim.SGD(model.parameters(), lr=0.01)
x, y = mpnn.randn(32, 16), mpnn.randn(32, 1)
for _ in range(30):
    opt.zero_grad()
    mpnn.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
"""


def _launch(tmp_path, env=None, script=TINY):
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent(script))
    command = [sys.executable, "-m", "mpnn", "launch", "-n", "2", "--profile", "--log-dir", str(tmp_path / "runs")]
    command += ["--run-id", "r", "--timeout", "30", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    return result, tmp_path / "runs" / "r"


@pytest.mark.skipif(profiling.find_pyspy() is None, reason="py-spy is not installed (the profile extra)")
def test_launch_profile_writes_a_flame_graph_per_rank(tmp_path):
    if profiling.ptrace_blocked() is not None:
        pytest.skip(f"py-spy may not attach here: {profiling.ptrace_blocked()}")
    result, run_dir = _launch(tmp_path)
    if "may not attach" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    found = find_profiles(run_dir)
    assert found["flamegraph"] == ["profile-0.svg", "profile-1.svg"]
    assert found["speedscope"] == ["profile-0.speedscope.json", "profile-1.speedscope.json"]
    for rank in (0, 1):
        data = json.loads((run_dir / f"profile-{rank}.speedscope.json").read_text())
        assert data["profiles"] and data["shared"]["frames"]
        svg = ET.parse(run_dir / f"profile-{rank}.svg").getroot()
        assert svg.tag.endswith("svg") and len(svg) > 3
    assert "flame graphs in" in result.stderr
    show = subprocess.run(
        [sys.executable, "-m", "mpnn", "telemetry", "show", str(run_dir)], capture_output=True, text=True
    )
    assert "profile-0.svg, profile-1.svg" in show.stdout


def test_launch_profile_without_ptrace_permission_runs_unprofiled(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    pyspy = fake / "py-spy"
    pyspy.write_text(
        '#!/bin/sh\necho "Permission Denied: Try running again with elevated permissions by going '
        '\'sudo env \\"PATH=\\$PATH\\" !!\'" >&2\nexit 1\n'
    )
    pyspy.chmod(0o755)
    result, run_dir = _launch(tmp_path, env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "--profile" in line]
    assert len(said) == 1, result.stderr
    assert "ptrace" in said[0] and "unprofiled" in said[0]
    assert find_profiles(run_dir) == {"flamegraph": [], "speedscope": [], "ops_trace": []}


def test_pyspy_missing_names_the_extra(tmp_path, monkeypatch, capsys):
    assert profiling.find_pyspy(path=str(tmp_path), executable=str(tmp_path / "python")) is None
    monkeypatch.setattr(profiling, "find_pyspy", lambda: None)
    assert profiling.open_samplers(tmp_path / "run") is None
    assert profiling.open_samplers(tmp_path / "run", restart=1) is None  # said once per run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mpnn[profile]" in err[0] and "unprofiled" in err[0]


def test_ptrace_scope_is_read(tmp_path):
    scope = tmp_path / "ptrace_scope"
    scope.write_text("3\n")
    assert "3" in profiling.ptrace_blocked(scope, has_cap=True)
    scope.write_text("1\n")
    assert "CAP_SYS_PTRACE" in profiling.ptrace_blocked(scope, has_cap=False)
    assert profiling.ptrace_blocked(scope, has_cap=True) is None
    assert profiling.ptrace_blocked(tmp_path / "missing") is None
