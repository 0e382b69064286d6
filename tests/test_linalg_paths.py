"""The copy-free paths around the GPT's matrix products: attention reading strided q, k, v (views of one qkv
projection) and a strided output gradient where they lie, and linear's GEMM routes, each against the plain
(copied, contiguous) computation in float64."""

import numpy as np
import pytest

from mpnn.core import Tensor, gradcheck, linalg
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


# ----- linear's GEMM route (mpnn.core.gemm_kernels) -----------------------------------------------------------
@pytest.fixture
def own_gemm(monkeypatch):
    """Every float32 product through mpnn's own GEMM, however small (and on any CPU: without AVX-512 it is
    slower, not wrong)."""
    monkeypatch.setattr(linalg, "_OWN_GEMM", True)
    monkeypatch.setattr(linalg, "_OWN_GEMM_MIN_FLOPS", 0)


def layouts(m, k, n):
    """(name, a, b) float32 operands of a (m, k) @ (k, n) product in the layouts linear hands over: plain,
    transposed (a weight's W.T, a gradient's g.T), strided and offset views."""
    a = randn(m, k, dtype=np.float32)
    b = randn(k, n, dtype=np.float32)
    at = np.ascontiguousarray(a.T).T
    bt = np.ascontiguousarray(b.T).T
    a_strided = randn(m + 3, 2 * k, dtype=np.float32)[3:, ::2]
    b_strided = randn(2 * k + 1, n + 5, dtype=np.float32)[1::2, 5:]
    return [("NN", a, b), ("NT", a, bt), ("TN", at, b), ("TT", at, bt), ("strided", a_strided, b_strided)]


@pytest.mark.parametrize("m", [1, 2, 5, 11, 12, 13, 27, 103])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 31), (64, 32), (33, 33), (300, 65), (513, 103)])
def test_own_gemm_matches_float64(m, k, n, own_gemm):
    """Every strip height (12, 8, 4, 2, 1 rows), a last panel narrower than 32, k across several blocks."""
    for name, a, b in layouts(m, k, n):
        got = linalg._mm(a, b)
        want = a.astype(np.float64) @ b.astype(np.float64)
        assert got.dtype == np.float32 and got.shape == (m, n) and got.flags.c_contiguous
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k), err_msg=name)


def test_own_gemm_gpt_shapes_equal_numpy(own_gemm):
    """The GPT's products (768 rows, K = 128): the own kernel and OpenBLAS agree to float32 rounding."""
    x, w, g = randn(768, 128, dtype=np.float32), randn(384, 128, dtype=np.float32), randn(768, 384, dtype=np.float32)
    for a, b in ((x, w.T), (g, w), (g.T, x)):
        np.testing.assert_allclose(linalg._mm(a, b), np.matmul(a, b), rtol=1e-4, atol=1e-4)


def test_own_gemm_falls_back_where_it_cannot_read_in_place(own_gemm):
    a, b = randn(20, 30, dtype=np.float32), randn(30, 40, dtype=np.float32)
    ro = b.copy()
    ro.flags.writeable = False
    assert linalg._flat(ro) is None and linalg._flat(a[::-1]) is None
    for x, y in ((a, ro), (a[::-1], b), (a, b[:, ::-1])):
        np.testing.assert_allclose(linalg._mm(x, y), x.astype(np.float64) @ y, rtol=1e-5, atol=1e-4)
    a64 = a.astype(np.float64)
    np.testing.assert_array_equal(linalg._mm(a64, a64.T), a64 @ a64.T)  # float64: NumPy, exactly


@pytest.mark.parametrize("bias", [False, True])
def test_linear_float32_own_gemm_forward_and_gradients(bias, own_gemm):
    """linear on a 3-D float32 input through the own GEMM (forward, input and weight gradients) against the
    float64 computation."""
    x = randn(3, 17, 40, dtype=np.float32)
    w = randn(70, 40, dtype=np.float32)
    b = randn(70, dtype=np.float32)
    g = randn(3, 17, 70, dtype=np.float32)
    ts = [Tensor(a, requires_grad=True) for a in ((x, w, b) if bias else (x, w))]
    out = linear(*ts)
    out.backward(Tensor(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    want = x64 @ w64.T + (b if bias else 0)
    np.testing.assert_allclose(out.data, want, rtol=1e-5, atol=1e-4)
    g2 = g64.reshape(-1, 70)
    np.testing.assert_allclose(ts[0].grad.data, (g2 @ w64).reshape(x.shape), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ts[1].grad.data, g2.T @ x64.reshape(-1, 40), rtol=1e-5, atol=1e-4)


def test_linear_gradcheck_float64_takes_numpy_path():
    """float64 (the gradient checks' dtype) never takes the float32 kernel; the op's gradients stay exact."""
    x, w, b = (Tensor(randn(*s), requires_grad=True) for s in ((2, 3, 5), (4, 5), (4,)))
    assert gradcheck(linear, [x, w, b])


def test_own_gemm_empty_products(own_gemm):
    for m, k, n in ((0, 3, 4), (3, 0, 4), (3, 4, 0)):
        a, b = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
        np.testing.assert_array_equal(linalg._mm(a, b), np.zeros((m, n), np.float32))


@pytest.mark.parametrize("shape", [(2, 3, 9, 4), (3, 9, 4), (9, 4), (2, 1, 5, 4)])
def test_attention_output_lies_as_torch_lays_it_out(shape):
    """A (..., H, L, Ev) result is a view of a (..., L, H, Ev) array, so transpose(-2, -3) is contiguous (the
    GPT's ``y.transpose(1, 2).contiguous()`` copies nothing), with the same values as contiguous inputs give."""
    q, k, v = randn(*shape), randn(*shape), randn(*shape)
    out = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), is_causal=True)
    if len(shape) > 2:
        assert out.transpose(-2, -3).data.flags.c_contiguous
    else:
        assert out.data.flags.c_contiguous
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(shape[-1])
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(out.data, (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-12, atol=1e-12)


def test_own_gemm_route_by_host():
    """The own GEMM on AVX-512 hosts except AMD's Zen (where OpenBLAS measured faster), OpenBLAS without
    AVX-512; MPNN_GEMM=own|blas overrides either way."""
    pick = linalg._own_gemm_default
    assert pick({"avx512f": True}, "sapphirerapids", "") is True
    assert pick({"avx512f": True}, "skylake-avx512", "") is True
    assert pick({"avx512f": True}, "znver4", "") is False
    assert pick({"avx512f": False}, "haswell", "") is False
    assert pick({"avx512f": True}, "znver4", "own") is True
    assert pick({"avx512f": True}, "icelake-server", "blas") is False
    with pytest.raises(ValueError, match="MPNN_GEMM='fast': must be 'own'"):
        pick({"avx512f": True}, "znver4", "fast")
