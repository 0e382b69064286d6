"""signsgd: 1 bit per entry. Each rank sends the signs of its (error-corrected) gradient packed 8 per byte
(np.packbits) and one float32 scale per parameter, mean |g| over that parameter's entries; the decode is the
mean over ranks of scale_r * sign_r (scaled sign with error feedback, EF-SignSGD, Karimireddy et al. 2019).

Why the scaled mean and not signSGD's majority vote (Bernstein et al. 2018): the vote returns signs without a
magnitude, so it cannot be the mean the codec slot promises and error feedback cannot correct it; the scaled
sign is a contraction, which is what error feedback needs to converge. Why a scale per parameter rather than
per bucket: layers' gradients differ in size by orders of magnitude, and one bucket-wide scale gives the small
ones steps far too large (measured on the MNIST-1D CNN recipe with Adam, 2 workers, 2000 steps: 10.2% test
accuracy with one scale per bucket, 84.6% with one per parameter), for 4 bytes per parameter tensor.
Cost per rank: ceil(numel / 8) + 4 * (parameters in the bucket) bytes, all-gathered (bits do not sum on a ring).
"""

from __future__ import annotations

import numpy as np

from mpnn._version import __version__
from mpnn.plugins.codec import Codec
from mpnn.plugins.options import Option

SCALE_BYTES = 4


class SignSGD(Codec):
    """Send 1-bit signs plus one scale (mean |g|) per parameter, with error feedback."""

    name = "signsgd"
    version = __version__  # a built-in plugin is versioned with mpnn
    options = {"error_feedback": Option(bool, True, "add what the signs lost to the next step's gradient")}

    def __init__(self, error_feedback: bool = True):
        super().__init__()
        self.error_feedback = bool(error_feedback)

    def allreduce(self, bucket, ctx):
        numel, slices = bucket.size, list(ctx.slices())
        if self.error_feedback:
            residual = self.residual(ctx, bucket.dtype)
            bucket += residual
        positive = bucket >= 0
        head = SCALE_BYTES * len(slices)
        message = np.empty(head + (numel + 7) // 8, np.uint8)
        scales = message[:head].view(np.float32)
        for i, (start, stop, _) in enumerate(slices):
            scales[i] = np.abs(bucket[start:stop]).mean() if stop > start else 0
        message[head:] = np.packbits(positive)
        if self.error_feedback:
            residual[...] = bucket
            for i, (start, stop, _) in enumerate(slices):
                residual[start:stop] -= np.where(positive[start:stop], scales[i], -scales[i])
        pieces = ctx.comm.allgather(message)
        bucket[...] = 0
        for piece in pieces:  # rank order: the same sums on every rank
            rank_scales = piece[:head].view(np.float32)
            signs = np.unpackbits(piece[head:], count=numel).astype(bucket.dtype)
            for i, (start, stop, _) in enumerate(slices):
                bucket[start:stop] += signs[start:stop] * (2 * rank_scales[i]) - rank_scales[i]
        bucket /= ctx.world_size
        self.count_wire(message.nbytes, numel)
