"""All-reduce side by side: mpnn's ZeroMQ ring vs torch.distributed gloo, 2 ranks on this host, float32 sums.

    python benchmarks/allreduce.py [--sizes 4KB,1MB,16MB,64MB] [--ranks 2] [--transport auto|tcp] [--encrypt]
                                   [--no-shm] [--rounds 3]

For each size, each library runs a few warm-up all-reduces, then repetitions each preceded by a barrier;
rank 0's median time gives latency, algorithm bandwidth (bytes / time) and bus bandwidth
(2 (n - 1) / n * bytes / time). Both run in the same invocation, one library at a time, alternating for
--rounds rounds; each library's best round counts (a shared machine's noise only ever slows a round down).
"""

import argparse
import multiprocessing
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time

import numpy as np

SIZES = {"4KB": 4 << 10, "1MB": 1 << 20, "16MB": 16 << 20, "64MB": 64 << 20}
REPEATS = {4 << 10: 400, 1 << 20: 60, 16 << 20: 15, 64 << 20: 8}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _repeats(nbytes):
    return REPEATS.get(nbytes, max(5, min(400, (64 << 20) // max(nbytes, 1))))


def _mpnn_rank(env, sizes, out):
    os.environ.update(env)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mpnn.comm import init_from_env

    comm = init_from_env()
    timings = {}
    for nbytes in sizes:
        a = np.ones(nbytes // 4, np.float32)
        for _ in range(3):
            comm.allreduce(a)
        samples = []
        for _ in range(_repeats(nbytes)):
            a.fill(1.0)
            comm.barrier()
            start = time.perf_counter()
            comm.allreduce(a)
            samples.append(time.perf_counter() - start)
        timings[nbytes] = statistics.median(samples)
    comm.close()
    if comm.rank == 0:
        out.put(timings)


def _gloo_rank(rank, world_size, port, sizes, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    timings = {}
    for nbytes in sizes:
        t = torch.ones(nbytes // 4)
        for _ in range(3):
            dist.all_reduce(t)
        samples = []
        for _ in range(_repeats(nbytes)):
            t.fill_(1.0)
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - start)
        timings[nbytes] = statistics.median(samples)
    dist.destroy_process_group()
    if rank == 0:
        out.put(timings)


def _run(context, targets):
    out = context.Queue()
    processes = [context.Process(target=target, args=(*args, out)) for target, args in targets]
    for process in processes:
        process.start()
    timings = out.get(timeout=600)
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    return timings


def bench_mpnn(context, world_size, sizes, transport, encrypt, shared_memory):
    """Rank 0's median all-reduce time per size for mpnn's ring."""
    run_dir = tempfile.mkdtemp(prefix="mpnn-bench-")
    secret_file = os.path.join(run_dir, "secret")
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secrets.token_hex(32).encode())
    os.close(fd)
    port, run_id = _free_port(), secrets.token_hex(4)
    targets = []
    for rank in range(world_size):
        env = {
            "MPNN_RANK": str(rank),
            "MPNN_WORLD_SIZE": str(world_size),
            "MPNN_LOCAL_RANK": str(rank),
            "MPNN_LOCAL_WORLD_SIZE": str(world_size),
            "MPNN_RUN_ID": run_id,
            "MPNN_RUN_DIR": run_dir,
            "MPNN_RENDEZVOUS": f"tcp://127.0.0.1:{port}",
            "MPNN_SECRET_FILE": secret_file,
            "MPNN_TRANSPORT": transport,
            "MPNN_ENCRYPT": "1" if encrypt else "0",
            "MPNN_TIMEOUT": "120",
            "MPNN_SHM": "1" if shared_memory else "0",
        }
        env.update({name: "1" for name in THREAD_VARS})
        targets.append((_mpnn_rank, (env, sizes)))
    try:
        return _run(context, targets)
    finally:
        os.unlink(secret_file)
        os.rmdir(run_dir)


def bench_gloo(context, world_size, sizes):
    """Rank 0's median all-reduce time per size for torch.distributed with the gloo backend on loopback."""
    port = _free_port()
    return _run(context, [(_gloo_rank, (rank, world_size, port, sizes)) for rank in range(world_size)])


def _format_bytes(nbytes):
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g}{unit}"
    return f"{nbytes}B"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4KB,1MB,16MB,64MB", help="comma-separated from " + ",".join(SIZES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--transport", choices=("auto", "tcp"), default="auto")
    parser.add_argument("--encrypt", action="store_true", help="CURVE-encrypt mpnn's data sockets")
    parser.add_argument("--no-shm", action="store_true", help="all-reduce over the socket ring, not shared memory")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per library; the best counts")
    args = parser.parse_args()
    sizes = [SIZES[name] for name in args.sizes.split(",")]
    for name in THREAD_VARS:
        os.environ[name] = "1"
    context = multiprocessing.get_context("spawn")
    mpnn, gloo = {}, {}
    for _ in range(args.rounds):
        for best, timings in (
            (mpnn, bench_mpnn(context, args.ranks, sizes, args.transport, args.encrypt, not args.no_shm)),
            (gloo, bench_gloo(context, args.ranks, sizes)),
        ):
            for nbytes, seconds in timings.items():
                best[nbytes] = min(best.get(nbytes, seconds), seconds)
    n = args.ranks
    print(
        f"all-reduce, float32 sum, {n} ranks, mpnn transport={args.transport} encrypt={args.encrypt} "
        f"shared_memory={not args.no_shm}; "
        f"rank 0's median of repetitions, best of {args.rounds} rounds"
    )
    print(
        f"{'size':>6} | {'mpnn time':>11} {'algbw':>10} {'busbw':>10} | {'gloo time':>11} {'algbw':>10} "
        f"{'busbw':>10} | {'bw mpnn/gloo':>12} {'time mpnn/gloo':>14}"
    )
    for nbytes in sizes:
        rows = []
        for timings in (mpnn, gloo):
            seconds = timings[nbytes]
            algbw = nbytes / seconds / 1e9
            rows.append((seconds, algbw, algbw * 2 * (n - 1) / n))
        (tm, am, bm), (tg, ag, bg) = rows
        print(
            f"{_format_bytes(nbytes):>6} | {tm * 1e6:>9.1f}us {am:>7.3f}GB/s {bm:>7.3f}GB/s | {tg * 1e6:>9.1f}us "
            f"{ag:>7.3f}GB/s {bg:>7.3f}GB/s | {am / ag:>11.2f}x {tm / tg:>13.2f}x"
        )


if __name__ == "__main__":
    main()
