"""Compile (or load from the on-disk cache) the float32 Numba kernels of the engine's ops, once.

The launcher calls this (mpnn.launch.warmup) before it starts any worker, so the workers find a warm cache
instead of racing to compile the same functions into it (docs/architecture.md: concurrent cache=True compiles can
race). Only the engine's own kernels: the layers above warm theirs from the launcher (the optimizers' fused updates, the
communicator's fence), since core imports nothing above it.
"""

from __future__ import annotations

import numpy as np


def warmup() -> None:
    """Run each kernel-backed op once on tiny float32 inputs, forward and backward."""
    from mpnn.core.activation import gelu, log_softmax
    from mpnn.core.attention import scaled_dot_product_attention
    from mpnn.core.conv import conv1d, conv2d
    from mpnn.core.indexing import embedding
    from mpnn.core.linalg import linear
    from mpnn.core.normalization import batch_norm, layer_norm
    from mpnn.core.pool import adaptive_avg_pool2d, avg_pool1d, avg_pool2d, max_pool1d, max_pool2d
    from mpnn.core.tensor import Tensor

    rng = np.random.default_rng(0)

    def leaf(*shape):
        return Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)

    x1, w1 = leaf(2, 3, 12), leaf(4, 3, 3)
    x2, w2, w3 = leaf(2, 8, 10, 10), leaf(8, 8, 3, 3), leaf(4, 8, 3, 3)
    outs = [
        conv1d(x1, w1, leaf(4), stride=2, padding=1),
        conv2d(x2, w2, leaf(8), padding=1),  # the Winograd path
        conv2d(x2, w3, None, stride=2, padding=1),  # the im2col path
        conv2d(leaf(1, 64, 3, 3), leaf(64, 64, 3, 3), None, padding=1),  # Winograd F(2x2): narrow map, 64 channels
        max_pool1d(x1, 2),
        avg_pool1d(x1, 2),
        max_pool2d(x2, 2),
        avg_pool2d(x2, 2),
        adaptive_avg_pool2d(x2, 3),
        gelu(x1),
        gelu(x1, approximate="tanh"),
        log_softmax(x1, 1),
        layer_norm(x1, (12,), leaf(12), leaf(12)),
        batch_norm(x2, None, None, leaf(8), leaf(8), training=True),
        batch_norm(x2, Tensor(np.zeros(8, np.float32)), Tensor(np.ones(8, np.float32)), leaf(8), leaf(8)),
        embedding(np.array([[0, 2], [1, 2]]), leaf(3, 4)),
        scaled_dot_product_attention(x1, x1, x1, is_causal=True),
        linear(leaf(2, 64, 64), leaf(64, 64)),  # large enough for the float32 GEMM kernel (mpnn.core.gemm_kernels)
    ]
    loss = outs[0].sum()
    for out in outs[1:]:
        loss = loss + out.sum()
    loss.backward()
