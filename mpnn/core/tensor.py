"""Tensor: an n-dimensional array with an optional gradient, shaped after torch.Tensor.

The class is assembled from one method mixin per op family (``mpnn.core.elementwise``, ``reduce``, ``movement``,
``indexing``, ``linalg``, ``activation``, ``inplace``), so every operator and method is defined on a class
that readers, IDEs and type checkers see; what is left here is the Python protocol, device/dtype moves, hooks
and ``backward``. Slots, dtypes and ``make_result`` live in ``mpnn.core.tensor_base``; the tape and the
reverse pass in ``mpnn.core.autograd``.
"""

from __future__ import annotations

import weakref

import numpy as np

from mpnn import hooks
from mpnn.core import autograd, tensor_base
from mpnn.core.activation import ActivationMethods
from mpnn.core.elementwise import ElementwiseMethods
from mpnn.core.elementwise import to_dtype as cast
from mpnn.core.grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled  # noqa: F401 (re-exported)
from mpnn.core.indexing import IndexingMethods
from mpnn.core.inplace import InplaceMethods
from mpnn.core.linalg import LinalgMethods
from mpnn.core.movement import MovementMethods
from mpnn.core.reduce import ReduceMethods
from mpnn.core.tensor_base import (  # noqa: F401 (re-exported)
    OUTPUT,
    TensorBase,
    as_tensor,
    bool_,
    check_device,
    float16,
    float32,
    float64,
    from_array,
    init_slots,
    int32,
    int64,
    is_device,
    make_result,
    make_view,
    to_dtype,
)


class Tensor(
    ElementwiseMethods,
    ActivationMethods,
    ReduceMethods,
    MovementMethods,
    IndexingMethods,
    LinalgMethods,
    InplaceMethods,
    TensorBase,
):
    """An n-dimensional array with an optional gradient, shaped after torch.Tensor."""

    __slots__ = ()
    __array_priority__ = 1000  # so ndarray <op> Tensor defers to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is not None:
            arr = np.asarray(data, dtype=to_dtype(dtype))
        else:
            arr = np.asarray(data)
            if arr.dtype.kind == "f":
                if arr.dtype not in (float32, float64, float16):
                    arr = arr.astype(np.float32)
                elif not isinstance(data, np.ndarray) and arr.dtype == float64:
                    arr = arr.astype(np.float32)  # Python floats and lists become float32, as in torch
            elif arr.dtype.kind in "iu":
                if arr.dtype != int64 and not isinstance(data, np.ndarray):
                    arr = arr.astype(np.int64)
            elif arr.dtype.kind not in "b":
                raise TypeError(f"tensor: cannot make a tensor from data of dtype {arr.dtype}")
        if requires_grad and arr.dtype.kind != "f":
            raise TypeError(f"tensor: only floating-point tensors can require gradients, got {arr.dtype}")
        init_slots(self, arr, bool(requires_grad))

    # ----- plain properties -------------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def device(self):
        return "cpu"

    @property
    def is_leaf(self):
        return self._node is None

    @property
    def grad_fn(self):
        return self._node

    @property
    def _version(self) -> int:
        """How many in-place writes this tensor's storage has seen (shared with its views), as torch's."""
        return self._ver.value

    def size(self, dim=None):
        shape = self.data.shape
        if dim is None:
            return shape
        n = len(shape)
        if not -n <= dim < n:
            raise IndexError(
                f"size: dimension {dim} out of range for a tensor of shape {shape} (expected a dim in [{-n}, {n - 1}])"
                if n
                else f"size: dimension specified as {dim} but the tensor has no dimensions"
            )
        return shape[dim]

    def dim(self):
        return self.data.ndim

    def numel(self):
        return self.data.size

    def __len__(self):
        if self.data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.data.shape[0]

    def __iter__(self):
        if self.data.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self.data.shape[0]))

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self):
        if self.data.size != 1:
            raise ValueError(
                f"item: only a one-element tensor converts to a Python scalar, got shape {self.data.shape}"
            )
        return self.data.item()

    def tolist(self):
        return self.data.tolist()

    def detach(self) -> Tensor:
        """The same data, cut from the tape; it shares the version counter, so writing to it in place
        is still caught by a backward that needs the original (as in torch)."""
        t = from_array(self.data)
        t._ver = self._ver
        return t

    def detach_(self) -> Tensor:
        self._node = None
        self.requires_grad = False
        return self

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"requires_grad_: only floating-point tensors can require gradients, got {self.data.dtype}")
        if not flag and self._node is not None:
            raise RuntimeError(
                "requires_grad_: you can only change requires_grad flags of leaf tensors; use "
                "detach() to cut an op's result from the tape"
            )
        self.requires_grad = flag
        return self

    def retain_grad(self) -> None:
        """Keep this non-leaf tensor's gradient in ``.grad`` at the next backward (leaves always keep theirs)."""
        if not self.requires_grad:
            raise RuntimeError("retain_grad: can't retain_grad on a tensor that does not require grad")
        if self._node is not None:
            self._node.retain = weakref.ref(self)

    def register_hook(self, hook):
        """Call ``hook(grad)`` with the gradient flowing into this tensor; a returned tensor replaces it."""
        if not self.requires_grad:
            raise RuntimeError("register_hook: cannot register a hook on a tensor that does not require grad")
        if self._node is None:
            if self._grad_hooks is None:
                self._grad_hooks = []
            registry = self._grad_hooks
        else:
            if self._node.hooks is None:
                self._node.hooks = []
            registry = self._node.hooks
        registry.append(hook)
        return hooks.RemovableHandle(registry, hook)

    def register_post_accumulate_grad_hook(self, hook):
        """Call ``hook(tensor)`` each time backward has finished accumulating this leaf's .grad."""
        if self._node is not None:
            raise RuntimeError("register_post_accumulate_grad_hook: only leaf tensors have hooks")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(hook)
        return hooks.RemovableHandle(self._hooks, hook)

    # ----- device and dtype ---------------------------------------------------------------------
    def to(self, *args, dtype=None, device=None, non_blocking=False, copy=False, memory_format=None):
        """``to(dtype)``, ``to("cpu")``, ``to(device, dtype)``, ``to(other)``, ``to(dtype=..., device=...)``:
        a cast (recorded on the tape) or this tensor itself when nothing changes; devices other than cpu
        are refused by name."""
        for a in args:
            if isinstance(a, Tensor):
                dtype = a.data.dtype
            elif is_device(a):
                device = a
            elif a is not None:
                dtype = a
        check_device(device, "to")
        if dtype is None:
            return self.clone() if copy else self
        out = cast(self, dtype)
        return out.clone() if copy and out is self else out

    def cpu(self) -> Tensor:
        return self

    def cuda(self, *args, **kwargs):
        check_device("cuda", "cuda")

    @property
    def is_cuda(self) -> bool:
        return False

    def type_as(self, other) -> Tensor:
        return self.to(other.data.dtype)

    def float(self):
        return self.to(float32)

    def double(self):
        return self.to(float64)

    def half(self):
        return self.to(float16)

    def long(self):
        return self.to(int64)

    def int(self):
        return self.to(int32)

    def bool(self):
        return self.to(bool_)

    # ----- Python protocol ----------------------------------------------------------------------
    def __repr__(self):
        body = np.array2string(self.data, separator=", ", precision=4, threshold=20)
        extra = ""
        if self.data.dtype != float32:
            extra += f", dtype={self.data.dtype}"
        if self._node is not None:
            extra += f", grad_fn=<{self._node.op}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    def __format__(self, spec):
        if self.data.ndim == 0:
            return self.data.item().__format__(spec)
        return object.__format__(self, spec) if spec else repr(self)

    def __bool__(self):
        return bool(self.data)

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        return int(self.data.__index__())

    # by identity, as object's (tensors are dict keys: optimizer state, hooks); C-level, no Python frame per lookup
    __hash__ = object.__hash__

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

    # ----- the reverse pass -------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph: bool | None = None, create_graph: bool = False, inputs=None):
        """Accumulate d(self)/d(leaf) into every leaf's .grad; then free the graph unless retained."""
        if create_graph:
            raise NotImplementedError("backward: create_graph=True (higher-order gradients) is not supported")
        if inputs is not None:
            raise NotImplementedError("backward: inputs= is not supported; every leaf receives its gradient")
        if not self.requires_grad:
            raise RuntimeError(
                "backward: this tensor does not require grad and has no grad_fn "
                "(did you compute it under no_grad, or from inputs that do not require grad?)"
            )
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward: a gradient can be implied only for a scalar output; this "
                    f"output has shape {self.data.shape}, pass gradient= of that shape"
                )
            g = np.ones_like(self.data)
        else:
            g = gradient.data if isinstance(gradient, Tensor) else np.asarray(gradient, dtype=self.data.dtype)
            if g.shape != self.data.shape:
                raise RuntimeError(f"backward: gradient has shape {g.shape} but the output has shape {self.data.shape}")
        around = tuple(hooks.backward_hooks)
        for pre, _ in around:
            if pre is not None:
                pre(self)
        try:
            autograd.run_backward(self, g, bool(retain_graph))
        finally:
            for _, post in around:
                if post is not None:
                    post(self)


Tensor._from_array = staticmethod(from_array)
tensor_base.bind(Tensor)


def tensor(data, requires_grad: bool = False, dtype=None, device=None) -> Tensor:
    """Make a Tensor: float32 by default for floating data, int64 for integers (as torch.tensor)."""
    check_device(device, "tensor")
    if isinstance(data, Tensor):
        data = np.array(data.data, copy=True)
    elif isinstance(data, np.ndarray):
        data = np.array(data, copy=True)
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# Kept for callers of the old names; new code subscribes through mpnn.hooks.
register_backward_hooks = hooks.register_backward_hooks
queue_callback = hooks.queue_callback
