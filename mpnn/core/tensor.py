"""Tensor and the reverse-mode tape: each op result remembers its parents and a backward closure.

An op is written as a plain function that computes its forward on NumPy arrays and returns
``make_result(out, parents, backward, "name")`` where ``backward(grad) -> tuple`` gives one gradient
(NumPy array or None) per parent. The closure keeps only what backward needs (Chainer's retained
inputs), and ``Tensor.backward`` drops every node it has used, so the graph is freed as the tape unwinds.
"""
from __future__ import annotations

import numpy as np

from mpnn.core.errors import OpError

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

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


class no_grad:
    """Context manager and decorator that stops recording ops on the tape (as torch.no_grad)."""

    def __enter__(self):
        global _grad_enabled
        self._prev = _grad_enabled
        _grad_enabled = False
        return self

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._prev
        return False

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)
        return wrapper


class enable_grad(no_grad):
    """Turns recording back on inside a no_grad block."""

    def __enter__(self):
        global _grad_enabled
        self._prev = _grad_enabled
        _grad_enabled = True
        return self


def to_dtype(dtype) -> np.dtype:
    """Map a dtype given as a NumPy dtype, a type or a name ('float32', 'long', ...) to a NumPy dtype."""
    if isinstance(dtype, str) or dtype is None:
        try:
            return np.dtype(_DTYPES[dtype])
        except KeyError:
            raise TypeError(f"tensor: unknown dtype {dtype!r}; use one of "
                            f"{sorted(k for k in _DTYPES if k)}") from None
    return np.dtype(dtype)


class Node:
    """One recorded op: the tensors it read and the closure that maps its output gradient to theirs."""

    __slots__ = ("parents", "backward", "op")

    def __init__(self, parents, backward, op):
        self.parents = parents
        self.backward = backward
        self.op = op


class Tensor:
    """An n-dimensional array with an optional gradient, shaped after torch.Tensor."""

    __slots__ = ("data", "grad", "requires_grad", "_node", "_hooks", "__weakref__")
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
        self.data = arr
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None
        self._hooks = None

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
    def is_leaf(self):
        return self._node is None

    @property
    def grad_fn(self):
        return self._node

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
        t = Tensor.__new__(Tensor)
        t.data, t.grad, t.requires_grad, t._node, t._hooks = self.data, None, False, None, None
        return t

    def clone(self) -> "Tensor":
        from mpnn.core import ops
        return ops.clone(self)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"requires_grad_: only floating-point tensors can require gradients, "
                            f"got {self.data.dtype}")
        self.requires_grad = flag
        return self

    def zero_(self) -> "Tensor":
        self.data[...] = 0
        return self

    def register_post_accumulate_grad_hook(self, hook):
        """Call ``hook(tensor)`` each time backward has finished accumulating this leaf's .grad."""
        if self._node is not None:
            raise RuntimeError("register_post_accumulate_grad_hook: only leaf tensors have hooks")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(hook)
        return _HookHandle(self._hooks, hook)

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
    def backward(self, gradient=None, retain_graph: bool = False):
        """Accumulate d(self)/d(leaf) into every leaf's .grad; then free the graph unless retained."""
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
        for pre, _ in _backward_hooks:
            if pre is not None:
                pre(self)
        run_backward(self, g, retain_graph)
        for _, post in _backward_hooks:
            if post is not None:
                post(self)

    # Operators and methods are attached by mpnn.core.ops (kept beside their backward there).


class _HookHandle:
    __slots__ = ("_hooks", "_hook")

    def __init__(self, hooks, hook):
        self._hooks, self._hook = hooks, hook

    def remove(self):
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def _toposort(root):
    """Tensors reachable from root that need a gradient, parents before children (iterative DFS)."""
    order = []
    seen = {id(root)}
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        stack.append((t, True))
        node = t._node
        if node is not None:
            for p in node.parents:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    stack.append((p, False))
    return order


_backward_hooks = []  # (pre, post) pairs around every Tensor.backward: telemetry times it
_end_callbacks = []  # run once when the backward in progress ends: DataParallel's final bucket wait


def register_backward_hooks(pre=None, post=None):
    """Call ``pre(root)`` before and ``post(root)`` after every ``Tensor.backward``; returns a handle."""
    entry = (pre, post)
    _backward_hooks.append(entry)
    return _HookHandle(_backward_hooks, entry)


def queue_callback(fn):
    """Run ``fn()`` once when the backward now in progress has visited every node (torch's
    Variable._execution_engine.queue_callback): a grad hook uses it to act after the last gradient."""
    _end_callbacks.append(fn)


def run_backward(root, grad, retain_graph=False):
    try:
        _run_backward(root, grad, retain_graph)
    finally:
        callbacks = _end_callbacks[:]
        _end_callbacks.clear()
    for fn in callbacks:
        fn()


def _run_backward(root, grad, retain_graph):
    order = _toposort(root)
    grads = {id(root): grad}
    for t in reversed(order):
        g = grads.pop(id(t), None)
        node = t._node
        if node is None:
            if g is not None:
                _accumulate_leaf(t, g)
            continue
        if not retain_graph:
            t._node = None
        if g is None:
            continue
        pgrads = node.backward(g)
        for p, pg in zip(node.parents, pgrads):
            if pg is None or not p.requires_grad:
                continue
            key = id(p)
            prev = grads.get(key)
            grads[key] = pg if prev is None else prev + pg
    # a tensor that was an op's output and is now cut loose keeps requires_grad (as torch's would)


def _accumulate_leaf(t, g):
    data = t.data
    if g.shape != data.shape:
        raise OpError("backward", f"gradient of shape {g.shape} reached a leaf of shape {data.shape}")
    if t.grad is None:
        # Copy: an op's backward may hand the same array to several parents.
        t.grad = Tensor._from_array(np.array(g, dtype=data.dtype, copy=True))
    else:
        np.add(t.grad.data, g, out=t.grad.data, casting="unsafe")
    if t._hooks:
        for hook in t._hooks:
            hook(t)


def _from_array(arr, requires_grad=False):
    t = Tensor.__new__(Tensor)
    t.data, t.grad, t.requires_grad, t._node, t._hooks = arr, None, requires_grad, None, None
    return t


Tensor._from_array = staticmethod(_from_array)


def make_result(data, parents, backward, op):
    """Wrap an op's output array; record (parents, backward) on the tape if any parent needs grad."""
    t = Tensor.__new__(Tensor)
    t.data, t.grad, t._hooks = data, None, None
    if _grad_enabled:
        for p in parents:
            if p.requires_grad:
                t.requires_grad = True
                t._node = Node(parents, backward, op)
                return t
    t.requires_grad = False
    t._node = None
    return t


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """Tensor from a Tensor (as is), an array, or a Python number (in ``like``'s dtype when given)."""
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, (int, float, bool)):
        return _from_array(np.asarray(x, dtype=like.data.dtype if like.data.dtype.kind == "f"
                                      else np.result_type(like.data.dtype, type(x))))
    return Tensor(x)


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Make a Tensor: float32 by default for floating data, int64 for integers (as torch.tensor)."""
    if isinstance(data, Tensor):
        data = np.array(data.data, copy=True)
    elif isinstance(data, np.ndarray):
        data = np.array(data, copy=True)
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)
