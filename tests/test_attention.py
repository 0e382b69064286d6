"""scaled_dot_product_attention (fused Numba kernels): forward and gradients against a plain composition of mpnn
ops in float64, finite-difference gradchecks, float32 against float64, torch where installed, the errors, the
composed (dropout, differentiable mask) path, and what the node keeps for backward."""

import math
import tracemalloc

import numpy as np
import pytest

import mpnn
from mpnn.core import OpError, Tensor, gradcheck
from mpnn.core import attention as attention_module
from mpnn.core import attention_kernels as K
from mpnn.core.activation import softmax
from mpnn.core.indexing import getitem, masked_fill
from mpnn.core.linalg import matmul
from mpnn.core.movement import transpose
from mpnn.nn import functional as F

sdpa = F.scaled_dot_product_attention
RNG = np.random.default_rng(12)


def randn(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


def leaf(arr):
    return Tensor(arr, requires_grad=True)


@pytest.fixture(params=["default blocks", "small blocks"])
def blocks(request, monkeypatch):
    """Run with the shipped block sizes, and with blocks small and odd enough that every path of the kernels
    (several query and key blocks, partial last blocks, the online rescale, causal blocks skipped and cut)
    runs on these small shapes."""
    if request.param == "small blocks":
        monkeypatch.setattr(attention_module, "_FWD_Q", 4)
        monkeypatch.setattr(attention_module, "_FWD_K", 3)
        monkeypatch.setattr(attention_module, "_BWD_K", 3)
        monkeypatch.setattr(attention_module, "_BWD_Q", 5)
    return request.param


# ----- the reference: plain mpnn ops --------------------------------------------------------------------------
def allowed_of(L, S, mask, causal):
    """The bool array of (query, key) pairs that take part (broadcast like the mask), or None for all."""
    if causal:
        return np.tril(np.ones((L, S), np.bool_))
    if mask is not None and mask.dtype == np.bool_:
        return mask
    if mask is not None:
        return mask != -np.inf
    return None


def composed(q, k, v, mask=None, causal=False, scale=None, gqa=1):
    """softmax(q @ k^T * scale + mask) @ v from mpnn ops. A query row no key may attend gets output 0 (what the
    fused op promises): its mask row is opened to every key (so that softmax stays finite), and the row is
    multiplied by 0 afterwards, so that no gradient flows through it either."""
    E = q.data.shape[-1]
    L, S = q.data.shape[-2], k.data.shape[-2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if gqa > 1:
        idx = np.repeat(np.arange(k.data.shape[-3]), gqa)
        k = getitem(k, (Ellipsis, idx, slice(None), slice(None)))
        v = getitem(v, (Ellipsis, idx, slice(None), slice(None)))
    s = matmul(q, transpose(k, -2, -1)) * scale
    allowed = allowed_of(L, S, mask, causal)
    live = None
    if allowed is not None:
        live = np.any(allowed, axis=-1, keepdims=True)
        allowed = allowed | ~live
    if mask is not None and mask.dtype != np.bool_:
        s = s + Tensor(np.where(np.broadcast_to(live, mask.shape), mask, 0.0).astype(mask.dtype))
    if allowed is not None:
        s = masked_fill(s, ~allowed, float("-inf"))
    p = softmax(s, -1)
    if live is not None:
        p = p * Tensor(live.astype(q.data.dtype))
    return matmul(p, v)


def outputs_and_grads(fn, arrays, g):
    ts = [leaf(a) for a in arrays]  # the arrays as they are (strided views stay views)
    out = fn(*ts)
    out.backward(g)
    return out.data, [t.grad.data for t in ts]


# shapes: (q, k, v, mask shape or None, mask kind, causal, gqa group)
CASES = [
    ((2, 3, 7, 5), (2, 3, 13, 5), (2, 3, 13, 6), None, None, False, 1),  # L != S, E != Ev
    ((2, 3, 13, 4), (2, 3, 7, 4), (2, 3, 7, 4), None, None, False, 1),
    ((2, 3, 7, 5), (2, 3, 13, 5), (2, 3, 13, 5), None, None, True, 1),  # causal, L < S
    ((1, 2, 13, 4), (1, 2, 7, 4), (1, 2, 7, 3), None, None, True, 1),  # causal, L > S
    ((2, 2, 9, 4), (2, 2, 9, 4), (2, 2, 9, 4), None, None, True, 1),  # causal, L == S
    ((2, 3, 7, 5), (2, 3, 13, 5), (2, 3, 13, 6), (7, 13), "bool", False, 1),  # mask over batch and heads
    ((2, 3, 7, 5), (2, 3, 13, 5), (2, 3, 13, 5), (2, 1, 7, 13), "add", False, 1),  # per batch, over heads
    ((2, 3, 7, 5), (2, 3, 13, 5), (2, 3, 13, 5), (2, 1, 1, 13), "bool", False, 1),  # key padding (one row)
    ((2, 3, 7, 5), (2, 3, 13, 5), (2, 3, 13, 5), (3, 1, 13), "add", False, 1),  # one additive row per head
    ((5, 7, 4), (5, 13, 4), (5, 13, 3), (7, 13), "bool", False, 1),  # 3-D inputs
    ((7, 4), (9, 4), (9, 5), None, None, True, 1),  # 2-D inputs
    ((2, 3, 7, 5), (1, 3, 13, 5), (2, 1, 13, 5), None, None, False, 1),  # broadcast batch dims
    ((2, 4, 7, 5), (2, 2, 11, 5), (2, 2, 11, 3), (2, 1, 7, 11), "add", False, 2),  # grouped-query heads
    ((3, 4, 6, 4), (3, 1, 6, 4), (3, 1, 6, 4), None, None, True, 1),  # shared k/v head (MQA)
]


def make_mask(shape, kind, dtype):
    """A mask of the given shape with some keys masked and the last query row masked entirely (a mask with one
    row for all queries: the last slab along its first dim), and (bool) one row with a single key left."""
    dead = (Ellipsis, -1, slice(None)) if shape[-2] > 1 else (-1, Ellipsis)
    if kind == "bool":
        m = RNG.random(shape) > 0.4
        m[dead] = False
        if shape[-2] > 1:
            m[..., 0, :] = False
            m[..., 0, 1] = True
        return m
    m = RNG.standard_normal(shape).astype(dtype)
    m[RNG.random(shape) < 0.3] = -np.inf
    m[dead] = -np.inf
    return m


def out_shape(qs, ks, vs, gqa):
    """The output shape: the batch dims broadcast (k and v heads repeated gqa times), then (L, Ev)."""

    def heads(shape):
        return shape[:-1] + (shape[-1] * gqa,) if gqa > 1 else shape

    return np.broadcast_shapes(qs[:-2], heads(ks[:-2]), heads(vs[:-2])) + (qs[-2], vs[-1])


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_composed_ops_float64(case, blocks):
    qs, ks, vs, mshape, kind, causal, gqa = case
    q, k, v = randn(*qs), randn(*ks), randn(*vs)
    mask = make_mask(mshape, kind, np.float64) if mshape else None
    shape = out_shape(qs, ks, vs, gqa)
    g = randn(*shape)
    out, grads = outputs_and_grads(
        lambda a, b, c: sdpa(a, b, c, attn_mask=mask, is_causal=causal, enable_gqa=gqa > 1), (q, k, v), g
    )
    ref, ref_grads = outputs_and_grads(lambda a, b, c: composed(a, b, c, mask, causal, gqa=gqa), (q, k, v), g)
    assert out.shape == ref.shape == shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11, err_msg=f"d{name}")
    if mshape and mshape[-2] > 1:  # the rows no key may attend: output 0
        assert np.all(out[..., -1, :] == 0)
    assert np.any(out != 0)


def test_custom_scale_and_noncontiguous_inputs(blocks):
    base = randn(2, 9, 3, 8)  # (B, T, H, D) viewed as (B, H, T, D), as a transformer block does
    q = base.transpose(0, 2, 1, 3)
    k, v = randn(2, 3, 9, 8)[..., ::-1, :], randn(2, 3, 8, 9).transpose(0, 1, 3, 2)
    assert not (q.flags.c_contiguous or k.flags.c_contiguous or v.flags.c_contiguous)
    g = randn(2, 3, 9, 8)
    out, grads = outputs_and_grads(lambda a, b, c: sdpa(a, b, c, is_causal=True, scale=0.3), (q, k, v), g)
    ref, ref_grads = outputs_and_grads(lambda a, b, c: composed(a, b, c, causal=True, scale=0.3), (q, k, v), g)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("setup", ["plain", "causal", "bool mask", "add mask", "key padding", "gqa", "broadcast"])
def test_gradcheck(setup, monkeypatch):
    monkeypatch.setattr(attention_module, "_FWD_Q", 2)
    monkeypatch.setattr(attention_module, "_FWD_K", 3)
    monkeypatch.setattr(attention_module, "_BWD_K", 2)
    monkeypatch.setattr(attention_module, "_BWD_Q", 3)
    kw = {}
    qs, ks, vs = (2, 2, 5, 3), (2, 2, 6, 3), (2, 2, 6, 4)
    if setup == "causal":
        kw["is_causal"] = True
    elif setup == "bool mask":
        kw["attn_mask"] = make_mask((5, 6), "bool", np.float64)
    elif setup == "add mask":
        kw["attn_mask"] = make_mask((2, 1, 5, 6), "add", np.float64)
    elif setup == "key padding":
        m = np.ones((2, 1, 1, 6), np.bool_)
        m[0, ..., 4:] = False
        kw["attn_mask"] = m
    elif setup == "gqa":
        qs, ks, vs = (1, 4, 5, 3), (1, 2, 6, 3), (1, 2, 6, 2)
        kw["enable_gqa"] = True
    elif setup == "broadcast":
        qs, ks, vs = (2, 2, 5, 3), (1, 2, 6, 3), (2, 1, 6, 4)
    q, k, v = leaf(randn(*qs)), leaf(randn(*ks)), leaf(randn(*vs))
    assert gradcheck(lambda a, b, c: sdpa(a, b, c, **kw), [q, k, v])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 100, 16), (12, 4, 64, 32), (1, 2, 300, 8)])
def test_float32_close_to_float64(shape, causal, blocks):
    q, k, v, g = (randn(*shape) for _ in range(4))
    out64, grads64 = outputs_and_grads(lambda a, b, c: sdpa(a, b, c, is_causal=causal), (q, k, v), g)
    out32, grads32 = outputs_and_grads(
        lambda a, b, c: sdpa(a, b, c, is_causal=causal),
        tuple(a.astype(np.float32) for a in (q, k, v)),
        g.astype(np.float32),
    )
    assert out32.dtype == np.float32 and all(d.dtype == np.float32 for d in grads32)
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=2e-5)
    for got, want in zip(grads32, grads64):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_float32_masks_close_to_float64(blocks):
    q, k, v, g = randn(2, 3, 20, 8), randn(2, 3, 17, 8), randn(2, 3, 17, 5), randn(2, 3, 20, 5)
    for mask in (
        make_mask((20, 17), "bool", np.float64),
        make_mask((2, 1, 20, 17), "add", np.float64),
        make_mask((2, 1, 1, 17), "bool", np.float64),
        make_mask((3, 1, 17), "add", np.float64),
    ):
        out64, grads64 = outputs_and_grads(lambda a, b, c, m=mask: sdpa(a, b, c, attn_mask=m), (q, k, v), g)
        m32 = mask if mask.dtype == np.bool_ else mask.astype(np.float32)
        out32, grads32 = outputs_and_grads(
            lambda a, b, c, m=m32: sdpa(a, b, c, attn_mask=m),
            tuple(a.astype(np.float32) for a in (q, k, v)),
            g.astype(np.float32),
        )
        np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=2e-5)
        for got, want in zip(grads32, grads64):
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_exp_f32_accuracy():
    """The kernels' float32 exp: within 1 ulp-ish of exp over the range softmax uses, exactly 0 below -87.3
    and for -inf (no denormals), exactly 1 at 0."""
    x = np.linspace(-87.3, 88.0, 2_000_001).astype(np.float32)
    out = np.empty_like(x)
    K.exp_f32_array(x, out)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(out - want) / want
    assert rel.max() < 1.5 * np.finfo(np.float32).eps
    special = np.array([-np.inf, -1e30, -87.5, 0.0], np.float32)
    got = np.empty_like(special)
    K.exp_f32_array(special, got)
    assert got.tolist() == [0.0, 0.0, 0.0, 1.0]


# ----- semantics ------------------------------------------------------------------------------------------------
def test_fully_masked_rows_give_zero_output_and_gradient(blocks):
    q, k, v = leaf(randn(1, 2, 4, 3)), leaf(randn(1, 2, 5, 3)), leaf(randn(1, 2, 5, 3))
    for mask in (np.zeros((4, 5), np.bool_), np.full((4, 5), -np.inf)):
        for t in (q, k, v):
            t.grad = None
        out = sdpa(q, k, v, attn_mask=mask)
        out.sum().backward()
        assert np.all(out.data == 0)
        assert all(np.all(t.grad.data == 0) for t in (q, k, v))


def test_large_negative_additive_mask_is_finite_not_masked(blocks):
    """A finite mask value, however negative, still takes part (torch: a row of finfo.min averages v)."""
    q, k, v = randn(1, 1, 3, 4), randn(1, 1, 5, 4), randn(1, 1, 5, 4)
    mask = np.full((3, 5), np.finfo(np.float64).min / 2)
    out = sdpa(Tensor(q), Tensor(k), Tensor(v), attn_mask=mask).data
    np.testing.assert_allclose(out[0, 0], np.broadcast_to(v[0, 0].mean(0), (3, 4)), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_scores_propagate_as_in_torch(bad):
    """A NaN or inf in q or k makes that query's row NaN (softmax of it), not some finite weighting."""
    q, k, v = randn(1, 2, 6, 4), randn(1, 2, 7, 4), randn(1, 2, 7, 3)
    clean = sdpa(Tensor(q), Tensor(k), Tensor(v), is_causal=True).data
    q[0, 1, 2, 0] = bad
    out = sdpa(Tensor(q), Tensor(k), Tensor(v), is_causal=True).data
    assert np.all(np.isnan(out[0, 1, 2]))
    keep = np.ones(out.shape, np.bool_)
    keep[0, 1, 2] = False
    np.testing.assert_allclose(out[keep], clean[keep], rtol=1e-12)
    k[0, 0, 3, 1] = bad  # a key every later query sees (an inf there scores +inf or -inf, by q's sign)
    out = sdpa(Tensor(q), Tensor(k), Tensor(v), is_causal=True).data
    assert np.all(np.isfinite(out[0, 0, :3]))
    plus = np.isnan(q[0, 0, 3:, 1] * bad) | (q[0, 0, 3:, 1] * bad > 0)  # NaN, or +inf: softmax gives NaN
    assert np.array_equal(np.isnan(out[0, 0, 3:]).all(-1), plus)


def test_empty_keys_and_queries():
    q, k, v = leaf(randn(2, 3, 4)), leaf(randn(2, 0, 4)), leaf(randn(2, 0, 5))
    out = sdpa(q, k, v)
    assert out.shape == (2, 3, 5) and np.all(out.data == 0)
    out.sum().backward()
    assert np.all(q.grad.data == 0) and k.grad.shape == (2, 0, 4)
    q0 = leaf(randn(2, 0, 4))
    k1, v1 = leaf(randn(2, 6, 4)), leaf(randn(2, 6, 5))
    out = sdpa(q0, k1, v1, is_causal=True)
    assert out.shape == (2, 0, 5)
    out.sum().backward()
    assert np.all(k1.grad.data == 0) and np.all(v1.grad.data == 0)


def test_some_inputs_frozen_and_no_grad():
    q, k, v = leaf(randn(2, 5, 3)), Tensor(randn(2, 6, 3)), leaf(randn(2, 6, 3))
    out = sdpa(q, k, v, is_causal=True)
    out.sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is not None
    with mpnn.no_grad():
        out = sdpa(q, k, v)
    assert not out.requires_grad and out.grad_fn is None


def test_inplace_write_to_an_input_after_forward_raises():
    q, k, v = leaf(randn(2, 5, 3)), leaf(randn(2, 6, 3)), leaf(randn(2, 6, 3))
    qq = q * 1.0
    out = sdpa(qq, k, v)
    qq.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_errors():
    q, k, v = Tensor(randn(2, 3, 4)), Tensor(randn(2, 5, 4)), Tensor(randn(2, 5, 6))
    with pytest.raises(OpError, match="Explicit attn_mask should not be set when is_causal=True"):
        sdpa(q, k, v, attn_mask=np.ones((3, 5), np.bool_), is_causal=True)
    with pytest.raises(OpError, match="one float dtype"):
        sdpa(q, Tensor(randn(2, 5, 4, dtype=np.float32)), v)
    with pytest.raises(OpError, match="attn_mask must be bool or of the query's dtype"):
        sdpa(q, k, v, attn_mask=np.ones((3, 5), np.int64))
    with pytest.raises(OpError, match="attn_mask must be bool or of the query's dtype"):
        sdpa(q, k, v, attn_mask=np.zeros((3, 5), np.float32))
    with pytest.raises(OpError, match="does not broadcast"):
        sdpa(q, k, v, attn_mask=np.ones((3, 4), np.bool_))
    with pytest.raises(OpError, match="does not broadcast"):  # a mask may not add batch dims
        sdpa(q, k, v, attn_mask=np.ones((7, 2, 3, 5), np.bool_))
    with pytest.raises(OpError, match="shapes do not fit"):
        sdpa(q, Tensor(randn(2, 5, 3)), v)
    with pytest.raises(OpError, match="shapes do not fit"):
        sdpa(q, k, Tensor(randn(2, 4, 6)))
    with pytest.raises(OpError, match="between 0 and 1"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(OpError, match="batch dims do not broadcast"):
        sdpa(Tensor(randn(2, 4, 3, 4)), Tensor(randn(2, 2, 5, 4)), Tensor(randn(2, 2, 5, 4)))
    with pytest.raises(OpError, match="multiple of key and value heads"):
        sdpa(Tensor(randn(2, 5, 3, 4)), Tensor(randn(2, 2, 5, 4)), Tensor(randn(2, 2, 5, 4)), enable_gqa=True)
    with pytest.raises(OpError, match="at least 2 dims"):
        sdpa(Tensor(randn(4)), k, v)


# ----- the composed path: dropout, differentiable masks ------------------------------------------------------------
def test_dropout_zero_is_the_fused_op_and_dropout_is_reproducible():
    q, k, v = (Tensor(randn(2, 2, 6, 4)) for _ in range(3))
    np.testing.assert_array_equal(sdpa(q, k, v, dropout_p=0.0).data, sdpa(q, k, v).data)
    mpnn.manual_seed(3)
    a = sdpa(q, k, v, dropout_p=0.5, is_causal=True).data
    mpnn.manual_seed(3)
    b = sdpa(q, k, v, dropout_p=0.5, is_causal=True).data
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, sdpa(q, k, v, is_causal=True).data)
    assert np.all(sdpa(q, k, v, dropout_p=1.0).data == 0)


def test_dropout_gradcheck_with_fixed_draws():
    q, k, v = leaf(randn(1, 2, 4, 3)), leaf(randn(1, 2, 5, 3)), leaf(randn(1, 2, 5, 2))
    mask = make_mask((4, 5), "bool", np.float64)

    def fn(a, b, c):
        mpnn.manual_seed(11)  # the same dropout mask on every evaluation
        return sdpa(a, b, c, attn_mask=mask, dropout_p=0.3)

    assert gradcheck(fn, [q, k, v])
    out = fn(q, k, v)
    assert np.all(out.data[..., -1, :] == 0)  # the fully masked row: 0, as in the fused op


def test_differentiable_float_mask_gets_its_gradient():
    q, k, v = leaf(randn(2, 2, 4, 3)), leaf(randn(2, 2, 5, 3)), leaf(randn(2, 2, 5, 3))
    bias = leaf(randn(2, 1, 4, 5))  # a learned relative-position bias, broadcast over heads
    assert gradcheck(lambda a, b, c, m: sdpa(a, b, c, attn_mask=m), [q, k, v, bias])
    out = sdpa(q, k, v, attn_mask=bias.detach())
    np.testing.assert_allclose(sdpa(q, k, v, attn_mask=bias).data, out.data, rtol=1e-12, atol=1e-12)


# ----- memory: what the node keeps ----------------------------------------------------------------------------------
def _closure_arrays(fn, seen=None):
    """Every NumPy array a function's closure reaches (through nested closures and tuples)."""
    seen = set() if seen is None else seen
    found = []
    for cell in fn.__closure__ or ():
        stack = [cell.cell_contents]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, np.ndarray):
                found.append(obj)
            elif isinstance(obj, (tuple, list)):
                stack.extend(obj)
            elif callable(obj) and getattr(obj, "__closure__", None):
                found.extend(_closure_arrays(obj, seen))
    return found


def test_node_keeps_only_per_row_state_beyond_inputs_and_output():
    B, H, T, D = 2, 3, 512, 16
    q, k, v = (leaf(randn(B, H, T, D, dtype=np.float32)) for _ in range(3))
    mask = np.ones((T, T), np.bool_)
    for kw in ({"is_causal": True}, {"attn_mask": mask}):
        out = sdpa(q, k, v, **kw)
        known = [q.data, k.data, v.data, out.data, mask]
        extra = [a for a in _closure_arrays(out.grad_fn.backward) if not any(np.may_share_memory(a, b) for b in known)]
        extra_bytes = sum(a.nbytes for a in extra)
        # the log-sum-exp per query row (B*H*T floats) and 4 index maps of B*H entries; no T x T array
        assert max(a.size for a in extra) <= B * H * T
        assert extra_bytes <= B * H * T * 4 + 4 * B * H * 8 + 64
        assert sum(a.nbytes for a in extra if a.size == B * H * T) == B * H * T * 4


def test_backward_peak_memory_against_composed_ops():
    """tracemalloc (NumPy's allocations) while building the graph and running backward at T = 512: the fused op
    holds per-row state and block buffers, the composition holds several (B, H, T, T) arrays."""
    B, H, T, D = 1, 2, 512, 16
    arrays = [randn(B, H, T, D, dtype=np.float32) for _ in range(3)]
    g = randn(B, H, T, D, dtype=np.float32)
    tt = B * H * T * T * 4  # bytes of one probability matrix

    def measure(fn):
        ts = [leaf(a.copy()) for a in arrays]
        # kernels loaded, and the operands' geometry cached (attention._GEOMETRY, bounded), before counting
        fn(*(leaf(a.copy()) for a in arrays)).sum().backward()
        tracemalloc.start()
        try:
            out = fn(*ts)
            held = tracemalloc.get_traced_memory()[0] - out.data.nbytes
            out.backward(g)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return held, peak

    fused_held, fused_peak = measure(lambda a, b, c: sdpa(a, b, c, is_causal=True))
    comp_held, comp_peak = measure(lambda a, b, c: composed(a, b, c, causal=True))
    assert fused_held < B * H * T * 4 + 4096  # the log-sum-exp (and index maps)
    assert comp_held > 2 * tt  # scores and probabilities, at least
    # fused: the gradients and their copies into .grad, Q^T and dO^T of one head, the block buffers
    assert fused_peak < 8 * arrays[0].nbytes + 256 * 1024 < tt // 2
    assert comp_peak > 3 * tt


# ----- torch -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_torch(case, dtype):
    torch = pytest.importorskip("torch")
    qs, ks, vs, mshape, kind, causal, gqa = case
    q, k, v = (randn(*s, dtype=dtype) for s in (qs, ks, vs))
    mask = make_mask(mshape, kind, dtype) if mshape else None
    kw = {"is_causal": causal, "enable_gqa": gqa > 1}
    out = sdpa(*(leaf(a) for a in (q, k, v)), attn_mask=mask, **kw)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=None if mask is None else torch.tensor(mask), **kw
    )
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out.data, tout.detach().numpy(), **tol)
    g = randn(*out.shape, dtype=dtype)
    mine = [leaf(a) for a in (q, k, v)]
    sdpa(*mine, attn_mask=mask, **kw).backward(g)
    tout.backward(torch.tensor(g))
    for t, tt in zip(mine, (tq, tk, tv)):
        np.testing.assert_allclose(
            t.grad.data, tt.grad.numpy(), **(dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else tol)
        )


# ----- the operands' cached geometry (attention._GEOMETRY, attention._SMALL) -------------------------------------
def test_cached_geometry_reads_each_calls_own_memory():
    """Two qkv buffers of one shape (a cache hit for the second) each give their own attention and gradients, and
    a read-only operand of a cached shape and strides is still copied, not read as the writeable one was."""
    b, t, h, d = 2, 7, 3, 4
    results = []
    for seed in (1, 2):
        qkv = np.random.default_rng(seed).standard_normal((b, t, 3 * h * d))
        q, k, v = (z.reshape(b, t, h, d).transpose(0, 2, 1, 3) for z in np.split(qkv, 3, axis=2))
        ts = [leaf(z) for z in (q, k, v)]
        out = F.scaled_dot_product_attention(*ts, is_causal=True)
        out.sum().backward()
        refs = [leaf(np.ascontiguousarray(z)) for z in (q, k, v)]
        ref = composed(*refs, causal=True)
        ref.sum().backward()
        np.testing.assert_allclose(out.data, ref.data, rtol=1e-12, atol=1e-12)
        for got, want in zip(ts, refs):
            np.testing.assert_allclose(got.grad.data, want.grad.data, rtol=1e-12, atol=1e-12)
        results.append(out.data)
    assert not np.allclose(results[0], results[1])  # the second call did not read the first buffer

    qkv = randn(b, t, 3 * h * d)
    q = qkv[..., : h * d].reshape(b, t, h, d).transpose(0, 2, 1, 3)
    index = np.arange(b * h)
    flat, offsets, ld = attention_module._operand(q, index)  # writeable: read in place, geometry cached
    assert np.shares_memory(flat, qkv) and ld == 3 * h * d
    q_ro = q.view()
    q_ro.flags.writeable = False
    flat_ro, offsets_ro, ld_ro = attention_module._operand(q_ro, index)
    assert not np.shares_memory(flat_ro, qkv) and ld_ro == d
    for n in range(b * h):
        row = q[n // h, n % h, 2]
        np.testing.assert_array_equal(flat[offsets[n] + 2 * ld : offsets[n] + 2 * ld + d], row)
        np.testing.assert_array_equal(flat_ro[offsets_ro[n] + 2 * ld_ro : offsets_ro[n] + 2 * ld_ro + d], row)
