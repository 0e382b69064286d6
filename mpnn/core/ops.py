"""The op set on Tensor: elementwise, reductions, shape, indexing, matmul. Each backward sits by its forward.

Every op reduces broadcast gradients back to its input's shape (``unbroadcast``) and returns None for a
parent that does not require grad, so no work is spent on it.
"""
from __future__ import annotations

import builtins
from collections import namedtuple

import numpy as np

from mpnn.core.errors import OpError
from mpnn.core.tensor import OUTPUT, Tensor, as_tensor, make_result, make_view

_from = Tensor._from_array


def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``g`` over the axes that broadcasting added or stretched, so it has ``shape``."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _pair(op, a, b):
    """Two operands as Tensors; a Python number takes the other operand's dtype (as in torch)."""
    if not isinstance(a, Tensor):
        a = as_tensor(a, like=b)
    if not isinstance(b, Tensor):
        b = as_tensor(b, like=a)
    return a, b


def _broadcast_error(op, a, b):
    return OpError(op, f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast")


# ----- elementwise binary -----------------------------------------------------------------------
def add(a, b):
    a, b = _pair("add", a, b)
    try:
        out = a.data + b.data
    except ValueError:
        raise _broadcast_error("add", a, b) from None
    sa, sb = a.data.shape, b.data.shape

    def backward(g):
        return (unbroadcast(g, sa) if a.requires_grad else None,
                unbroadcast(g, sb) if b.requires_grad else None)
    return make_result(out, (a, b), backward, "add", saved=())


def sub(a, b):
    a, b = _pair("sub", a, b)
    try:
        out = a.data - b.data
    except ValueError:
        raise _broadcast_error("sub", a, b) from None
    sa, sb = a.data.shape, b.data.shape

    def backward(g):
        return (unbroadcast(g, sa) if a.requires_grad else None,
                unbroadcast(-g, sb) if b.requires_grad else None)
    return make_result(out, (a, b), backward, "sub", saved=())


def mul(a, b):
    a, b = _pair("mul", a, b)
    try:
        out = a.data * b.data
    except ValueError:
        raise _broadcast_error("mul", a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        return (unbroadcast(g * bd, ad.shape) if a.requires_grad else None,
                unbroadcast(g * ad, bd.shape) if b.requires_grad else None)
    return make_result(out, (a, b), backward, "mul", saved=(a, b))


def div(a, b):
    a, b = _pair("div", a, b)
    try:
        out = a.data / b.data
    except ValueError:
        raise _broadcast_error("div", a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        ga = unbroadcast(g / bd, ad.shape) if a.requires_grad else None
        gb = unbroadcast(-g * out / bd, bd.shape) if b.requires_grad else None
        return ga, gb
    return make_result(out, (a, b), backward, "div", saved=(b, OUTPUT))


def pow(a, b):
    a, b = _pair("pow", a, b)
    try:
        out = a.data ** b.data
    except ValueError:
        raise _broadcast_error("pow", a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        ga = gb = None
        if a.requires_grad:
            ga = unbroadcast(g * bd * ad ** (bd - 1), ad.shape)
        if b.requires_grad:
            with np.errstate(divide="ignore", invalid="ignore"):
                logs = np.where(ad > 0, np.log(np.where(ad > 0, ad, 1)), 0).astype(out.dtype)
            gb = unbroadcast(g * out * logs, bd.shape)
        return ga, gb
    return make_result(out, (a, b), backward, "pow", saved=(a, b, OUTPUT))


def maximum(a, b):
    """Elementwise max; at ties the gradient is split evenly between the two inputs (as torch)."""
    return _minmax("maximum", a, b, np.greater)


def minimum(a, b):
    """Elementwise min; at ties the gradient is split evenly between the two inputs (as torch)."""
    return _minmax("minimum", a, b, np.less)


def _minmax(op, a, b, better):
    a, b = _pair(op, a, b)
    try:
        out = (np.maximum if op == "maximum" else np.minimum)(a.data, b.data)
    except ValueError:
        raise _broadcast_error(op, a, b) from None
    ad, bd = a.data, b.data

    def backward(g):
        wa = better(ad, bd) + 0.5 * (ad == bd)
        ga = unbroadcast((g * wa).astype(g.dtype), ad.shape) if a.requires_grad else None
        gb = unbroadcast((g * (1 - wa)).astype(g.dtype), bd.shape) if b.requires_grad else None
        return ga, gb
    return make_result(out, (a, b), backward, op, saved=(a, b))


# ----- elementwise unary ------------------------------------------------------------------------
def neg(a):
    def backward(g):
        return (-g,)
    return make_result(-a.data, (a,), backward, "neg", saved=())


def exp(a):
    out = np.exp(a.data)

    def backward(g):
        return (g * out,)
    return make_result(out, (a,), backward, "exp", saved=(OUTPUT,))


def log(a):
    ad = a.data

    def backward(g):
        return (g / ad,)
    return make_result(np.log(ad), (a,), backward, "log", saved=(a,))


def sqrt(a):
    out = np.sqrt(a.data)

    def backward(g):
        return (g / (2 * out),)
    return make_result(out, (a,), backward, "sqrt", saved=(OUTPUT,))


def abs(a):
    ad = a.data

    def backward(g):
        return (g * np.sign(ad),)
    return make_result(np.abs(ad), (a,), backward, "abs", saved=(a,))


def clip(a, min=None, max=None):
    """Clamp to [min, max]; the gradient passes where the input was inside the range (as torch.clamp)."""
    if min is None and max is None:
        raise OpError("clip", "at least one of min and max must be given")
    lo = min.data if isinstance(min, Tensor) else min
    hi = max.data if isinstance(max, Tensor) else max
    ad = a.data
    out = np.clip(ad, lo, hi).astype(ad.dtype, copy=False)

    def backward(g):
        keep = np.ones(ad.shape, dtype=bool)
        if lo is not None:
            keep &= ad >= lo
        if hi is not None:
            keep &= ad <= hi
        return (g * keep,)
    return make_result(out, (a,), backward, "clip", saved=(a,))


def sign(a):
    return _from(np.sign(a.data))


def relu(a):
    ad = a.data
    out = np.maximum(ad, 0)

    def backward(g):
        return (g * (ad > 0),)
    return make_result(out, (a,), backward, "relu", saved=(a,))


def leaky_relu(a, negative_slope=0.01):
    ad = a.data
    slope = np.where(ad > 0, 1, negative_slope).astype(ad.dtype)
    out = ad * slope

    def backward(g):
        return (g * slope,)
    return make_result(out, (a,), backward, "leaky_relu", saved=())


def sigmoid(a):
    ad = a.data
    # exp of a non-positive argument only, so large |x| neither overflows nor warns.
    e = np.exp(-np.abs(ad))
    out = np.where(ad >= 0, 1 / (1 + e), e / (1 + e)).astype(ad.dtype, copy=False)

    def backward(g):
        return (g * out * (1 - out),)
    return make_result(out, (a,), backward, "sigmoid", saved=(OUTPUT,))


def tanh(a):
    out = np.tanh(a.data)

    def backward(g):
        return (g * (1 - out * out),)
    return make_result(out, (a,), backward, "tanh", saved=(OUTPUT,))


def gelu(a, approximate="none"):
    """GELU, exact (erf) by default or the tanh approximation, as torch.nn.functional.gelu."""
    from mpnn.core.kernels import erf
    ad = a.data
    if approximate == "none":
        cdf = 0.5 * (1.0 + erf(ad * np.asarray(1 / np.sqrt(2), ad.dtype)))
        out = ad * cdf

        def backward(g):
            pdf = np.exp(-0.5 * ad * ad) * np.asarray(1 / np.sqrt(2 * np.pi), ad.dtype)
            return (g * (cdf + ad * pdf),)
    elif approximate == "tanh":
        k = np.asarray(np.sqrt(2 / np.pi), ad.dtype)
        inner = k * (ad + 0.044715 * ad ** 3)
        t = np.tanh(inner)
        out = 0.5 * ad * (1 + t)

        def backward(g):
            dinner = k * (1 + 3 * 0.044715 * ad * ad)
            return (g * (0.5 * (1 + t) + 0.5 * ad * (1 - t * t) * dinner),)
    else:
        raise OpError("gelu", f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return make_result(out.astype(ad.dtype, copy=False), (a,), backward, "gelu", saved=(a,))


def clone(a):
    def backward(g):
        return (g,)
    return make_result(a.data.copy(), (a,), backward, "clone", saved=())


def to_dtype(a, dtype):
    """Cast; the gradient flows back cast to the input's dtype."""
    from mpnn.core.tensor import to_dtype as _dt
    dt = _dt(dtype)
    src = a.data.dtype
    if dt == src:
        return a
    if dt.kind != "f":
        return _from(a.data.astype(dt))

    def backward(g):
        return (g.astype(src),)
    return make_result(a.data.astype(dt), (a,), backward, "to", saved=())


# ----- reductions -------------------------------------------------------------------------------
def _axes(op, dim, ndim):
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -builtins.max(ndim, 1) <= d < builtins.max(ndim, 1):
            raise OpError(op, f"dim {d} is out of range for a tensor of {ndim} dimensions")
        out.append(d % builtins.max(ndim, 1))
    return tuple(out)


def _expand_back(g, shape, axes, keepdim):
    """Reshape a reduced gradient so it broadcasts against the input again."""
    if axes is None:
        return np.broadcast_to(g.reshape((1,) * len(shape)) if len(shape) else g, shape)
    if not keepdim:
        g = np.expand_dims(g, axes)
    return np.broadcast_to(g, shape)


def sum(a, dim=None, keepdim=False, dtype=None):
    axes = _axes("sum", dim, a.data.ndim)
    out = np.sum(a.data, axis=axes, keepdims=keepdim)
    if a.data.ndim == 0:
        out = a.data.copy()
    if dtype is None:  # booleans and integers sum to int64, as in torch
        dtype = np.int64 if a.data.dtype.kind in "biu" else a.data.dtype
    out = np.asarray(out, dtype=dtype)
    shape = a.data.shape

    def backward(g):
        return (np.array(_expand_back(g, shape, axes, keepdim), order="C"),)  # (ascontiguousarray makes 0-d 1-d)
    return make_result(out, (a,), backward, "sum", saved=())


def mean(a, dim=None, keepdim=False):
    if a.data.dtype.kind != "f":
        raise OpError("mean", f"needs a floating-point tensor, got {a.data.dtype}")
    axes = _axes("mean", dim, a.data.ndim)
    out = np.asarray(np.mean(a.data, axis=axes, keepdims=keepdim), dtype=a.data.dtype)
    shape = a.data.shape
    count = a.data.size if axes is None else int(np.prod([shape[i] for i in axes]))

    def backward(g):
        return (np.array(_expand_back(g / count, shape, axes, keepdim), dtype=g.dtype, order="C"),)
    return make_result(out, (a,), backward, "mean", saved=())


def var(a, dim=None, keepdim=False, correction=1, unbiased=None):
    """Variance (two-pass: mean first, then squared deviations), Bessel-corrected by default as torch."""
    if unbiased is not None:
        correction = 1 if unbiased else 0
    axes = _axes("var", dim, a.data.ndim)
    n = a.data.size if axes is None else int(np.prod([a.data.shape[i] for i in axes]))
    d = a - mean(a, dim=axes, keepdim=True)
    return sum(d * d, dim=axes, keepdim=keepdim) / builtins.max(n - correction, 0)


def std(a, dim=None, keepdim=False, correction=1, unbiased=None):
    return sqrt(var(a, dim, keepdim, correction, unbiased))


_ValuesIndices = namedtuple("ValuesIndices", ["values", "indices"])


def _extreme(op, a, dim, keepdim, reduce_fn, arg_fn):
    ad = a.data
    if ad.size == 0:
        raise OpError(op, f"cannot take {op} of an empty tensor of shape {ad.shape}")
    if dim is None:
        out = np.asarray(reduce_fn(ad))
        mask = ad == out
        count = mask.sum()

        def backward(g):
            return ((mask * (g / count)).astype(g.dtype),)
        return make_result(out, (a,), backward, op, saved=())
    axis = _axes(op, dim, ad.ndim)[0]
    idx = arg_fn(ad, axis=axis, keepdims=True) if ad.ndim else np.zeros((), np.int64)
    values = np.take_along_axis(ad, idx, axis=axis) if ad.ndim else ad.copy()
    shape = ad.shape

    def backward(g):
        full = np.zeros(shape, dtype=g.dtype)
        gg = g if keepdim else np.expand_dims(g, axis)
        np.put_along_axis(full, idx, gg, axis=axis)
        return (full,)
    indices = idx.squeeze(axis) if not keepdim and ad.ndim else idx
    if not keepdim and ad.ndim:
        values = values.squeeze(axis)
    return _ValuesIndices(make_result(values, (a,), backward, op, saved=()), _from(indices.astype(np.int64)))


def max(a, dim=None, keepdim=False):
    """Without dim: the largest element (ties share the gradient). With dim: (values, indices), as torch."""
    if isinstance(dim, Tensor):
        return maximum(a, dim)
    return _extreme("max", a, dim, keepdim, np.max, np.argmax)


def min(a, dim=None, keepdim=False):
    if isinstance(dim, Tensor):
        return minimum(a, dim)
    return _extreme("min", a, dim, keepdim, np.min, np.argmin)


def amax(a, dim=None, keepdim=False):
    if dim is None:
        return max(a)
    axes = _axes("amax", dim, a.data.ndim)
    return _amaxmin("amax", a, axes, keepdim, np.max)


def amin(a, dim=None, keepdim=False):
    if dim is None:
        return min(a)
    axes = _axes("amin", dim, a.data.ndim)
    return _amaxmin("amin", a, axes, keepdim, np.min)


def _amaxmin(op, a, axes, keepdim, fn):
    ad = a.data
    kept = fn(ad, axis=axes, keepdims=True)
    mask = ad == kept
    count = mask.sum(axis=axes, keepdims=True)

    def backward(g):
        gg = g if keepdim else np.expand_dims(g, axes)
        return ((mask * gg / count).astype(g.dtype),)
    out = kept if keepdim else np.squeeze(kept, axis=axes)
    return make_result(out, (a,), backward, op, saved=())


def argmax(a, dim=None, keepdim=False):
    if dim is None:
        return _from(np.asarray(np.argmax(a.data), dtype=np.int64))
    return _from(np.argmax(a.data, axis=dim, keepdims=keepdim).astype(np.int64))


def argmin(a, dim=None, keepdim=False):
    if dim is None:
        return _from(np.asarray(np.argmin(a.data), dtype=np.int64))
    return _from(np.argmin(a.data, axis=dim, keepdims=keepdim).astype(np.int64))


# ----- shape ------------------------------------------------------------------------------------
def _shape_args(shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(int(s) for s in shape)


def reshape(a, *shape):
    shape = _shape_args(shape)
    src = a.data.shape
    try:
        out = a.data.reshape(shape)
    except ValueError:
        raise OpError("reshape", f"cannot reshape a tensor of shape {src} ({a.data.size} elements) "
                                 f"into {shape}") from None

    def backward(g):
        return (g.reshape(src),)
    return make_view(out, a, backward, "reshape", lambda arr: arr.reshape(shape))


def view(a, *shape):
    return reshape(a, *shape)


def flatten(a, start_dim=0, end_dim=-1):
    nd = a.data.ndim
    if nd == 0:
        return reshape(a, 1)
    s, e = start_dim % nd, end_dim % nd
    if s > e:
        raise OpError("flatten", f"start_dim {start_dim} comes after end_dim {end_dim} for {nd} dims")
    shp = a.data.shape
    return reshape(a, shp[:s] + (-1 if 0 not in shp[s:e + 1] else 0,) + shp[e + 1:])


def permute(a, *dims):
    dims = _shape_args(dims)
    nd = a.data.ndim
    if sorted(d % builtins.max(nd, 1) for d in dims) != list(range(nd)):
        raise OpError("permute", f"dims {dims} are not a permutation of the {nd} dimensions of a tensor "
                                 f"of shape {a.data.shape}")
    inv = np.argsort([d % nd for d in dims])

    def backward(g):
        return (g.transpose(inv),)
    return make_view(a.data.transpose(dims), a, backward, "permute", lambda arr: arr.transpose(dims))


def transpose(a, dim0=0, dim1=1):
    nd = a.data.ndim
    if nd < 2 and dim0 in (0, -1) and dim1 in (0, -1):
        return a
    if not (-nd <= dim0 < nd and -nd <= dim1 < nd):
        raise OpError("transpose", f"dims ({dim0}, {dim1}) out of range for shape {a.data.shape}")

    def backward(g):
        return (np.swapaxes(g, dim0, dim1),)
    return make_view(np.swapaxes(a.data, dim0, dim1), a, backward, "transpose",
                     lambda arr: np.swapaxes(arr, dim0, dim1))


def t(a):
    if a.data.ndim > 2:
        raise OpError("t", f"expects a tensor of at most 2 dimensions, got shape {a.data.shape}")
    return transpose(a, 0, 1) if a.data.ndim == 2 else a


def squeeze(a, dim=None):
    src = a.data.shape
    if dim is None:
        out = a.data.squeeze()
    else:
        axes = _axes("squeeze", dim, a.data.ndim)
        axes = tuple(d for d in axes if src[d] == 1)  # torch ignores dims that are not of size 1
        out = a.data.squeeze(axes) if axes else a.data

    shape = out.shape

    def backward(g):
        return (g.reshape(src),)
    return make_view(out, a, backward, "squeeze", lambda arr: arr.reshape(shape))


def unsqueeze(a, dim):
    nd = a.data.ndim + 1
    if not -nd <= dim < nd:
        raise OpError("unsqueeze", f"dim {dim} out of range for a result of {nd} dimensions")
    src = a.data.shape

    def backward(g):
        return (g.reshape(src),)
    axis = dim % nd
    return make_view(np.expand_dims(a.data, axis), a, backward, "unsqueeze", lambda arr: np.expand_dims(arr, axis))


def expand(a, *sizes):
    sizes = _shape_args(sizes)
    src = a.data.shape
    lead = len(sizes) - len(src)
    if lead < 0:
        raise OpError("expand", f"cannot expand shape {src} to fewer dimensions {sizes}")
    if builtins.any(s == -1 for s in sizes[:lead]):
        raise OpError("expand", f"the expanded size -1 isn't allowed in a leading, new dimension (shape {src} "
                                f"to {sizes})")
    target = tuple(src[i - lead] if s == -1 else s for i, s in enumerate(sizes))
    try:
        out = np.broadcast_to(a.data, target)
    except ValueError:
        raise OpError("expand", f"cannot expand shape {src} to {sizes}") from None

    def backward(g):
        return (unbroadcast(g, src),)
    return make_view(out, a, backward, "expand", lambda arr: np.broadcast_to(arr, target))


def contiguous(a):
    if a.data.flags.c_contiguous:
        return a
    return clone(a)


def cat(tensors, dim=0):
    tensors = [as_tensor(x) for x in tensors]
    if not tensors:
        raise OpError("cat", "needs at least one tensor")
    try:
        out = np.concatenate([x.data for x in tensors], axis=dim)
    except (ValueError, IndexError) as e:  # AxisError subclasses both (np.exceptions is NumPy >= 1.25)
        raise OpError("cat", f"cannot concatenate shapes {[tuple(x.shape) for x in tensors]} along dim "
                             f"{dim}: {e}") from None
    ax = dim % out.ndim
    bounds = np.cumsum([x.data.shape[ax] for x in tensors])[:-1]

    def backward(g):
        parts = np.split(g, bounds, axis=ax)
        return tuple(p if x.requires_grad else None for p, x in zip(parts, tensors))
    return make_result(out, tuple(tensors), backward, "cat", saved=())


concat = cat


def stack(tensors, dim=0):
    tensors = [as_tensor(x) for x in tensors]
    if not tensors:
        raise OpError("stack", "needs at least one tensor")
    try:
        out = np.stack([x.data for x in tensors], axis=dim)
    except ValueError:
        raise OpError("stack", f"all tensors must have the same shape, got "
                               f"{[tuple(x.shape) for x in tensors]}") from None
    ax = dim % out.ndim

    def backward(g):
        return tuple(np.take(g, i, axis=ax) if x.requires_grad else None for i, x in enumerate(tensors))
    return make_result(out, tuple(tensors), backward, "stack", saved=())


def split(a, split_size_or_sections, dim=0):
    """Split into chunks of a given size (the last may be smaller) or of the listed sizes, as torch.split."""
    n = a.data.shape[dim]
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise OpError("split", f"split size must be positive, got {split_size_or_sections}")
        sizes = [split_size_or_sections] * (n // split_size_or_sections)
        if n % split_size_or_sections:
            sizes.append(n % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:
            raise OpError("split", f"sizes {sizes} do not add up to {n}, the length of dim {dim}")
    out, start = [], 0
    for s in sizes:
        idx = [slice(None)] * a.data.ndim
        idx[dim] = slice(start, start + s)
        out.append(getitem(a, tuple(idx)))
        start += s
    return tuple(out)


def chunk(a, chunks, dim=0):
    n = a.data.shape[dim]
    return split(a, -(-n // chunks) if n else 1, dim)


# ----- indexing ---------------------------------------------------------------------------------
def _is_basic(idx):
    if isinstance(idx, tuple):
        return builtins.all(_is_basic(i) for i in idx)
    return idx is None or idx is Ellipsis or isinstance(idx, (int, np.integer, slice))


def _unwrap_index(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, tuple):
        return tuple(_unwrap_index(i) for i in idx)
    if isinstance(idx, list):
        return np.asarray([_unwrap_index(i) for i in idx])
    return idx


def getitem(a, idx):
    idx = _unwrap_index(idx)
    basic = _is_basic(idx)
    if basic and Ellipsis not in (idx if isinstance(idx, tuple) else (idx,)):
        idx = (idx if isinstance(idx, tuple) else (idx,)) + (Ellipsis,)  # a 0-d view, never a NumPy scalar
    try:
        out = a.data[idx]
    except IndexError as e:
        raise OpError("index", f"{e} (tensor of shape {a.data.shape})") from None
    shape, dtype = a.data.shape, a.data.dtype

    def backward(g):
        full = np.zeros(shape, dtype=g.dtype)
        if basic:
            full[idx] = g  # basic indices never repeat an element
        else:
            np.add.at(full, idx, g)  # integer arrays may select an element more than once
        return (full,)
    if basic:
        return make_view(out, a, backward, "index", lambda arr: arr[idx])
    if not isinstance(out, np.ndarray):
        out = np.asarray(out, dtype=dtype)
    return make_result(out, (a,), backward, "index", saved=())


def where(cond, a, b):
    cond = cond.data if isinstance(cond, Tensor) else np.asarray(cond)
    if cond.dtype != np.bool_:
        raise OpError("where", f"condition must be bool, got {cond.dtype}")
    a, b = _pair("where", a, b)
    try:
        out = np.where(cond, a.data, b.data)
    except ValueError:
        raise OpError("where", f"shapes {cond.shape}, {a.data.shape}, {b.data.shape} do not broadcast") from None
    sa, sb = a.data.shape, b.data.shape

    def backward(g):
        return (unbroadcast(np.where(cond, g, 0).astype(g.dtype), sa) if a.requires_grad else None,
                unbroadcast(np.where(cond, 0, g).astype(g.dtype), sb) if b.requires_grad else None)
    return make_result(out, (a, b), backward, "where", saved=())


def masked_fill(a, mask, value):
    m = mask.data if isinstance(mask, Tensor) else np.asarray(mask)
    return where(m, as_tensor(value, like=a), a)


# ----- matmul -----------------------------------------------------------------------------------
def matmul(a, b):
    """Matrix product with torch.matmul's rules: 1-D operands promoted, batch dims broadcast."""
    a, b = _pair("matmul", a, b)
    ad, bd = a.data, b.data
    if ad.ndim == 0 or bd.ndim == 0:
        raise OpError("matmul", f"both operands need at least 1 dimension, got shapes {ad.shape} and {bd.shape}")
    if ad.dtype != bd.dtype:
        raise OpError("matmul", f"operands have different dtypes {ad.dtype} and {bd.dtype} (shapes {ad.shape} "
                                f"and {bd.shape}); cast one with .to(...) first")
    try:
        out = ad @ bd
    except ValueError:
        raise OpError("matmul", f"shapes {ad.shape} and {bd.shape} cannot be multiplied "
                                f"({ad.shape[-1]} != {bd.shape[-2] if bd.ndim > 1 else bd.shape[0]})") from None

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
        raise OpError("linear", f"input dtype {xd.dtype} does not match weight dtype {wd.dtype} "
                                f"(input shape {xd.shape}, weight shape {wd.shape})")
    if wd.ndim != 2 or xd.shape[-1:] != wd.shape[1:]:
        raise OpError("linear", f"input of shape {xd.shape} does not match weight of shape {wd.shape} "
                                f"(expects last dim {wd.shape[-1] if wd.ndim else '?'})")
    out = xd @ wd.T
    if bias is not None:
        if bias.data.shape != (wd.shape[0],):
            raise OpError("linear", f"bias of shape {bias.data.shape} does not match weight {wd.shape}")
        out += bias.data
    parents = (x, weight) if bias is None else (x, weight, bias)

    def backward(g):
        gx = g @ wd if x.requires_grad else None
        gw = gb = None
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            g2 = g.reshape(-1, g.shape[-1])
            if weight.requires_grad:
                gw = g2.T @ xd.reshape(-1, xd.shape[-1])
            if bias is not None and bias.requires_grad:
                gb = g2.sum(axis=0)
        return (gx, gw) if bias is None else (gx, gw, gb)
    return make_result(out, parents, backward, "linear", saved=(x, weight))


# ----- attach to Tensor -------------------------------------------------------------------------
from mpnn.core import inplace  # noqa: E402  (in-place ops import this module's helpers lazily)

def _r(fn):
    return lambda self, other: fn(other, self)


def _method_max(self, dim=None, keepdim=False):
    return max(self, dim, keepdim)


def _method_min(self, dim=None, keepdim=False):
    return min(self, dim, keepdim)


_METHODS = {
    "__add__": add, "__radd__": _r(add), "__sub__": sub, "__rsub__": _r(sub), "__mul__": mul,
    "__rmul__": _r(mul), "__truediv__": div, "__rtruediv__": _r(div), "__pow__": pow, "__rpow__": _r(pow),
    "__matmul__": matmul, "__rmatmul__": _r(matmul), "__neg__": neg, "__abs__": abs,
    "__getitem__": getitem,
    "add": add, "sub": sub, "mul": mul, "div": div, "pow": pow, "matmul": matmul, "neg": neg, "exp": exp,
    "log": log, "sqrt": sqrt, "abs": abs, "clip": clip, "clamp": clip, "sign": sign, "relu": relu,
    "sigmoid": sigmoid, "tanh": tanh, "gelu": gelu, "leaky_relu": leaky_relu, "maximum": maximum,
    "minimum": minimum, "sum": sum, "mean": mean, "var": var, "std": std, "max": _method_max,
    "min": _method_min, "amax": amax, "amin": amin, "argmax": argmax, "argmin": argmin, "reshape": reshape,
    "view": view, "flatten": flatten, "permute": permute, "transpose": transpose, "t": t,
    "squeeze": squeeze, "unsqueeze": unsqueeze, "expand": expand, "contiguous": contiguous,
    "split": split, "chunk": chunk, "masked_fill": masked_fill, "clone": clone,
    "__setitem__": inplace.setitem, "add_": inplace.add_, "sub_": inplace.sub_, "mul_": inplace.mul_,
    "div_": inplace.div_, "copy_": inplace.copy_, "fill_": inplace.fill_, "zero_": inplace.zero_,
    "clamp_": inplace.clamp_, "clip_": inplace.clamp_, "relu_": inplace.relu_,
    "masked_fill_": inplace.masked_fill_, "__iadd__": inplace.add_, "__isub__": inplace.sub_,
    "__imul__": inplace.mul_, "__itruediv__": inplace.div_,
}


def _compare(np_fn):
    def fn(self, other):
        other = other.data if isinstance(other, Tensor) else other
        return _from(np_fn(self.data, other))
    return fn


for _name, _np in (("__lt__", np.less), ("__le__", np.less_equal), ("__gt__", np.greater),
                   ("__ge__", np.greater_equal), ("__eq__", np.equal), ("__ne__", np.not_equal),
                   ("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("gt", np.greater),
                   ("__and__", np.logical_and), ("__or__", np.logical_or)):
    _METHODS[_name] = _compare(_np)
_METHODS["__invert__"] = lambda self: _from(np.logical_not(self.data))

for _name, _fn in _METHODS.items():
    setattr(Tensor, _name, _fn)
Tensor.T = property(lambda self: permute(self, *reversed(range(self.data.ndim))))
