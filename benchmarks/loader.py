"""Loader throughput: CIFAR-shaped uint8 images through ArrayShards, the fused transforms and prefetch.

    python benchmarks/loader.py [--images 10000] [--batch-size 32] [--repeats 5] [--consumes 40]

Synthetic 32x32x3 uint8 images (seeded) are written as memory-mapped shards in a temporary directory, then
read in shuffled batches through RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor and Normalize,
as a CIFAR ResNet-18 recipe does. Each figure is the median img/s over ``--repeats`` epochs, with one
thread for the data work (NUMBA/BLAS threads pinned to 1): the prefetch thread, or the loop's own thread
with prefetch=0, and for comparison the same chain unfused (gather, then each transform with its own
buffer). ``--consumes`` is what training eats (default 40 img/s, the order of ResNet-18's one-core rate
on this machine kind: issue 13 measured 23 img/s in mpnn, 31 in torch); issue 13 asks for >= 10x it.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from mpnn.data import ArrayShards, DataLoader  # noqa: E402
from mpnn.data import transforms as T  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar_chain(fused=True, seed=0):
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    return T.Compose(steps + ([] if fused else [T.Lambda(lambda x: x)]), seed=seed)  # Lambda turns fusion off


def epoch_rate(loader) -> float:
    """Images per second over one pass, touching each batch as a training step would read it."""
    count, t0 = 0, time.perf_counter()
    for images, _labels in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - t0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--shard-size", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="epochs timed per configuration (median)")
    p.add_argument("--consumes", type=float, default=40.0, help="img/s that training consumes")
    args = p.parse_args(argv)
    for name in ("images", "shard_size", "batch_size", "prefetch", "repeats"):
        if getattr(args, name) < (0 if name == "prefetch" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.consumes > 0:
        p.error(f"--consumes must be a positive img/s, got {args.consumes}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    with tempfile.TemporaryDirectory(prefix="mpnn-loader-bench-") as root:
        ArrayShards.write(root, images, labels, shard_size=args.shard_size)
        del images  # from here on the data lives only in the memory-mapped shards
        configs = [
            ("fused, prefetch", True, args.prefetch),
            ("fused, prefetch=0", True, 0),
            ("unfused, prefetch=0", False, 0),
        ]
        rates = {}
        for name, fused, prefetch in configs:
            dataset = ArrayShards(root, transform=cifar_chain(fused))
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, seed=0, prefetch=prefetch)
            epoch_rate(loader)  # warm-up: kernels compiled or loaded, pages mapped
            rates[name] = statistics.median(epoch_rate(loader) for _ in range(args.repeats))
    print(
        f"loader: {args.images} CIFAR-shaped uint8 images, batch {args.batch_size}, "
        f"RandomCrop(32, 4) + flip + ToTensor + Normalize, one data thread, median of {args.repeats} epochs"
    )
    for name, _, prefetch in configs:
        label = f"{name}={prefetch}" if name.endswith("prefetch") else name
        rate = rates[name]
        print(f"  {label:24s} {rate:12,.0f} img/s   {rate / args.consumes:10,.0f}x training's {args.consumes:g} img/s")
    ratio = rates["fused, prefetch"] / args.consumes
    print(f"fused + prefetch feeds {ratio:,.0f}x what training consumes (issue 13 asks for >= 10x)")
    return 0 if ratio >= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
