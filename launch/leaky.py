"""A training script that leaks on purpose: every step keeps a 10 KB bytes object in a global list, so the
memory-leak watchdog has a real leak to find (and, with --leak-bytes 0, the same loop as a clean run).

    mpnn launch -n 2 --plugin watchdog:action=abort launch/leaky.py --steps 2000
"""

import argparse

import numpy as np

import mpnn
from mpnn import nn

KEPT = []  # grows by one object per step and is never cleared: the leak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--leak-bytes", type=int, default=10_000, help="bytes kept per step (0: a clean run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    comm = mpnn.init()
    mpnn.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + comm.rank)
    x = mpnn.from_numpy(rng.standard_normal((64, 32)).astype(np.float32))
    y = mpnn.from_numpy(rng.integers(0, 10, 64))
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    if comm.world_size > 1:
        model = mpnn.DataParallel(model)
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if args.leak_bytes:
            KEPT.append(b"x" * args.leak_bytes)  # the leak the watchdog must name
    if comm.rank == 0:
        print(f"done: {args.steps} steps, loss {loss.item():.4f}, kept {len(KEPT)} objects", flush=True)


if __name__ == "__main__":
    main()
