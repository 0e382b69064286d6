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


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def relu(a):
    """max(x, 0); float arrays through activation_kernels' one-pass loops (the same bits as NumPy's)."""
    from mpnn.core import activation_kernels as K

    ad = a.data
    if ad.dtype in _FLOATS and ad.flags.c_contiguous:
        out = np.empty_like(ad)
        K.relu_forward(ad.reshape(-1), out.reshape(-1))
    else:
        out = np.maximum(ad, 0)

    def backward(g):
        if g.dtype == out.dtype and out.dtype in _FLOATS and g.flags.c_contiguous and out.flags.c_contiguous:
            dx = np.empty_like(out)
            K.relu_backward(g.reshape(-1), out.reshape(-1), dx.reshape(-1))
            return (dx,)
        return (g * (out > 0),)

    # the output, not the input, as torch saves: in a conv-BN-ReLU chain the next conv keeps that same array,
    # so the BatchNorm output can go (ResNet-18, batch 32: peak RSS 740 -> 675 MiB, benchmarks/resnet18.py)
    return make_result(out, (a,), backward, "relu", saved=(OUTPUT,))


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
    """GELU, exact (erf) by default or the tanh approximation, as torch.nn.functional.gelu; fused Numba loops
    (mpnn.core.activation_kernels says what was measured), other dtypes through float32."""
    if approximate not in ("none", "tanh"):
        raise OpError("gelu", f"approximate must be 'none' or 'tanh', got {approximate!r}")
    from mpnn.core import activation_kernels as K

    ad = a.data
    x = K.flat(ad if ad.dtype in (np.float32, np.float64) else ad.astype(np.float32))
    out = np.empty_like(x)
    kept = np.empty_like(x)  # the CDF (exact) or tanh(inner) (approximation), which backward reads
    if approximate == "none":
        (K.gelu_forward_float32 if x.dtype == np.float32 else K.gelu_forward_exact)(x, out, kept)
    else:
        K.gelu_tanh_inner(x, kept)
        np.tanh(kept, out=kept)
        K.gelu_tanh_forward(x, kept, out)

    def backward(g):
        gf = K.flat(g.astype(x.dtype, copy=False))
        gx = np.empty_like(x)
        if approximate == "none" and x.dtype == np.float32:
            K.gelu_backward_float32(x, gf, kept, gx)
        elif approximate == "none":
            gauss = np.multiply(x, x, out=np.empty_like(x))
            gauss *= -0.5
            np.exp(gauss, out=gauss)
            K.gelu_backward(x, gf, kept, gauss, gx)
        else:
            K.gelu_tanh_backward(x, kept, gf, gx)
        return (gx.reshape(ad.shape).astype(ad.dtype, copy=False),)

    return make_result(out.reshape(ad.shape).astype(ad.dtype, copy=False), (a,), backward, "gelu", saved=(a,))


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
