"""Losses with torch.nn.functional's signatures; cross_entropy fuses log_softmax and nll in one node."""

from __future__ import annotations

import numpy as np

from mpnn.core import ops
from mpnn.core.errors import OpError
from mpnn.core.tensor import Tensor, as_tensor, make_result

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(op, reduction):
    if reduction not in _REDUCTIONS:
        raise OpError(op, f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _class_last(op, x, target):
    """(N, C, d1, ...) logits and (N, d1, ...) labels -> (M, C) rows and (M,) labels."""
    if x.ndim == 1:
        x = x[None, :]
        target = target.reshape(1)
    if x.ndim < 2:
        raise OpError(op, f"input must have shape (N, C) or (N, C, d1, ...), got {x.shape}")
    expect = (x.shape[0],) + x.shape[2:]
    if target.shape != expect:
        raise OpError(
            op,
            f"target of shape {target.shape} does not match input of shape {x.shape} (expected target shape {expect})",
        )
    c = x.shape[1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, c) if x.ndim > 2 else x
    return rows, target.reshape(-1), c


def _check_labels(op, labels, c, ignore_index):
    if labels.dtype.kind not in "iu":
        raise OpError(op, f"target must hold integer class labels, got dtype {labels.dtype}")
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= c))
    if bad.any():
        raise OpError(
            op,
            f"target label {int(labels[bad][0])} is out of range for {c} classes "
            f"(valid labels are 0..{c - 1}, or ignore_index={ignore_index})",
        )
    return valid


def cross_entropy(
    input: Tensor, target, weight=None, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0
) -> Tensor:
    """Softmax cross-entropy against integer labels (or class probabilities of the input's shape)."""
    _check_reduction("cross_entropy", reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise OpError("cross_entropy", f"label_smoothing must be in [0, 1], got {label_smoothing}")
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    x = input.data
    if t.dtype.kind == "f":
        return _cross_entropy_probs(input, target, weight, reduction, label_smoothing)
    rows, labels, c = _class_last("cross_entropy", x, t)
    valid = _check_labels("cross_entropy", labels, c, ignore_index)
    w = None if weight is None else (weight.data if isinstance(weight, Tensor) else np.asarray(weight))
    if w is not None and w.shape != (c,):
        raise OpError("cross_entropy", f"weight has shape {w.shape}, expected ({c},)")
    e, s, logp = _log_softmax_rows(rows)
    safe = np.where(valid, labels, 0)
    # q: the target distribution per row, times class weights; the loss is -sum(q * logp).
    eps = label_smoothing
    wrow = np.ones(len(labels), dtype=x.dtype) if w is None else w[safe].astype(x.dtype)
    wrow = wrow * valid
    picked = logp[np.arange(len(labels)), safe]
    loss = -(1 - eps) * wrow * picked
    if eps:
        cls_w = np.ones(c, dtype=x.dtype) if w is None else w.astype(x.dtype)
        loss = loss - eps / c * (logp @ cls_w) * valid
    denom = wrow.sum() if reduction == "mean" else 1
    if reduction == "mean":
        out = np.asarray(loss.sum() / denom, dtype=x.dtype)
    elif reduction == "sum":
        out = np.asarray(loss.sum(), dtype=x.dtype)
    else:
        out = loss.reshape(t.shape).astype(x.dtype, copy=False)
    shape, ndim = x.shape, x.ndim

    def backward(g):
        p = e / s
        q = np.zeros_like(rows)
        q[np.arange(len(labels)), safe] = (1 - eps) * wrow
        if eps:
            q += (eps / c) * cls_w[None, :] * valid[:, None]
        grow = p * q.sum(axis=1, keepdims=True) - q
        gscale = g.reshape(-1)[:, None] if reduction == "none" else g / denom
        grow = (grow * gscale).astype(x.dtype, copy=False)
        if ndim == 1:
            return (grow.reshape(shape),)
        if ndim > 2:
            grow = np.moveaxis(grow.reshape((shape[0],) + shape[2:] + (shape[1],)), -1, 1)
        return (np.ascontiguousarray(grow),)

    return make_result(out, (input,), backward, "cross_entropy", saved=())


def _log_softmax_rows(rows):
    """exp(rows - max), its row sums and log-softmax, as cross_entropy computes them (mpnn.compile's replayed
    cross-entropy calls this too, so both give the same bits)."""
    z = rows - rows.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    return e, s, z - np.log(s)


def _cross_entropy_probs(input, target, weight, reduction, label_smoothing):
    target = as_tensor(target)
    if target.data.shape != input.data.shape:
        raise OpError(
            "cross_entropy",
            f"probability target of shape {target.data.shape} must match input shape {input.data.shape}",
        )
    c = input.data.shape[1] if input.data.ndim > 1 else input.data.shape[0]
    dim = 1 if input.data.ndim > 1 else 0
    from mpnn.core.activation import log_softmax

    q = target * (1 - label_smoothing) + label_smoothing / c
    logp = log_softmax(input, dim=dim)
    if weight is not None:
        wshape = [1] * input.data.ndim
        wshape[dim] = c
        logp = logp * as_tensor(weight).reshape(*wshape)
    loss = -(q * logp).sum(dim=dim)
    return _reduce(loss, reduction, input.data.shape[0] if reduction == "mean" else None)


def _reduce(loss, reduction, count=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def nll_loss(input: Tensor, target, weight=None, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer labels given log-probabilities (N, C[, d...])."""
    _check_reduction("nll_loss", reduction)
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    x = input.data
    rows, labels, c = _class_last("nll_loss", x, t)
    valid = _check_labels("nll_loss", labels, c, ignore_index)
    w = None if weight is None else (weight.data if isinstance(weight, Tensor) else np.asarray(weight))
    safe = np.where(valid, labels, 0)
    wrow = (np.ones(len(labels), dtype=x.dtype) if w is None else w[safe].astype(x.dtype)) * valid
    loss = -wrow * rows[np.arange(len(labels)), safe]
    denom = wrow.sum() if reduction == "mean" else 1
    if reduction == "none":
        out = loss.reshape(t.shape)
    else:
        out = np.asarray(loss.sum() / denom, dtype=x.dtype)
    shape, ndim = x.shape, x.ndim

    def backward(g):
        grow = np.zeros_like(rows)
        gscale = g.reshape(-1) if reduction == "none" else g / denom
        grow[np.arange(len(labels)), safe] = -wrow * gscale
        if ndim == 1:
            return (grow.reshape(shape),)
        if ndim > 2:
            grow = np.moveaxis(grow.reshape((shape[0],) + shape[2:] + (shape[1],)), -1, 1)
        return (np.ascontiguousarray(grow),)

    return make_result(out.astype(x.dtype, copy=False), (input,), backward, "nll_loss", saved=())


def _same_shape(op, a, b):
    if a.data.shape != b.data.shape:
        raise OpError(
            op,
            f"input of shape {a.data.shape} and target of shape {b.data.shape} differ; "
            f"reshape one of them (broadcasting here is almost always a bug)",
        )


def mse_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:
    _check_reduction("mse_loss", reduction)
    target = as_tensor(target, like=input)
    _same_shape("mse_loss", input, target)
    d = input - target
    return _reduce(d * d, reduction)


def l1_loss(input: Tensor, target, reduction: str = "mean") -> Tensor:
    _check_reduction("l1_loss", reduction)
    target = as_tensor(target, like=input)
    _same_shape("l1_loss", input, target)
    return _reduce(ops.abs(input - target), reduction)


def binary_cross_entropy_with_logits(
    input: Tensor, target, weight=None, reduction: str = "mean", pos_weight=None
) -> Tensor:
    """Sigmoid + binary cross-entropy in one stable node: log(1 + e^-|x|) + max(-x, 0) never overflows."""
    _check_reduction("binary_cross_entropy_with_logits", reduction)
    target = as_tensor(target, like=input)
    _same_shape("binary_cross_entropy_with_logits", input, target)
    x, y = input.data, target.data
    pw = None if pos_weight is None else as_tensor(pos_weight).data
    w = None if weight is None else as_tensor(weight).data
    softplus_neg = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0)  # = -log(sigmoid(x))
    coef = 1 + (pw - 1) * y if pw is not None else 1
    loss = (1 - y) * x + coef * softplus_neg
    if w is not None:
        loss = loss * w
    if reduction == "mean":
        out = np.asarray(loss.mean(), dtype=x.dtype)
    elif reduction == "sum":
        out = np.asarray(loss.sum(), dtype=x.dtype)
    else:
        out = loss.astype(x.dtype, copy=False)
    n = x.size

    def backward(g):
        e = np.exp(-np.abs(x))
        sig = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        pwt = pw * y if pw is not None else y
        grad = sig * (pwt + 1 - y) - pwt
        if w is not None:
            grad = grad * w
        scale = g / n if reduction == "mean" else g
        gx = (grad * scale).astype(x.dtype, copy=False)
        gy = None
        if target.requires_grad:
            gy = ((-x + (pw - 1) * softplus_neg if pw is not None else -x) * scale).astype(x.dtype)
            gy = gy * w if w is not None else gy
            gy = gy.astype(x.dtype, copy=False)
        return gx if input.requires_grad else None, gy

    return make_result(out, (input, target), backward, "binary_cross_entropy_with_logits", saved=(input, target))
