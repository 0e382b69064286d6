"""Tensor: an n-dimensional array with an optional gradient, shaped after torch.Tensor.

A tensor holds its NumPy array (``data``), its ``grad``, and its place on the tape (``mpnn.core.autograd``):
the node that made it, the version counter it shares with its views, and, for a view, its base and how to
take the view from the base (so an in-place write through the view can be differentiated). Ops are plain
functions that compute on arrays and call ``make_result``; the operators and methods are defined on the class
by the per-family mixins of ``mpnn.core.ops``.
"""
from __future__ import annotations

import weakref

import numpy as np

from mpnn import hooks
from mpnn.core import autograd
from mpnn.core.autograd import Node, Version, edge_of, saved_versions
from mpnn.core.errors import OpError
from mpnn.core.grad_mode import _state as _grad_state
from mpnn.core.grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled  # noqa: F401 (re-exported)

_DTYPES = {
    None: np.float32, "float32": np.float32, "float": np.float32, "float64": np.float64,
    "double": np.float64, "float16": np.float16, "half": np.float16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int64, "bool": np.bool_, "uint8": np.uint8,
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
            raise TypeError(f"tensor: unknown dtype {dtype!r}; use one of "
                            f"{sorted(k for k in _DTYPES if k)}") from None
    return np.dtype(dtype)


def check_device(device, where: str = "tensor") -> None:
    """mpnn computes on the CPU: accept device "cpu" (or None), refuse any other by name."""
    if device is None:
        return
    name = str(getattr(device, "type", device))
    if name.split(":")[0] != "cpu":
        raise RuntimeError(f"{where}: device {name!r} is not available: mpnn runs on the CPU only (device='cpu')")


def _is_device(x) -> bool:
    return isinstance(x, str) and x.split(":")[0] in ("cpu", "cuda", "mps", "xpu", "meta", "hip")


class Tensor:
    """An n-dimensional array with an optional gradient, shaped after torch.Tensor."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "_hooks", "_grad_hooks", "_ver", "_base", "_view_fn",
                 "_view_ver", "__weakref__")
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
        _init(self, arr, bool(requires_grad))

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
        return self.data.shape if dim is None else self.data.shape[dim]

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
            raise ValueError(f"item: only a one-element tensor converts to a Python scalar, "
                             f"got shape {self.data.shape}")
        return self.data.item()

    def tolist(self):
        return self.data.tolist()

    def detach(self) -> "Tensor":
        """The same data, cut from the tape; it shares the version counter, so writing to it in place
        is still caught by a backward that needs the original (as in torch)."""
        t = _from_array(self.data)
        t._ver = self._ver
        return t

    def detach_(self) -> "Tensor":
        self._node = None
        self.requires_grad = False
        return self

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"requires_grad_: only floating-point tensors can require gradients, "
                            f"got {self.data.dtype}")
        if not flag and self._node is not None:
            raise RuntimeError("requires_grad_: you can only change requires_grad flags of leaf tensors; use "
                               "detach() to cut an op's result from the tape")
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
            elif _is_device(a) or type(a).__name__ == "device":
                device = a
            elif a is not None:
                dtype = a
        check_device(device, "to")
        if dtype is None:
            return self.clone() if copy else self
        from mpnn.core import ops
        out = ops.to_dtype(self, dtype)
        return out.clone() if copy and out is self else out

    def cpu(self) -> "Tensor":
        return self

    def cuda(self, *args, **kwargs):
        check_device("cuda", "cuda")

    @property
    def is_cuda(self) -> bool:
        return False

    def type_as(self, other) -> "Tensor":
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

    def __hash__(self):
        return id(self)

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
            raise RuntimeError("backward: this tensor does not require grad and has no grad_fn "
                               "(did you compute it under no_grad, or from inputs that do not require grad?)")
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward: a gradient can be implied only for a scalar output; this "
                                   f"output has shape {self.data.shape}, pass gradient= of that shape")
            g = np.ones_like(self.data)
        else:
            g = gradient.data if isinstance(gradient, Tensor) else np.asarray(gradient, dtype=self.data.dtype)
            if g.shape != self.data.shape:
                raise RuntimeError(f"backward: gradient has shape {g.shape} but the output has shape "
                                   f"{self.data.shape}")
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


def _init(t, arr, requires_grad):
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


def _from_array(arr, requires_grad=False):
    t = Tensor.__new__(Tensor)
    _init(t, arr, requires_grad)
    return t


Tensor._from_array = staticmethod(_from_array)


def make_result(data, parents, backward, op, saved=None):
    """Wrap an op's output array; record (edges to parents, backward) on the tape if any parent needs grad.

    ``saved``: the tensors (parents, or ``OUTPUT`` for the result) whose values ``backward`` reads; a later
    in-place write to one of them makes backward raise instead of computing a wrong gradient. None (the
    default) means every parent and the output: safe for any op, and precise once an op declares its own.
    """
    if type(data) is not np.ndarray:
        data = np.asarray(data)
    t = Tensor.__new__(Tensor)
    _init(t, data, False)
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
    elif saved and saved[-1] is OUTPUT:  # by convention OUTPUT comes last
        saved = saved[:-1] + (t,)
    t.requires_grad = True
    t._node = Node(tuple(edges), backward, op, saved_versions(saved) if saved else (), data.shape)
    return t


OUTPUT = object()  # in make_result's saved=: "the result itself" (exp, sqrt, sigmoid read their output)


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


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """Tensor from a Tensor (as is), an array, or a Python number (in ``like``'s dtype when given)."""
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (int, float, bool)):
        return _from_array(np.asarray(x, dtype=like.data.dtype if like.data.dtype.kind == "f"
                                      else np.result_type(like.data.dtype, type(x))))
    return Tensor(x)


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
