"""The copy-free paths around the GPT's matrix products: attention reading strided q, k, v (views of one qkv
projection) and a strided output gradient where they lie, and linear's GEMM routes, each against the plain
(copied, contiguous) computation in float64."""

import numpy as np
import pytest

from mpnn.core import Tensor, gradcheck
from mpnn.core import attention as attention_module
from mpnn.core.linalg import linear
from mpnn.nn import functional as F

RNG = np.random.default_rng(7)


def randn(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


def grads_of(fn, arrays, g):
    ts = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(Tensor(g))
    return out.data.copy(), [t.grad.data.copy() for t in ts]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_reads_gpt_qkv_views_without_copies(causal, monkeypatch):
    """q, k, v as a GPT makes them (split of a (B, T, 3C) projection, view, transpose), and the output's
    gradient a transposed view: the same output and gradients as contiguous copies, and the kernel's operands
    are the projection's own memory."""
    monkeypatch.setattr(attention_module, "_FWD_Q", 4)  # several blocks on a small T
    monkeypatch.setattr(attention_module, "_BWD_K", 3)
    b, t, h, d = 2, 9, 3, 4
    qkv = randn(b, t, 3 * h * d)
    q, k, v = (z.reshape(b, t, h, d).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, axis=2))
    g = randn(b, t, h, d).transpose(0, 2, 1, 3)
    for z in (q, k, v, g):
        assert not z.flags.c_contiguous
    flat, offsets, ld = attention_module._operand(q, np.arange(b * h))
    assert np.shares_memory(flat, qkv) and ld == 3 * h * d
    np.testing.assert_array_equal(flat[offsets[4] : offsets[4] + d], q[1, 1, 0])

    def fused(a, b_, c):
        return F.scaled_dot_product_attention(a, b_, c, is_causal=causal)

    out, grads = grads_of(fused, (q, k, v), g)
    ref, ref_grads = grads_of(fused, [np.ascontiguousarray(z) for z in (q, k, v)], np.ascontiguousarray(g))
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_attention_gradcheck_through_the_gpt_split():
    """float64 finite differences through linear -> split -> view -> transpose -> attention, as the GPT runs."""
    b, t, h, d = 2, 5, 2, 3
    c = h * d
    x, w = Tensor(randn(b, t, c), requires_grad=True), Tensor(randn(3 * c, c) * 0.3, requires_grad=True)

    def block(x, w):
        q, k, v = linear(x, w).split(c, dim=2)
        q, k, v = (z.view(b, t, h, d).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).contiguous().view(b, t, c)

    assert gradcheck(block, [x, w])


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[..., ::-1, :],  # rows backwards: copied
        lambda a: np.asfortranarray(a),  # column stride != 1: copied
        lambda a: a[:, ::2],  # a strided batch dim: read in place
        lambda a: np.broadcast_to(a[:1], a.shape),  # read-only, stride 0: copied
        lambda a: np.lib.stride_tricks.as_strided(a, a.shape, (0,) + a.strides[1:]),  # writeable stride 0: in place
    ],
)
def test_attention_operand_layouts(make):
    base = randn(4, 2, 6, 5)
    q = make(base)
    k, v = randn(*q.shape), randn(*q.shape[:-1], 3)
    g = randn(*q.shape[:-1], 3)
    out, grads = grads_of(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), (q, k, v), g)
    ref, ref_grads = grads_of(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), (np.array(q), k, v), g)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_attention_float32_gpt_views_match_contiguous():
    """The float32 kernels (the GPT's dtype) on the benchmark's shape, views against copies."""
    b, t, h, d = 12, 64, 4, 32
    qkv = randn(b, t, 3 * h * d, dtype=np.float32)
    q, k, v = (z.reshape(b, t, h, d).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, axis=2))
    g = randn(b, t, h, d, dtype=np.float32).transpose(0, 2, 1, 3)

    def fused(a, b_, c):
        return F.scaled_dot_product_attention(a, b_, c, is_causal=True)

    out, grads = grads_of(fused, (q, k, v), g)
    ref, ref_grads = grads_of(fused, [np.ascontiguousarray(z) for z in (q, k, v)], np.ascontiguousarray(g))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
