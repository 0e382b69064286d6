"""Resuming a checkpoint written by N ranks on M ranks (issue 17, "resume at another world size").

On the sampler directly: after the resume the M ranks' batches continue the N ranks' pass exactly where it stopped
in the global order (every sample before the position seen once, the next global batches the next positions).
The codec's rule: residuals summed into rank 0's (scaled by M/N, so the mean update owed is kept) or dropped.
New ranks' random streams come from the run's seed. End to end under `mpnn launch`: launch/mnist1d.py stopped
at step 30 on 2 ranks goes on on 1, and one stopped on 1 goes on on 3, with the loss curve of the run that
went on on the old world size (the curves are in the failure message)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mpnn
from mpnn.checkpoint import resize
from mpnn.checkpoint.state import load_rank_state, rank_state
from mpnn.data import DataLoader, DistributedSampler, TensorDataset
from mpnn.plugins.compression.powersgd import PowerSGD
from mpnn.plugins.compression.topk import TopK

ROOT = Path(__file__).resolve().parents[1]
MNIST1D = ROOT / "launch" / "mnist1d.py"


# ----- the global data order ------------------------------------------------------------------------------------
def _dataset(n=50):
    return TensorDataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.int64))


def _world(world_size, batch, data, seed=7):
    """One (sampler, loader) per rank of a world, as a training script builds them on each rank."""
    ranks = []
    for rank in range(world_size):
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        ranks.append((sampler, DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)))
    return ranks


def _steps(world, count, epoch=0):
    """`count` global steps of a world (each rank's iterator advanced in lockstep): the sample ids of each step."""
    for sampler, _ in world:
        sampler.set_epoch(epoch)
    iterators = [iter(loader) for _, loader in world]
    taken = []
    for _ in range(count):
        batches = [next(it, None) for it in iterators]
        if any(b is None for b in batches):
            break
        taken.append(sorted(int(i) for _, y in batches for i in y.numpy()))
    return taken


def _resume(states, old, new, batch, data):
    """The new world, each rank's state rebuilt from the old ranks' `states` as Checkpointer.restore does."""
    world = _world(new, batch, data)
    notes = []
    for rank, (sampler, loader) in enumerate(world):
        needed = {r: states[r] for r in resize.source_ranks(old, new, rank)}
        state, said = resize.resized_rank_state(needed, old, new, rank, None, sampler, loader)
        load_rank_state(state, None, sampler, loader)
        notes += said
    return world, notes


@pytest.mark.parametrize(
    "old, old_batch, new, new_batch, stop",
    [(2, 3, 1, 6, 4), (1, 6, 3, 2, 4), (2, 3, 3, 2, 5), (3, 2, 2, 3, 2), (2, 3, 3, 2, 8)],
)
def test_the_global_order_continues_exactly_where_the_old_world_stopped(old, old_batch, new, new_batch, stop):
    data = _dataset()  # 50 samples: 2 and 3 ranks pad the pass differently (50 and 51 positions)
    order = np.random.default_rng(7).permutation(50)  # DistributedSampler's order of epoch 0, any world size
    before = _world(old, old_batch, data)
    seen = _steps(before, stop)
    states = {r: rank_state(stop, 0, r, None, sampler, loader) for r, (sampler, loader) in enumerate(before)}
    after, notes = _resume(states, old, new, new_batch, data)
    going_on = _steps(after, 8)  # the rest of pass 0 (8 global steps of 6 in all on every world here)
    global_batch = old * old_batch
    assert sorted(i for step in seen for i in step) == sorted(order[: stop * global_batch])
    assert len(seen) + len(going_on) == 8
    expected = [sorted(order[g : g + global_batch]) for g in range(stop * global_batch, 48, global_batch)]
    assert going_on == expected, f"seen {seen}\nthen {going_on}\nexpected {expected}"
    next_pass = _steps(after, 1, epoch=1)[0]  # the next pass is the shuffle of epoch 1 on the new world
    assert next_pass == sorted(np.random.default_rng(8).permutation(50)[:global_batch])
    assert any(f"global sample {stop * global_batch}" in note for note in notes)


def test_a_position_that_is_not_whole_global_batches_is_refused_naming_the_numbers():
    data = _dataset()
    before = _world(2, 3, data)
    _steps(before, 3)  # 18 samples into the pass
    states = {r: rank_state(3, 0, r, None, s, loader) for r, (s, loader) in enumerate(before)}
    with pytest.raises(ValueError, match=r"18 samples into pass 0 .*3 ranks x batch 4 = 12.*keep the global batch"):
        _resume(states, 2, 3, 4, data)


def test_a_loader_whose_order_is_per_rank_cannot_change_world_size():
    data = _dataset()
    loader = DataLoader(data, batch_size=5, shuffle=True, seed=1)
    next(iter(loader))
    states = {0: rank_state(1, 0, 0, None, None, loader)}
    assert states[0]["data_position"] is None
    target = DataLoader(data, batch_size=5, shuffle=True, seed=1)
    with pytest.raises(ValueError, match="not draw from a DistributedSampler"):
        resize.resized_rank_state(states, 1, 2, 0, None, None, target)


def test_new_ranks_get_streams_derived_from_the_seed_and_old_ranks_keep_theirs():
    data = _dataset()
    before = _world(1, 6, data)
    mpnn.manual_seed(11)
    states = {0: rank_state(4, 0, 0, None, *before[0])}
    new = [resize.resized_rank_state({0: states[0]}, 1, 3, r, None, *_world(3, 2, data)[r])[0] for r in range(3)]
    assert new[0]["rng"] is states[0]["rng"]  # rank 0 goes on with its own streams
    assert new[1]["rng"]["mpnn"] == resize.derived_rng_state(11, 4, 1)["mpnn"]
    draws = []
    for state in new[1:]:
        load_rank_state(state, None, None, None)
        draws.append((np.random.random(), mpnn.randn(2).numpy().tolist()))
    assert draws[0] != draws[1]  # two new ranks, two streams
    load_rank_state(new[1], None, None, None)
    assert (np.random.random(), mpnn.randn(2).numpy().tolist()) == draws[0]  # and repeatable


# ----- the codec's rule ----------------------------------------------------------------------------------------
def _residuals(codec, values):
    codec.residuals = {0: np.asarray(values, np.float32)}
    return codec.state_dict()


def test_topk_sums_residuals_into_rank_0_scaled_so_the_owed_mean_is_kept():
    states = [_residuals(TopK(), [1.0, 2.0]), _residuals(TopK(), [3.0, -1.0])]
    to_one, note = TopK().resize_state(states, 2, 1, 0)
    np.testing.assert_allclose(to_one["residual.0"], [2.0, 0.5])  # (1/2) x the sum: the mean owed on 1 rank
    assert "summed into rank 0's" in note
    to_three = [TopK().resize_state(states if r == 0 else states[:1], 2, 3, r) for r in range(3)]
    np.testing.assert_allclose(to_three[0][0]["residual.0"], [6.0, 1.5])  # on 3 ranks rank 0's counts 1/3
    assert to_three[1] == ({}, None) and to_three[2] == ({}, None)


def test_powersgd_keeps_the_shared_warm_start_and_sums_residuals():
    old = []
    for values in ([1.0, 1.0], [2.0, 0.0]):
        codec = PowerSGD()
        codec.q = {(0, 1): np.full((3, 2), 0.5, np.float32)}
        old.append(_residuals(codec, values))
    for rank in (0, 1):
        state, _ = PowerSGD().resize_state(old if rank == 0 else old[:1], 2, 2 + rank, rank)
        np.testing.assert_array_equal(state["q.0.1"], np.full((3, 2), 0.5, np.float32))
        fresh = PowerSGD()
        fresh.load_state_dict(state)
        assert (0, 1) in fresh.q and (rank == 0) == (0 in fresh.residuals)


class Forgetful(TopK):
    name = "forgetful"
    resize_rule = "drop"


def test_a_codec_whose_rule_is_drop_starts_from_zero_with_one_warning():
    states = [_residuals(Forgetful(), [1.0]), _residuals(Forgetful(), [2.0])]
    results = [Forgetful().resize_state(states if r == 0 else states[:1], 2, 3, r) for r in range(3)]
    assert [state for state, _ in results] == [{}, {}, {}]
    notes = [note for _, note in results if note]
    assert len(notes) == 1 and notes[0].startswith("forgetful: dropping the error-feedback residuals of 2 rank(s)")


# ----- end to end under `mpnn launch` ---------------------------------------------------------------------------
def _launch(log_dir, n, run_id, *args, resume=None, plugins=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", "from mpnn.cli import main; main()", "launch", "-n", str(n)]
    cmd += ["--log-dir", str(log_dir), "--run-id", run_id]
    cmd += ["--resume", str(resume)] if resume else []
    for plugin in plugins:
        cmd += ["--plugin", plugin]
    cmd += [str(MNIST1D), "--model", "mlp", "--eval-every", "1000", "--num-samples", "2500", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    return log_dir / run_id, done


def _curve(run_dir):
    """{step: the global batch's loss}: the mean of the ranks' telemetry losses (their batches are equal)."""
    losses = {}
    for path in run_dir.glob("worker-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("loss") is not None and "event" not in record:
                losses.setdefault(record["step"], []).append(record["loss"])
    return {step: float(np.mean(values)) for step, values in sorted(losses.items())}


def _resume_on_another_world(tmp_path, old, new, batch, plugins=()):
    """Run `old` ranks to step 60 (checkpoints at 30 and 60), and resume its step 30 on `new` ranks to step 60."""
    args = ("--steps", "60", "--batch-size", str(batch), "--checkpoint-every", "30")
    reference, _ = _launch(tmp_path, old, "reference", *args, plugins=plugins)
    source = tmp_path / "stopped" / "checkpoints"
    source.mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-00000030", source / "step-00000030")
    resumed, done = _launch(tmp_path, new, "resumed", *args, resume=tmp_path / "stopped", plugins=plugins)
    return _curve(reference), _curve(resumed), done


def _assert_continues(reference, resumed, label, exact=True):
    steps = list(range(31, 61))
    table = "\n".join(
        f"  step {s:3d}  {reference.get(s, float('nan')):.4f}  {resumed.get(s, float('nan')):.4f}" for s in steps
    )
    message = f"{label}: loss curves (step, continued on the old world, resumed on the new one)\n{table}"
    assert sorted(resumed) == steps, message  # telemetry goes on numbering from the checkpoint's step
    gap = np.array([resumed[s] - reference[s] for s in steps])
    # The same samples in the same global batches from the same weights: without a codec only float summation order
    # differs, so the curves stay together; step to step the loss itself moves by ~0.1 (the batch-to-batch noise).
    # A codec compresses differently on another world (topk keeps the largest entries of each rank's gradient): the
    # curves part, by less than that noise.
    noise = float(np.std(np.diff([reference[s] for s in steps])))
    message += f"\n  largest gap {np.abs(gap).max():.2e}, mean gap {gap.mean():.2e}, step-to-step noise {noise:.4f}"
    print(message)
    assert abs(gap[0]) < 1e-3, message  # the first step after the resume: the same batch and weights
    if exact:
        assert np.abs(gap).max() < 0.5 * noise and abs(gap.mean()) < 0.1 * noise, message
    else:
        assert np.abs(gap).max() < noise and abs(gap.mean()) < 0.25 * noise, message
    assert reference[31] < reference[1] - 0.3  # it went on from step 30, not from scratch


def test_two_ranks_resume_on_one_and_the_loss_curve_goes_on(tmp_path):
    reference, resumed, done = _resume_on_another_world(tmp_path, 2, 1, 100)
    _assert_continues(reference, resumed, "2 -> 1 ranks")
    assert "written by a world of 2, on 1 rank(s)" in (tmp_path / "resumed" / "worker-0.log").read_text()


def test_one_rank_resumes_on_three_and_the_loss_curve_goes_on(tmp_path):
    reference, resumed, done = _resume_on_another_world(tmp_path, 1, 3, 96)
    _assert_continues(reference, resumed, "1 -> 3 ranks")
    log = (tmp_path / "resumed" / "worker-0.log").read_text()
    assert "written by a world of 1, on 3 rank(s)" in log and "random streams derived from the run's seed 0" in log


def test_two_ranks_with_topk_resume_on_three_with_residuals_summed_and_the_loss_curve_goes_on(tmp_path):
    reference, resumed, done = _resume_on_another_world(tmp_path, 2, 3, 96, plugins=("topk:ratio=0.05",))
    _assert_continues(reference, resumed, "2 -> 3 ranks, topk:ratio=0.05", exact=False)
    log = (tmp_path / "resumed" / "worker-0.log").read_text()
    assert "topk: the error-feedback residuals of 2 rank(s) summed into rank 0's (times 3/2" in log
