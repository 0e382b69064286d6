"""mpnn vs PyTorch scaled_dot_product_attention, one thread each: causal forward+backward (and forward alone).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/attention.py [--reps 15]

Both run in this one process, interleaved repetition by repetition (so load from other processes hits both
alike); each figure is the median after a warm-up, of wall time and of this thread's CPU time (which leaves
out the time the thread waited for a core: on a shared, loaded machine the steadier of the two). torch runs
its own CPU flash-attention kernel (float32, 4-D inputs, no mask: the path F.scaled_dot_product_attention
picks). The ratio is torch time / mpnn time: above 1 means mpnn is faster.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy, Numba or torch start their thread pools

import argparse  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import side_by_side  # noqa: E402

from mpnn.core.attention import scaled_dot_product_attention  # noqa: E402
from mpnn.core.tensor import Tensor, no_grad  # noqa: E402

SHAPES = ((12, 4, 64, 32), (4, 8, 512, 64))  # (B, H, T, D)


def flops(b, h, t, d, causal=True):
    """Matrix-product FLOPs of forward (QK^T, PV) and backward (QK^T again, dV, dP, dQ, dK); causal halves."""
    full = 2 * b * h * t * t * d
    frac = 0.5 if causal else 1.0
    return 2 * full * frac, 5 * full * frac


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    F = torch.nn.functional
    print(
        f"numpy {np.__version__}, torch {torch.__version__} (threads {torch.get_num_threads()}), "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
    )
    rng = np.random.default_rng(0)
    rows = []
    for b, h, t, d in SHAPES:
        arrays = [rng.standard_normal((b, h, t, d)).astype(np.float32) for _ in range(3)]
        g = rng.standard_normal((b, h, t, d)).astype(np.float32)
        mt = [Tensor(a, requires_grad=True) for a in arrays]
        tt = [torch.tensor(a, requires_grad=True) for a in arrays]
        gt = torch.from_numpy(g)

        def mine_step(mt=mt, g=g):
            for x in mt:
                x.grad = None
            scaled_dot_product_attention(*mt, is_causal=True).backward(g)

        def torch_step(tt=tt, gt=gt):
            for x in tt:
                x.grad = None
            F.scaled_dot_product_attention(*tt, is_causal=True).backward(gt)

        def mine_fwd(mt=mt):
            with no_grad():
                scaled_dot_product_attention(*mt, is_causal=True)

        def torch_fwd(tt=tt):
            with torch.no_grad():
                F.scaled_dot_product_attention(*tt, is_causal=True)

        reps = args.reps * (10 if t <= 128 else 1)
        both = side_by_side([mine_step, torch_step], reps)
        fwd = side_by_side([mine_fwd, torch_fwd], reps)
        rows.append(((b, h, t, d), both, fwd, flops(b, h, t, d)))

    print("\ncausal scaled_dot_product_attention, float32, one thread (median ms; ratio = torch / mpnn)")
    print(
        f"  {'(B, H, T, D)':<18}{'pass':<6}{'mpnn wall':>10}{'torch wall':>11}{'ratio':>7}"
        f"{'mpnn cpu':>10}{'torch cpu':>10}{'ratio':>7}{'mpnn GFLOP/s':>14}"
    )
    for shape, both, fwd, (ff, bf) in rows:
        for name, ((wm, cm), (wt, ct)), fl in (("f+b", both, ff + bf), ("fwd", fwd, ff)):
            print(
                f"  {str(shape):<18}{name:<6}{wm * 1e3:10.3f}{wt * 1e3:11.3f}{wt / wm:6.2f}x"
                f"{cm * 1e3:10.3f}{ct * 1e3:10.3f}{ct / cm:6.2f}x{fl / cm / 1e9:14.1f}"
            )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
