"""Activations: relu, leaky_relu, sigmoid, tanh, gelu, softmax, log_softmax, dropout; each backward by its forward
(softmax and log_softmax fused, cheaper than composing)."""
from __future__ import annotations

import numpy as np

from mpnn.core.errors import OpError
from mpnn.core.tensor_base import OUTPUT, TensorBase, make_result


def _dim(op, dim, ndim):
    if dim is None:
        raise OpError(op, "dim must be given (implicit dim is deprecated in torch too)")
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise OpError(op, f"dim {dim} is out of range for a tensor of {ndim} dimensions")
    return dim % max(ndim, 1)


def softmax(a: TensorBase, dim: int = None, dtype=None) -> TensorBase:
    x = a.data if dtype is None else a.data.astype(dtype)
    ax = _dim("softmax", dim, x.ndim)
    e = np.exp(x - x.max(axis=ax, keepdims=True))
    out = e / e.sum(axis=ax, keepdims=True)

    def backward(g):
        return (out * (g - (g * out).sum(axis=ax, keepdims=True)),)
    return make_result(out, (a,), backward, "softmax", saved=(OUTPUT,))


def log_softmax(a: TensorBase, dim: int = None, dtype=None) -> TensorBase:
    x = a.data if dtype is None else a.data.astype(dtype)
    ax = _dim("log_softmax", dim, x.ndim)
    z = x - x.max(axis=ax, keepdims=True)
    out = z - np.log(np.exp(z).sum(axis=ax, keepdims=True))

    def backward(g):
        return (g - np.exp(out) * g.sum(axis=ax, keepdims=True),)
    return make_result(out, (a,), backward, "log_softmax", saved=(OUTPUT,))


def dropout(a: TensorBase, p: float = 0.5, training: bool = True) -> TensorBase:
    """Zero each element with probability p and scale the rest by 1/(1-p) (inverted dropout)."""
    if not 0.0 <= p <= 1.0:
        raise OpError("dropout", f"probability p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return a
    from mpnn.core.random import generator
    if p == 1.0:
        mask = np.zeros(a.data.shape, dtype=a.data.dtype)
    else:
        keep = generator().random(a.data.shape, dtype=np.float32) >= p
        mask = keep.astype(a.data.dtype) * a.data.dtype.type(1.0 / (1.0 - p))

    def backward(g):
        return (g * mask,)
    return make_result(a.data * mask, (a,), backward, "dropout", saved=())


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



class ActivationMethods:
    """Tensor's activation methods (mixed into Tensor)."""

    __slots__ = ()

    def relu(self):
        return relu(self)

    def leaky_relu(self, negative_slope=0.01):
        return leaky_relu(self, negative_slope)

    def sigmoid(self):
        return sigmoid(self)

    def tanh(self):
        return tanh(self)

    def gelu(self, approximate="none"):
        return gelu(self, approximate)

    def softmax(self, dim=None, dtype=None):
        return softmax(self, dim, dtype)

    def log_softmax(self, dim=None, dtype=None):
        return log_softmax(self, dim, dtype)
