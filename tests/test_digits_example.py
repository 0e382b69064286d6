"""launch/digits.py: scikit-learn's digits through ArrayShards and the fused transforms into a residual CNN that
learns, in one process and under `mpnn launch -n 2` (issue 13)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import load_example
from mpnn.data import ArrayShards

pytest.importorskip("sklearn")
REPO = Path(__file__).resolve().parents[1]
DIGITS = load_example("digits")
BRIEF = ["--epochs", "4", "--width", "16", "--batch-size", "32"]


def test_the_split_is_fixed_and_the_shards_hold_uint8_digits(tmp_path):
    DIGITS.write_shards(tmp_path)
    train, test = ArrayShards(tmp_path / "train", verify=True), ArrayShards(tmp_path / "test", verify=True)
    assert (len(train), len(test)) == (1438, 359) and train.image_shape == (8, 8, 1)
    images, labels = DIGITS.load_digits_uint8()
    assert images.dtype == np.uint8 and images.max() == 255 and images.min() == 0
    (_, _), (test_x, test_y) = DIGITS.split(images, labels)
    assert np.array_equal(test[np.arange(359)][1].data, test_y)  # the same 359 test images for every seed
    assert np.array_equal(test[np.arange(359)][0].data, test_x)


def test_the_model_is_residual_and_the_chain_runs_fused():
    model = DIGITS.ResidualCNN(8)
    assert model.block2.shortcut is not None and model.block1.shortcut is None
    chain = DIGITS.T.Compose([DIGITS.T.RandomCrop(8, padding=1), DIGITS.T.ToTensor(), DIGITS.T.Normalize([0.3], [0.4])])
    assert chain.fused is not None


def test_learns_in_one_process(tmp_path):
    acc = DIGITS.main(["--seed", "1", "--data-dir", str(tmp_path)] + BRIEF)
    assert acc > 0.9, acc  # chance is 0.1; 4 epochs gave 0.978-0.981, the full 20 reach >= 0.98


@pytest.mark.slow
def test_learns_under_mpnn_launch_with_two_workers(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "mpnn", "launch", "-n", "2", "--run-id", "digits", str(REPO / "launch" / "digits.py")]
    done = subprocess.run(
        cmd + BRIEF, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stdout + done.stderr
    final = [line for line in done.stdout.splitlines() if "final test accuracy" in line]
    assert len(final) == 1 and "world 2" in final[0], done.stdout  # rank 0 prints
    assert float(re.search(r"final test accuracy ([0-9.]+)", final[0]).group(1)) > 0.9, final
    run = tmp_path / "runs" / "digits"
    assert ArrayShards(run / "digits-shards" / "train", verify=True)
    records = [json.loads(line) for line in (run / "worker-1.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if "step" in r and "event" not in r) == 4 * (1438 // 2 // 16)
