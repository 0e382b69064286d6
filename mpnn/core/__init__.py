"""The autodiff engine: Tensor, the tape, the op set, Numba kernels and the gradient check."""

from mpnn.core import ops  # noqa: F401  (the op set in one namespace; importing it builds Tensor)
from mpnn.core.errors import OpError
from mpnn.core.gradcheck import GradcheckError, gradcheck
from mpnn.core.tensor import (
    Tensor,
    bool_,
    enable_grad,
    float16,
    float32,
    float64,
    int32,
    int64,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
    tensor,
)
from mpnn.core.warmup import warmup

__all__ = [
    "Tensor",
    "tensor",
    "no_grad",
    "enable_grad",
    "set_grad_enabled",
    "is_grad_enabled",
    "gradcheck",
    "GradcheckError",
    "OpError",
    "warmup",
    "float16",
    "float32",
    "float64",
    "int32",
    "int64",
    "bool_",
]
