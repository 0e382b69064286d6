"""MNIST-1D CNN 2-rank step under a fixed competing load: mpnn vs PyTorch DDP (gloo), side by side.

    python benchmarks/contention.py [--loads 0,1,2,4] [--warmup 200] [--steps 600] [--block 100] [--rounds 3]
                                    [--load-kind python|numpy] [--mpnn-env MPNN_MAILBOX=0 ...] [--baseline DIR]

The step is ddp_mnist1d.py's (its runners are reused, not copied): `mpnn launch -n 2 launch/mnist1d.py --model
cnn` (global batch 100, rank 0's telemetry step_s) and the same CNN under DistributedDataParallel with gloo, each
rank pinned to its own core, one thread per rank. Around each measurement N busy processes compete for the
cores: each a pure-Python `while True: pass` (or, --load-kind numpy, a loop of small NumPy additions), not pinned,
started half a second before the run and killed (SIGKILL, then reaped) right after it, also on any error or ^C.
Each (load, library) cell runs --rounds times, the order of the two libraries alternating between rounds; a
cell's figure is the median over its rounds of the "block median" (median of the means of --block consecutive
steps, as in ddp_mnist1d.py). Printed per load: both step times, mpnn/DDP, and each library's degradation
(step time at that load / its own step time at load 0); the goal is mpnn's degradation <= DDP's. The 1-minute
load average is printed before and after each cell (it includes the N busy processes). --baseline DIR adds a
third column, "base": mpnn from another checkout (e.g. `git worktree add /tmp/base <commit>`, or `git archive
<commit> | tar -x -C DIR`), run in the same rounds, so a change to mpnn is judged before/after side by side.
"""

import os

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, "1")  # before NumPy/torch load in this process and in every child

import argparse  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ddp_mnist1d  # noqa: E402  (this folder is sys.path[0] when run as a script)

BUSY_LOOPS = {
    "python": "while True:\n    pass\n",
    "numpy": "import numpy as np\na = np.ones(256)\nwhile True:\n    a += 1.0\n",
}


class BusyLoad:
    """N busy processes for the duration of a `with` block; every one is killed and reaped on the way out."""

    def __init__(self, count, kind):
        self.count, self.code, self.processes = count, BUSY_LOOPS[kind], []

    def __enter__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        try:
            for _ in range(self.count):
                self.processes.append(subprocess.Popen([sys.executable, "-c", self.code], env=env))
        except BaseException:
            self.__exit__()
            raise
        if self.count:
            time.sleep(0.5)  # let them get going (and the load average notice them)
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait()
        self.processes.clear()


def run_cell(library, load, args, data, log_dir, tag):
    """The step times of one run of `library` ("mpnn", "base" or "DDP") under `load` busy processes."""
    with BusyLoad(load, args.load_kind):
        if library == "DDP":
            return ddp_mnist1d.ddp_step_times(2, args.warmup, args.steps, data["x"], data["y"])
        repo = args.baseline if library == "base" else ddp_mnist1d.REPO
        return ddp_mnist1d.mpnn_step_times(
            2, args.warmup, args.steps, log_dir, f"{tag}-{library}", env=args.mpnn_env, repo=repo
        )


def parse_env(items):
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--mpnn-env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", default="0,1,2,4", help="comma-separated numbers of busy processes")
    parser.add_argument("--warmup", type=int, default=200, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=600, help="timed steps")
    parser.add_argument("--block", type=int, default=100, help="steps per block (figure: median of block means)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each cell, the libraries' order alternating")
    parser.add_argument("--load-kind", choices=sorted(BUSY_LOOPS), default="python", help="what a busy process runs")
    parser.add_argument("--mpnn-env", nargs="*", default=[], metavar="NAME=VALUE", help="extra environment for mpnn")
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="also run mpnn from this checkout ('base')")
    args = parser.parse_args()
    loads = sorted({int(n) for n in args.loads.split(",")})
    if loads[0] != 0:
        loads.insert(0, 0)  # the degradation needs the unloaded figure
    if args.warmup < 0 or args.block < 1 or args.steps < args.block or args.rounds < 1 or loads[0] < 0:
        parser.error("need --warmup >= 0, --block >= 1, --steps >= --block, --rounds >= 1 and loads >= 0")
    if args.baseline is not None and not (args.baseline / "launch" / "mnist1d.py").is_file():
        parser.error(f"--baseline {args.baseline}: no launch/mnist1d.py there (not an mpnn checkout)")
    libraries = ("mpnn", "DDP") + (("base",) if args.baseline is not None else ())
    args.mpnn_env = parse_env(args.mpnn_env)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind the `with` blocks: no busy process left
    for var in ddp_mnist1d.OPENBLAS_VARS:
        os.environ.pop(var, None)
    print(
        f"cores {sorted(os.sched_getaffinity(0))} of {os.cpu_count()}; "
        f"{', '.join(f'{v}={os.environ[v]}' for v in THREAD_VARS)}; "
        f"busy load: {args.load_kind}; mpnn env: {args.mpnn_env or 'default'}"
        + (f"; base = mpnn from {args.baseline}" if args.baseline is not None else "")
    )
    print(
        f"{args.warmup} warm-up steps, {args.steps} timed; figure = median over {args.rounds} rounds of the median of "
        f"{args.steps // args.block} block means of {args.block} steps; load average = 1-minute, before -> after"
    )
    from mpnn.data.datasets import load_mnist1d

    data = load_mnist1d()
    figures = {}  # (library, load) -> [block median per round]
    with tempfile.TemporaryDirectory(prefix="mpnn-contention-") as log_dir:
        for round_number in range(1, args.rounds + 1):
            for load in loads:
                order = libraries if round_number % 2 else libraries[::-1]
                for library in order:
                    before = os.getloadavg()[0]
                    times = run_cell(library, load, args, data, Path(log_dir), f"r{round_number}-l{load}")
                    block_median, best, step_median = ddp_mnist1d.summarize(times, args.block)
                    figures.setdefault((library, load), []).append(block_median)
                    print(
                        f"round {round_number} load {load} {library:>4}: block median {1e3 * block_median:7.3f}  "
                        f"best block {1e3 * best:7.3f}  step median {1e3 * step_median:7.3f} ms/step  "
                        f"(load average {before:.2f} -> {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
    median = {key: statistics.median(values) for key, values in figures.items()}
    print(f"\nmedian of {args.rounds} rounds (block medians), ms/step; degradation = step at N / step at 0")
    base = args.baseline is not None
    print(
        f"  {'N busy':>6}  {'mpnn':>8}  {'DDP':>8}  {'mpnn/DDP':>8}  {'mpnn degr':>9}  {'DDP degr':>9}  "
        + (f"{'base':>8}  {'base/DDP':>8}  {'base degr':>9}  " if base else "")
        + "verdict"
    )
    for load in loads:
        mine, theirs = median[("mpnn", load)], median[("DDP", load)]
        mine_degr, their_degr = mine / median[("mpnn", 0)], theirs / median[("DDP", 0)]
        verdict = "" if load == 0 else ("ok" if mine_degr <= their_degr else "mpnn degrades more")
        extra = ""
        if base:
            old = median[("base", load)]
            extra = f"{1e3 * old:8.3f}  {old / theirs:8.3f}  {old / median[('base', 0)]:9.2f}  "
        print(
            f"  {load:6d}  {1e3 * mine:8.3f}  {1e3 * theirs:8.3f}  {mine / theirs:8.3f}  {mine_degr:9.2f}  "
            f"{their_degr:9.2f}  {extra}{verdict}"
        )


if __name__ == "__main__":
    main()
