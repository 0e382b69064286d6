"""mpnn vs PyTorch convolution, one thread each: conv2d forward+backward GFLOP/s and MNIST-1D conv1d latency.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/conv2d.py [--reps 15]

Both run in this one process, interleaved repetition by repetition (so load from other processes hits both
alike); each figure is the median after a warm-up, of wall time and of this thread's CPU time (which leaves
out the time the thread waited for a core: on a shared, loaded machine the steadier of the two).
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy, Numba or torch start their thread pools

import argparse  # noqa: E402
import ctypes  # noqa: E402
import glob  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import side_by_side  # noqa: E402

from mpnn.core.conv import conv1d, conv2d  # noqa: E402
from mpnn.core.tensor import Tensor  # noqa: E402


def openblas_core():
    """The OpenBLAS kernel family NumPy dispatched to (threadpoolctl if present, else NumPy's own library)."""
    try:
        from threadpoolctl import threadpool_info

        return (
            ", ".join(
                f"{i.get('internal_api')}:{i.get('architecture')}"
                for i in threadpool_info()
                if i.get("user_api") == "blas"
            )
            or "unknown"
        )
    except ImportError:
        pass
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown (no threadpoolctl, no NumPy-bundled OpenBLAS found)"


def train_step(op, x, w, b, g, **kw):
    """Forward and backward of op (mpnn's or torch's) with fresh gradients, as one training step does."""

    def step():
        x.grad = w.grad = b.grad = None
        op(x, w, b, **kw).backward(g)

    return step


def tensors(rng, x_shape, w_shape):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    return x, w, b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    F = torch.nn.functional
    print(
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
        f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')} "
        f"numpy OpenBLAS core: {openblas_core()}"
    )
    print(f"numpy {np.__version__}, torch {torch.__version__} (threads {torch.get_num_threads()})")
    rng = np.random.default_rng(0)

    # Target 1: 3x3, 32->64 channels, 64x64, batch 8, padding 1, forward + all three gradients.
    x, w, b = tensors(rng, (8, 32, 64, 64), (64, 32, 3, 3))
    g = rng.standard_normal((8, 64, 64, 64)).astype(np.float32)
    flops = 3 * 2 * 8 * 64 * 64 * 64 * 32 * 9  # forward, input grad, weight grad: one GEMM's worth each
    mine = train_step(conv2d, *(Tensor(a, requires_grad=True) for a in (x, w, b)), g, padding=1)
    theirs = train_step(
        F.conv2d, *(torch.tensor(a, requires_grad=True) for a in (x, w, b)), torch.from_numpy(g), padding=1
    )
    (w_mine, c_mine), (w_torch, c_torch) = side_by_side([mine, theirs], args.reps)
    print(f"\nconv2d 3x3 32->64 64x64 batch 8 pad 1, forward+backward ({flops / 1e9:.2f} GFLOP):")
    print(f"  {'':6}{'wall ms':>9}{'GFLOP/s':>9}{'cpu ms':>9}{'GFLOP/s':>9}")
    for name, wall, cpu in (("mpnn", w_mine, c_mine), ("torch", w_torch, c_torch)):
        print(f"  {name:<6}{wall * 1e3:9.2f}{flops / wall / 1e9:9.1f}{cpu * 1e3:9.2f}{flops / cpu / 1e9:9.1f}")
    print(f"  mpnn/torch throughput ratio {w_torch / w_mine:.2f}x wall, {c_torch / c_mine:.2f}x cpu")

    # Target 2: the MNIST-1D CNN's three conv1d layers, batch 100.
    print("\nMNIST-1D conv1d layers, batch 100 (median microseconds of thread CPU time):")
    print(f"  {'layer':<34}{'mpnn fwd':>10}{'torch fwd':>11}{'mpnn f+b':>10}{'torch f+b':>11}{'ratio f+b':>11}")
    total_mine = total_torch = 0.0
    for c_in, length, k in ((1, 40, 5), (25, 19, 3), (25, 10, 3)):
        x, w, b = tensors(rng, (100, c_in, length), (25, c_in, k))
        out_len = (length + 2 - k) // 2 + 1
        g = rng.standard_normal((100, 25, out_len)).astype(np.float32)
        mt = [Tensor(a, requires_grad=True) for a in (x, w, b)]
        tt = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]

        def mine_fwd(mt=mt):
            conv1d(*mt, stride=2, padding=1)

        def torch_fwd(tt=tt):
            with torch.no_grad():
                F.conv1d(*tt, stride=2, padding=1)

        fwd = [cpu for _, cpu in side_by_side([mine_fwd, torch_fwd], 20 * args.reps)]
        both = [
            cpu
            for _, cpu in side_by_side(
                [
                    train_step(conv1d, *mt, g, stride=2, padding=1),
                    train_step(F.conv1d, *tt, torch.from_numpy(g), stride=2, padding=1),
                ],
                20 * args.reps,
            )
        ]
        total_mine += both[0]
        total_torch += both[1]
        name = f"({c_in}->25, k{k}, s2, p1) {length}->{out_len}"
        print(
            f"  {name:<34}{fwd[0] * 1e6:10.1f}{fwd[1] * 1e6:11.1f}{both[0] * 1e6:10.1f}{both[1] * 1e6:11.1f}"
            f"{both[1] / both[0]:10.2f}x"
        )
    print(
        f"  {'all three':<34}{'':10}{'':11}{total_mine * 1e6:10.1f}{total_torch * 1e6:11.1f}"
        f"{total_torch / total_mine:10.2f}x"
    )


if __name__ == "__main__":
    main()
