"""MNIST-1D CNN data-parallel step time in one run: mpnn on 2 workers, mpnn on 1, PyTorch DDP (gloo) on 2.

    python benchmarks/ddp_mnist1d.py [--warmup 300] [--steps 1000] [--block 100] [--rounds 3]

(a) mpnn-2: `mpnn launch -n 2 launch/mnist1d.py --model cnn` (global batch 100, 50 per rank, DataParallel).
(b) mpnn-1: `mpnn launch -n 1 launch/mnist1d.py --model cnn` (batch 100, no communication).
(c) DDP-2: the same CNN (three Conv1d of 25 channels, k5/s2/p1, k3/s2/p1, k3/s2/p1, ReLU, Linear 125 -> 10),
    Adam lr 1e-2, 50 per rank, DistributedSampler, torch.distributed gloo on 127.0.0.1, torch.set_num_threads(1),
    each rank pinned to its own core as mpnn's launcher pins its workers.
A step is the whole recipe: next batch, zero_grad, forward, cross-entropy, backward (+ all-reduce), Adam; its
time runs from the end of one optimizer step to the end of the next. mpnn's step times are read from rank 0's
telemetry (worker-0.jsonl "step_s", what `mpnn launch` records anyway); DDP's are timed the same way in the loop.
Statistics of one run, over the --steps timed steps after --warmup: the headline "block median" cuts them into
blocks of --block steps and takes the median of the block means. A block mean charges every cost the steps
really have (epoch reshuffles, the occasional slow all-reduce, garbage collection), which a median of single
steps would drop; the median over blocks drops the blocks another process on this shared machine slowed down.
"best block" (the least disturbed block) and "step median" (the median single step) are printed beside it: on a
loaded machine two ranks in lockstep stall whenever either is preempted, and these two show the speed with
little of that. Each setup runs --rounds times, interleaved, and the median of its runs is reported, with the
load average around each round.
"""

import os

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, "1")  # before NumPy/torch load in this process and in every child

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
GLOBAL_BATCH = 100
STATISTICS = ("block median", "best block", "step median")


def block_means(step_times, block):
    """Mean step time (seconds) of each run of `block` consecutive steps."""
    return [statistics.fmean(step_times[i : i + block]) for i in range(0, len(step_times) - block + 1, block)]


def mpnn_step_times(nproc, warmup, steps, log_dir, run_id, env=None, repo=REPO):
    """Run the MNIST-1D CNN recipe under `mpnn launch -n nproc` (with `env` added to this process's environment)
    with the mpnn and the recipe of checkout `repo` (this one by default); rank 0's step_s of the timed steps."""
    from mpnn.telemetry.reader import load_run

    command = [
        sys.executable,
        "-m",
        "mpnn",
        "launch",
        "-n",
        str(nproc),
        "--log-dir",
        str(log_dir),
        "--run-id",
        run_id,
        str(Path(repo) / "launch" / "mnist1d.py"),
        "--model",
        "cnn",
        "--batch-size",
        str(GLOBAL_BATCH),
        "--steps",
        str(warmup + steps),
        "--eval-every",
        str(warmup + steps),
    ]
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)  # over an editable install
    done = subprocess.run(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.exit(f"ddp_mnist1d: `{' '.join(command)}` failed with exit code {done.returncode}:\n{done.stdout}")
    records = load_run(log_dir / run_id).ranks[0].steps
    times = [r["step_s"] for r in records if warmup < r["step"] <= warmup + steps]
    if len(times) != steps:
        sys.exit(f"ddp_mnist1d: {log_dir / run_id}: rank 0 recorded {len(times)} of the {steps} timed steps")
    return times


def _ddp_rank(rank, world_size, port, core, x, y, warmup, steps, out):
    """One DDP rank (a spawned process): train the CNN, put rank 0's timed step times on `out`."""
    os.sched_setaffinity(0, {core})
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(
            nn.Unflatten(1, (1, x.shape[1])),
            nn.Conv1d(1, 25, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(125, 10),
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=GLOBAL_BATCH // world_size, sampler=sampler, drop_last=True)
    times, step, epoch = [], 0, 0
    last = time.perf_counter()
    while step < warmup + steps:
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            now = time.perf_counter()
            times.append(now - last)
            last = now
            step += 1
            if step == warmup + steps:
                break
        epoch += 1
    if rank == 0:
        out.put(times[warmup:])
    dist.barrier()  # leave together: a rank tearing gloo down while its peer still talks can abort at exit
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ddp_step_times(world_size, warmup, steps, x, y):
    """PyTorch DDP with gloo on `world_size` spawned ranks pinned like mpnn's workers; rank 0's timed step times."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    cores = sorted(os.sched_getaffinity(0))
    port = _free_port()
    ranks = [
        context.Process(
            target=_ddp_rank, args=(rank, world_size, port, cores[rank % len(cores)], x, y, warmup, steps, out)
        )
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    try:
        while True:
            try:
                times = out.get(timeout=1.0)
                break
            except queue.Empty:
                for rank, process in enumerate(ranks):
                    if process.exitcode not in (None, 0):
                        sys.exit(f"ddp_mnist1d: DDP rank {rank} exited with code {process.exitcode}")
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return times


def summarize(times, block):
    """(median of block means, best block mean, median single step) in seconds."""
    means = block_means(times, block)
    return statistics.median(means), min(means), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=300, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps")
    parser.add_argument("--block", type=int, default=100, help="steps per block (headline: median of block means)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setup, interleaved; medians reported")
    args = parser.parse_args()
    if args.warmup < 0 or args.block < 1 or args.steps < args.block or args.rounds < 1:
        parser.error("need --warmup >= 0, --block >= 1, --steps >= --block and --rounds >= 1")
    was_set = {var: os.environ.pop(var) for var in OPENBLAS_VARS if var in os.environ}
    print(
        f"unset for the children: {was_set or 'none of ' + ', '.join(OPENBLAS_VARS) + ' was set'}; "
        f"{', '.join(f'{v}={os.environ[v]}' for v in THREAD_VARS)}; cores {sorted(os.sched_getaffinity(0))}"
    )
    print(
        f"{args.warmup} warm-up steps, {args.steps} timed; block median = median of {args.steps // args.block} "
        f"block means of {args.block} steps; {args.rounds} rounds"
    )
    from mpnn.data.datasets import load_mnist1d

    data = load_mnist1d()
    results = {"mpnn-2": [], "mpnn-1": [], "DDP-2": []}
    with tempfile.TemporaryDirectory(prefix="mpnn-ddp-bench-") as log_dir:
        for round_number in range(1, args.rounds + 1):
            load_before = os.getloadavg()[0]
            runs = {
                "mpnn-2": mpnn_step_times(2, args.warmup, args.steps, Path(log_dir), f"r{round_number}-n2"),
                "mpnn-1": mpnn_step_times(1, args.warmup, args.steps, Path(log_dir), f"r{round_number}-n1"),
                "DDP-2": ddp_step_times(2, args.warmup, args.steps, data["x"], data["y"]),
            }
            print(f"round {round_number}: load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
            for name, times in runs.items():
                results[name].append(summarize(times, args.block))
                print(
                    f"  {name:>6}: "
                    + "  ".join(f"{label} {1e3 * s:.3f}" for label, s in zip(STATISTICS, results[name][-1]))
                    + "  ms/step",
                    flush=True,
                )
    print(f"median of {args.rounds} rounds, ms/step:")
    print(f"  {'':6}  " + "  ".join(f"{label:>13}" for label in STATISTICS))
    figure = {name: [statistics.median(column) for column in zip(*rows)] for name, rows in results.items()}
    for name, values in figure.items():
        print(f"  {name:>6}  " + "  ".join(f"{1e3 * s:13.3f}" for s in values))
    for label, (num, den), target in (
        ("mpnn-2 / DDP-2 ", ("mpnn-2", "DDP-2"), 0.3),
        ("mpnn-2 / mpnn-1", ("mpnn-2", "mpnn-1"), 1.0),
    ):
        print(
            f"  {label}  "
            + "  ".join(f"{a / b:13.3f}" for a, b in zip(figure[num], figure[den]))
            + f"   (target <= {target})"
        )


if __name__ == "__main__":
    main()
