"""mpnn.Checkpointer: a run stopped and resumed reaches bit-identical parameters, optimizer and codec state to one
never stopped (one process, and two workers with a topk error-feedback codec), a corrupt or incomplete newest
checkpoint is skipped with one warning for the older one, resuming from nothing valid fails naming the place,
rotation keeps K, the plugin hook and telemetry event carry the manifest's SHA-256, and SIGKILL at random moments
of saving never leaves a checkpoint that restore() would load wrongly."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mpnn
from mpnn import nn
from mpnn.checkpoint import Checkpointer, CheckpointSaveError, ResumeError, layout
from mpnn.checkpoint.weights import load_safetensors
from mpnn.data import DataLoader, DistributedSampler, TensorDataset
from mpnn.launch import run
from mpnn.optim.lr_scheduler import StepLR
from mpnn.plugins import hookimpl

ROOT = Path(__file__).resolve().parents[1]


def assert_same_run(a, b):
    """Model state dicts, optimizer state dicts (and anything nested) equal bit for bit."""
    if isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str)
        for key in a:
            assert_same_run(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_run(x, y)
    elif isinstance(a, (np.ndarray, np.generic, mpnn.Tensor)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def _data(n=96, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return TensorDataset(x, (x[:, :3].sum(1) > x[:, 3:].sum(1)).astype(np.int64))


def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def _noisy(x):
    """Input noise from NumPy's global RNG scaled by Python's random: both streams must resume too."""
    noise = np.random.standard_normal(x.shape).astype(np.float32) * np.float32(0.05 * random.random())
    return x + mpnn.from_numpy(noise)


# ----- one process: dropout, Adam, StepLR, a shuffling loader, stopped mid-epoch --------------------------
def _train_alone(directory, until, every=5):
    mpnn.manual_seed(0)
    np.random.seed(1)
    random.seed(2)
    loader = DataLoader(_data(), batch_size=8, shuffle=True)  # 12 batches an epoch, its own generator
    model = _mlp()
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)
    schedule = StepLR(opt, step_size=7, gamma=0.5)
    ckpt = Checkpointer(model, opt, schedule, loader=loader, every=every, directory=directory)
    start = ckpt.restore()
    _train(model, opt, schedule, loader, ckpt, start, until)
    return start, model.state_dict(), opt.state_dict(), schedule.get_last_lr()


def _train(model, opt, schedule, loader, ckpt, start, until, sampler=None):
    """The training loop both set-ups share: from the restored step and epoch to step `until`, checkpointing."""
    step, epoch = start.step, start.epoch
    while step < until:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(_noisy(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            ckpt.step(step, epoch=epoch)
            if step == until:
                break
        epoch += 1


def test_resume_mid_epoch_in_one_process_is_bit_exact(tmp_path):
    full = _train_alone(tmp_path / "full", until=40)
    _train_alone(tmp_path / "stopped", until=17)  # checkpoints at 5, 10, 15; stops 2 steps later
    resumed = _train_alone(tmp_path / "stopped", until=40)  # its own directory: resumes from step 15
    assert (resumed[0].step, resumed[0].epoch, resumed[0].path.name) == (15, 1, "step-00000015")
    assert full[0].step == 0 and not full[0].resumed
    assert_same_run(full[1:], resumed[1:])
    assert full[3] == [1e-2 * 0.5**5]  # the schedule really moved across the stop


# ----- two workers: DataParallel with topk error feedback, DistributedSampler, dropout, Adam, StepLR ---------
class SavedCheckpoints:
    """Test plugin: records each mpnn_checkpoint_saved call."""

    name, version, options = "savedcheckpoints", "1.0", {}

    def __init__(self):
        self.calls = []

    @hookimpl
    def mpnn_checkpoint_saved(self, run, path, sha256, step):
        self.calls.append((path, sha256, step))


def _train_two(until, source=None):
    saved = SavedCheckpoints()
    comm = mpnn.init(plugins=[saved])
    mpnn.manual_seed(0)
    np.random.seed(1 + comm.rank)
    random.seed(2 + comm.rank)
    data = _data(64)
    sampler = DistributedSampler(data, shuffle=True, seed=4)  # 32 samples a rank: 4 batches an epoch
    loader = DataLoader(data, batch_size=8, sampler=sampler, drop_last=True)
    model = mpnn.DataParallel(_mlp())  # the run's codec: --plugin topk
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)
    schedule = StepLR(opt, step_size=6, gamma=0.5)
    ckpt = Checkpointer(model, opt, schedule, sampler=sampler, loader=loader, every=5)
    start = ckpt.restore(source)
    _train(model, opt, schedule, loader, ckpt, start, until, sampler)
    states = comm.allgather_object(_arrays((model.module.state_dict(), opt.state_dict(), model.codec.state_dict())))
    return (start.step, start.epoch), states, saved.calls, os.environ["MPNN_RUN_DIR"]


def _arrays(obj):
    """`obj` with every Tensor as its NumPy array: what collectives of objects carry."""
    if isinstance(obj, mpnn.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {key: _arrays(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_arrays(value) for value in obj)
    return obj


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory):
    """A run stopped after step 13 (checkpoints at 5 and 10), its resumption to step 23, and a run to 23 unstopped."""
    root = tmp_path_factory.mktemp("two")
    plugins = ("topk:ratio=0.1",)
    stopped = run(_train_two, n=2, args=(13,), log_dir=root / "stopped", plugins=plugins, timeout=60)
    resumed = run(_train_two, n=2, args=(23, stopped[3]), log_dir=root / "resumed", plugins=plugins, timeout=60)
    full = run(_train_two, n=2, args=(23,), log_dir=root / "full", plugins=plugins, timeout=60)
    return stopped, resumed, full


def test_two_workers_with_topk_error_feedback_resume_bit_exact(two_worker_runs):
    stopped, resumed, full = two_worker_runs
    assert resumed[0] == (10, 2) and full[0] == (0, 0)  # step 10 is mid-epoch 2 (2 of its 4 batches done)
    assert_same_run(full[1], resumed[1])  # both ranks: parameters, Adam state and lr, codec residuals
    residuals = [rank_state[2] for rank_state in full[1]]
    assert all(any(np.any(r != 0) for r in rank.values()) for rank in residuals)  # error feedback in play
    assert not np.array_equal(residuals[0]["residual.0"], residuals[1]["residual.0"])  # per-rank state


def test_each_checkpoint_fires_the_hook_and_a_telemetry_event_with_the_manifest_digest(two_worker_runs):
    stopped = two_worker_runs[0]
    run_dir = Path(stopped[3])
    names = [Path(path).name for path, _, _ in stopped[2]]
    assert names == ["step-00000005", "step-00000010"] and [step for _, _, step in stopped[2]] == [5, 10]
    for path, sha256, step in stopped[2]:
        assert Path(path).parent == run_dir / "checkpoints"
        assert sha256 == hashlib.sha256((Path(path) / layout.MANIFEST).read_bytes()).hexdigest()
        for rank in (0, 1):
            events = [json.loads(line) for line in (run_dir / f"worker-{rank}.jsonl").read_text().splitlines()]
            assert {"step": step, "path": path, "sha256": sha256}.items() <= next(
                e for e in events if e.get("event") == "checkpoint" and e["step"] == step
            ).items()


def test_a_checkpoint_of_two_ranks_resumes_alone_dropping_residuals_it_has_no_codec_for(two_worker_runs, capsys):
    model = _mlp()
    opt = mpnn.optim.Adam(model.parameters())
    ckpt = Checkpointer(model, opt, StepLR(opt, 6))
    start = ckpt.restore(two_worker_runs[0][3])
    assert (start.step, start.epoch, start.path.name) == (10, 2, "step-00000010")
    weights = start.path / "model.safetensors"
    saved = load_safetensors(weights) if weights.exists() else mpnn.load(start.path / "model.mpnn")
    assert_same_run(model.state_dict(), saved)  # the weights of the stopped run's step 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by a world of 2, on 1 rank(s)" in err
    assert "topk: dropping the error-feedback residuals of 2 rank(s): this run has no DataParallel" in err


def _resume_alone_with_topk(source):
    """Step 10 of the 2-rank run on one rank with the same codec, the global batch of 16 kept, trained to 14."""
    mpnn.init()
    data = _data(64)
    sampler = DistributedSampler(data, shuffle=True, seed=4)
    loader = DataLoader(data, batch_size=16, sampler=sampler, drop_last=True)
    model = mpnn.DataParallel(_mlp())
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)
    schedule = StepLR(opt, step_size=6, gamma=0.5)
    ckpt = Checkpointer(model, opt, schedule, sampler=sampler, loader=loader, every=5)
    start = ckpt.restore(source)
    residuals, position = model.codec.state_dict(), loader.state_dict()
    _train(model, opt, schedule, loader, ckpt, start, 14, sampler)
    return (start.step, start.epoch), residuals, position


def test_a_checkpoint_of_two_ranks_resumes_on_one_with_the_residuals_summed_by_the_codecs_rule(
    two_worker_runs, tmp_path
):
    source = Path(two_worker_runs[0][3]) / "checkpoints" / "step-00000010"
    start, residuals, position = run(
        _resume_alone_with_topk, n=1, args=(source,), log_dir=tmp_path, plugins=("topk:ratio=0.1",), timeout=60
    )
    assert start == (10, 2) and position["batches_consumed"] == 2  # 2 batches of 8 on 2 ranks: 2 of 16 on one
    old = [mpnn.load(source / layout.rank_file(r))["data_parallel"]["codec_state"] for r in (0, 1)]
    assert sorted(residuals) == sorted(old[0])
    for key in old[0]:
        np.testing.assert_allclose(residuals[key], (old[0][key] + old[1][key]) / 2, rtol=1e-6)
    assert any(np.any(r != 0) for r in residuals.values())


# ----- corrupt, incomplete and missing checkpoints ------------------------------------------------------
def _stamped(directory, steps, **kwargs):
    """A tiny model whose weight is filled with the step number at each save, and its Checkpointer."""
    model = nn.Linear(3, 2)
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(model, opt, directory=directory, **kwargs)
    for step in steps:
        model.weight.data[...] = step
        ckpt.save(step)
    model.weight.data[...] = -1
    return model, ckpt


def _flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


CORRUPTIONS = {
    "flipped byte": (lambda d: _flip_byte(d / "step-00000002" / "model.safetensors"), "model.safetensors has SHA-256"),
    "truncated": (lambda d: _truncate(d / "step-00000002" / "optimizer.mpnn"), "optimizer.mpnn is .* bytes"),
    "no manifest": (lambda d: (d / "step-00000002" / "manifest.json").unlink(), "no manifest.json"),
    "edited manifest": (lambda d: _flip_byte(d / "step-00000002" / "manifest.json"), "manifest.json"),
    "missing rank file": (lambda d: (d / "step-00000002" / "rank-0.mpnn").unlink(), "rank-0.mpnn is missing"),
}


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_skipped_with_one_warning(corrupt, tmp_path, capsys):
    damage, reason = CORRUPTIONS[corrupt]
    model, ckpt = _stamped(tmp_path, [1, 2])
    capsys.readouterr()
    damage(tmp_path)
    state = ckpt.restore()
    assert (state.step, state.path) == (1, tmp_path / "step-00000001")
    assert (model.weight.data == 1).all()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert f"skipping checkpoint {tmp_path / 'step-00000002'}: " in lines[0]
    assert re.search(reason, lines[0]), lines[0]


def test_a_leftover_temporary_directory_is_never_read_and_goes_at_the_next_save(tmp_path, capsys):
    model, ckpt = _stamped(tmp_path, [1, 2])
    leftover = tmp_path / layout.writing_name(3)
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    capsys.readouterr()
    assert ckpt.restore().step == 2 and (model.weight.data == 2).all()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"ignoring {leftover}: a save that never finished" in lines[0], lines
    ckpt.save(4)
    assert sorted(os.listdir(tmp_path)) == ["step-00000001", "step-00000002", "step-00000004"]


def test_resume_from_a_place_without_a_valid_checkpoint_fails_naming_it(tmp_path, monkeypatch):
    _, ckpt = _stamped(tmp_path / "run" / "checkpoints", [5])
    _flip_byte(tmp_path / "run" / "checkpoints" / "step-00000005" / "model.safetensors")
    monkeypatch.setenv("MPNN_RESUME_FROM", str(tmp_path / "run"))
    with pytest.raises(
        ResumeError,
        match=r"no valid checkpoint in .*run/checkpoints to resume from "
        r"\(step-00000005: model.safetensors has SHA-256",
    ):
        ckpt.restore()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("MPNN_RESUME_FROM", str(tmp_path / "empty"))
    with pytest.raises(ResumeError, match=r"no valid checkpoint in .*empty .*holds no step-\* checkpoint"):
        ckpt.restore()
    monkeypatch.setenv("MPNN_RESUME_FROM", str(tmp_path / "nowhere"))
    with pytest.raises(ResumeError, match=r"nowhere is not a directory"):
        ckpt.restore()


def test_a_checkpoint_of_another_model_is_refused_naming_the_mismatch(tmp_path):
    _stamped(tmp_path, [1])
    other = nn.Linear(4, 2)
    ckpt = Checkpointer(other, mpnn.optim.SGD(other.parameters(), lr=0.1), directory=tmp_path)
    with pytest.raises(
        ResumeError,
        match=r"(?s)rank 0: .*step-00000001 does not fit this run: .*size mismatch for "
        r"weight: .*\(2, 3\) from checkpoint, .* is \(2, 4\)",
    ):
        ckpt.restore()


def test_the_example_refuses_to_resume_from_nothing(tmp_path):
    env = dict(os.environ, MPNN_RESUME_FROM=str(tmp_path))
    for name in ("MPNN_RUN_DIR", "MPNN_CHECKPOINT_EVERY", "MPNN_RANK", "MPNN_WORLD_SIZE"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "mnist1d.py"), "--model", "mlp", "--steps", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0
    assert f"ResumeError: Checkpointer.restore: no valid checkpoint in {tmp_path} to resume from" in done.stderr
    assert "final test accuracy" not in done.stdout


def test_a_directory_that_cannot_be_written_fails_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    model = nn.Linear(2, 2)
    ckpt = Checkpointer(model, mpnn.optim.SGD(model.parameters(), lr=0.1), every=1, directory=tmp_path / "file")
    with pytest.raises(CheckpointSaveError, match=r"checkpoint: rank 0: cannot make .*file.*File exists: .*file"):
        ckpt.step(1)
    with pytest.raises(ValueError, match="need a directory"):
        Checkpointer(model, mpnn.optim.SGD(model.parameters(), lr=0.1), every=1)


# ----- settings ----------------------------------------------------------------------------------------------
def test_keep_k_rotation_and_the_launchers_environment(tmp_path, monkeypatch):
    _stamped(tmp_path / "a", range(1, 6), keep=2)
    assert sorted(os.listdir(tmp_path / "a")) == ["step-00000004", "step-00000005"]
    monkeypatch.setenv("MPNN_CHECKPOINT_KEEP", "1")
    monkeypatch.setenv("MPNN_CHECKPOINT_EVERY", "3")
    model, ckpt = _stamped(tmp_path / "b", [], every=2, keep=4)
    assert (ckpt.every, ckpt.keep) == (3, 1)
    for step in range(1, 8):
        ckpt.step(step)
    assert os.listdir(tmp_path / "b") == ["step-00000006"]
    monkeypatch.setenv("MPNN_CHECKPOINT_EVERY", "0")  # 0: the script's own setting
    assert Checkpointer(model, ckpt.optimizer, every=2, directory=tmp_path).every == 2
    monkeypatch.setenv("MPNN_CHECKPOINT_KEEP", "zero")
    with pytest.raises(ValueError, match="MPNN_CHECKPOINT_KEEP='zero' must be an integer >= 1"):
        Checkpointer(model, ckpt.optimizer)


# ----- SIGKILL while checkpoints are written -----------------------------------------------------------------
SIZE = 2_000_000  # float32s: 8 MB of model on rank 0 and 8 MB of per-rank state on every rank, each checkpoint
CHILD = """
import sys
import numpy as np
import mpnn
from mpnn import nn


class Ballast:
    \"\"\"Per-rank state as big as the model, so that every rank's file takes a while to write.\"\"\"

    def __init__(self, size):
        self.values = np.zeros(size, np.float32)

    def state_dict(self):
        return {"values": self.values}

    def load_state_dict(self, state):
        self.values[...] = state["values"]


comm = mpnn.init()
size = int(sys.argv[1])
model = nn.Linear(size, 1, bias=False)
ballast = Ballast(size)
ckpt = mpnn.Checkpointer(model, mpnn.optim.SGD(model.parameters(), lr=0.1), sampler=ballast, every=1, keep=2,
                         directory=sys.argv[2] if len(sys.argv) > 2 else None)
step = ckpt.restore().step
if step and not ((model.weight.data == step).all() and (ballast.values == step + comm.rank).all()):
    sys.exit(f"rank {comm.rank}: restored step {step} with the state of another step")
print("resumed", step, flush=True)
while True:
    step += 1
    model.weight.data[...] = step
    ballast.values[...] = step + comm.rank
    ckpt.step(step)
"""


def _wait_for_new_checkpoint(directory, before, process):
    deadline = time.monotonic() + 60
    while {name for _, name in layout.list_checkpoints(directory)} <= before and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint saved within 60 s"
        time.sleep(0.01)


def _assert_every_checkpoint_whole(directory, world_size):
    """Each step-* directory holds every file its manifest lists, unchanged, and every rank's file."""
    for step, name in layout.list_checkpoints(directory):
        manifest, _ = layout.read_manifest(directory / name)
        layout.verify_files(directory / name, manifest, manifest["files"])
        assert manifest["step"] == step and {layout.rank_file(r) for r in range(world_size)} <= set(manifest["files"])


def test_sigkill_of_a_lone_process_while_saving_leaves_only_whole_checkpoints(tmp_path, capsys):
    script, directory = tmp_path / "child.py", tmp_path / "ckpt"
    script.write_text(CHILD)
    delays, resumed_at = [random.uniform(0, 0.5) for _ in range(4)], []
    for delay in delays:
        before = {name for _, name in layout.list_checkpoints(directory)}
        child = subprocess.Popen(
            [sys.executable, str(script), str(SIZE), str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            line = child.stdout.readline()  # it restored (and checked) the newest checkpoint
            _wait_for_new_checkpoint(directory, before, child)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            _, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, (line, err)
        resumed_at.append(int(line.split()[1]))
        _assert_every_checkpoint_whole(directory, 1)
    assert resumed_at[0] == 0 and all(a < b for a, b in zip(resumed_at, resumed_at[1:])), (resumed_at, delays)
    model = nn.Linear(SIZE, 1, bias=False)
    capsys.readouterr()
    state = Checkpointer(model, mpnn.optim.SGD(model.parameters(), lr=0.1), directory=directory).restore()
    assert state.step == layout.list_checkpoints(directory)[0][0] > resumed_at[-1]
    assert (model.weight.data == state.step).all() and "skipping" not in capsys.readouterr().err


def _launch_and_kill(script, log_dir, run_id, victim, delay, resume=None):
    """`mpnn launch -n 2` the child; once it saved a checkpoint, wait `delay` s and SIGKILL worker `victim`."""
    run_dir = log_dir / run_id
    command = [sys.executable, "-m", "mpnn", "launch", "-n", "2", "--log-dir", str(log_dir), "--run-id", run_id]
    command += ["--resume", str(resume)] if resume else []
    launcher = subprocess.Popen(
        command + [str(script), str(SIZE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_for_new_checkpoint(run_dir / "checkpoints", set(), launcher)
        time.sleep(delay)
        starts = [
            json.loads(line)
            for rank in (0, 1)
            for line in (run_dir / f"worker-{rank}.jsonl").open()
            if '"event":"start"' in line
        ]
        os.kill(starts[victim]["pid"], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0, output
    for start in starts:  # the launcher stopped the survivor too
        with pytest.raises(ProcessLookupError):
            os.kill(start["pid"], 0)
    return run_dir, output


def test_sigkill_of_a_worker_while_saving_leaves_only_whole_checkpoints_and_resumes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    first, output = _launch_and_kill(script, tmp_path, "first", victim=1, delay=random.uniform(0, 0.4))
    _assert_every_checkpoint_whole(first / "checkpoints", 2)
    newest = layout.list_checkpoints(first / "checkpoints")[0][0]
    second, output = _launch_and_kill(script, tmp_path, "second", victim=0, delay=random.uniform(0, 0.4), resume=first)
    assert f"[0] resumed {newest}" in output and f"[1] resumed {newest}" in output, output
    _assert_every_checkpoint_whole(second / "checkpoints", 2)
