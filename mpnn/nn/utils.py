"""Gradient clipping and flat-vector views of parameters, as torch.nn.utils."""

from __future__ import annotations

import math

import numpy as np

from mpnn.core.inplace import bump_version
from mpnn.core.tensor import Tensor


def _grads(parameters) -> list:
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad.data for p in parameters if p.grad is not None]


# mpnn.compile's recorder while it captures a step (mpnn/capture/recorder.py), None otherwise: clipping reads and
# scales the .grad arrays in NumPy, which no op records, so the recorder records the call and replays it whole.
capture_call = None


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Scale all gradients together so that their joint ``norm_type`` norm is at most max_norm.

    Returns the norm before clipping as a float32 Tensor; per-tensor norms are summed in float64.
    """
    if capture_call is not None:
        return capture_call(_clip_grad_norm, parameters, max_norm, norm_type, error_if_nonfinite)
    return _clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite)


def _clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite):
    grads = _grads(parameters)
    norm_type = float(norm_type)
    if not grads:
        return Tensor(np.zeros((), dtype=np.float32))
    if norm_type == math.inf:
        total = max(float(np.max(np.abs(g))) if g.size else 0.0 for g in grads)
    elif norm_type == 2.0:
        total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))  # BLAS dot, no temporary
    elif norm_type > 0:
        total = sum(float(np.sum(np.abs(g.astype(np.float64)) ** norm_type)) for g in grads) ** (1.0 / norm_type)
    else:
        raise ValueError(f"clip_grad_norm_: norm_type must be positive or inf, got {norm_type}")
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"clip_grad_norm_: the total norm of order {norm_type} for gradients is non-finite "
            f"({total}), so it cannot be clipped; set error_if_nonfinite=False to clip anyway"
        )
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return Tensor(np.asarray(total, dtype=np.float32))


def clip_grad_value_(parameters, clip_value: float) -> None:
    """Clamp every gradient element into [-clip_value, clip_value], in place."""
    if capture_call is not None:
        return capture_call(_clip_grad_value, parameters, clip_value)
    return _clip_grad_value(parameters, clip_value)


def _clip_grad_value(parameters, clip_value):
    clip_value = float(clip_value)
    for g in _grads(parameters):
        np.clip(g, -clip_value, clip_value, out=g)


def parameters_to_vector(parameters) -> Tensor:
    """All parameters flattened and concatenated into one new 1-d Tensor (a copy, no gradient)."""
    arrays = [p.data.ravel() for p in parameters]
    if not arrays:
        raise ValueError("parameters_to_vector: no parameters given")
    return Tensor(np.concatenate(arrays))


def vector_to_parameters(vec: Tensor, parameters) -> None:
    """Copy consecutive slices of a 1-d vector into the parameters, in place (inverse of the above)."""
    flat = vec.data if isinstance(vec, Tensor) else np.asarray(vec)
    parameters = list(parameters)
    need = sum(p.data.size for p in parameters)
    if flat.ndim != 1 or flat.size != need:
        raise ValueError(f"vector_to_parameters: expected a 1-d vector of {need} elements, got shape {flat.shape}")
    offset = 0
    for p in parameters:
        n = p.data.size
        p.data[...] = flat[offset : offset + n].reshape(p.data.shape)
        bump_version(p)
        offset += n
