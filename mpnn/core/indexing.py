"""Indexing ops: tensor[index] (basic indices give views, integer arrays gather), where, masked_fill, embedding;
gather, scatter and scatter_add along a dim; sort, argsort and topk (values on the tape, indices off it)."""

from __future__ import annotations

import builtins
from collections import namedtuple

import numpy as np

from mpnn.core.autograd import SliceGrad
from mpnn.core.elementwise import _pair, unbroadcast
from mpnn.core.errors import OpError
from mpnn.core.indexing_kernels import add_rows
from mpnn.core.random import multinomial
from mpnn.core.tensor_base import TensorBase, as_tensor, from_array, make_result, make_view


def _is_basic(idx):
    if isinstance(idx, tuple):
        return builtins.all(_is_basic(i) for i in idx)
    return idx is None or idx is Ellipsis or isinstance(idx, (int, np.integer, slice))


def _unwrap_index(idx):
    if isinstance(idx, TensorBase):
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
        if basic:  # basic indices never repeat an element: the engine adds the region in place
            return (SliceGrad(shape, idx, g),)
        full = np.zeros(shape, dtype=g.dtype)
        np.add.at(full, idx, g)  # integer arrays may select an element more than once
        return (full,)

    if basic:
        return make_view(out, a, backward, "index", lambda arr: arr[idx])
    if not isinstance(out, np.ndarray):
        out = np.asarray(out, dtype=dtype)
    return make_result(out, (a,), backward, "index", saved=())


def where(cond, a, b):
    cond = cond.data if isinstance(cond, TensorBase) else np.asarray(cond)
    if cond.dtype != np.bool_:
        raise OpError("where", f"condition must be bool, got {cond.dtype}")
    a, b = _pair("where", a, b)
    try:
        out = np.where(cond, a.data, b.data)
    except ValueError:
        raise OpError("where", f"shapes {cond.shape}, {a.data.shape}, {b.data.shape} do not broadcast") from None
    sa, sb = a.data.shape, b.data.shape

    def backward(g):
        return (
            unbroadcast(np.where(cond, g, 0).astype(g.dtype), sa) if a.requires_grad else None,
            unbroadcast(np.where(cond, 0, g).astype(g.dtype), sb) if b.requires_grad else None,
        )

    return make_result(out, (a, b), backward, "where", saved=())


def masked_fill(a, mask, value):
    m = mask.data if isinstance(mask, TensorBase) else np.asarray(mask)
    return where(m, as_tensor(value, like=a), a)


def embedding(input, weight: TensorBase, padding_idx: int | None = None) -> TensorBase:
    """Rows of ``weight`` picked by integer ``input``; the padding row gets no gradient (as torch)."""
    idx = input.data if isinstance(input, TensorBase) else np.asarray(input)
    if idx.dtype.kind not in "iu":
        raise OpError("embedding", f"indices must be integers, got {idx.dtype}")
    num = weight.data.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        bad = idx[(idx < 0) | (idx >= num)].flat[0]
        raise OpError("embedding", f"index {bad} is out of range for an embedding of {num} rows")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num
    out = weight.data[idx]
    wshape = weight.data.shape

    def backward(g):
        full = np.zeros(wshape, dtype=g.dtype)
        add_rows(
            full, np.ascontiguousarray(idx.reshape(-1), dtype=np.int64), np.ascontiguousarray(g.reshape(-1, wshape[1]))
        )
        if padding_idx is not None:
            full[padding_idx] = 0
        return (full,)

    return make_result(out, (weight,), backward, "embedding", saved=())


# ----- gather / scatter along a dim ---------------------------------------------------------------------------
def _dim(op, dim, ndim):
    n = builtins.max(ndim, 1)
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool):
        raise OpError(op, f"dim must be an int, got {dim!r}")
    if not -n <= dim < n:
        raise OpError(op, f"dim {dim} is out of range for a tensor of {ndim} dimensions (expected in [{-n}, {n - 1}])")
    return int(dim) % n


def _along(op, shape, dim, index, src_shape=None):
    """Check ``index`` against a tensor of ``shape`` for gather/scatter along ``dim`` (as torch: the same number
    of dims, no larger than ``shape`` outside ``dim`` nor than ``src_shape`` anywhere, entries in range) and
    return (the advanced index that pairs each entry with its place, the shape to work in, index's shape, the
    index's shape to work in). A 0-d tensor is worked on as shape (1,)."""
    idx = index.data if isinstance(index, TensorBase) else np.asarray(index)
    if idx.dtype.kind not in "iu":
        raise OpError(op, f"index must be an integer tensor (int64), got {idx.dtype}")
    nd = len(shape)
    if idx.ndim != nd:
        raise OpError(op, f"index must have as many dims as the input: index shape {idx.shape}, input shape {shape}")
    if src_shape is not None and len(src_shape) != nd:
        raise OpError(op, f"src must have as many dims as index: src shape {src_shape}, index shape {idx.shape}")
    ax = _dim(op, dim, nd)
    ishape = idx.shape
    if nd == 0:
        shape, idx, src_shape = (1,), idx.reshape(1), None if src_shape is None else (1,)
    for d in range(len(shape)):
        if d != ax and idx.shape[d] > shape[d]:
            raise OpError(
                op,
                f"index of shape {ishape} is larger than the input of shape {tuple(shape)} in dim {d} "
                f"(only dim {dim} may differ)",
            )
        if src_shape is not None and idx.shape[d] > src_shape[d]:
            raise OpError(op, f"index of shape {ishape} is larger than src of shape {tuple(src_shape)} in dim {d}")
    n = shape[ax]
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)].flat[0]
        raise OpError(op, f"index {bad} is out of bounds for dim {dim} with size {n}")
    grids = list(np.ix_(*[np.arange(k) for k in idx.shape]))
    grids[ax] = idx
    return tuple(grids), tuple(shape), ishape, idx.shape


def _corner(arr, shape):
    """The leading ``shape`` block of ``arr`` (the part of src that scatter reads); a 0-d arr as shape (1,)."""
    arr = arr.reshape(1) if arr.ndim == 0 else arr
    return arr[tuple(slice(0, k) for k in shape)]


def gather(input, dim, index, *, sparse_grad=False):
    """out[i][j][k] = input[i][index[i][j][k]][k] for dim=1 (and so on), as torch.gather; the gradient adds
    back into the gathered places (repeated indices accumulate)."""
    ad = input.data
    grids, work, ishape, wshape = _along("gather", ad.shape, dim, index)
    out = ad.reshape(work)[grids].reshape(ishape)
    shape = ad.shape

    def backward(g):
        full = np.zeros(work, dtype=g.dtype)
        np.add.at(full, grids, g.reshape(wshape))
        return (full.reshape(shape),)

    return make_result(out, (input,), backward, "gather", saved=())


def scatter(input, dim, index, src=None, value=None, *, reduce=None):
    """A copy of ``input`` with ``src`` (a tensor) or ``value`` (a number) written at ``index`` along ``dim``, as
    torch.scatter: out[i][index[i][j]] = src[i][j] for dim=1. Gradients as torch's: the input's is zero where
    written; src's is the output gradient gathered at ``index``."""
    if reduce is not None:
        raise OpError("scatter", f"reduce={reduce!r} is not supported; use scatter_add for reduce='add'")
    if src is not None and not isinstance(src, TensorBase):
        src, value = None, src  # scatter(input, dim, index, 2.0): a number in src's place
    if src is None and value is None:
        raise OpError("scatter", "give src (a tensor) or value (a number)")
    ad = input.data
    if src is not None and src.data.dtype != ad.dtype:
        raise OpError("scatter", f"src dtype {src.data.dtype} does not match the input's {ad.dtype}")
    grids, work, _, ishape = _along("scatter", ad.shape, dim, index, None if src is None else src.data.shape)
    out = ad.reshape(work).copy()
    out[grids] = value if src is None else _corner(src.data, ishape)
    shape = ad.shape

    def backward(g):
        g1 = g.reshape(work)
        gi = gs = None
        if input.requires_grad:
            gi = g1.copy()
            gi[grids] = 0
            gi = gi.reshape(shape)
        if src is not None and src.requires_grad:
            gs = np.zeros(src.data.shape if src.data.ndim else (1,), dtype=g.dtype)
            _corner(gs, ishape)[...] = g1[grids]
            gs = gs.reshape(src.data.shape)
        return (gi,) if src is None else (gi, gs)

    return make_result(out.reshape(shape), (input,) if src is None else (input, src), backward, "scatter", saved=())


def scatter_add(input, dim, index, src):
    """A copy of ``input`` with ``src`` added at ``index`` along ``dim`` (repeated indices accumulate), as
    torch.scatter_add; the input's gradient passes through, src's is gathered at ``index``."""
    if not isinstance(src, TensorBase):
        raise OpError("scatter_add", f"src must be a tensor, got {type(src).__name__}")
    ad = input.data
    if src.data.dtype != ad.dtype:
        raise OpError("scatter_add", f"src dtype {src.data.dtype} does not match the input's {ad.dtype}")
    grids, work, _, ishape = _along("scatter_add", ad.shape, dim, index, src.data.shape)
    out = ad.reshape(work).copy()
    np.add.at(out, grids, _corner(src.data, ishape))
    shape = ad.shape

    def backward(g):
        gs = None
        if src.requires_grad:
            gs = np.zeros(src.data.shape if src.data.ndim else (1,), dtype=g.dtype)
            _corner(gs, ishape)[...] = g.reshape(work)[grids]
            gs = gs.reshape(src.data.shape)
        return (g if input.requires_grad else None, gs)

    return make_result(out.reshape(shape), (input, src), backward, "scatter_add", saved=())


# ----- sort, argsort, topk ------------------------------------------------------------------------------------
_Sort = namedtuple("sort", ["values", "indices"])  # torch.return_types.sort
_TopK = namedtuple("topk", ["values", "indices"])  # torch.return_types.topk


def _order(x, ax, descending):
    """Indices that sort ``x`` along ``ax``, stable (equal elements keep their order) either way, NaN counted
    greater than every number (as torch). Descending: a stable ascending sort of the reversed input, reversed."""
    if not descending:
        return np.argsort(x, axis=ax, kind="stable")
    n = x.shape[ax]
    return (n - 1) - np.flip(np.argsort(np.flip(x, ax), axis=ax, kind="stable"), ax)


def _take_sorted(op, input, order, ax, out_shape):
    """Values of ``input`` at ``order`` along ``ax`` on the tape (gradient scattered back), indices off it."""
    ad = input.data
    x = ad.reshape(1) if ad.ndim == 0 else ad
    values = np.take_along_axis(x, order, axis=ax)
    shape = ad.shape

    def backward(g):
        full = np.zeros(x.shape, dtype=g.dtype)
        np.put_along_axis(full, order, g.reshape(order.shape), axis=ax)  # indices along ax never repeat
        return (full.reshape(shape),)

    return (
        make_result(values.reshape(out_shape), (input,), backward, op, saved=()),
        from_array(order.astype(np.int64, copy=False).reshape(out_shape)),
    )


def sort(input, dim=-1, descending=False, stable=False):
    """(values, indices) sorted along ``dim``, as torch.sort; always stable, so ``stable=`` changes nothing."""
    ad = input.data
    ax = _dim("sort", dim, ad.ndim)
    order = _order(ad.reshape(1) if ad.ndim == 0 else ad, ax, descending)
    return _Sort(*_take_sorted("sort", input, order, ax, ad.shape))


def argsort(input, dim=-1, descending=False, stable=False):
    """The indices that sort ``input`` along ``dim`` (stable), as torch.argsort; off the tape."""
    ad = input.data
    ax = _dim("argsort", dim, ad.ndim)
    order = _order(ad.reshape(1) if ad.ndim == 0 else ad, ax, descending)
    return from_array(order.astype(np.int64, copy=False).reshape(ad.shape))


def topk(input, k, dim=-1, largest=True, sorted=True):
    """The ``k`` largest (or smallest) elements along ``dim`` as (values, indices), as torch.topk; always in
    sorted order, ties in index order. The values' gradient goes back to the places they came from."""
    ad = input.data
    ax = _dim("topk", dim, ad.ndim)
    n = ad.shape[ax] if ad.ndim else 1
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise OpError("topk", f"k must be an int, got {k!r}")
    if not 0 <= k <= n:
        raise OpError(
            "topk", f"k ({k}) is out of range for dim {dim} of size {n} (shape {ad.shape}); need 0 <= k <= {n}"
        )
    x = ad.reshape(1) if ad.ndim == 0 else ad
    order = _order(x, ax, largest)
    order = order[(slice(None),) * ax + (slice(0, int(k)),)]
    out_shape = ad.shape if ad.ndim == 0 and k == 1 else order.shape
    return _TopK(*_take_sorted("topk", input, order, ax, out_shape))


class IndexingMethods:
    """Tensor's indexing methods (mixed into Tensor); writes (``t[i] = v``) are in mpnn.core.inplace."""

    __slots__ = ()

    def __getitem__(self, idx):
        return getitem(self, idx)

    def masked_fill(self, mask, value):
        return masked_fill(self, mask, value)

    def gather(self, dim, index, *, sparse_grad=False):
        return gather(self, dim, index)

    def scatter(self, dim, index, src=None, value=None, *, reduce=None):
        return scatter(self, dim, index, src, value, reduce=reduce)

    def scatter_add(self, dim, index, src):
        return scatter_add(self, dim, index, src)

    def sort(self, dim=-1, descending=False, stable=False):
        return sort(self, dim, descending, stable)

    def argsort(self, dim=-1, descending=False, stable=False):
        return argsort(self, dim, descending, stable)

    def topk(self, k, dim=-1, largest=True, sorted=True):
        return topk(self, k, dim, largest, sorted)

    def multinomial(self, num_samples, replacement=False, *, generator=None):
        return multinomial(self, num_samples, replacement, generator=generator)
