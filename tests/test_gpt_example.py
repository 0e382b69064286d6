"""launch/gpt.py: the character GPT learns in one process, and trains, checkpoints and resumes under
`mpnn launch -n 2` with a compression plugin, its telemetry written as for any model (issue 12)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mpnn
from examples import load_example

REPO = Path(__file__).resolve().parents[1]
GPT = load_example("gpt")
TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "16",
    "--batch-size",
    "8",
    "--eval-iters",
    "4",
    "--sample-chars",
    "0",
    "--warmup-steps",
    "5",
]


def test_the_model_is_nanogpts_shape_with_tied_weights():
    cfg = GPT.GPTConfig(vocab_size=65)
    model = GPT.GPT(cfg)
    names = dict(model.named_parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in names or "transformer.wte.weight" not in names  # counted once
    # nanoGPT's CPU recipe at vocabulary 65 has 0.80M parameters (wte tied to lm_head, no biases).
    assert sum(p.numel() for p in model.parameters()) == 65 * 128 + 64 * 128 + 4 * (12 * 128 * 128 + 2 * 128) + 128
    logits, loss = model(mpnn.zeros(2, 64, dtype=mpnn.long), mpnn.zeros(2, 64, dtype=mpnn.long))
    assert logits.shape == (2, 64, 65) and loss.shape == ()


def test_learns_a_text_in_one_process(tmp_path):
    text = tmp_path / "abc.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    start = GPT.main(["--text", str(text), "--steps", "1", "--eval-every", "1000"] + TINY)
    final = GPT.main(["--text", str(text), "--steps", "150", "--lr", "3e-3", "--eval-every", "1000"] + TINY)
    assert np.isfinite(final) and final < 0.6 * start, (start, final)


def test_the_sampler_shards_windows_and_generate_extends(tmp_path):
    tokens = np.arange(100) % 7
    windows = GPT.Windows(tokens, 8)
    x, y = windows[3]
    assert len(windows) == 92 and list(x) == list(tokens[3:11]) and list(y) == list(tokens[4:12])
    model = GPT.GPT(GPT.GPTConfig(block_size=8, vocab_size=7, n_layer=1, n_head=1, n_embd=8))
    out = model.generate(mpnn.tensor([[1, 2]]), 10, top_k=3)
    assert out.shape == (1, 12) and int(out.data.max()) < 7 and list(out[0, :2].tolist()) == [1, 2]


def _launch(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "mpnn",
        "launch",
        "-n",
        "2",
        "--plugin",
        "topk:ratio=0.01",
        "--checkpoint-every",
        "5",
        *args,
    ]
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, check=False
    )


@pytest.mark.slow
def test_two_workers_with_topk_checkpoint_and_resume(tmp_path):
    script = str(REPO / "launch" / "gpt.py")
    done = _launch(tmp_path, "--run-id", "gpt-a", script, "--steps", "12", "--eval-every", "6", *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "runs" / "gpt-a"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    assert "final validation loss" in done.stdout and "world 2" in done.stdout
    for rank in (0, 1):
        steps = [json.loads(line) for line in (run / f"worker-{rank}.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "step" in r and "event" not in r]
        assert [r["step"] for r in steps][-1] == 12 and all(np.isfinite(r["loss"]) for r in steps)
        assert any(r.get("codec_bytes") for r in steps)  # top-k carried the gradients
    resumed = _launch(
        tmp_path, "--run-id", "gpt-b", "--resume", str(run), script, "--steps", "15", "--eval-every", "100", *TINY
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 10" in resumed.stdout and "final validation loss" in resumed.stdout
