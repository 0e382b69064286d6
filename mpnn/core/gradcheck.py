"""Finite-difference gradient check in float64: the test every op's backward must pass."""

from __future__ import annotations

import numpy as np

from mpnn.core.tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """Analytic and numeric gradients disagree; the message names the input, element and both values."""


def _output_tensors(out):
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, Tensor) and o.data.dtype.kind == "f"]
    raise TypeError(f"gradcheck: fn must return a Tensor or a tuple of Tensors, got {type(out).__name__}")


def gradcheck(
    fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4, seed: int = 0, raise_exception: bool = True
) -> bool:
    """Compare backward's gradients of ``fn(*inputs)`` with central finite differences.

    Each output is contracted with a fixed random weight so that every output element's gradient
    path is exercised. Inputs that require grad must be float64 (float32 differences fail falsely).
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    for i in checked:
        if inputs[i].data.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {inputs[i].data.dtype}; use float64 inputs")
    rng = np.random.default_rng(seed)
    outs = _output_tensors(fn(*inputs))
    weights = [rng.standard_normal(o.data.shape) for o in outs]

    def scalar():
        with no_grad():
            return float(
                sum(np.sum(o.data.astype(np.float64) * w) for o, w in zip(_output_tensors(fn(*inputs)), weights))
            )

    for i in checked:
        inputs[i].grad = None
    loss = None
    for o, w in zip(outs, weights):
        if not o.requires_grad:
            continue
        term = (o * Tensor._from_array(w.astype(o.data.dtype))).sum()
        loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()

    for i in checked:
        x = inputs[i]
        analytic = np.zeros(x.data.shape) if x.grad is None else np.asarray(x.grad.data, dtype=np.float64)
        numeric = np.zeros(x.data.shape)
        flat_index = np.ndindex(*x.data.shape) if x.data.ndim else [()]
        for idx in flat_index:
            orig = x.data[idx]
            x.data[idx] = orig + eps
            plus = scalar()
            x.data[idx] = orig - eps
            minus = scalar()
            x.data[idx] = orig
            numeric[idx] = (plus - minus) / (2 * eps)
        bad = np.abs(analytic - numeric) > atol + rtol * np.abs(numeric)
        if bad.any():
            where = tuple(int(k) for k in np.argwhere(bad)[0])
            msg = (
                f"gradcheck: input {i} (shape {x.data.shape}) gradient mismatch at {where}: "
                f"analytic {analytic[where]:.8g}, numeric {numeric[where]:.8g}; "
                f"{int(bad.sum())} of {bad.size} elements off, max abs diff "
                f"{np.max(np.abs(analytic - numeric)):.3g}"
            )
            if raise_exception:
                raise GradcheckError(msg)
            return False
    return True
