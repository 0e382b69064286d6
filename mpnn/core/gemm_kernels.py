"""A float32 GEMM for the shapes of a small transformer's Linear layers, in Numba with an explicit AVX-512-width
register tile: C = A @ B with A and B read through any non-negative strides (a transposed weight or gradient needs
no copy), C C-contiguous.

Why (measured, one thread, this machine, float32, thread CPU time): at nanoGPT's CPU-recipe shapes (768 rows,
K = 128, N = 128..512) NumPy's OpenBLAS 0.3.31 (SkylakeX kernels; OPENBLAS_CORETYPE=SapphireRapids, Cooperlake or
Haswell no faster) ran 122-130 GFLOP/s against 137-153 for torch's MKL; every other route (scipy's sgemm,
Numba's np.dot, BLIS) was the same OpenBLAS or slower. This kernel ran them at 135-146 GFLOP/s (qkv (768,128)
@ (128,384): 521 against OpenBLAS's 595 us).

How (GotoBLAS's loop order, without packing A): for each block of KC rows of B and each panel of NR = 32 of its
columns, the panel is packed contiguous (KC x 32, in L1), and a micro-kernel runs every 12-row strip of A
against it: 24 vector accumulators (12 rows x two 16-float vectors) in registers, one broadcast of A[i, k] and
two fused multiply-adds per row per k. The micro-kernel is written in LLVM IR (an intrinsic) because Numba's
auto-vectorizer neither keeps such a tile in registers nor uses 512-bit vectors. Strips of 8, 4, 2 and 1 rows
finish M; a last panel narrower than 32 goes through a scratch tile. LLVM lowers the <16 x float> operations
to whatever vector width the CPU has (two AVX2 registers per vector without AVX-512).

Not on AMD Zen (linalg._own_gemm_default): on a Zen 4 (32 KB L1D, 512-bit operations split in two halves)
OpenBLAS's SkylakeX kernels ran the GPT's products at 96-100 GFLOP/s against this kernel's 77-94 alone, and this
kernel's time varied 1.3-2.8 ms from one process to the next on the MLP up product ((768,128)@(128,512);
OpenBLAS a steady 1.0 ms), so linear takes OpenBLAS there.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic

NR = 32  # columns of B per packed panel: two 16-float vectors
KC = 256  # rows of B per packed block: a 256 x 32 float32 panel is 32 KB, within L1 (48 KB here)

_F32 = ir.FloatType()
_V16 = ir.VectorType(_F32, 16)
_I64 = ir.IntType(64)
_SPLAT = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)


def _micro_kernel(mr, accum):
    """An intrinsic micro(a, sar, sak, b, c, ldc, kc): for r < mr, the 32 floats at c + r*ldc become
    (accum ? them : 0) + sum over k < kc of a[r*sar + k*sak] * b[k*32 : k*32 + 32]. ``accum`` is fixed when the
    kernel is made: a select between loaded C and zeros still loaded C, and reading a cold output cost ~7%."""

    @intrinsic
    def micro(typingctx, a, sar, sak, b, c, ldc, kc):
        f32p = types.CPointer(types.float32)
        sig = types.void(f32p, types.int64, types.int64, f32p, f32p, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            a, sar, sak, b, c, ldc, kc = args
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.fma.v16f32"
            )
            fn = builder.function
            init_bb, loop_bb, done_bb = (fn.append_basic_block(n) for n in ("gemm_init", "gemm_loop", "gemm_done"))
            cptrs = []
            for r in range(mr):
                row = builder.mul(ir.Constant(_I64, r), ldc)
                for v in range(2):
                    p = builder.gep(c, [builder.add(row, ir.Constant(_I64, 16 * v))])
                    cptrs.append(builder.bitcast(p, _V16.as_pointer()))
            builder.branch(init_bb)
            builder.position_at_end(init_bb)
            zero = ir.Constant(_V16, [0.0] * 16)
            start = [builder.load(p, align=4) if accum else zero for p in cptrs]
            builder.cbranch(builder.icmp_signed(">", kc, ir.Constant(_I64, 0)), loop_bb, done_bb)

            builder.position_at_end(loop_bb)
            k = builder.phi(_I64)
            k.add_incoming(ir.Constant(_I64, 0), init_bb)
            accs = []
            for s in start:
                ph = builder.phi(_V16)
                ph.add_incoming(s, init_bb)
                accs.append(ph)
            boff = builder.mul(k, ir.Constant(_I64, NR))
            bv = [
                builder.load(
                    builder.bitcast(builder.gep(b, [builder.add(boff, ir.Constant(_I64, 16 * v))]), _V16.as_pointer()),
                    align=4,
                )
                for v in range(2)
            ]
            ak = builder.mul(k, sak)
            new = []
            for r in range(mr):
                s = builder.load(builder.gep(a, [builder.add(ak, builder.mul(ir.Constant(_I64, r), sar))]))
                sv = builder.insert_element(ir.Constant(_V16, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
                sv = builder.shuffle_vector(sv, ir.Constant(_V16, ir.Undefined), _SPLAT)
                for v in range(2):
                    new.append(builder.call(fma, [sv, bv[v], accs[2 * r + v]]))
            k1 = builder.add(k, ir.Constant(_I64, 1))
            k.add_incoming(k1, loop_bb)
            for ph, nw in zip(accs, new):
                ph.add_incoming(nw, loop_bb)
            builder.cbranch(builder.icmp_signed("<", k1, kc), loop_bb, done_bb)

            builder.position_at_end(done_bb)
            final = []
            for s, nw in zip(start, new):
                ph = builder.phi(_V16)
                ph.add_incoming(s, init_bb)
                ph.add_incoming(nw, loop_bb)
                final.append(ph)
            for val, p in zip(final, cptrs):
                builder.store(val, p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro


_SET = tuple(_micro_kernel(m, False) for m in (12, 8, 4, 2, 1))  # C = A B
_ADD = tuple(_micro_kernel(m, True) for m in (12, 8, 4, 2, 1))  # C += A B (later blocks of k)
_set12, _set8, _set4, _set2, _set1 = _SET
_add12, _add8, _add4, _add2, _add1 = _ADD


@intrinsic
def _ptr(typingctx, arr, off):
    """The address of flat array element ``off`` (a pointer for the micro-kernels)."""
    if not isinstance(arr, types.Array) or arr.dtype != types.float32:
        return None
    sig = types.CPointer(types.float32)(arr, types.int64)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.gep(ary.data, [args[1]])

    return sig, codegen


@njit(cache=True)
def _strips_set(af, ao, sar, sak, bp, cf, co, ldc, m, kc):
    """C = A @ panel for every row of A (m rows from af[ao], strides sar, sak) against the packed panel bp, into
    cf[co:] (row stride ldc): strips of 12 rows, then 8, 4, 2, 1."""
    i = 0
    pb = _ptr(bp, 0)
    if sak == 1:  # A row-major (the forward and the input gradient): unit steps along k, a constant to LLVM
        while m - i >= 12:
            _set12(_ptr(af, ao + i * sar), sar, 1, pb, _ptr(cf, co + i * ldc), ldc, kc)
            i += 12
    while m - i >= 12:
        _set12(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 12
    if m - i >= 8:
        _set8(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 8
    if m - i >= 4:
        _set4(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 4
    if m - i >= 2:
        _set2(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 2
    if m - i >= 1:
        _set1(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)


@njit(cache=True)
def _strips_add(af, ao, sar, sak, bp, cf, co, ldc, m, kc):
    """_strips_set's C += A @ panel (the second and later blocks of k)."""
    i = 0
    pb = _ptr(bp, 0)
    while m - i >= 12:
        _add12(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 12
    if m - i >= 8:
        _add8(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 8
    if m - i >= 4:
        _add4(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 4
    if m - i >= 2:
        _add2(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 2
    if m - i >= 1:
        _add1(_ptr(af, ao + i * sar), sar, sak, pb, _ptr(cf, co + i * ldc), ldc, kc)


@njit(cache=True)
def _strips(af, ao, sar, sak, bp, cf, co, ldc, m, kc, accum):
    if accum:
        _strips_add(af, ao, sar, sak, bp, cf, co, ldc, m, kc)
    else:
        _strips_set(af, ao, sar, sak, bp, cf, co, ldc, m, kc)


@njit(cache=True)
def _packed_set(ap, kc, bp, cf, co, ldc, m):
    """_strips_set for an A packed by _pack_a: strip s0 (rows s0..s0+11) at ap[s0*kc:], 12 floats per k."""
    pb = _ptr(bp, 0)
    full = m - m % 12
    for s0 in range(0, full, 12):
        _set12(_ptr(ap, s0 * kc), 1, 12, pb, _ptr(cf, co + s0 * ldc), ldc, kc)
    i = full
    if m - i >= 8:
        _set8(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 8
    if m - i >= 4:
        _set4(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 4
    if m - i >= 2:
        _set2(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 2
    if m - i >= 1:
        _set1(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)


@njit(cache=True)
def _packed_add(ap, kc, bp, cf, co, ldc, m):
    """_packed_set's C += A @ panel."""
    pb = _ptr(bp, 0)
    full = m - m % 12
    for s0 in range(0, full, 12):
        _add12(_ptr(ap, s0 * kc), 1, 12, pb, _ptr(cf, co + s0 * ldc), ldc, kc)
    i = full
    if m - i >= 8:
        _add8(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 8
    if m - i >= 4:
        _add4(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 4
    if m - i >= 2:
        _add2(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)
        i += 2
    if m - i >= 1:
        _add1(_ptr(ap, full * kc + i - full), 1, 12, pb, _ptr(cf, co + i * ldc), ldc, kc)


@njit(cache=True)
def _pack_a(af, ao, sar, sak, m, kc, ap):
    """A's block (m x kc from af[ao]) into strips of 12 rows, k-major within a strip: ap[s0*kc + l*12 + r] =
    A[s0 + r, l]. For an A read down its columns (the weight gradient's g.T: each k another cache line), so that
    the micro-kernel streams 48 contiguous bytes per k instead of touching kc lines per strip."""
    for s0 in range(0, m, 12):
        rr = min(12, m - s0)
        for r2 in range(kc):
            src = ao + s0 * sar + r2 * sak
            dst = s0 * kc + r2 * 12
            for r in range(rr):
                ap[uint64(dst + r)] = af[uint64(src + r * sar)]


@njit(cache=True)
def sgemm(af, ao, sar, sak, bf, bo, sbk, sbj, m, n, k, cf, bp, ct, kcb, ap):
    """cf (m x n, C-contiguous, flat) = A @ B. A is m x k at af[ao + i*sar + l*sak], B is k x n at
    bf[bo + l*sbk + j*sbj] (element strides, non-negative). Work buffers: bp (kcb * NR), ct (m * NR), and ap
    (12 * ceil(m / 12) * kcb) when A is packed (sak != 1), else any."""
    pack = sak != 1
    for k0 in range(0, k, kcb):
        kc = min(kcb, k - k0)
        accum = k0 > 0
        if pack:
            _pack_a(af, ao + k0 * sak, sar, sak, m, kc, ap)
        for j0 in range(0, n, NR):
            w = min(NR, n - j0)
            base = bo + k0 * sbk + j0 * sbj
            # indices as uint64: a signed index brings a wraparound check per element that keeps the loops scalar
            if sbj == 1:  # rows of the panel lie contiguous in B
                for r in range(kc):
                    src = base + r * sbk
                    dst = r * NR
                    for c in range(w):
                        bp[uint64(dst + c)] = bf[uint64(src + c)]
                    for c in range(w, NR):
                        bp[uint64(dst + c)] = 0.0
            else:  # B is a transposed view: gather column by column (its rows in memory)
                for c in range(w):
                    src = base + c * sbj
                    for r in range(kc):
                        bp[uint64(r * NR + c)] = bf[uint64(src + r * sbk)]
                for c in range(w, NR):
                    for r in range(kc):
                        bp[uint64(r * NR + c)] = 0.0
            if w == NR:
                if pack:
                    if accum:
                        _packed_add(ap, kc, bp, cf, j0, n, m)
                    else:
                        _packed_set(ap, kc, bp, cf, j0, n, m)
                else:
                    _strips(af, ao + k0 * sak, sar, sak, bp, cf, j0, n, m, kc, accum)
            else:  # a last, narrower panel: through the scratch tile
                if accum:
                    for i in range(m):
                        for c in range(w):
                            ct[i * NR + c] = cf[i * n + j0 + c]
                if pack:
                    if accum:
                        _packed_add(ap, kc, bp, ct, 0, NR, m)
                    else:
                        _packed_set(ap, kc, bp, ct, 0, NR, m)
                else:
                    _strips(af, ao + k0 * sak, sar, sak, bp, ct, 0, NR, m, kc, accum)
                for i in range(m):
                    for c in range(w):
                        cf[i * n + j0 + c] = ct[i * NR + c]
