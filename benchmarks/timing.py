"""Timing shared by the side-by-side benchmarks (imported as a sibling module: run them as scripts)."""

import time

import numpy as np


def side_by_side(fns, reps, warmup=3):
    """Median (wall, thread CPU) seconds of each function, run alternately so that both see the same load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [([], []) for _ in fns]
    for _ in range(reps):
        for fn, (wall, cpu) in zip(fns, times):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
    return [(float(np.median(wall)), float(np.median(cpu))) for wall, cpu in times]
