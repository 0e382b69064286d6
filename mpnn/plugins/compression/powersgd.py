"""powersgd: rank-r gradients by one step of power iteration (Vogels, Karimireddy, Jaggi 2019), as PyTorch's
powerSGD_hook does it.

Each parameter's gradient in the bucket is a matrix M (shape[0] x the rest); with this step's error added,
    P = M Q            all-reduce P (mean), orthogonalise its columns (QR)
    Q = M^T P          all-reduce Q (mean)
    M ~ P Q^T          the decoded mean;  residual = M_local - P Q^T   (error feedback)
Q is kept for the next step (warm start), so the power iteration continues across steps. A gradient is only
compressed when r (n + m) < n m; 1-D tensors (biases, norms) and matrices too small to gain go uncompressed
in the same all-reduce as P (their residual stays zero). Both all-reduces carry float32: per rank
4 * (sum r (n + m) + uncompressed) bytes instead of 4 * numel. The initial Q is random with a seed every
rank shares; a Q that became zero or non-finite is drawn again.

With fp16=True both all-reduces carry float16 (half the bytes), as PyTorch's fp16_compress_wrapper around its
powerSGD_hook does. One 4-byte max all-reduce agrees on amax = max|M| over the bucket; every rank then bounds P,
Q and the uncompressed pieces alike (|P_ij| <= sqrt(m) amax |Q_:j| with the shared warm-start Q; |Q_ij| <= sqrt(n)
amax since P's columns are orthonormal) and scales each by the power of two that keeps world_size * bound below
float16's 2**15, so nothing overflows and every rank decodes the same bits.
"""

from __future__ import annotations

import math

import numpy as np

from mpnn._version import __version__
from mpnn.plugins.codec import Codec
from mpnn.plugins.compression.fp16 import scale_exponent
from mpnn.plugins.options import Option


class _Plan:
    """Where one bucket's compressed matrices and uncompressed pieces lie."""

    def __init__(self, ctx, rank):
        self.matrices = []  # (index, start, stop, n, m, r)
        self.plain = []  # (start, stop)
        for index, (start, stop, shape) in enumerate(ctx.slices()):
            n = shape[0] if len(shape) >= 2 else 0
            m = (stop - start) // n if n else 0
            r = min(rank, n, m)
            if len(shape) >= 2 and r * (n + m) < n * m:
                self.matrices.append((index, start, stop, n, m, r))
            else:
                self.plain.append((start, stop))
        self.p_size = sum(n * r for _, _, _, n, _, r in self.matrices)
        self.q_size = sum(m * r for _, _, _, _, m, r in self.matrices)
        self.plain_size = sum(stop - start for start, stop in self.plain)


class PowerSGD(Codec):
    """Send a rank-`rank` approximation P Q^T of each gradient matrix, with error feedback and warm start."""

    name = "powersgd"
    version = __version__  # a built-in plugin is versioned with mpnn
    options = {
        "rank": Option(int, 2, "rank of each gradient matrix's approximation"),
        "error_feedback": Option(bool, True, "add the approximation's error to the next step's gradient"),
        "warm_start": Option(bool, True, "start each step's power iteration from the previous step's Q"),
        "seed": Option(int, 0, "seed of the random initial Q (the same on every rank)"),
        "fp16": Option(
            bool,
            False,
            "send P, Q and the uncompressed pieces as float16 under shared power-of-two "
            "scales (half the bytes, plus one 4-byte max all-reduce)",
        ),
    }

    def __init__(
        self, rank: int = 2, error_feedback: bool = True, warm_start: bool = True, seed: int = 0, fp16: bool = False
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank = int(rank)
        self.error_feedback = bool(error_feedback)
        self.warm_start = bool(warm_start)
        self.seed = int(seed)
        self.fp16 = bool(fp16)
        self.q: dict[tuple[int, int], np.ndarray] = {}  # (bucket, parameter index) -> Q, m x r
        self._plans: dict[int, tuple[tuple, _Plan]] = {}

    def allreduce(self, bucket, ctx):
        plan = self._plan(ctx)
        if self.error_feedback:
            residual = self.residual(ctx, bucket.dtype)
            bucket += residual
            residual[...] = bucket
        first = np.empty(plan.p_size + plan.plain_size, bucket.dtype)
        second = np.empty(plan.q_size, bucket.dtype)
        ps, qs, at_p, at_q = [], [], 0, 0
        p_bound = q_bound = 0.0  # per unit of amax, for fp16's scales
        for index, start, stop, n, m, r in plan.matrices:
            p, q_next = first[at_p : at_p + n * r].reshape(n, r), second[at_q : at_q + m * r].reshape(m, r)
            q = self._q(ctx, index, m, r)
            np.matmul(bucket[start:stop].reshape(n, m), q, out=p)
            ps.append(p)
            qs.append(q_next)
            at_p, at_q = at_p + n * r, at_q + m * r
            if self.fp16:
                p_bound = max(p_bound, math.sqrt(m) * float(np.sqrt((q.astype(np.float64) ** 2).sum(0)).max()))
                q_bound = max(q_bound, math.sqrt(n))
        for start, stop in plan.plain:
            first[at_p : at_p + stop - start] = bucket[start:stop]
            at_p += stop - start
        wire = 0
        if self.fp16:
            amax = np.array([np.max(np.abs(bucket)) if bucket.size else 0.0], np.float32)
            ctx.comm.allreduce(amax, "max")
            amax, wire = float(amax[0]), amax.nbytes
            wire += self._mean_fp16(ctx, first, [(plan.p_size, p_bound * amax), (plan.plain_size, amax)])
        else:
            ctx.comm.allreduce(first, "mean")
        for p, q_next, (_, start, stop, n, m, _) in zip(ps, qs, plan.matrices):
            p[...] = np.linalg.qr(p)[0]
            np.matmul(bucket[start:stop].reshape(n, m).T, p, out=q_next)
        if self.fp16:
            wire += self._mean_fp16(ctx, second, [(plan.q_size, q_bound * amax)])
        else:
            ctx.comm.allreduce(second, "mean")
        for p, q_next, (index, start, stop, n, m, _) in zip(ps, qs, plan.matrices):
            np.matmul(p, q_next.T, out=bucket[start:stop].reshape(n, m))
            if self.warm_start:
                self.q[(ctx.bucket_index, index)] = q_next.copy()
        at_p = plan.p_size
        for start, stop in plan.plain:
            bucket[start:stop] = first[at_p : at_p + stop - start]
            at_p += stop - start
        if self.error_feedback:
            residual -= bucket
            for start, stop in plan.plain:
                residual[start:stop] = 0
        self.count_wire(wire if self.fp16 else first.nbytes + second.nbytes, bucket.size)

    @staticmethod
    def _mean_fp16(ctx, values, segments) -> int:
        """Replace `values` (float32) by their mean over ranks, sent as float16: each (length, bound) segment scaled
        by the power of two that keeps world_size * bound below 2**15. Returns the bytes sent."""
        exponents = np.empty(values.size, np.float32)
        at = 0
        for length, bound in segments:
            exponents[at : at + length] = 2.0 ** scale_exponent(bound, ctx.world_size)
            at += length
        half = np.multiply(values, exponents).astype(np.float16)
        ctx.comm.allreduce(half, "sum")  # accumulated in float32 by the communicator
        np.divide(half, exponents, out=values, casting="unsafe")
        values /= ctx.world_size
        return half.nbytes

    def _plan(self, ctx) -> _Plan:
        cached = self._plans.get(ctx.bucket_index)
        if cached is None or cached[0] != ctx.shapes:
            cached = self._plans[ctx.bucket_index] = (ctx.shapes, _Plan(ctx, self.rank))
        return cached[1]

    def _q(self, ctx, index, m, r):
        """This matrix's Q: the previous step's (warm start) or a fresh random one every rank draws alike."""
        q = self.q.get((ctx.bucket_index, index)) if self.warm_start else None
        if q is None or q.shape != (m, r) or not np.isfinite(q).all() or not q.any():
            key = [self.seed, ctx.bucket_index, index] + ([] if self.warm_start else [ctx.step])
            q = np.random.default_rng(key).standard_normal((m, r)).astype(np.float32)
        return q

    def state_dict(self) -> dict:
        """Residuals plus the warm-start factors, q.<bucket>.<parameter index>."""
        state = super().state_dict()
        state.update({f"q.{bucket}.{index}": q.copy() for (bucket, index), q in self.q.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.q = {}
        super().load_state_dict(state)

    def _load_extra(self, key, value) -> bool:
        kind, _, rest = key.partition(".")
        bucket, _, index = rest.partition(".")
        if kind != "q" or not (bucket.isdigit() and index.isdigit()):
            return False
        self.q[(int(bucket), int(index))] = np.array(value, dtype=np.float32, copy=True)
        return True

    def _extra_keys_help(self) -> str:
        return " or q.<bucket>.<parameter index>"
