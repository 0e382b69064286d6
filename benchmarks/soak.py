"""Soak: a long 2-worker MNIST-1D MLP run with the memory-leak watchdog on; is memory flat and the step steady?

    python benchmarks/soak.py [--steps 50000] [--window 5000] [--baseline]

Runs `mpnn launch -n 2 --plugin watchdog launch/mnist1d.py --model mlp --steps N` and reads the run back from
its telemetry (every rank's worker-<rank>.jsonl):
- RSS per rank: after warm-up (the first window) against the end, the least-squares slope over the rest of the
  run in bytes per step, and the largest RSS seen;
- watchdog events: "leak" (an alarm) and "memory_trend" (a trend no Python line explains), per rank;
- step time per window of --window steps: the median step_s of rank 0, so a slow drift (a growing list,
  fragmentation, a cache that never stops filling) shows as a rising column;
- with --baseline, the same run without the watchdog first, and the ratio of their median step times: the
  watchdog's cost over the long run, on the same machine in the same session.
Not a CI test: 50,000 steps take minutes.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "launch" / "mnist1d.py"


def launch(log_dir: Path, run_id: str, steps: int, plugins: list[str]) -> tuple[Path, float]:
    """One launched run; returns its run directory and wall seconds; exits with its output if it failed."""
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
        *[arg for plugin in plugins for arg in ("--plugin", plugin)],
        str(RECIPE),
        "--model",
        "mlp",
        "--steps",
        str(steps),
        "--eval-every",
        str(max(steps // 10, 1)),
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"soak: `{' '.join(command)}` failed with exit code {done.returncode}:\n{done.stdout[-4000:]}")
    return log_dir / run_id, time.perf_counter() - started


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def report(run_dir: Path, window: int, wall: float) -> float:
    """Print the run's memory, events and step-time windows; return rank 0's median step time (seconds)."""
    from mpnn.telemetry.reader import load_run

    run = load_run(run_dir)
    print(f"  {run_dir.name}: {wall:.0f} s wall")
    for rank, log in run.ranks.items():
        steps = [r for r in log.steps if isinstance(r.get("rss_bytes"), int)]
        after = [r for r in steps if r["step"] > window]
        if not after:
            print(f"    rank {rank}: fewer than {window} steps recorded")
            continue
        start, end = after[0]["rss_bytes"], after[-1]["rss_bytes"]
        rate = slope([r["step"] for r in after], [r["rss_bytes"] for r in after])
        events = [e["event"] for e in log.events if e["event"] in ("leak", "memory_trend")]
        print(
            f"    rank {rank}: RSS after warm-up {start / 2**20:.1f} MiB, at the end {end / 2**20:.1f} MiB "
            f"({(end - start) / 2**10:+.0f} KiB), slope {rate:+.2f} B/step, peak "
            f"{max(r['rss_bytes'] for r in steps) / 2**20:.1f} MiB; watchdog events: {events or 'none'}"
        )
    times = [r["step_s"] for r in run.ranks[0].steps if "step_s" in r]
    columns = [statistics.median(times[i : i + window]) * 1e3 for i in range(0, len(times), window)]
    print(f"    rank 0 median step per window of {window} steps, ms: {' '.join(f'{c:.3f}' for c in columns)}")
    return statistics.median(times[window:]) if len(times) > window else statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=5_000, help="steps per step-time column; also the warm-up")
    parser.add_argument("--baseline", action="store_true", help="also run without the watchdog, first")
    args = parser.parse_args()
    print(f"soak: MNIST-1D MLP, 2 workers, {args.steps} steps; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="mpnn-soak-") as log_dir:
        medians = {}
        setups = [("bare", [])] if args.baseline else []
        for name, plugins in setups + [("watchdog", ["watchdog"])]:
            run_dir, wall = launch(Path(log_dir), name, args.steps, plugins)
            medians[name] = report(run_dir, args.window, wall)
    if args.baseline:
        print(
            f"  median step: watchdog {medians['watchdog'] * 1e3:.3f} ms, bare {medians['bare'] * 1e3:.3f} ms, "
            f"ratio {medians['watchdog'] / medians['bare']:.3f}"
        )
    print(f"  load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
