"""Compile (or load from the on-disk cache) the float32 Numba kernels of the engine's ops, once.

The launcher calls this (mpnn.launch.warmup) before it starts any worker, so the workers find a warm cache
instead of racing to compile the same functions into it (docs/architecture.md: concurrent cache=True compiles can
race). Only the engine's own kernels: the layers above warm theirs from the launcher (the optimizers' fused updates, the
communicator's fence), since core imports nothing above it.
"""

from __future__ import annotations

import numpy as np


def warmup(progress=None) -> None:
    """Run each kernel-backed op once on tiny float32 inputs, forward and backward; progress(done, total), if
    given, after each op (compiling them all from an empty cache takes ~25 s on one core here)."""
    ops = kernel_ops()
    for done, run_op in enumerate(ops, 1):
        run_op().sum().backward()
        if progress is not None:
            progress(done, len(ops))
    from mpnn.core import conv_weight_cache

    for words in (np.uint64, np.uint32):  # the kept Winograd weights' comparison (no-grad forwards only)
        conv_weight_cache._differ(np.zeros(2, words), np.zeros(2, words))


def kernel_ops() -> list:
    """One thunk per kernel-backed op (and per path of it: Winograd F4/F2, im2col, GEMM) returning its output."""
    from mpnn.core.activation import gelu, log_softmax, relu
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
    return [
        lambda: conv1d(x1, w1, leaf(4), stride=2, padding=1),
        lambda: conv2d(x2, w2, leaf(8), padding=1),  # the Winograd path
        lambda: conv2d(x2, w3, None, stride=2, padding=1),  # the im2col path
        lambda: conv2d(leaf(1, 64, 3, 3), leaf(64, 64, 3, 3), None, padding=1),  # Winograd F(2x2): narrow, 64 ch
        lambda: conv2d(leaf(1, 64, 16, 16), leaf(4, 64, 3, 3), None, stride=2, padding=1),  # the stride-2 Winograd
        lambda: conv2d(leaf(1, 4, 32, 32), leaf(4, 4, 1, 1), None, stride=2),  # Pointwise: 1x1, 256 positions
        lambda: max_pool1d(x1, 2),
        lambda: avg_pool1d(x1, 2),
        lambda: max_pool2d(x2, 2),
        lambda: avg_pool2d(x2, 2),
        lambda: adaptive_avg_pool2d(x2, 3),
        lambda: relu(x1),
        lambda: gelu(x1),
        lambda: gelu(x1, approximate="tanh"),
        lambda: log_softmax(x1, 1),
        lambda: layer_norm(x1, (12,), leaf(12), leaf(12)),
        lambda: batch_norm(x2, None, None, leaf(8), leaf(8), training=True),
        lambda: batch_norm(x2, Tensor(np.zeros(8, np.float32)), Tensor(np.ones(8, np.float32)), leaf(8), leaf(8)),
        lambda: embedding(np.array([[0, 2], [1, 2]]), leaf(3, 4)),
        lambda: scaled_dot_product_attention(x1, x1, x1, is_causal=True),
        lambda: linear(leaf(2, 64, 64), leaf(64, 64)),  # large enough for the float32 GEMM kernel (gemm_kernels)
    ]
