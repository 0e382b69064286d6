"""scaled_dot_product_attention with torch.nn.functional's signature and semantics, as one fused node.

    out = softmax(q @ k^T * scale + mask) @ v        q (..., L, E), k (..., S, E), v (..., S, Ev)

Forward and backward run in Numba kernels (mpnn.core.attention_kernels) in the FlashAttention-2 manner: blocks
of queries against blocks of keys, an online softmax (running row max and sum, the output rescaled as the max
grows), block products as BLAS GEMMs. The node keeps the inputs (as every matmul does), the output and one
log-sum-exp per query row: O(batch * L) floats beyond them, never the L x S probabilities, which backward
recomputes block by block. Causal blocks above the diagonal are skipped in both directions.

Semantics, as torch's (checked against torch 2.13 on CPU):
- batch dims broadcast (q, k, v may each have size-1 or missing batch dims); enable_gqa=True lets k and v
  have fewer heads (dim -3) than q, each shared by q.size(-3) // k.size(-3) query heads (repeat_interleave).
- attn_mask: bool (True = take part) or additive float of q's dtype, broadcast over batch and heads; it must
  broadcast to (*batch, L, S) without adding batch dims. Not combinable with is_causal (torch's error).
- is_causal: row i attends keys j <= i (top-left aligned, also when L != S).
- scale defaults to 1/sqrt(E).
- dropout_p > 0 applies dropout to the attention weights whenever it is given, as torch's functional does
  (layers pass ``dropout_p if self.training else 0.0``). That case, and a float mask that requires grad, run
  a composed path of mpnn ops (which does hold the L x S weights).
- A row that no key may attend (all False / all -inf in the mask) gives output 0 and gradient 0. torch 2.13
  gives 0 as well on CPU (its flash and math kernels, float32 and float64), though older torch versions
  and a plain softmax composition give NaN there; 0 is the safe answer (a padded row must not poison a
  batch's loss with NaN).
"""

from __future__ import annotations

import math

import numpy as np

from mpnn.core import attention_kernels as K
from mpnn.core.errors import OpError
from mpnn.core.tensor_base import OUTPUT, TensorBase, as_tensor, make_result

_OP = "scaled_dot_product_attention"
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Block sizes (module constants: tests patch them to force many blocks). Forward: _FWD_Q queries per block
# against _FWD_K keys per block; backward: _BWD_K keys per block against _BWD_Q queries per chunk. With E = 64
# every block product stays within OpenBLAS's small-matrix kernels (M*N*K <= ~512K, 125-155 GFLOP/s here). Causal
# forward+backward, float32, one thread, (B, H, T, D) = (4, 8, 512, 64) / (12, 4, 64, 32), ms: these 50.8 / 1.44;
# forward queries 16: 53.4 / 1.53, 64: 54.6 / 1.56 (more of the diagonal block computed, then masked); forward
# keys 128 or 512: 53.6 / -, 51.9 / -; backward 32x64, 128x64, 64x128, 32x32: within 3% (machine noise ~5%).
_FWD_Q = 32
_FWD_K = 256
_BWD_K = 64
_BWD_Q = 64
_DUMMY_BOOL = np.zeros((1, 1, 1), np.bool_)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
):
    """softmax(query @ key^T * scale + attn_mask) @ value, with torch's signature and semantics (see module
    docstring): returns (*batch, L, Ev)."""
    q, k, v = as_tensor(query), as_tensor(key), as_tensor(value)
    qd, kd, vd = q.data, k.data, v.data
    if qd.ndim < 2 or kd.ndim < 2 or vd.ndim < 2:
        raise OpError(
            _OP, f"query, key and value need at least 2 dims (..., L, E), got shapes {qd.shape}, {kd.shape}, {vd.shape}"
        )
    if not (qd.dtype == kd.dtype == vd.dtype) or qd.dtype not in _FLOATS:
        raise OpError(
            _OP,
            f"query, key and value must have one float dtype (float32 or float64), got "
            f"{qd.dtype}, {kd.dtype}, {vd.dtype}",
        )
    if kd.shape[-1] != qd.shape[-1] or kd.shape[-2] != vd.shape[-2]:
        raise OpError(
            _OP,
            f"shapes do not fit: query (..., L, E) {qd.shape}, key (..., S, E) {kd.shape}, "
            f"value (..., S, Ev) {vd.shape}",
        )
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise OpError(_OP, f"dropout probability has to be between 0 and 1, got {dropout_p}")
    if attn_mask is not None and is_causal:
        raise OpError(_OP, "Explicit attn_mask should not be set when is_causal=True")
    dtype = qd.dtype
    L, E = qd.shape[-2:]
    S, Ev = vd.shape[-2:]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)

    qb, kb, vb = qd.shape[:-2], kd.shape[:-2], vd.shape[:-2]
    group = 1
    if enable_gqa and qb and kb and vb and kb[-1] != qb[-1] and kb[-1] != 1:
        if qb[-1] % kb[-1] or kb[-1] != vb[-1]:
            raise OpError(
                _OP,
                f"enable_gqa: query heads (dim -3) {qb[-1]} must be a multiple of key and "
                f"value heads, got key {kd.shape} and value {vd.shape}",
            )
        group = qb[-1] // kb[-1]
    kb_eff = kb[:-1] + (kb[-1] * group,) if group > 1 else kb
    vb_eff = vb[:-1] + (vb[-1] * group,) if group > 1 else vb
    try:
        batch = np.broadcast_shapes(qb, kb_eff, vb_eff)
    except ValueError:
        raise OpError(
            _OP,
            f"batch dims do not broadcast: query {qd.shape}, key {kd.shape}, value {vd.shape}"
            f"{' (enable_gqa=True lets key/value have fewer heads)' if not enable_gqa else ''}",
        ) from None

    mask_t = None
    md = None
    if attn_mask is not None:
        mask_t = attn_mask if isinstance(attn_mask, TensorBase) else None
        md = attn_mask.data if mask_t is not None else np.asarray(attn_mask)
        if md.dtype != np.bool_ and md.dtype != dtype:
            raise OpError(_OP, f"attn_mask must be bool or of the query's dtype {dtype}, got {md.dtype}")
        full = batch + (L, S)
        if md.ndim > len(full) or any(m not in (1, f) for m, f in zip(md.shape[::-1], full[::-1])):
            raise OpError(_OP, f"attn_mask of shape {md.shape} does not broadcast to (*batch, L, S) = {full}")

    if dropout_p > 0.0 or (mask_t is not None and mask_t.requires_grad and md.dtype != np.bool_):
        return _composed(q, k, v, attn_mask, md, dropout_p, is_causal, scale, group)

    n = math.prod(batch)
    qi = _index_map(qb, batch)
    ki = _index_map(kb, batch, group)
    vi = _index_map(vb, batch, group)
    (qf, qo, ldq), (kf, ko, ldk), (vf, vo, ldv) = _operand(qd, qi), _operand(kd, ki), _operand(vd, vi)
    mode, bmask, amask, mi = _mask_args(md, batch, L, S, dtype)
    per_query_mask = mode and (bmask if mode == 1 else amask).shape[1] > 1
    sc = dtype.type(scale)
    causal = bool(is_causal)
    br, bc = _block(_FWD_Q, L), _block(_FWD_K, S)
    out, oo, ldo = _output(batch, L, Ev, dtype)
    of = out.reshape(-1)
    lse = np.empty((n, L), dtype)
    if n and L:
        bad = K.attention_forward(
            qf,
            qo,
            ldq,
            kf,
            ko,
            ldk,
            vf,
            vo,
            ldv,
            S,
            E,
            oo,
            ldo,
            Ev,
            mode,
            bmask,
            amask,
            mi,
            causal,
            _edge(br, dtype),
            sc,
            br,
            bc,
            *_forward_scratch(E, L, br, bc, per_query_mask, dtype),
            of,
            lse,
        )
        if bad:  # NaN or inf among the scores: the composition propagates them as torch does
            return _composed(q, k, v, attn_mask, md, dropout_p, is_causal, scale, group)

    def backward(g):
        # The inputs again, read where they lie (as in forward), and the output's gradient likewise: autograd
        # hands the GPT's a transposed view (of y.transpose(1, 2)), which a copy would cost 0.4 MB a layer.
        (qf, qo, ldq), (kf, ko, ldk), (vf, vo, ldv) = _operand(qd, qi), _operand(kd, ki), _operand(vd, vi)
        gf, go, ldg = _operand(g.astype(dtype, copy=False).reshape(batch + (L, Ev)), _index_map(batch, batch))
        nq, nk, nv = math.prod(qb), math.prod(kb), math.prod(vb)
        # fresh: no slab of q, k, v is shared by two problems (no broadcast batch dims, no GQA), so the
        # kernel writes each gradient slab's first product instead of adding it to zeros
        fresh = n == nq == nk == nv and bool(S)
        alloc = np.empty if fresh else np.zeros
        dq, dk, dv = alloc((nq, L, E), dtype), alloc((nk, S, E), dtype), alloc((nv, S, Ev), dtype)
        if n and S and (L or fresh):
            bk, bq = _block(_BWD_K, S), _block(_BWD_Q, L)
            K.attention_backward(
                qf,
                qo,
                ldq,
                kf,
                ko,
                ldk,
                vf,
                vo,
                ldv,
                gf,
                go,
                ldg,
                of,
                oo,
                ldo,
                Ev,
                lse,
                S,
                E,
                qi,
                ki,
                vi,
                mode,
                bmask,
                amask,
                mi,
                causal,
                _edge(bq, dtype),
                sc,
                bk,
                bq,
                fresh,
                *_backward_scratch(E, Ev, L, bk, bq, per_query_mask, dtype),
                dq,
                dk,
                dv,
            )
        return (
            dq.reshape(qd.shape) if q.requires_grad else None,
            dk.reshape(kd.shape) if k.requires_grad else None,
            dv.reshape(vd.shape) if v.requires_grad else None,
        )

    saved = (q, k, v) + ((mask_t,) if mask_t is not None else ()) + (OUTPUT,)
    return make_result(out.swapaxes(-2, -3) if out.ndim > 2 else out, (q, k, v), backward, _OP, saved=saved)


def _kernel_array(a):
    """``a`` itself if C-contiguous and writeable, else a copy that is: the kernels see one array type (a
    read-only or strided array would compile another specialization, seconds, at its first use)."""
    return np.require(a, requirements=("C", "W"))


def _output(batch, L, Ev, dtype):
    """The output's buffer, each problem's offset in it and its row stride. As torch's CPU kernel, heads lie
    inside rows: a (B, H, L, Ev) result is a view of a (B, L, H, Ev) array, so the transformer's
    ``y.transpose(1, 2).contiguous()`` before its output projection is free (a 0.4 MB copy a layer otherwise,
    26 us against torch's 3.4). With no batch dims the buffer is plain (L, Ev)."""
    if not batch:
        return np.empty((L, Ev), dtype), np.zeros(1, np.int64), Ev
    h = batch[-1]
    out = np.empty(batch[:-1] + (L, h, Ev), dtype)
    key = ("output", batch, L, Ev)
    oo = _SMALL.get(key)
    if oo is None:
        outer = np.arange(math.prod(batch[:-1]), dtype=np.int64)[:, None] * (L * h * Ev)
        oo = _keep(key, (outer + np.arange(h, dtype=np.int64) * Ev).reshape(-1))
    return out, oo, h * Ev


def _operand(a, index):
    """An input as the kernels read it: (flat, offsets, ld): problem n's (rows, cols) matrix starts at
    flat[offsets[n]] with row stride ld and unit column stride; ``index`` maps problems to ``a``'s batch slabs.

    A strided view is read where it lies (flat spans its memory from its first element to its last): the GPT's
    q, k and v are (B, H, T, D) views of its (B, T, 3C) qkv projection, and copying them (three 0.4 MB copies
    a layer forward, three again backward, and one of the output's gradient) cost 1.7 ms of a 55 ms step
    (cProfile, 30 steps). Arrays that BLAS cannot read in place (a column stride other than 1, rows that
    overlap or run backwards, a negative or unaligned stride) or that are read-only (a second compiled
    specialization) are copied first.

    The geometry of an in-place operand (its span, offsets and ld) depends only on its shape, strides and
    ``index``, and is kept in ``_GEOMETRY`` (the kernels only read the offsets): computing it took about 20 us
    of Python per operand, at the GPT's size 7 operand reads per attention layer and step."""
    it = a.itemsize
    key = (a.shape, a.strides, it, a.flags.writeable and a.flags.aligned, index.tobytes())
    geometry = _GEOMETRY.get(key)
    if geometry is None:
        geometry = _operand_geometry(a, index)
        if len(_GEOMETRY) >= _GEOMETRY_MAX:
            _GEOMETRY.clear()
        _GEOMETRY[key] = geometry
    span, offsets, ld = geometry
    if offsets is None:  # not readable in place: a C-contiguous copy, whose geometry is computed afresh
        a = np.require(a, requirements=("C", "W"))
        span, offsets, ld = _operand_geometry(a, index, check=False)
    flat = np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(it,))
    return flat, offsets, ld


_GEOMETRY: dict = {}
_GEOMETRY_MAX = 256


def _operand_geometry(a, index, check=True):
    """(span in elements, offsets[index], ld) of an operand BLAS can read in place (or of a C-contiguous copy,
    ``check`` False), else (0, None, 0)."""
    it = a.itemsize
    rows, cols = a.shape[-2:]
    st = a.strides
    ld = st[-2] // it if rows > 1 else cols
    ok = not check or (
        a.flags.writeable
        and a.flags.aligned
        and a.size > 0
        and (cols <= 1 or st[-1] == it)
        and ld >= cols
        and all(s >= 0 and s % it == 0 for s, d in zip(st, a.shape) if d > 1)
    )
    if not ok:
        return 0, None, 0
    span = 1 + sum((d - 1) * (s // it) for s, d in zip(st, a.shape) if d > 1) if a.size else 0
    offsets = np.zeros(1, np.int64)
    for s, d in zip(st[:-2], a.shape[:-2]):  # row-major over the batch dims, as _index_map numbers slabs
        offsets = (offsets[:, None] + np.arange(d, dtype=np.int64) * (s // it if d > 1 else 0)).reshape(-1)
    return span, offsets[index], ld


def _block(size, n):
    return max(min(size, n), 1)


def _edge(size, dtype):
    """-inf size times, then 0 size times: the kernels' causal edge (see attention_kernels.block_max)."""
    key = ("edge", size, np.dtype(dtype).char)
    edge = _SMALL.get(key)
    if edge is None:
        edge = _keep(key, np.concatenate([np.full(size, -np.inf, dtype), np.zeros(size, dtype)]))
    return edge


# Small arrays that depend only on shapes (index maps, output offsets, causal edges, the no-mask arguments),
# made once and shared by every call: the kernels only read them. Making them anew took about 30 us of Python
# per forward at the GPT's size. Bounded: cleared when full.
_SMALL: dict = {}
_SMALL_MAX = 512


def _keep(key, value):
    if len(_SMALL) >= _SMALL_MAX:
        _SMALL.clear()
    _SMALL[key] = value
    return value


def _forward_scratch(E, L, br, bc, per_query_mask, dtype):
    """The work arrays attention_forward takes between its block sizes and the output (eager's and the replay's)."""
    blk = br * bc if per_query_mask else 1
    return (
        np.empty(E * L, dtype),
        np.empty(bc * br, dtype),
        np.empty(blk, np.bool_),
        np.empty(blk, dtype),
        *_vectors(4, br, dtype),
        np.empty(2, dtype),
    )


def _backward_scratch(E, Ev, L, bk, bq, per_query_mask, dtype):
    """The work arrays attention_backward takes between its ``fresh`` flag and dq (eager's and the replay's)."""
    blk = bk * bq if per_query_mask else 1
    return (
        np.empty(E * L, dtype),
        np.empty(Ev * L, dtype),
        *_vectors(2, L, dtype),
        np.empty(bk * bq, dtype),
        np.empty(bk * bq, dtype),
        np.empty(blk, np.bool_),
        np.empty(blk, dtype),
        np.empty(bq, dtype),
        np.empty(2, dtype),
    )


def _vectors(count, size, dtype):
    return [np.empty(size, dtype) for _ in range(count)]


def _index_map(shape, batch, group=1):
    """For each of the prod(batch) problems (row-major), the slab of an input with batch dims ``shape`` that
    it reads; with ``group`` > 1 the last batch dim (heads) is shared by ``group`` consecutive query heads."""
    key = ("index", shape, batch, group)
    found = _SMALL.get(key)
    if found is not None:
        return found
    ids = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    if group > 1:
        ids = np.repeat(ids, group, axis=-1)
    return _keep(key, np.array(np.broadcast_to(ids, batch), order="C").reshape(-1))


def _mask_args(md, batch, L, S, dtype):
    """(mode, bool mask, additive mask, index map) for the kernels: the mask as (Nm, Lm, S) slabs with Lm 1 or
    L, the unused one a 1-element dummy. Only a mask broadcast along S is copied (to S columns)."""
    n = math.prod(batch)
    if md is None:
        key = ("nomask", n, np.dtype(dtype).char)
        found = _SMALL.get(key)
        if found is None:
            found = _keep(key, (0, _DUMMY_BOOL, np.zeros((1, 1, 1), dtype), np.zeros(max(n, 1), np.int64)))
        return found
    dummy_add = np.zeros((1, 1, 1), dtype)
    shape = (1,) * (len(batch) + 2 - md.ndim) + md.shape
    mb, lm, sm = shape[:-2], shape[-2], shape[-1]
    m3 = md.reshape(shape)
    if sm != S:
        m3 = np.broadcast_to(m3, mb + (lm, S))
    m3 = _kernel_array(m3).reshape(-1, lm, S)
    mi = _index_map(mb, batch)
    if md.dtype == np.bool_:
        return 1, m3, dummy_add, mi
    return 2, _DUMMY_BOOL, m3, mi


def _composed(q, k, v, attn_mask, md, dropout_p, is_causal, scale, group):
    """The same attention as a composition of mpnn ops (dropout on the weights; a differentiable float mask)."""
    from mpnn.core.activation import dropout, softmax
    from mpnn.core.elementwise import mul
    from mpnn.core.indexing import getitem, masked_fill, where
    from mpnn.core.linalg import matmul
    from mpnn.core.movement import transpose

    L, S = q.data.shape[-2], k.data.shape[-2]
    if group > 1:
        idx = np.repeat(np.arange(k.data.shape[-3]), group)
        k = getitem(k, (Ellipsis, idx, slice(None), slice(None)))
        v = getitem(v, (Ellipsis, idx, slice(None), slice(None)))
    s = mul(matmul(q, transpose(k, -2, -1)), scale)
    take = None
    if is_causal:
        take = np.tril(np.ones((L, S), np.bool_))
    elif md is not None and md.dtype == np.bool_:
        take = md
    if md is not None and md.dtype != np.bool_:
        s = s + as_tensor(attn_mask)
        dead = np.all(md == -np.inf, axis=-1)
    elif take is not None:
        s = masked_fill(s, ~take, float("-inf"))
        dead = ~np.any(take, axis=-1)
    else:
        dead = np.zeros((), np.bool_)
    if dead.any():  # rows no key may attend: 0 (a finite softmax, then zeroed), not NaN
        s = where(np.broadcast_to(dead[..., None], s.data.shape), as_tensor(0.0, like=s), s)
        p = mul(softmax(s, -1), as_tensor((~dead[..., None]).astype(s.data.dtype)))
    else:
        p = softmax(s, -1)
    p = dropout(p, dropout_p, training=True)
    return matmul(p, v)
