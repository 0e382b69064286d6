"""Numba kernels of fused scaled-dot-product attention (mpnn.core.attention): FlashAttention-2 style forward
and backward over blocks of queries and keys, every block product one BLAS GEMM.

Inputs: q, k, v (and dO in backward) are flat arrays of one float dtype, each read where it lies: problem n of
the N = prod(batch) problems reads its (L, E) query matrix at qf[qo[n]:] with row stride ldq (unit column
stride), likewise k, v and dO. So strided views (the q, k, v of a GPT's split qkv projection, the transposed
gradient of the output) and broadcast batch dims or grouped-query heads cost no copies. The output is flat too:
problem n's (L, Ev) block at out[oo[n]:], row stride ldo (mpnn.core.attention lays it out as torch does, heads
inside rows). Gradient slabs are C-contiguous: dq[qi[n]], dk[ki[n]], dv[vi[n]] (backward adds the gradients of
shared slabs into them). The mask slab of problem n is mi[n]. The mask is
mode 0 (none), 1 (bool bmask (Nm, Lm, S), True = take part) or 2 (additive amask (Nm, Lm, S)), with Lm 1
(one row for every query) or L. Causal is top-left aligned (query i sees keys j <= i), as torch's.

Forward, per block of `br` queries: for each block of `bc` keys, the scores, the block's row max, the
rescale of the running sum l and output O (online softmax), then O += P V_b; it keeps O and
lse = m + log(l) per query. Backward, per block of `bk` keys and chunk of `bq` queries, recomputes
P = exp(s - lse) and with D_i = rowsum(dO * O)_i accumulates dV += P^T dO, dK += dS^T Q, dQ += dS K,
dS = P * (dO V^T - D) * scale. No L x S matrix outlives a block; the work buffers come from the caller, so
that nothing is allocated in here. Queries no key may attend (all masked) give O = 0, lse = -inf and zero
gradients. Everything runs on one thread (no prange): a worker is one process per core.

Blocks are held transposed, st = K_b Q_b^T (keys x queries), so that
- every GEMM is NN or TN (Q^T and dO^T are transposed once per head, ~0.3 ns per element): OpenBLAS ran the
  NT products (Q K^T, dO V^T on row-major inputs) 1.5-2.5x slower at 32-64 rows (64x32x64: NT 3.2 us, NN
  1.9, TN 1.7), and
- the softmax passes run along the queries: the running max, sum and shift are vectors over the block's
  queries, updated one key row at a time, so no loop has a horizontal reduction or a per-query setup.
Loops index flat arrays with uint64 offsets: a view per row costs a refcount pair (~50 ns here, more than a
short row's work), and a signed index that Numba cannot prove non-negative brings a wraparound check that
keeps the loop scalar.

GEMMs go straight to BLAS through numba_xxgemm, the C helper behind Numba's own np.dot (SciPy's cython_blas;
SciPy comes with mnist1d, a dependency): that gives alpha and beta (scale folded into the product; dQ, dK,
dV and O accumulated in place, no temporaries and add loops: those cost 2.5 of 33 ms on the benchmark's
backward) and row strides (blocks of Q^T and dO^T used where they lie). OpenBLAS runs products up to
M*N*K ~ 512K through its small-matrix kernels at 125-155 GFLOP/s here against 85-100 for larger ones
(float32, one thread), which is what the block sizes in mpnn.core.attention aim at.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic, overload

_FM = {"nnan", "nsz", "reassoc", "contract"}  # no NaN scores; sums may be reordered (vectorized)
_NEG_INF = np.float32(-np.inf)  # float32, so that it keeps float32 loops float32 (and widens exactly)
_N, _T = ord("n"), ord("t")

# exp for float32 as a polynomial LLVM can vectorize (Numba has no vector exp without Intel's SVML, absent
# here; a scalar expf call per element kept every loop scalar). Cephes' expf: x = n*ln2 + r with |r| <=
# ln2/2, exp(r) by a degree-7 polynomial, 2^n put into the exponent bits. Max relative error 0.7 eps
# (float32) against float64 exp over [-87.3, 88] (tests/test_attention.py); NumPy's float32 exp: 1.7 eps.
# Below -87.3 (and -inf) it returns exactly 0, so masked scores never make denormals (a microcode assist
# per op on x86).
_F32_LOG2E = np.float32(1.44269504088896341)
_F32_C1 = np.float32(0.693359375)
_F32_C2 = np.float32(-2.12194440e-4)
_F32_P0 = np.float32(1.9875691500e-4)
_F32_P1 = np.float32(1.3981999507e-3)
_F32_P2 = np.float32(8.3334519073e-3)
_F32_P3 = np.float32(4.1665795894e-2)
_F32_P4 = np.float32(1.6666665459e-1)
_F32_P5 = np.float32(5.0000001201e-1)
_F32_ONE = np.float32(1.0)
_F32_HALF = np.float32(0.5)
_F32_LO = np.float32(-87.3)
_F32_HI = np.float32(88.0)
_F32_ZERO = np.float32(0.0)


@intrinsic
def _pow2(typingctx, n):
    """2**n for an integral float32 n in [-126, 127] (float64: [-1022, 1023]), put straight into the exponent
    bits. An intrinsic so that the integer steps stay 32-bit: in Numba code int32 arithmetic widens to int64,
    and the int64 conversions it left in the loop made the exp 0.52 instead of 0.36 ns per element."""
    if n not in (types.float32, types.float64):
        return None
    bits, bias = (32, 127) if n == types.float32 else (64, 1023)
    mant = 23 if bits == 32 else 52

    def codegen(context, builder, signature, args):
        ity = ir.IntType(bits)
        i = builder.fptosi(args[0], ity)
        i = builder.shl(builder.add(i, ir.Constant(ity, bias)), ir.Constant(ity, mant))
        return builder.bitcast(i, context.get_value_type(signature.return_type))

    return n(n), codegen


def _llvm_binary(name):
    """An intrinsic calling LLVM's llvm.<name> on two floats (float32, or float64 if either is)."""

    @intrinsic
    def fn(typingctx, a, b):
        if a not in (types.float32, types.float64) or b not in (types.float32, types.float64):
            return None
        t = types.float64 if types.float64 in (a, b) else types.float32

        def codegen(context, builder, signature, args):
            ty = context.get_value_type(signature.return_type)
            suffix = "f32" if signature.return_type == types.float32 else "f64"
            decl = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ty, [ty, ty]), f"llvm.{name}.{suffix}"
            )
            return builder.call(decl, args)

        return t(t, t), codegen

    return fn


# max/min as llvm.maxnum/minnum (NaN-ignoring; scores are never NaN). A reduction written with them vectorizes
# (0.06 ns per element); with Python's max(mx, x), np.fmax, np.maximum or `x if x > mx else mx` it stayed
# scalar (1.0 ns), nnan or not, and the equivalent -min(-mx, -x) vectorized only for some operand shapes.
_fmax = _llvm_binary("maxnum")
_fmin = _llvm_binary("minnum")
_fmaximum = _llvm_binary("maximum")  # NaN-propagating max


@njit(cache=True, fastmath={"nnan", "nsz", "contract"})
def exp_f32(x):
    """exp of a float32 (see above): vectorizes; 0 below -87.3; arguments above 88 count as 88 (attention only
    takes exp of x <= 0)."""
    xc = _fmin(_fmax(x, _F32_LO), _F32_HI)
    n = np.floor(xc * _F32_LOG2E + _F32_HALF)
    r = xc - n * _F32_C1 - n * _F32_C2
    p = _F32_P0
    p = p * r + _F32_P1
    p = p * r + _F32_P2
    p = p * r + _F32_P3
    p = p * r + _F32_P4
    p = p * r + _F32_P5
    p = p * r * r + r + _F32_ONE
    e = p * _pow2(n)
    return _F32_ZERO if x < _F32_LO else e


@njit(cache=True, fastmath={"nnan", "nsz", "contract"})
def exp_f32_array(x, out):
    """out[i] = exp_f32(x[i]) (for the accuracy test)."""
    for i in range(x.shape[0]):
        out[i] = exp_f32(x[i])


@intrinsic
def _address(typingctx, addr):
    """An integer address as a void pointer (for BLAS)."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))

    return types.voidptr(addr), codegen


# int numba_xxgemm(kind, transa, transb, m, n, k, *alpha, *a, lda, *b, ldb, *beta, *c, ldc): column-major
# ?gemm of Numba's helper library (numba/_lapack.c), exported to jitted code; np.dot calls it the same way.
_XXGEMM = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(
        types.char,
        types.char,
        types.char,
        types.intp,
        types.intp,
        types.intp,
        types.voidptr,
        types.voidptr,
        types.intp,
        types.voidptr,
        types.intp,
        types.voidptr,
        types.voidptr,
        types.intp,
    ),
)


@njit(cache=True)
def gemm(ta, tb, m, n, k, alpha, a, ao, lda, b, bo, ldb, beta, c, co, ldc, ab):
    """Row-major c[co:] (m x n, row stride ldc) = alpha * op(a) @ op(b) + beta * c, where op(a) (m x k) is
    a[ao:] with row stride lda, transposed if ta is _T (then a holds k x m), likewise b. a, b, c: flat arrays
    of one float dtype; ab: 2 of them (alpha and beta are passed by address)."""
    if m == 0 or n == 0:
        return
    ab[0] = alpha
    ab[1] = beta
    sz = c.itemsize
    base = ab.ctypes.data
    # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same flags, operands swapped
    _XXGEMM(
        115 if sz == 4 else 100,
        tb,
        ta,
        n,
        m,
        k,
        _address(base),
        _address(b.ctypes.data + bo * sz),
        max(ldb, 1),
        _address(a.ctypes.data + ao * sz),
        max(lda, 1),
        _address(base + sz),
        _address(c.ctypes.data + co * sz),
        max(ldc, 1),
    )


@njit(cache=True, fastmath=_FM)
def transpose(src, off, stride, nrows, ncols, dst):
    """dst[c * nrows + r] = src[off + r * stride + c] (r < nrows, c < ncols): a block of a row-major array
    (row length `stride`) transposed into dst. 16x16 tiles: 0.3 ns per element on a 512 x 64 float32 head,
    a plain column-by-column loop 1.1 (its strided reads miss)."""
    r16 = nrows - nrows % 16
    c16 = ncols - ncols % 16
    for r0 in range(0, r16, 16):
        for c0 in range(0, c16, 16):
            for c in range(c0, c0 + 16):
                s = off + r0 * stride + c
                d = c * nrows + r0
                for u in range(16):
                    dst[uint64(d + u)] = src[uint64(s + u * stride)]
        for c in range(c16, ncols):
            for r in range(r0, r0 + 16):
                dst[uint64(c * nrows + r)] = src[uint64(off + r * stride + c)]
    for c in range(ncols):
        for r in range(r16, nrows):
            dst[uint64(c * nrows + r)] = src[uint64(off + r * stride + c)]


def _exp(x):
    """exp: exp_f32 for float32 (vectorizes), libm's for float64 (gradient checks); chosen when compiling."""
    return math.exp(x)


@overload(_exp, jit_options={"fastmath": {"nnan", "nsz", "contract"}})
def _exp_impl(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: math.exp(x)


# The block passes. st (w key rows x rr queries, flat) holds scale * scores. Key row c is key j = j0 + c;
# query r is i = i0 + r. What takes part, per key row:
#   causal: queries r >= rs = j - i0. A row with 0 < rs < rr adds edge[emax - rs + r] (edge: emax times
#       -inf, then emax zeros), so that every loop runs over whole rows: loops that started at rs ran their
#       vector remainders scalar (rows are 32-64 long) and cost up to 3 cycles per element; a row with
#       rs = rr (no query sees the key) is skipped, its P set to 0;
#   mode 1/2 with Lm = 1: one mask value per key, bf/af[mo + c] (mo: the flat offset of the mask row at
#       key j0); a False key row counts as -inf, its P is 0;
#   mode 1/2 with Lm = L: the mask's (rr, w) block transposed into tb / ta (w x rr, like st).
# Indices are uint64 throughout: mx[r] with a signed r that Numba could not prove non-negative kept the max
# pass scalar (7.4 against 1.6 Mcycles on the benchmark's forward).
@njit(cache=True, fastmath={"nsz", "contract"})
def block_max(st, w, rr, mode, lm, causal, edge, bf, af, mo, tb, ta, i0, j0, mx):
    """mx[r] = max(mx[r], max over the block's key rows of x[c, r]) (x: st plus mask; -inf for none); returns
    how many queries' maxima are NaN or +inf, i.e. met a NaN or +inf score. The max is llvm.maximum, which
    propagates NaN, and this function has no nnan: the caller recomputes such queries the slow way, which
    propagates them as torch does (this kernel's exp would have turned them into some finite weight)."""
    emax = edge.shape[0] // 2
    for c in range(w):
        b = c * rr
        rs = min(max(j0 + c - i0, 0), rr) if causal else 0
        if rs == rr:  # causal: no query of the block sees this key
            continue
        if rs > 0:
            eo = emax - rs
            for r in range(rr):
                mx[uint64(r)] = _fmaximum(mx[uint64(r)], st[uint64(b + r)] + edge[uint64(eo + r)])
        elif mode == 0:
            for r in range(rr):
                mx[uint64(r)] = _fmaximum(mx[uint64(r)], st[uint64(b + r)])
        elif lm == 1:
            val = af[uint64(mo + c)] if mode == 2 else _F32_ZERO
            if mode == 1 and not bf[uint64(mo + c)]:
                val = _NEG_INF
            for r in range(rr):
                mx[uint64(r)] = _fmaximum(mx[uint64(r)], st[uint64(b + r)] + val)
        elif mode == 1:
            for r in range(rr):
                x = st[uint64(b + r)]
                mx[uint64(r)] = _fmaximum(mx[uint64(r)], x if tb[uint64(b + r)] else _NEG_INF)
        else:
            for r in range(rr):
                mx[uint64(r)] = _fmaximum(mx[uint64(r)], st[uint64(b + r)] + ta[uint64(b + r)])
    bad = 0
    for r in range(rr):
        if not mx[r] < np.inf:
            bad += 1
    return bad


@njit(cache=True, fastmath=_FM)
def block_exp(st, w, rr, mode, lm, causal, edge, bf, af, mo, tb, ta, i0, j0, shift, vo, acc, ao):
    """st[c, r] = exp(x[c, r] - shift[vo + r]) in place (0 where nothing takes part), acc[ao + r] += it.

    The exp runs unconditionally in each loop (x = -inf gives 0): an exp under an `if`, or a select on the
    column index, kept the loop scalar or 3x slower (measured)."""
    emax = edge.shape[0] // 2
    for c in range(w):
        b = c * rr
        rs = min(max(j0 + c - i0, 0), rr) if causal else 0
        if rs == rr or (mode == 1 and lm == 1 and not bf[uint64(mo + c)]):  # nothing takes part
            for r in range(rr):
                st[uint64(b + r)] = 0.0
        elif rs > 0:
            eo = emax - rs
            for r in range(rr):
                p = _exp(st[uint64(b + r)] + edge[uint64(eo + r)] - shift[uint64(vo + r)])
                st[uint64(b + r)] = p
                acc[uint64(ao + r)] += p
        elif mode == 0 or lm == 1:
            val = af[uint64(mo + c)] if mode == 2 else _F32_ZERO  # a float64 0.0 would make it all float64
            for r in range(rr):
                p = _exp(st[uint64(b + r)] + (val - shift[uint64(vo + r)]))
                st[uint64(b + r)] = p
                acc[uint64(ao + r)] += p
        elif mode == 1:
            for r in range(rr):
                x = st[uint64(b + r)] - shift[uint64(vo + r)]
                p = _exp(x if tb[uint64(b + r)] else _NEG_INF)
                st[uint64(b + r)] = p
                acc[uint64(ao + r)] += p
        else:
            for r in range(rr):
                p = _exp(st[uint64(b + r)] + ta[uint64(b + r)] - shift[uint64(vo + r)])
                st[uint64(b + r)] = p
                acc[uint64(ao + r)] += p


@njit(cache=True, fastmath=_FM)
def _mask_block(mode, lm, bf, af, mslab, s_, i0, rows, j0, w, tb, ta):
    """A mask with a row per query (Lm = L): its block [i0, i0 + rows) x [j0, j0 + w), transposed."""
    if lm > 1:
        off = (mslab + i0) * s_ + j0
        if mode == 1:
            transpose(bf, off, s_, rows, w, tb)
        elif mode == 2:
            transpose(af, off, s_, rows, w, ta)


@njit(cache=True, fastmath=_FM)
def attention_forward(
    qf,
    qo_,
    ldq,
    kf,
    ko_,
    ldk,
    vf,
    vo_,
    ldv,
    s_,
    e_,
    oo_,
    ldo,
    ev,
    mode,
    bmask,
    amask,
    mi,
    causal,
    edge,
    scale,
    br,
    bc,
    qt,
    sbuf,
    tb,
    ta,
    m,
    mnew,
    lsum,
    alpha,
    ab,
    out,
    lse,
):
    """out (problem n at out[oo_[n]:], row stride ldo) = softmax(q k^T * scale + mask) v and lse[n] = its per-query
    log-sum-exp, n < lse.shape[0];
    returns the number of scores that were NaN or infinite (then out is not to be trusted: see block_max).

    edge: 2*emax (emax >= br) entries, emax times -inf then emax zeros (see block_max). Work buffers: qt
    (E*L), sbuf (bc*br), tb (bool) and ta (bc*br with a per-query mask, else any), m,
    mnew, lsum and alpha (br), ab (2), all but tb of q's dtype. Each output block accumulates its P V in place.
    """
    n_, l_ = lse.shape
    lm = bmask.shape[1] if mode == 1 else amask.shape[1]
    bf, af = bmask.reshape(-1), amask.reshape(-1)
    of = out
    bad = 0
    for n in range(n_):
        ko = ko_[n]
        vo = vo_[n]
        mslab = mi[n] * lm
        transpose(qf, qo_[n], ldq, l_, e_, qt)  # Q^T (E x L)
        for i0 in range(0, l_, br):
            i1 = min(i0 + br, l_)
            rows = i1 - i0
            oo = oo_[n] + i0 * ldo  # the output block (rows x Ev, row stride ldo)
            kend = min(s_, i1) if causal else s_  # causal: query i sees keys j <= i; later blocks skipped
            for r in range(rows):
                m[r] = _NEG_INF
                lsum[r] = 0.0
            if kend == 0:
                for r in range(rows):
                    for c in range(ev):
                        of[uint64(oo + r * ldo + c)] = 0.0
            for j0 in range(0, kend, bc):
                w = min(j0 + bc, kend) - j0
                # st = scale * K_b Q_b^T (w x rows)
                gemm(_N, _N, w, rows, e_, scale, kf, ko + j0 * ldk, ldk, qt, i0, l_, 0.0, sbuf, 0, rows, ab)
                _mask_block(mode, lm, bf, af, mslab, s_, i0, rows, j0, w, tb, ta)
                mo = mslab * s_ + j0
                for r in range(rows):
                    mnew[r] = m[r]
                bad += block_max(sbuf, w, rows, mode, lm, causal, edge, bf, af, mo, tb, ta, i0, j0, mnew)
                for r in range(rows):
                    # alpha: how much the old sum and output shrink against the new max; a query that no key
                    # took part in so far keeps max -inf and takes shift 0 (its alpha and P are 0)
                    shift = mnew[r] if mnew[r] != _NEG_INF else _F32_ZERO
                    alpha[r] = _exp(m[r] - shift)
                    lsum[r] *= alpha[r]
                    mnew[r] = shift
                block_exp(sbuf, w, rows, mode, lm, causal, edge, bf, af, mo, tb, ta, i0, j0, mnew, 0, lsum, 0)
                for r in range(rows):
                    m[r] = mnew[r] if lsum[r] > 0.0 else _NEG_INF
                if j0 > 0:
                    for r in range(rows):
                        a = alpha[r]
                        for c in range(ev):
                            of[uint64(oo + r * ldo + c)] *= a
                # O_b (+)= P V_b, P = st^T (rows x w)
                gemm(
                    _T,
                    _N,
                    rows,
                    ev,
                    w,
                    1.0,
                    sbuf,
                    0,
                    rows,
                    vf,
                    vo + j0 * ldv,
                    ldv,
                    1.0 if j0 > 0 else 0.0,
                    of,
                    oo,
                    ldo,
                    ab,
                )
            for r in range(rows):
                lr = lsum[r]
                inv = 1.0 / lr if lr > 0.0 else 0.0
                for c in range(ev):
                    of[uint64(oo + r * ldo + c)] *= inv
                lse[n, i0 + r] = m[r] + math.log(lr) if lr > 0.0 else _NEG_INF
    return bad


@njit(cache=True, fastmath=_FM)
def attention_backward(
    qf,
    qo_,
    ldq,
    kf,
    ko_,
    ldk,
    vf,
    vo_,
    ldv,
    dof,
    doo_,
    lddo,
    of,
    oo_,
    ldo,
    ev,
    lse,
    s_,
    e_,
    qi,
    ki,
    vi,
    mode,
    bmask,
    amask,
    mi,
    causal,
    edge,
    scale,
    bk,
    bq,
    fresh,
    qt,
    dot,
    dsc,
    shift,
    pbuf,
    dpbuf,
    tb,
    ta,
    acc,
    ab,
    dq,
    dk,
    dv,
):
    """dq, dk, dv (+)= the gradients of sum(out * do), recomputing P from lse block by block.

    Per block of bk keys, per chunk of bq queries (from the block's first key on when causal). fresh: every
    slab of dq, dk, dv belongs to one problem n, so the first product into it overwrites (the caller need
    not zero them); else they accumulate into zeros. edge as in attention_forward (emax >= bq). Work buffers:
    qt (E*L), dot (Ev*L), dsc and shift (L), pbuf and dpbuf (bk*bq), tb and ta (bk*bq with a per-query mask,
    else any), acc (bq), ab (2).
    """
    n_, l_ = lse.shape
    lm = bmask.shape[1] if mode == 1 else amask.shape[1]
    bf, af = bmask.reshape(-1), amask.reshape(-1)
    dqf, dkf, dvf = dq.reshape(-1), dk.reshape(-1), dv.reshape(-1)
    for n in range(n_):
        qo, ko, vo, doo, oo = qo_[n], ko_[n], vo_[n], doo_[n], oo_[n]  # inputs and output: offsets, row strides ld*
        dqo, dko, dvo = qi[n] * l_ * e_, ki[n] * s_ * e_, vi[n] * s_ * ev  # gradient slabs: contiguous
        mslab = mi[n] * lm
        transpose(qf, qo, ldq, l_, e_, qt)  # Q^T (E x L)
        transpose(dof, doo, lddo, l_, ev, dot)  # dO^T (Ev x L)
        for i in range(l_):
            t = _F32_ZERO
            for c in range(ev):
                t += of[uint64(oo + i * ldo + c)] * dof[uint64(doo + i * lddo + c)]
            dsc[i] = t * scale  # D_i * scale
            # P = exp(x - lse); a query no key may attend has lse -inf: shift +inf makes its P 0
            shift[i] = lse[n, i] if lse[n, i] != _NEG_INF else np.inf
        for j0 in range(0, s_, bk):
            w = min(j0 + bk, s_) - j0
            qs = min(j0, l_) if causal else 0  # causal: queries before key j0 see none of these keys
            if fresh and qs == l_:  # keys no query sees: zero gradient
                for t in range(w * e_):
                    dkf[uint64(dko + j0 * e_ + t)] = 0.0
                for t in range(w * ev):
                    dvf[uint64(dvo + j0 * ev + t)] = 0.0
            for a in range(qs, l_, bq):
                rr = min(a + bq, l_) - a
                first_kv = 0.0 if fresh and a == qs else 1.0  # beta: overwrite a fresh slab's first product
                first_q = 0.0 if fresh and j0 == 0 else 1.0
                # P^T = exp(scale * K_b Q_a^T + mask - lse) (w x rr)
                gemm(_N, _N, w, rr, e_, scale, kf, ko + j0 * ldk, ldk, qt, a, l_, 0.0, pbuf, 0, rr, ab)
                _mask_block(mode, lm, bf, af, mslab, s_, a, rr, j0, w, tb, ta)
                block_exp(pbuf, w, rr, mode, lm, causal, edge, bf, af, mslab * s_ + j0, tb, ta, a, j0, shift, a, acc, 0)
                # dV_b += P^T dO_a
                gemm(
                    _N, _N, w, ev, rr, 1.0, pbuf, 0, rr, dof, doo + a * lddo, lddo, first_kv, dvf, dvo + j0 * ev, ev, ab
                )
                # dS^T * scale = P^T * (scale * V_b dO_a^T - scale * D), into dpbuf
                gemm(_N, _N, w, rr, ev, scale, vf, vo + j0 * ldv, ldv, dot, a, l_, 0.0, dpbuf, 0, rr, ab)
                for c in range(w):
                    b = c * rr
                    for r in range(rr):
                        dpbuf[uint64(b + r)] = pbuf[uint64(b + r)] * (dpbuf[uint64(b + r)] - dsc[uint64(a + r)])
                # dK_b += dS^T Q_a; dQ_a += dS K_b
                gemm(_N, _N, w, e_, rr, 1.0, dpbuf, 0, rr, qf, qo + a * ldq, ldq, first_kv, dkf, dko + j0 * e_, e_, ab)
                gemm(_T, _N, rr, e_, w, 1.0, dpbuf, 0, rr, kf, ko + j0 * ldk, ldk, first_q, dqf, dqo + a * e_, e_, ab)
