"""The tensorboard plugin (mpnn/plugins/tensorboard.py), through real `mpnn launch -n 2` runs read back with
TensorBoard's own EventAccumulator: the loss scalars equal the losses the script computed, at the right steps;
the learning rate follows the schedule; shares lie in [0, 1]; the codec's ratio is there; ranks=all writes one
run per rank, the default only rank 0; bad options stop the launch with one line naming the option."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorboardX")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, pathlib, sys
import numpy as np
import mpnn
from mpnn import nn

comm = mpnn.init()
mpnn.manual_seed(0)
model = mpnn.DataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
schedule = mpnn.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
rng = np.random.default_rng(comm.rank)
losses, lrs = [], []
for step in range(6):
    x = rng.standard_normal((8, 4)).astype(np.float32)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(mpnn.from_numpy(x)), mpnn.from_numpy((x[:, 0] > 0).astype(np.int64)))
    loss.backward()
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    schedule.step()
    losses.append(loss.item())
out = pathlib.Path(sys.argv[1]) / f"logged-{comm.rank}.json"
out.write_text(json.dumps({"losses": losses, "lrs": lrs}))
"""


def _launch(tmp_path, run_id, *plugin_specs):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    specs = [arg for spec in plugin_specs for arg in ("--plugin", spec)]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "from mpnn.cli import main; main()", "launch", "-n", "2"]
        + ["--log-dir", str(tmp_path / "runs"), "--run-id", run_id, *specs, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return proc, time.monotonic() - t0


def _scalars(directory):
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_rank_writes_its_own_run_with_the_losses_the_script_logged(tmp_path):
    proc, _ = _launch(tmp_path, "all", "tensorboard:every=1,ranks=all", "topk:ratio=0.5")
    assert proc.returncode == 0, proc.stderr
    board = tmp_path / "runs" / "all" / "tensorboard"
    assert sorted(p.name for p in board.iterdir()) == ["rank0", "rank1"]
    for rank in (0, 1):
        logged = json.loads((tmp_path / f"logged-{rank}.json").read_text())
        scalars = _scalars(board / f"rank{rank}")
        assert [step for step, _ in scalars["loss/train"]] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in scalars["loss/train"]] == pytest.approx(logged["losses"], rel=1e-6)
        assert [v for _, v in scalars["lr"]] == pytest.approx(logged["lrs"])  # 0.1, 0.1, 0.05, 0.05, ...
        for tag in ("time/step_s", "time/compute_s", "bytes/sent", "memory/rss_bytes", "codec/ratio"):
            assert [step for step, _ in scalars[tag]] == [1, 2, 3, 4, 5, 6], tag
        for lane in ("compute", "comm", "optimizer", "data"):
            assert all(0.0 <= v <= 1.0 for _, v in scalars[f"share/{lane}"]), lane
        assert all(v == pytest.approx(4 * 58 / (8 * 29), rel=1e-3) for _, v in scalars["codec/ratio"])
        assert all(v > 0 for _, v in scalars["memory/rss_bytes"])
        assert scalars["loss/epoch_mean"][0][1] == pytest.approx(sum(logged["losses"]) / 6, rel=1e-6)


def test_by_default_only_rank_0_writes_every_nth_step(tmp_path):
    proc, _ = _launch(tmp_path, "zero", "tensorboard:every=2")
    assert proc.returncode == 0, proc.stderr
    board = tmp_path / "runs" / "zero" / "tensorboard"
    assert [p.name for p in board.iterdir()] == ["rank0"]
    logged = json.loads((tmp_path / "logged-0.json").read_text())
    scalars = _scalars(board / "rank0")
    assert scalars["loss/train"] == [(s, pytest.approx(logged["losses"][s - 1], rel=1e-6)) for s in (2, 4, 6)]


@pytest.mark.parametrize(
    "spec, needle",
    [("tensorboard:every=0", "every=0 must be an integer >= 1"), ("tensorboard:ranks=2", "ranks='2'")],
    ids=["every=0", "ranks=2"],
)
def test_bad_options_stop_the_launch_naming_the_option(tmp_path, spec, needle):
    proc, elapsed = _launch(tmp_path, "bad", spec)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "logged-0.json").exists()
    assert elapsed < 30


def test_watchdog_trend_in_the_record_is_written_under_memory(tmp_path):
    from tensorboardX import SummaryWriter

    from mpnn.plugins.tensorboard import TensorBoard

    board = TensorBoard(every=1)
    board.writer = SummaryWriter(str(tmp_path))
    board._write({"step": 3, "rss_bytes": 1 << 20, "watchdog_rss_slope": 4096.0})
    board.writer.close()
    scalars = _scalars(tmp_path)
    assert scalars["memory/rss_slope_bytes_per_step"] == [(3, 4096.0)]
    assert scalars["memory/rss_bytes"] == [(3, float(1 << 20))]
