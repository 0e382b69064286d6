"""What every op needs to make a tensor: the storage and tape slots (``TensorBase``), dtypes, and the two ways
an op puts its result on the tape (``make_result``, ``make_view``).

The op families (elementwise, reduce, movement, indexing, linalg, activation, ...) import this module, not
``mpnn.core.tensor``: ``Tensor`` is built from their method mixins, so it is defined after them and registers
itself here (``bind``) for ``make_result`` to instantiate.
"""

from __future__ import annotations

import numpy as np

from mpnn.core.autograd import Node, Version, edge_of, saved_versions
from mpnn.core.grad_mode import _state as _grad_state

_DTYPES = {
    None: np.float32,
    "float32": np.float32,
    "float": np.float32,
    "float64": np.float64,
    "double": np.float64,
    "float16": np.float16,
    "half": np.float16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int64,
    "bool": np.bool_,
    "uint8": np.uint8,
}

float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
float16 = np.dtype(np.float16)
int64 = np.dtype(np.int64)
int32 = np.dtype(np.int32)
bool_ = np.dtype(np.bool_)


def to_dtype(dtype) -> np.dtype:
    """Map a dtype given as a NumPy dtype, a type or a name ('float32', 'long', ...) to a NumPy dtype."""
    if isinstance(dtype, str) or dtype is None:
        try:
            return np.dtype(_DTYPES[dtype])
        except KeyError:
            raise TypeError(f"tensor: unknown dtype {dtype!r}; use one of {sorted(k for k in _DTYPES if k)}") from None
    return np.dtype(dtype)


def check_device(device, where: str = "tensor") -> None:
    """mpnn computes on the CPU: accept device "cpu" (or None), refuse any other by name."""
    if device is None:
        return
    name = str(getattr(device, "type", device))
    if name.split(":")[0] != "cpu":
        raise RuntimeError(f"{where}: device {name!r} is not available: mpnn runs on the CPU only (device='cpu')")


def is_device(x) -> bool:
    """True for a device name ("cpu", "cuda:0", ...) or a torch-style device object."""
    if isinstance(x, str):
        return x.split(":")[0] in ("cpu", "cuda", "mps", "xpu", "meta", "hip")
    return type(x).__name__ == "device"


class TensorBase:
    """The slots of a tensor: its array, gradient, and place on the tape (node, version counter shared with
    its views, and for a view its base and how to take the view from the base's array)."""

    __slots__ = (
        "data",
        "grad",
        "requires_grad",
        "_node",
        "_hooks",
        "_grad_hooks",
        "_ver",
        "_base",
        "_view_fn",
        "_view_ver",
        "__weakref__",
    )


_tensor_class: type = TensorBase  # the full Tensor, once mpnn.core.tensor has built it


def bind(cls: type) -> None:
    """Called once by mpnn.core.tensor: the class that make_result and from_array instantiate."""
    global _tensor_class
    _tensor_class = cls


def init_slots(t, arr, requires_grad: bool) -> None:
    t.data = arr
    t.grad = None
    t.requires_grad = requires_grad
    t._node = None
    t._hooks = None
    t._grad_hooks = None
    t._ver = Version()
    t._base = None
    t._view_fn = None
    t._view_ver = 0


def from_array(arr, requires_grad: bool = False):
    """A tensor around ``arr`` as it is (no copy, no dtype change), off the tape."""
    cls = _tensor_class
    t = cls.__new__(cls)
    init_slots(t, arr, requires_grad)
    return t


OUTPUT = object()  # in make_result's saved=: "the result itself" (exp, sqrt, sigmoid read their output)

# mpnn.compile's recorder while it captures a step (see mpnn/capture/recorder.py), None otherwise: the eager path
# pays one global load and compare per op for it. Called with the result before it goes on the tape.
capture_hook = None


def make_result(data, parents, backward, op, saved=None):
    """Wrap an op's output array; record (edges to parents, backward) on the tape if any parent needs grad.

    ``saved``: the tensors (parents, and ``OUTPUT`` last for the result) whose values ``backward`` reads; a
    later in-place write to one of them makes backward raise instead of computing a wrong gradient. None (the
    default) means every parent and the output: safe for any op, precise once an op declares its own.
    """
    if type(data) is not np.ndarray:
        data = np.asarray(data)
    cls = _tensor_class
    t = cls.__new__(cls)
    init_slots(t, data, False)
    if capture_hook is not None:
        capture_hook(t, parents, backward, op)
    if not getattr(_grad_state, "enabled", True):
        return t
    edges = None
    for i, p in enumerate(parents):
        if p.requires_grad:
            if edges is None:
                edges = [None] * len(parents)
            edges[i] = edge_of(p)
    if edges is None:
        return t
    if saved is None:
        saved = tuple(parents) + (t,)
    elif saved and saved[-1] is OUTPUT:
        saved = saved[:-1] + (t,)
    t.requires_grad = True
    t._node = Node(tuple(edges), backward, op, saved_versions(saved) if saved else (), data.shape)
    return t


def make_view(data, a, backward, op, view_fn):
    """``make_result`` for an op whose output may share ``a``'s memory (reshape, transpose, slicing, ...):
    when NumPy returned a view, the result shares ``a``'s version counter and remembers its base and
    ``view_fn`` (base array -> this view), so in-place writes through it are seen and differentiated."""
    t = make_result(data, (a,), backward, op, saved=())
    if data is a.data or (data.base is not None and np.may_share_memory(data, a.data)):
        t._ver = a._ver
        base = a._base
        if base is None:
            t._base, t._view_fn = a, view_fn
        else:
            outer = a._view_fn
            t._base, t._view_fn = base, (lambda arr: view_fn(outer(arr)))
        t._view_ver = a._ver.value
    return t


def as_tensor(x, like=None):
    """Tensor from a Tensor (as is), an array, or a Python number (in ``like``'s dtype when given)."""
    if isinstance(x, TensorBase):
        return x
    if like is not None and isinstance(x, (int, float, bool)):
        return from_array(
            np.asarray(
                x, dtype=like.data.dtype if like.data.dtype.kind == "f" else np.result_type(like.data.dtype, type(x))
            )
        )
    return _tensor_class(x)
