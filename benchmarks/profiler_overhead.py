"""mpnn.profiler's cost in step time, and its table beside torch.profiler's on the same small model.

    python benchmarks/profiler_overhead.py [--batch 64 --hidden 256 --blocks 40] [--no-torch]

One process, one thread, blocks of steps in this order: "before" (no profiler has ever run in this process),
"after" (a profile() block has run and ended: the switch has put every op function and Node.apply back), "inside"
(record_shapes False, then True), "after, again". before vs after is the cost of the profiler when off: noise,
since the step runs the very same objects (tests/test_profiler.py asserts that); the order cannot be interleaved,
since "before" exists only until the first profile(), so compare the spread (p10-p90) too. Times are thread CPU
time (steadier than wall time on a shared machine). Then the op table of a few steps of an MLP
(Linear-ReLU-Linear-ReLU-Linear, MSE, SGD) under mpnn.profiler and under torch.profiler, for a sanity check of
the figures (torch's aten::addmm/mm are its linear forward/backward; its self times include its own
dispatcher, mpnn's its Python wrappers).
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, as `mpnn launch` gives each worker; before NumPy loads

import argparse  # noqa: E402
import os.path  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from timing import side_by_side  # noqa: E402

import mpnn  # noqa: E402
import mpnn.nn.functional as F  # noqa: E402
from mpnn import nn  # noqa: E402


def mpnn_step(batch, hidden, features=64):
    model = nn.Sequential(
        nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )
    opt = mpnn.optim.SGD(model.parameters(), lr=1e-3)
    x, y = mpnn.randn(batch, features), mpnn.randn(batch, 10)

    def step():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    return step


def torch_step(batch, hidden, features=64):
    import torch

    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(features, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, features), torch.randn(batch, 10)

    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return step


def _blocks(step, blocks, block):
    """Per-step thread CPU time (s) of each of `blocks` blocks of `block` steps."""
    out = []
    for _ in range(blocks):
        t0 = time.thread_time()
        for _ in range(block):
            step()
        out.append((time.thread_time() - t0) / block)
    return out


def overhead(batch, hidden, blocks, block=25):
    step = mpnn_step(batch, hidden)
    for _ in range(20):
        step()
    before = _blocks(step, blocks, block)  # nothing of the profiler has run in this process yet
    t0 = time.perf_counter()
    with mpnn.profiler.profile():
        pass
    switch = time.perf_counter() - t0
    after = _blocks(step, blocks, block)  # the switch ran and put every object back
    with mpnn.profiler.profile():
        on = _blocks(step, blocks, block)
    with mpnn.profiler.profile(record_shapes=True):
        shapes = _blocks(step, blocks, block)
    again = _blocks(step, blocks, block)
    base = float(np.median(before))
    print(f"step: batch {batch}, 64-{hidden}-{hidden}-10 MLP, MSE, SGD; {blocks} blocks of {block} steps, in order")
    for label, times in [
        ("before any profile()", before),
        ("after profile() ended", after),
        ("inside profile()", on),
        ("inside profile(record_shapes=True)", shapes),
        ("after, again", again),
    ]:
        med, lo, hi = np.median(times), np.percentile(times, 10), np.percentile(times, 90)
        print(
            f"  {label:36s} median {med * 1e6:7.1f} us/step (p10 {lo * 1e6:.1f}, p90 {hi * 1e6:.1f})  x{med / base:.3f}"
        )
    print(f"  profile() start+stop (the switch's two sweeps of sys.modules): {switch * 1e3:.1f} ms")


def tables(batch, hidden, steps=20, with_torch=True):
    step = mpnn_step(batch, hidden)
    for _ in range(5):
        step()
    with mpnn.profiler.profile() as prof:
        for _ in range(steps):
            step()
    print(f"\nmpnn.profiler, {steps} steps:")
    print(prof.table(sort_by="self_time", row_limit=12))
    if not with_torch:
        return
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        print("torch is not installed (the bench extra): no torch.profiler table")
        return
    tstep = torch_step(batch, hidden)
    for _ in range(5):
        tstep()
    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        for _ in range(steps):
            tstep()
    print(f"torch.profiler, {steps} steps:")
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    linear = sum(r.total_ns for r in prof.key_averages() if r.key == "linear") / 1e3
    addmm = sum(e.cpu_time_total for e in tprof.key_averages() if e.key == "aten::linear")
    print(f"linear forward, total over {steps} steps: mpnn {linear:.0f} us, torch aten::linear {addmm:.0f} us")
    print(
        f"time per step outside the profilers: mpnn {side_by_side([step], 50)[0][0] * 1e6:.0f} us, "
        f"torch {side_by_side([tstep], 50)[0][0] * 1e6:.0f} us"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    np.random.seed(0)
    overhead(args.batch, args.hidden, args.blocks)
    tables(args.batch, args.hidden, with_torch=not args.no_torch)


if __name__ == "__main__":
    main()
