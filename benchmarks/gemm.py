"""The GPT's Linear layers and their GEMMs, mpnn (NumPy/OpenBLAS) vs PyTorch, one thread, side by side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gemm.py [--reps 30] [--routes]

Two tables, each figure the median of --reps repetitions run alternately (so load from other processes hits
every column alike), in microseconds of this thread's CPU time (steadier than wall time on a shared machine):

- layers: F.linear forward, and forward+backward minus forward, on nanoGPT's CPU recipe's shapes (batch 12 x
  block 64 = 768 rows, embedding 128): qkv 128->384, attention proj 128->128, MLP up 128->512, down 512->128,
  lm head 128->103, no bias; mpnn also through NumPy's OpenBLAS (its route before mpnn.core.gemm_kernels).
  torch/mpnn above 1 means mpnn is faster.
- routes (--routes): each of a layer's three GEMMs (forward x @ W^T, input gradient g @ W, weight gradient
  g^T @ x) through np.matmul, np.matmul(out=), scipy.linalg.blas.sgemm (with its transpose flags and the
  operands' memory read as Fortran order: no copies), Numba's np.dot, mpnn's own float32 GEMM
  (mpnn.core.gemm_kernels, what linear runs on AVX-512 hosts) and torch.mm. GFLOP/s = 2*M*N*K / time.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy, Numba or torch start their thread pools

import argparse  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import side_by_side  # noqa: E402

ROWS = 12 * 64
# head: 128 -> 103, the vocabulary of benchmarks/gpt.py's default text (Python's pydoc topics; Shakespeare has 65)
LAYERS = {"qkv": (128, 384), "proj": (128, 128), "up": (128, 512), "down": (512, 128), "head": (128, 103)}


def layer_row(torch, mpnn, F, k, n, reps, rng):
    """Microseconds of one Linear(k, n): forward for mpnn (its own GEMM), mpnn through NumPy's OpenBLAS (what
    linear ran before mpnn.core.gemm_kernels) and torch, then backward for the same three."""
    from mpnn.core import linalg

    x = rng.standard_normal((12, 64, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    g = rng.standard_normal((12, 64, n)).astype(np.float32)
    mx, mw = mpnn.tensor(x, requires_grad=True), mpnn.nn.Parameter(mpnn.tensor(w))
    tx, tw = torch.tensor(x, requires_grad=True), torch.nn.Parameter(torch.tensor(w))
    mg, tg = mpnn.tensor(g), torch.from_numpy(g)

    def m_fwd():
        F.linear(mx, mw)

    def t_fwd():
        torch.nn.functional.linear(tx, tw)

    def m_both():
        mx.grad = mw.grad = None
        F.linear(mx, mw).backward(mg)

    def route(fn, use_own):
        def run():
            linalg._OWN_GEMM = use_own
            try:
                fn()
            finally:
                linalg._OWN_GEMM = default

        return run

    def blas(fn):
        return route(fn, False)

    default = linalg._OWN_GEMM  # the host's route (linalg._own_gemm_default: OpenBLAS on AMD Zen)

    def t_both():
        tx.grad = tw.grad = None
        torch.nn.functional.linear(tx, tw).backward(tg)

    fns = [route(m_fwd, True), blas(m_fwd), t_fwd, route(m_both, True), blas(m_both), t_both]
    mf, nf, tf, mb, nb, tb = (cpu for _, cpu in side_by_side(fns, reps))
    return np.array([mf, nf, tf, mb - mf, nb - nf, tb - tf]) * 1e6


def layer_table(reps):
    import torch

    import mpnn
    from mpnn.nn import functional as F

    head = ("layer", "mpnn fwd", "(blas)", "torch fwd", "ratio", "mpnn bwd", "(blas)", "torch bwd", "ratio")
    print(f"{head[0]:6s} " + " ".join(f"{h:>9s}" for h in head[1:]))
    rng = np.random.default_rng(0)
    total = np.zeros(6)
    for name, (k, n) in LAYERS.items():
        row = layer_row(torch, mpnn, F, k, n, reps, rng)
        total += row * (1 if name == "head" else 4)
        print(_layer_line(name, row))
    print(_layer_line("step", total) + "   (a GPT step: qkv/proj/up/down 4x each, head once)")
    from mpnn.core import linalg

    print(
        "ratio: torch / mpnn (above 1: mpnn faster); mpnn: its own GEMM, (blas): NumPy's OpenBLAS instead; this host's"
    )
    print(f"linear takes {'the own GEMM' if linalg._OWN_GEMM else 'OpenBLAS'} (MPNN_GEMM=own|blas overrides)")


def _layer_line(name, r):
    return (
        f"{name:6s} {r[0]:9.1f} {r[1]:9.1f} {r[2]:9.1f} {r[2] / r[0]:9.2f} {r[3]:9.1f} {r[4]:9.1f} {r[5]:9.1f} "
        f"{r[5] / r[3]:9.2f}"
    )


def route_row(blas, nb_dot, torch, a, b, sc, reps):
    """Microseconds of a @ b through each route (sc: the scipy call); a, b NumPy operands (views)."""
    from mpnn.core import linalg
    from mpnn.core.linalg import _mm as own_mm

    def own_route(fn):  # mpnn's own kernel, whichever route linear takes on this host
        def run():
            default, linalg._OWN_GEMM = linalg._OWN_GEMM, True
            try:
                fn()
            finally:
                linalg._OWN_GEMM = default

        return run

    ta, tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
    ta = ta if a.flags.c_contiguous else torch.from_numpy(np.ascontiguousarray(a.T)).t()  # same layout as a
    tb = tb if b.flags.c_contiguous else torch.from_numpy(np.ascontiguousarray(b.T)).t()
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    assert np.allclose(sc(), a @ b, rtol=1e-4, atol=1e-3)
    a_c, b_c = np.ascontiguousarray(a), np.ascontiguousarray(b)  # Numba's np.dot wants contiguous operands
    nb_dot(a_c, b_c, out)
    fns = [
        lambda: a @ b,
        lambda: np.matmul(a, b, out=out),
        sc,
        lambda: nb_dot(a_c, b_c, out),
        own_route(lambda: own_mm(a, b)),
        lambda: torch.mm(ta, tb),
    ]
    return [cpu for _, cpu in side_by_side(fns, reps, warmup=5)]


def route_table(reps):
    import numba
    import torch
    from scipy.linalg import blas

    @numba.njit(cache=False)
    def nb_dot(a, b, out):
        np.dot(a, b, out)

    routes = ("np", "np out=", "scipy", "numba", "mpnn", "torch")
    print(f"{'gemm':16s} " + " ".join(f"{r:>8s}" for r in routes) + "   GFLOP/s np / mpnn / torch")
    rng = np.random.default_rng(0)
    for name, (k, n) in LAYERS.items():
        x = rng.standard_normal((ROWS, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        g = rng.standard_normal((ROWS, n)).astype(np.float32)
        # scipy computes the same product transposed: row-major C = A B is column-major C^T = B^T A^T, so sgemm
        # reads the C-order arrays as their Fortran-order transposes and writes C^T in Fortran order (C in C
        # order), with its transpose flags where the row-major operand is itself transposed: no copies.
        gemms = {
            "fwd x@W^T": (x, w.T, lambda x=x, w=w: blas.sgemm(1.0, w.T, x.T, trans_a=1).T),
            "dx g@W": (g, w, lambda g=g, w=w: blas.sgemm(1.0, w.T, g.T).T),
            "dW g^T@x": (g.T, x, lambda g=g, x=x: blas.sgemm(1.0, x.T, g.T, trans_b=1).T),
        }
        for gname, (a, b, sc) in gemms.items():
            times = route_row(blas, nb_dot, torch, a, b, sc, reps)
            flop = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
            print(
                f"{name + ' ' + gname:16s} "
                + " ".join(f"{t * 1e6:8.1f}" for t in times)
                + f"   {flop / times[0] / 1e9:6.1f} / {flop / times[-2] / 1e9:6.1f} / {flop / times[-1] / 1e9:6.1f}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--routes", action="store_true", help="also time each GEMM through every route")
    args = parser.parse_args()
    import torch

    import mpnn

    torch.set_num_threads(1)
    mpnn.init()
    print(
        f"numpy {np.__version__}, torch {torch.__version__}, OPENBLAS_CORETYPE="
        f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; microseconds, thread CPU time, medians"
    )
    layer_table(args.reps)
    if args.routes:
        route_table(args.reps)


if __name__ == "__main__":
    main()
