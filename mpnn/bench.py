"""Collective benchmarks: time the Communicator's all-reduce over a list of sizes on n workers started by mpnn's
own launcher (mpnn.launch.run), and turn rank 0's medians into latency and bandwidth (nccl-tests' conventions)."""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import dataclass

import numpy as np

from mpnn.launch import run

UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}  # powers of 1024, as the sizes are printed
DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8")  # what Communicator.allreduce moves
OPS = ("sum", "mean", "max")
WARMUP = 3
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMG]?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in "4KB", "1.5MB", "64mb", "512B" or "512" (units B, KB, MB, GB are powers of 1024)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: use a number with B, KB, MB or GB, e.g. 4KB or 1MB")
    nbytes = float(match.group(1)) * UNITS[(match.group(2) or "B").upper()]
    if nbytes != int(nbytes):
        raise ValueError(f"{text!r} is not a whole number of bytes ({nbytes:g})")
    if nbytes <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return int(nbytes)


def parse_sizes(text: str) -> list[int]:
    """Bytes of each entry of a comma-separated list such as "4KB,1MB,16MB,64MB"."""
    return [parse_size(part) for part in text.split(",")]


def format_size(nbytes: int) -> str:
    """The largest unit that writes nbytes exactly: 4096 -> "4KB", 1536 -> "1.5KB" (no exact unit: bytes)."""
    for unit in ("GB", "MB", "KB"):
        if nbytes >= UNITS[unit] and (nbytes * 10) % UNITS[unit] == 0:
            return f"{nbytes / UNITS[unit]:g}{unit}"
    return f"{nbytes}B"


def auto_iters(nbytes: int) -> int:
    """Timed iterations for one size when none are given: about 1 GB moved in all, between 10 and 200."""
    return max(10, min(200, (1 << 30) // nbytes))


def check_arguments(sizes: list[int], dtype: str, op: str) -> None:
    """ValueError naming the bad value when the dtype/op pair or a size cannot be all-reduced."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if op not in OPS:
        raise ValueError(f"op {op!r}: choose one of {', '.join(OPS)}")
    if op == "mean" and not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"op 'mean' needs a floating dtype, got {dtype!r}")
    itemsize = np.dtype(dtype).itemsize
    for nbytes in sizes:
        if nbytes % itemsize:
            raise ValueError(
                f"size {format_size(nbytes)} is not a whole number of {dtype} elements ({itemsize} bytes each)"
            )


def time_allreduce(
    comm, sizes: list[int], dtype: str = "float32", op: str = "sum", iters: int | None = None, warmup: int = WARMUP
) -> list[tuple[int, float]]:
    """(iterations, median seconds) of comm.allreduce per size on this rank: `warmup` untimed calls, then
    `iters` (default auto_iters) timed calls, each on freshly filled ones and right after a barrier."""
    timings = []
    for nbytes in sizes:
        a = np.empty(nbytes // np.dtype(dtype).itemsize, dtype)
        for _ in range(warmup):
            a.fill(1)
            comm.allreduce(a, op)
        samples = []
        for _ in range(iters or auto_iters(nbytes)):
            a.fill(1)  # every call reduces ones: sums stay finite, the work stays the same
            comm.barrier()
            start = time.perf_counter()
            comm.allreduce(a, op)
            samples.append(time.perf_counter() - start)
        timings.append((len(samples), statistics.median(samples)))
    return timings


def _allreduce_worker(sizes, dtype, op, iters, warmup, transport, shared_memory):
    """Body of each launched worker: join the world with the chosen transport, time, leave."""
    os.environ["MPNN_TRANSPORT"] = transport
    os.environ["MPNN_SHM"] = "1" if shared_memory else "0"
    from mpnn.comm import init_from_env

    comm = init_from_env()
    try:
        return time_allreduce(comm, sizes, dtype, op, iters, warmup)
    finally:
        comm.close()


@dataclass(frozen=True)
class AllreduceTiming:
    """Rank 0's median all-reduce time for one size; bandwidths in bytes per second."""

    nbytes: int
    elements: int
    iters: int
    seconds: float
    world_size: int

    @property
    def algbw(self) -> float:
        """Algorithm bandwidth: the buffer's bytes over the time."""
        return self.nbytes / self.seconds

    @property
    def busbw(self) -> float:
        """Bus bandwidth: algbw * 2(n-1)/n, what each rank's link carries in a ring all-reduce."""
        return self.algbw * 2 * (self.world_size - 1) / self.world_size


def bench_allreduce(
    n: int,
    sizes: list[int],
    dtype: str = "float32",
    op: str = "sum",
    iters: int | None = None,
    warmup: int = WARMUP,
    transport: str = "auto",
    shared_memory: bool = True,
    timeout: float = 120.0,
) -> list[AllreduceTiming]:
    """Start n workers through mpnn.launch.run, time the all-reduce of each size there, return rank 0's figures.
    timeout is the collective timeout handed to the workers (a hung peer fails the run instead of hanging it)."""
    check_arguments(sizes, dtype, op)
    if iters is not None and iters < 1:
        raise ValueError(f"iters {iters}: must be at least 1")
    timings = run(
        _allreduce_worker, n, args=(sizes, dtype, op, iters, warmup, transport, shared_memory), timeout=timeout
    )
    itemsize = np.dtype(dtype).itemsize
    return [
        AllreduceTiming(nbytes, nbytes // itemsize, count, seconds, n)
        for nbytes, (count, seconds) in zip(sizes, timings)
    ]


def timings_record(timings: list[AllreduceTiming], **setup) -> dict:
    """One JSON-ready dict: the setup (world_size, dtype, op, ...) and a row per size; seconds and bytes/s."""
    return {
        **setup,
        "results": [
            {
                "size": format_size(t.nbytes),
                "bytes": t.nbytes,
                "elements": t.elements,
                "iters": t.iters,
                "median_s": t.seconds,
                "algbw_bytes_per_s": t.algbw,
                "busbw_bytes_per_s": t.busbw,
            }
            for t in timings
        ],
    }


def format_table(timings: list[AllreduceTiming]) -> str:
    """Aligned text table: size, elements, iterations, median time (us), algbw and busbw (GB/s = 1e9 bytes/s)."""
    lines = [f"{'size':>8} {'elements':>10} {'iters':>6} {'median us':>12} {'algbw GB/s':>11} {'busbw GB/s':>11}"]
    for t in timings:
        lines.append(
            f"{format_size(t.nbytes):>8} {t.elements:>10} {t.iters:>6} {t.seconds * 1e6:>12.1f} "
            f"{t.algbw / 1e9:>11.3f} {t.busbw / 1e9:>11.3f}"
        )
    return "\n".join(lines)
