"""Linear algebra: matmul with torch's broadcasting rules, linear (x @ W.T + b) as one node, and einsum."""

from __future__ import annotations

import math
import os
import string

import numpy as np

from mpnn.core import gemm_kernels
from mpnn.core.elementwise import _pair, unbroadcast
from mpnn.core.errors import OpError
from mpnn.core.tensor_base import as_tensor, make_result


def _own_gemm_default(features=None, cpu_name=None, setting=None):
    """Whether float32 products in the own kernel's range go through it (mpnn.core.gemm_kernels) rather than
    OpenBLAS: on AVX-512 hosts other than AMD's Zen. ``MPNN_GEMM=own|blas`` decides instead when set.

    Measured, one thread, thread CPU time, the GPT step (benchmarks/gpt.py's model, interleaved in one process):
    on Intel hosts with AVX-512 the own kernel ran the K=128 products at 135-146 GFLOP/s against OpenBLAS's
    SkylakeX kernels' 122-130; on an AMD EPYC Zen 4 (znver4: 512-bit operations split in two 256-bit halves)
    OpenBLAS ran them at 96-100 GFLOP/s against 77-94 in isolation, and inside the step the own kernel took
    twice its isolated time (MLP up (768,128)@(128,512): 2.27 ms against 1.11 ms through OpenBLAS): the step
    was 77.4 ms own against 56.4 ms OpenBLAS (torch 62.6 ms). The conv forward tiles lost there too
    ((128,577)@(577,768): 1.29 against 1.15 ms)."""
    if setting is None:
        setting = os.environ.get("MPNN_GEMM", "")
    if setting in ("own", "blas"):
        return setting == "own"
    if setting.strip():
        raise ValueError(f"MPNN_GEMM={setting!r}: must be 'own' (mpnn's GEMM kernel) or 'blas' (OpenBLAS), or unset")
    try:
        if features is None or cpu_name is None:
            from llvmlite import binding

            features = binding.get_host_cpu_features() if features is None else features
            cpu_name = binding.get_host_cpu_name() if cpu_name is None else cpu_name
        return bool(features.get("avx512f")) and not str(cpu_name).startswith("znver")
    except Exception:  # no feature query: stay with BLAS
        return False


# The Numba GEMM (mpnn.core.gemm_kernels) takes float32 products in this range; OpenBLAS the rest. Its tile is
# sized for AVX-512's 32 vector registers (with AVX2 it would spill), and it was measured against OpenBLAS on
# K <= 1024 only.
_OWN_GEMM = _own_gemm_default()
_OWN_GEMM_MIN_FLOPS = 1 << 20  # below: call overheads dominate either way
_OWN_GEMM_MAX_K = 1024
_F32 = np.dtype(np.float32)


def _flat(a):
    """(flat array over a's memory, its row and column element strides) for a 2-D array, or None when a stride
    is negative or not a whole number of elements, or a is read-only (a second compiled specialization)."""
    if not (a.flags.writeable and a.flags.aligned):
        return None
    if a.flags.c_contiguous:  # the common cases first: a reshape is a fraction of as_strided's cost
        return a.reshape(-1), a.shape[1], 1
    if a.flags.f_contiguous:
        return a.T.reshape(-1), 1, a.shape[0]
    it = a.itemsize
    s0, s1 = a.strides
    if a.shape[0] <= 1:
        s0 = 0
    if a.shape[1] <= 1:
        s1 = 0
    if s0 < 0 or s1 < 0 or s0 % it or s1 % it:
        return None
    s0, s1 = s0 // it, s1 // it
    span = 1 + (a.shape[0] - 1) * s0 + (a.shape[1] - 1) * s1
    return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(it,)), s0, s1


def _work(work, slot, size):
    """A packing buffer of `size` float32: a fresh one, or from `work` (a dict a caller keeps between calls)."""
    if work is None:
        return np.empty(size, _F32)
    buf = work.get(slot)
    if buf is None or buf.size < size:
        buf = work[slot] = np.empty(size, _F32)
    return buf[:size]


def _mm(a, b, out=None, work=None):
    """a @ b for 2-D arrays (either may be a transposed or strided view): float32 products of a transformer's
    Linear sizes through mpnn's own GEMM, anything else through NumPy (OpenBLAS). ``out``: a C-contiguous (m, n)
    array to write into instead of a new one (mpnn.compile's replay; the same kernels, so the same bits).

    Measured side by side (benchmarks/gemm.py, one thread, thread CPU time), the GPT's shapes: qkv forward
    (768,128)@(128,384) 521 us here against 595 through np.matmul; the weight gradient's transposed operand
    (g.T @ x) is read in place, as BLAS's transpose flag does. ``work``: a dict kept by the caller that holds the
    GEMM's packing buffers from one call to the next (mpnn.compile's replay: no allocation per step)."""
    m, k = a.shape
    n = b.shape[1]
    if (
        _OWN_GEMM
        and m
        and n
        and k
        and a.dtype == _F32
        and b.dtype == _F32
        and 2 * m * n * k >= _OWN_GEMM_MIN_FLOPS
        and k <= _OWN_GEMM_MAX_K
    ):
        fa, fb = _flat(a), _flat(b)
        if fa is not None and fb is not None:
            if out is None:
                out = np.empty((m, n), _F32)
            gemm_kernels.sgemm(
                fa[0],
                0,
                fa[1],
                fa[2],
                fb[0],
                0,
                fb[1],
                fb[2],
                m,
                n,
                k,
                out.reshape(-1),
                _work(work, "b", gemm_kernels.KC * gemm_kernels.NR),
                _work(work, "c", m * gemm_kernels.NR),
                gemm_kernels.KC,
                # A read down its columns (g.T of the weight gradient) is packed into 12-row strips per block of k
                _work(work, "a", 12 * (-(-m // 12)) * gemm_kernels.KC if fa[2] != 1 else 1),
            )
            return out
    if out is not None:
        return np.matmul(a, b, out=out)
    return a @ b


def matmul(a, b):
    """Matrix product with torch.matmul's rules: 1-D operands promoted, batch dims broadcast."""
    a, b = _pair("matmul", a, b)
    ad, bd = a.data, b.data
    if ad.ndim == 0 or bd.ndim == 0:
        raise OpError("matmul", f"both operands need at least 1 dimension, got shapes {ad.shape} and {bd.shape}")
    if ad.dtype != bd.dtype:
        raise OpError(
            "matmul",
            f"operands have different dtypes {ad.dtype} and {bd.dtype} (shapes {ad.shape} "
            f"and {bd.shape}); cast one with .to(...) first",
        )
    try:
        out = ad @ bd
    except ValueError:
        raise OpError(
            "matmul",
            f"shapes {ad.shape} and {bd.shape} cannot be multiplied "
            f"({ad.shape[-1]} != {bd.shape[-2] if bd.ndim > 1 else bd.shape[0]})",
        ) from None

    def backward(g):
        if ad.ndim == 1 and bd.ndim == 1:
            return (g * bd if a.requires_grad else None, g * ad if b.requires_grad else None)
        a2 = ad[None, :] if ad.ndim == 1 else ad
        b2 = bd[:, None] if bd.ndim == 1 else bd
        g2 = g
        if ad.ndim == 1:
            g2 = np.expand_dims(g2, -2)
        if bd.ndim == 1:
            g2 = np.expand_dims(g2, -1)
        ga = gb = None
        if a.requires_grad:
            ga = g2 @ np.swapaxes(b2, -1, -2)
            ga = unbroadcast(ga, a2.shape).reshape(ad.shape)
        if b.requires_grad:
            gb = np.swapaxes(a2, -1, -2) @ g2
            gb = unbroadcast(gb, b2.shape).reshape(bd.shape)
        return ga, gb

    return make_result(out, (a, b), backward, "matmul", saved=(a, b))


def linear(x, weight, bias=None):
    """x @ weight.T + bias in one node (one GEMM forward, two backward), as torch.nn.functional.linear."""
    xd, wd = x.data, weight.data
    if xd.dtype != wd.dtype:
        raise OpError(
            "linear",
            f"input dtype {xd.dtype} does not match weight dtype {wd.dtype} "
            f"(input shape {xd.shape}, weight shape {wd.shape})",
        )
    if wd.ndim != 2 or xd.shape[-1:] != wd.shape[1:]:
        raise OpError(
            "linear",
            f"input of shape {xd.shape} does not match weight of shape {wd.shape} "
            f"(expects last dim {wd.shape[-1] if wd.ndim else '?'})",
        )
    # Leading dims folded into one GEMM: NumPy runs a 3-D @ 2-D product as one GEMM per batch entry, 1.9x slower
    # than the single (12*64, 128) @ (128, 384) GEMM of a GPT block (measured, one thread).
    x2 = xd.reshape(-1, xd.shape[-1])
    out = _mm(x2, wd.T)
    if bias is not None:
        if bias.data.shape != (wd.shape[0],):
            raise OpError("linear", f"bias of shape {bias.data.shape} does not match weight {wd.shape}")
        out += bias.data
    out = out.reshape(xd.shape[:-1] + (wd.shape[0],))
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        g2 = g.reshape(-1, g.shape[-1])
        gx = _mm(g2, wd).reshape(xd.shape) if x.requires_grad else None
        gw = gb = None
        if weight.requires_grad:
            gw = _mm(g2.T, x2)
        if bias is not None and bias.requires_grad:
            gb = g2.sum(axis=0)
        return (gx, gw) if bias is None else (gx, gw, gb)

    return make_result(out, parents, backward, "linear", saved=(x, weight))


# ----- einsum ---------------------------------------------------------------------------------------------------
def einsum(equation: str, *operands):
    """Einstein summation as torch.einsum: ``einsum("bhqd,bhkd->bhqk", q, k)``, any number of operands (or one
    list of them), ``...`` for broadcast dims, size-1 dims broadcasting against any size, implicit output (no
    ``->``: the letters used once, sorted) and repeated letters in an operand (a diagonal).

    Ellipses and size-1 broadcasting are first spelled out with letters of their own, so every step below sees
    plain subscripts. Two operands contract as one batched matmul (BLAS), more through np.einsum. The gradient of
    each operand is another einsum, of the output's gradient with the other operands, into that operand's
    letters; letters only it has (summed by the forward) are broadcast back, and repeated ones fill a diagonal."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        raise OpError("einsum", f"the equation must be a string, got {type(equation).__name__}")
    if not operands:
        raise OpError("einsum", f"needs at least one operand (equation {equation!r})")
    tensors = tuple(as_tensor(o) for o in operands)
    dtypes = {t.data.dtype for t in tensors}
    if len(dtypes) > 1:
        raise OpError(
            "einsum",
            f"operands have different dtypes {[str(t.data.dtype) for t in tensors]} (equation "
            f"{equation!r}); cast them to one with .to(...) first",
        )
    arrays = [t.data for t in tensors]
    subs, out_sub, sizes = _einsum_parse(equation, [a.shape for a in arrays])
    out = _contract(subs, out_sub, arrays, sizes)

    def backward(g):
        grads = []
        for i, t in enumerate(tensors):
            if not t.requires_grad:
                grads.append(None)
                continue
            terms = [out_sub] + [s for j, s in enumerate(subs) if j != i]
            ins = [g] + [a for j, a in enumerate(arrays) if j != i]
            grads.append(_einsum_grad(subs[i], arrays[i].shape, terms, ins, sizes))
        return tuple(grads)

    return make_result(out, tensors, backward, "einsum", saved=tensors if len(tensors) > 1 else ())


def _einsum_parse(equation, shapes):
    """(subscripts per operand, output subscripts, size per letter) with ellipses replaced by letters of their
    own and every size-1 dim that broadcasts against a larger one given a fresh letter (summed over: a no-op)."""
    eq = equation.replace(" ", "")
    if eq.count("->") > 1:
        raise OpError("einsum", f"equation {equation!r} has more than one '->'")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise OpError(
            "einsum", f"equation {equation!r} has subscripts for {len(terms)} operands but {len(shapes)} were given"
        )
    for term in terms + ([rhs] if arrow else []):
        rest = term.replace("...", "", 1)
        bad = [c for c in rest if c not in string.ascii_letters]
        if bad:
            raise OpError(
                "einsum",
                f"invalid subscript {bad[0]!r} in equation {equation!r}: use letters a-z, A-Z "
                f"and at most one '...' per operand",
            )
    fresh = (c for c in string.ascii_letters if c not in eq)

    def new_letter():
        try:
            return next(fresh)
        except StopIteration:
            raise OpError("einsum", f"equation {equation!r} needs more than the 52 letters einsum has") from None

    ell = []
    for i, (term, shape) in enumerate(zip(terms, shapes)):
        named = len(term.replace("...", ""))
        if "..." in term and named <= len(shape):
            ell.append(len(shape) - named)
        elif named != len(shape):
            raise OpError(
                "einsum",
                f"the number of subscripts in the equation ({named}) does not match the number "
                f"of dimensions ({len(shape)}) for operand {i} (shape {tuple(shape)})"
                + ("" if "..." in term else " and no ellipsis was given"),
            )
        else:
            ell.append(0)
    ell_letters = [new_letter() for _ in range(max(ell, default=0))]
    subs = []
    for term, k in zip(terms, ell):
        head, dots, tail = term.partition("...")
        subs.append(list(head) + (ell_letters[len(ell_letters) - k :] if dots else []) + list(tail))
    sizes: dict = {}
    for i, (sub, shape) in enumerate(zip(subs, shapes)):
        for c, n in zip(sub, shape):
            seen = sizes.get(c, 1)
            if n != 1:
                if seen not in (1, n):
                    raise OpError(
                        "einsum",
                        f"subscript {c} has size {n} for operand {i} which does not broadcast "
                        f"with previously seen size {seen} (equation {equation!r})",
                    )
                sizes[c] = n
            else:
                sizes.setdefault(c, 1)
    if arrow:
        head, dots, tail = rhs.partition("...")
        out = list(head) + (ell_letters if dots else []) + list(tail)
        for c in out:
            if out.count(c) > 1:
                raise OpError(
                    "einsum", f"output subscript {c} appears more than once in the output (equation {equation!r})"
                )
            if c not in sizes:
                raise OpError(
                    "einsum",
                    f"output subscript {c} does not appear in the equation for any input "
                    f"operand (equation {equation!r})",
                )
    else:  # implicit output: the broadcast dims, then the letters used exactly once, in sorted order
        flat = [c for sub in subs for c in sub]
        out = ell_letters + sorted(c for c in set(flat) if flat.count(c) == 1 and c not in ell_letters)
    for sub, shape in zip(subs, shapes):
        for j, (c, n) in enumerate(zip(sub, shape)):
            if n == 1 and sizes[c] != 1:
                sub[j] = new_letter()
                sizes[sub[j]] = 1
    return ["".join(sub) for sub in subs], "".join(out), sizes


def _contract(subs, out, arrays, sizes):
    """einsum of plain subscripts (no ellipsis, no broadcasting): two operands without repeated letters as one
    batched matmul, anything else through np.einsum. Returns a new array (never a view of an operand)."""
    if len(arrays) == 2 and all(len(set(s)) == len(s) for s in subs):
        return _contract2(subs[0], subs[1], out, arrays[0], arrays[1], sizes)
    res = np.einsum(",".join(subs) + "->" + out, *arrays, optimize=len(arrays) > 2)
    return np.array(res) if len(arrays) == 1 else np.asarray(res)


def _contract2(sa, sb, so, a, b, sizes):
    """Two-operand einsum as one batched matmul: letters in both and the output are the batch, in both but not
    the output are contracted, in one and the output are that side's rows/columns; letters in one operand only
    are summed out first."""
    only_a = [c for c in sa if c not in sb and c not in so]
    if only_a:
        a = a.sum(axis=tuple(sa.index(c) for c in only_a))
        sa = "".join(c for c in sa if c not in only_a)
    only_b = [c for c in sb if c not in sa and c not in so]
    if only_b:
        b = b.sum(axis=tuple(sb.index(c) for c in only_b))
        sb = "".join(c for c in sb if c not in only_b)
    batch = [c for c in so if c in sa and c in sb]
    rows = [c for c in so if c in sa and c not in sb]
    cols = [c for c in so if c in sb and c not in sa]
    inner = [c for c in sa if c in sb and c not in so]
    nb = [sizes[c] for c in batch]  # batch dims stay apart: a transposed view then needs no copy (BLAS reads it)
    nr, nc, ni = (math.prod(sizes[c] for c in group) for group in (rows, cols, inner))
    a2 = a.transpose([sa.index(c) for c in batch + rows + inner]).reshape(nb + [nr, ni])
    b2 = b.transpose([sb.index(c) for c in batch + inner + cols]).reshape(nb + [ni, nc])
    order = batch + rows + cols
    res = np.matmul(a2, b2).reshape([sizes[c] for c in order])
    return res.transpose([order.index(c) for c in so])


def _einsum_grad(sub, shape, terms, ins, sizes):
    """The gradient of the operand with subscripts ``sub`` and ``shape``: the einsum of ``terms``/``ins`` (the
    output's gradient and the other operands) into its distinct letters, broadcast along letters no term has,
    placed on the diagonal where ``sub`` repeats a letter."""
    uniq = "".join(dict.fromkeys(sub))
    have = set("".join(terms))
    keep = "".join(c for c in uniq if c in have)
    grad = _contract(terms, keep, ins, sizes)
    if keep != uniq:  # summed by the forward over letters only this operand has: constant along them
        grad = np.expand_dims(grad, tuple(k for k, c in enumerate(uniq) if c not in have))
        grad = np.broadcast_to(grad, [sizes[c] for c in uniq])
    if uniq != sub:  # a repeated letter reads a diagonal: the gradient lands on it, zero elsewhere
        full = np.zeros(shape, dtype=grad.dtype)
        place = tuple(
            np.arange(sizes[c]).reshape([-1 if k == uniq.index(c) else 1 for k in range(len(uniq))]) for c in sub
        )
        full[place] = grad
        return full
    return np.array(grad) if keep != uniq else grad  # a broadcast view is copied (it is read-only)


class LinalgMethods:
    """Tensor's matrix-product operators and methods (mixed into Tensor)."""

    __slots__ = ()

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)

    def matmul(self, other):
        return matmul(self, other)
