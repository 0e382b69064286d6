"""Gradient compression on the MNIST-1D CNN recipe, 2 workers: final test accuracy and bytes on the wire.

    python benchmarks/compression.py [--steps 8000] [--seeds 0 1 2 3 4] [--eval-every 500] [--methods none ...]

Each method runs `mpnn launch -n 2 [--plugin METHOD] launch/mnist1d.py --model cnn --steps N --seed S` (the
paper's recipe: Adam lr 1e-2, global batch 100, 50 per rank) with MPNN_SHM=0, so every byte crosses the
socket ring and the communicator's bytes_sent is what a network would carry. Read back from the run:
- accuracy: rank 0's "final test accuracy" line (worker-0.log), on the 1000 held-out samples, and the mean
  of the test accuracies printed every --eval-every steps over the last quarter of training (Adam at a
  constant lr 1e-2 makes the final iterate's accuracy jump by a point or two from one eval to the next);
- wire: rank 0's telemetry, bytes_sent summed over all steps (every collective: the codec's, the initial
  parameter broadcast) and its median per step; for a codec also codec_bytes per step (the payload it hands
  to collectives) and codec_ratio (float32 bytes of the same gradients / codec_bytes);
- "x fewer": the uncompressed run's median bytes_sent per step over this method's.
The CNN's gradient is 5,210 floats (20,840 bytes) in one bucket, below the communicator's 32 KB small-array
path, so uncompressed steps send each rank's whole gradient to the other rank once (20,840 bytes per rank).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "launch" / "mnist1d.py"
DEFAULT_METHODS = ["none", "fp16", "topk:ratio=0.01", "powersgd:rank=2", "powersgd:rank=2,fp16=true", "signsgd"]
FINAL = re.compile(r"final test accuracy ([0-9.]+)")
EVAL = re.compile(r"step +(\d+)/\d+ .*test acc ([0-9.]+)")


def run_method(method, steps, seed, eval_every, log_dir):
    """One training run; returns (final accuracy, last-quarter mean accuracy), wall seconds, and rank 0's
    per-step telemetry records."""
    from mpnn.telemetry.reader import load_run

    run_id = f"{re.sub(r'[^A-Za-z0-9._-]', '-', method.replace('=', ''))}-seed{seed}"
    plugin = [] if method == "none" else ["--plugin", method]
    command = [
        sys.executable,
        "-m",
        "mpnn",
        "launch",
        "-n",
        "2",
        "--log-dir",
        str(log_dir),
        "--run-id",
        run_id,
        *plugin,
        str(RECIPE),
        "--model",
        "cnn",
        "--steps",
        str(steps),
        "--eval-every",
        str(eval_every),
        "--seed",
        str(seed),
    ]
    env = {**os.environ, "MPNN_SHM": "0", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"compression: `{' '.join(command)}` failed with exit code {done.returncode}:\n{done.stdout}")
    run_dir = log_dir / run_id
    log = (run_dir / "worker-0.log").read_text()
    late = [float(acc) for step, acc in EVAL.findall(log) if int(step) >= 0.75 * steps]
    accuracy = (float(FINAL.search(log).group(1)), statistics.fmean(late))
    return accuracy, wall, load_run(run_dir).ranks[0].steps


def summarize(method, results):
    """Mean accuracies over seeds and the wire figures of the first seed's run."""
    accuracies = [final for (final, _), _, _ in results]
    late = [late for (_, late), _, _ in results]
    _, wall, steps = results[0]
    sent = [s["bytes_sent"] for s in steps]
    row = {
        "method": method,
        "acc_mean": statistics.fmean(accuracies),
        "accs": accuracies,
        "acc_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "late_mean": statistics.fmean(late),
        "bytes_total": sum(sent),
        "bytes_step": statistics.median(sent),
        "ms_step": 1e3 * statistics.median(s["step_s"] for s in steps),
        "wall_s": wall,
    }
    if "codec_bytes" in steps[-1]:
        row["codec_bytes"] = statistics.median(s["codec_bytes"] for s in steps)
        row["codec_ratio"] = statistics.median(s["codec_ratio"] for s in steps)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpnn-compression-") as log_dir:
        for method in args.methods:
            results = [run_method(method, args.steps, seed, args.eval_every, Path(log_dir)) for seed in args.seeds]
            rows.append(summarize(method, results))
            print(f"done {method}: accuracies {rows[-1]['accs']}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["method"] == "none"), None)
    print(
        f"MNIST-1D CNN, 2 workers, {args.steps} steps, seeds {args.seeds} (accuracy: mean over seeds; wire: "
        f"seed {args.seeds[0]}, rank 0)"
    )
    print(
        f"{'method':<18}{'final acc':>10}{'sd':>7}{'vs none':>9}{'last 1/4':>10}{'vs none':>9}"
        f"{'bytes/step':>12}{'x fewer':>9}{'total MB':>10}{'codec B/step':>14}{'codec ratio':>13}{'ms/step':>9}"
    )
    for r in rows:
        delta = f"{100 * (r['acc_mean'] - base['acc_mean']):+.2f}" if base else "-"
        late_delta = f"{100 * (r['late_mean'] - base['late_mean']):+.2f}" if base else "-"
        fewer = f"{base['bytes_step'] / r['bytes_step']:.1f}" if base and r["bytes_step"] else "-"
        codec = f"{r['codec_bytes']:>14.0f}{r['codec_ratio']:>13.1f}" if "codec_bytes" in r else f"{'-':>14}{'-':>13}"
        print(
            f"{r['method']:<18}{100 * r['acc_mean']:>9.2f}%{100 * r['acc_sd']:>7.2f}{delta:>9}"
            f"{100 * r['late_mean']:>9.2f}%{late_delta:>9}{r['bytes_step']:>12.0f}{fewer:>9}"
            f"{r['bytes_total'] / 1e6:>10.2f}{codec}{r['ms_step']:>9.2f}"
        )


if __name__ == "__main__":
    main()
