"""Movement ops: reshape, view, permute, transpose, squeeze, expand, cat, stack, split, and the copying ones tril,
triu, repeat, flip, roll. Most of the first group return views that share the input's memory and version counter
(``make_view``), so in-place writes through them are tracked; the second group copies, as torch's do."""

from __future__ import annotations

import builtins

import numpy as np

from mpnn.core.elementwise import clone, unbroadcast
from mpnn.core.errors import OpError
from mpnn.core.indexing import getitem
from mpnn.core.reduce import _axes
from mpnn.core.tensor_base import as_tensor, make_result, make_view


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
        raise OpError(
            "reshape", f"cannot reshape a tensor of shape {src} ({a.data.size} elements) into {shape}"
        ) from None

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
    return reshape(a, shp[:s] + (-1 if 0 not in shp[s : e + 1] else 0,) + shp[e + 1 :])


def permute(a, *dims):
    dims = _shape_args(dims)
    nd = a.data.ndim
    if sorted(d % builtins.max(nd, 1) for d in dims) != list(range(nd)):
        raise OpError(
            "permute", f"dims {dims} are not a permutation of the {nd} dimensions of a tensor of shape {a.data.shape}"
        )
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

    return make_view(
        np.swapaxes(a.data, dim0, dim1), a, backward, "transpose", lambda arr: np.swapaxes(arr, dim0, dim1)
    )


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
        raise OpError(
            "expand", f"the expanded size -1 isn't allowed in a leading, new dimension (shape {src} to {sizes})"
        )
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
        raise OpError(
            "cat", f"cannot concatenate shapes {[tuple(x.shape) for x in tensors]} along dim {dim}: {e}"
        ) from None
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
        raise OpError(
            "stack", f"all tensors must have the same shape, got {[tuple(x.shape) for x in tensors]}"
        ) from None
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


def tril(a, diagonal=0):
    """The lower triangle of the last two dims (elements j <= i + diagonal), the rest zero, as torch.tril."""
    return _triangle("tril", a, diagonal, np.tril)


def triu(a, diagonal=0):
    """The upper triangle of the last two dims (elements j >= i + diagonal), the rest zero, as torch.triu."""
    return _triangle("triu", a, diagonal, np.triu)


def _triangle(op, a, diagonal, fn):
    if a.data.ndim < 2:
        raise OpError(op, f"input must have at least 2 dimensions, got shape {a.data.shape}")
    k = int(diagonal)

    def backward(g):
        return (fn(g, k),)

    return make_result(fn(a.data, k), (a,), backward, op, saved=())


def repeat(a, *sizes):
    """Tile the tensor ``sizes[i]`` times along dim i (leading new dims when sizes is longer), as Tensor.repeat;
    the gradient sums the copies."""
    sizes = _shape_args(sizes)
    src = a.data.shape
    if len(sizes) < len(src):
        raise OpError(
            "repeat",
            f"number of repeat dims ({len(sizes)}: {sizes}) can not be smaller than the number "
            f"of dims of the tensor ({len(src)}: shape {src})",
        )
    if builtins.any(s < 0 for s in sizes):
        raise OpError("repeat", f"repeats must be non-negative, got {sizes}")
    padded = (1,) * (len(sizes) - len(src)) + src
    out = np.tile(a.data.reshape(padded), sizes) if sizes else a.data.copy()
    pairs = tuple(n for pair in zip(sizes, padded) for n in pair)
    copies = tuple(range(0, 2 * len(sizes), 2))

    def backward(g):
        return (np.asarray(g.reshape(pairs).sum(axis=copies)).reshape(src),)

    return make_result(out, (a,), backward, "repeat", saved=())


def flip(a, *args, dims=None):
    """Reverse the order of elements along ``dims`` (a copy, as torch.flip): ``flip(x, (0, 1))``,
    ``flip(x, dims=[0])``, ``x.flip(0, 1)``."""
    if dims is not None and args:
        raise OpError("flip", f"dims given twice: {args} and dims={dims!r}")
    dims = _shape_args(args if dims is None else ((dims,) if isinstance(dims, int) else (dims,)))
    nd = a.data.ndim
    axes = _axes("flip", dims, nd)
    if len(set(axes)) != len(axes):
        raise OpError("flip", f"dims {dims} name a dim more than once (tensor of shape {a.data.shape})")
    if nd == 0:
        axes = ()

    def backward(g):
        return (np.flip(g, axes) if axes else g,)

    return make_result(np.flip(a.data, axes).copy() if axes else a.data.copy(), (a,), backward, "flip", saved=())


def roll(a, shifts, dims=None):
    """Shift elements cyclically by ``shifts`` along ``dims``; without dims, over the flattened tensor (shape
    kept), as torch.roll. The gradient rolls back."""
    shifts_t = (shifts,) if isinstance(shifts, (int, np.integer)) else tuple(shifts)
    nd = a.data.ndim
    if dims is None:
        if len(shifts_t) != 1:
            raise OpError("roll", f"without dims, shifts must be one int, got {shifts!r}")
        shift, axes = int(shifts_t[0]), None
    else:
        dims_t = (dims,) if isinstance(dims, (int, np.integer)) else tuple(dims)
        if len(shifts_t) != len(dims_t):
            raise OpError(
                "roll", f"shifts and dims must align: {len(shifts_t)} shifts {shifts_t} for {len(dims_t)} dims {dims_t}"
            )
        if nd == 0:
            raise OpError("roll", f"dims {dims_t} given but the tensor has no dimensions (0-d)")
        shift, axes = tuple(int(s) for s in shifts_t), _axes("roll", dims_t, nd)
    neg = -shift if axes is None else tuple(-s for s in shift)

    def backward(g):
        return (np.asarray(np.roll(g, neg, axes)).reshape(g.shape),)

    return make_result(np.asarray(np.roll(a.data, shift, axes)).reshape(a.data.shape), (a,), backward, "roll", saved=())


class MovementMethods:
    """Tensor's shape methods (mixed into Tensor)."""

    __slots__ = ()

    def reshape(self, *shape):
        return reshape(self, *shape)

    def view(self, *shape):
        return view(self, *shape)

    def flatten(self, start_dim=0, end_dim=-1):
        return flatten(self, start_dim, end_dim)

    def permute(self, *dims):
        return permute(self, *dims)

    def transpose(self, dim0=0, dim1=1):
        return transpose(self, dim0, dim1)

    def t(self):
        return t(self)

    @property
    def T(self):
        return permute(self, *reversed(range(self.data.ndim)))

    def squeeze(self, dim=None):
        return squeeze(self, dim)

    def unsqueeze(self, dim):
        return unsqueeze(self, dim)

    def expand(self, *sizes):
        return expand(self, *sizes)

    def contiguous(self):
        return contiguous(self)

    def split(self, split_size_or_sections, dim=0):
        return split(self, split_size_or_sections, dim)

    def chunk(self, chunks, dim=0):
        return chunk(self, chunks, dim)

    def tril(self, diagonal=0):
        return tril(self, diagonal)

    def triu(self, diagonal=0):
        return triu(self, diagonal)

    def repeat(self, *sizes):
        return repeat(self, *sizes)

    def flip(self, *args, dims=None):
        return flip(self, *args, dims=dims)

    def roll(self, shifts, dims=None):
        return roll(self, shifts, dims)
