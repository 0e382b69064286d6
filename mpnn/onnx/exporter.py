"""The ONNX exporter: trace one forward pass of a model in eval mode and write the ops it ran as an ONNX graph.

How the trace works. For the length of one forward pass, Module.__call__, a set of Tensor methods and a set of
mpnn.nn.functional functions are replaced by recording wrappers (and put back afterwards, even on error):

- a call of a known layer (LAYERS below: Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm, the activations, pooling,
  Flatten, Embedding, Dropout, Identity) runs as usual and records one ONNX node (or a few) from the layer's own
  attributes; what the layer does inside is not traced. Containers and layers with their own forward() (residual
  blocks, attention) are entered, and what they run is traced;
- a traced tensor op (GLUE below: + - * / @, relu/sigmoid/tanh/exp, (log_)softmax, reshape/view/flatten,
  transpose/permute/contiguous, split, basic indexing, F.linear, F.gelu, F.scaled_dot_product_attention, ...)
  records its own nodes.

Every value the trace makes is known by the id of its Tensor. A tensor the graph reads that the trace did not make
is a parameter or buffer (an initializer under its state_dict name; a tied weight once) or a constant (an
initializer of its value: e.g. mpnn.arange positions). A tensor that sits on the autograd tape (it was computed
from the input or a parameter) but was made by an op the trace does not know would be silently frozen into a
constant: the export refuses it instead, naming the op (its autograd node) and the layer whose forward ran it.
So does an in-place write to a traced value (its version counter moved).

The batch axis: the graph's inputs and outputs have a symbolic first axis ("batch"); reshapes that keep the first
axis copy it at run time (ONNX Reshape's 0), reshapes that fold it into the first axis use -1 there. Other axes
(sequence length included) are fixed to the example input's sizes.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np

from mpnn.core.grad_mode import enable_grad
from mpnn.core.tensor import Tensor
from mpnn.core.tensor_base import from_array
from mpnn.nn import functional as F
from mpnn.nn.activation import GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from mpnn.nn.activation import Dropout as _Dropout
from mpnn.nn.conv import Conv1d, Conv2d
from mpnn.nn.linear import Embedding, Identity, Linear
from mpnn.nn.module import Module
from mpnn.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from mpnn.nn.pooling import AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, Flatten, MaxPool1d, MaxPool2d

DEFAULT_OPSET = 17  # LayerNormalization needs 17; GELU is one Gelu node from opset 20, composed below it
_ONNX_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.int64): 7, np.dtype(np.int32): 6, np.dtype(np.float64): 11}


class ExportError(ValueError):
    """A model, input or op that mpnn.onnx.export cannot write; the message names the layer and the op."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise ImportError("mpnn.onnx.export needs the onnx package: pip install 'mpnn[onnx]'") from None
    return onnx, helper, numpy_helper


def export(model, example_input, path, opset: int = DEFAULT_OPSET, input_names=None, output_names=None, check=True):
    """Trace `model` in eval mode on `example_input` (a Tensor or array, or a tuple of them) and write an ONNX
    model to `path`; returns the onnx ModelProto. Inputs and outputs have a dynamic first (batch) axis. The
    model's training flags are restored afterwards. check=True runs onnx.checker.check_model (full_check) on it.

    Refused, naming the layer and op: a layer or tensor op the exporter does not know, a layer in a mode ONNX
    cannot express (BatchNorm without running statistics, padding modes other than zeros, return_indices)."""
    onnx, helper, _ = _onnx()
    if not isinstance(model, Module):
        raise ExportError(f"mpnn.onnx.export: expected an mpnn.nn.Module, got {type(model).__name__}")
    if not isinstance(opset, int) or not 17 <= opset <= 23:
        raise ExportError(f"mpnn.onnx.export: opset={opset!r}: mpnn writes opsets 17 to 23")
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        tracer = _Tracer(model, opset)
        graph = tracer.trace(inputs, input_names, output_names)
    finally:
        for module, mode in modes:
            module.training = mode
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mpnn", ir_version=_ir_version(opset)
    )
    if check:
        onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, os.fspath(path))
    return proto


def _ir_version(opset: int) -> int:
    return {17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}[opset]


# ----- the trace ---------------------------------------------------------------------------------------------
class _Value:
    __slots__ = ("name", "batch", "version", "tensor")

    def __init__(self, name, batch, version, tensor):
        self.name, self.batch, self.version, self.tensor = name, batch, version, tensor


class _Tracer:
    def __init__(self, model: Module, opset: int):
        _, self.helper, self.numpy_helper = _onnx()
        self.model, self.opset = model, opset
        self.nodes, self.initializers = [], []
        self.values: dict[int, _Value] = {}
        self.by_node: dict[int, _Value] = {}  # id(autograd node) -> the traced value it made
        self.params = {}  # id(parameter or buffer) -> state_dict name (the first name of a tied weight)
        for name, tensor in model._state_tensors().items():
            self.params.setdefault(id(tensor), name)
        self.made_params = {}
        self.module_names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        self.stack = [model]  # the layers being run, innermost last (for messages)
        self.busy = 0  # > 0 inside a recorded layer or op: what runs there is not traced
        self.counter = 0

    # ----- names and nodes -----
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def node(self, op_type, inputs, n_out=1, hint=None, **attrs):
        outs = [self.fresh(hint or op_type) for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs if n_out > 1 else outs[0]

    def const(self, array, hint="const") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values, hint="shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def where(self) -> str:
        module = self.stack[-1]
        return f"{type(module).__name__} ({self.module_names.get(id(module), '?')})"

    def fail(self, why: str):
        raise ExportError(f"mpnn.onnx.export: {self.where()}: {why}")

    # ----- values -----
    def traced(self, x) -> bool:
        return isinstance(x, Tensor) and id(x) in self.values

    def set(self, tensor, name: str, batch) -> None:
        value = _Value(name, batch, tensor._version, tensor)
        self.values[id(tensor)] = value
        if tensor.grad_fn is not None:
            self.by_node[id(tensor.grad_fn)] = value

    def from_tape(self, x) -> str:
        """A tensor made by an op the wrappers did not see (e.g. an activation function bound before the trace
        began, as TransformerEncoderLayer's F.relu): recorded from its autograd node when the op takes no
        attributes and its one input is traced; refused naming the op otherwise."""
        node = x.grad_fn
        op_type = _TAPE_UNARY.get(node.name())
        edges = [e for e in node.edges if e is not None]
        if op_type is not None and len(node.edges) == 1 and len(edges) == 1:
            edge = edges[0]
            parent = self.by_node.get(id(edge)) if not isinstance(edge, Tensor) else self.values.get(id(edge))
            if parent is not None:
                name = self.node(op_type, [parent.name])
                self.set(x, name, parent.batch)
                return name
        self.fail(
            f"it reads a tensor made by op {node.name()!r}, which mpnn cannot export to ONNX; export handles the "
            f"layers {', '.join(sorted(c.__name__ for c in LAYERS))} and the tensor ops of mpnn/onnx/exporter.py"
        )

    def on_tape(self, x) -> bool:
        """A traced value, or a tensor computed from one by an op the wrappers did not see (refused when read)."""
        return isinstance(x, Tensor) and (id(x) in self.values or x.grad_fn is not None)

    def batch(self, x):
        value = self.values.get(id(x)) if isinstance(x, Tensor) else None
        return value.batch if value is not None else None

    def name(self, x, like=None) -> str:
        """The graph value holding x: a traced value, a parameter, or a constant made now."""
        if isinstance(x, Tensor):
            value = self.values.get(id(x))
            if value is not None:
                if x._version != value.version:
                    self.fail("a traced value was written in place (in-place ops are not exported)")
                return value.name
            key = id(x)
            if key in self.params:
                if key not in self.made_params:
                    name = self.params[key]
                    self.initializers.append(self.numpy_helper.from_array(np.asarray(x.data), name))
                    self.made_params[key] = name
                return self.made_params[key]
            if x.grad_fn is not None:
                return self.from_tape(x)
            return self.const(x.data)
        dtype = like.data.dtype if isinstance(like, Tensor) else np.float32
        return self.const(np.asarray(x, dtype=dtype))

    # ----- the run -----
    def trace(self, inputs, input_names, output_names):
        helper = self.helper
        graph_inputs, args = [], []
        for i, x in enumerate(inputs):
            array = np.asarray(x.data if isinstance(x, Tensor) else x)
            if array.dtype not in _ONNX_DTYPES:
                raise ExportError(f"mpnn.onnx.export: input {i} has dtype {array.dtype}; give float32 or int64")
            if array.ndim == 0:
                raise ExportError(f"mpnn.onnx.export: input {i} is 0-d; inputs need a batch axis")
            t = from_array(array.copy(), requires_grad=array.dtype.kind == "f")
            name = (input_names or [])[i] if input_names and i < len(input_names) else f"input_{i}"
            self.set(t, name, 0)
            graph_inputs.append(
                helper.make_tensor_value_info(name, _ONNX_DTYPES[array.dtype], ["batch", *array.shape[1:]])
            )
            args.append(t)
        with _patched(self), enable_grad():
            out = self.model(*args)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o is not None]
        graph_outputs = []
        for i, o in enumerate(outs):
            if not isinstance(o, Tensor):
                raise ExportError(f"mpnn.onnx.export: the model returned a {type(o).__name__}; export needs tensors")
            source = self.name(o)
            name = output_names[i] if output_names and i < len(output_names) else f"output_{i}"
            self.nodes.append(helper.make_node("Identity", [source], [name]))
            dims = list(o.shape)
            if self.batch(o) == 0:
                dims[0] = "batch"
            graph_outputs.append(helper.make_tensor_value_info(name, _ONNX_DTYPES[o.data.dtype], dims))
        return helper.make_graph(self.nodes, "mpnn", graph_inputs, graph_outputs, self.initializers)

    # ----- layer calls -----
    def call(self, module, original, args, kwargs):
        if self.busy:
            return original(module, *args, **kwargs)
        emit = LAYERS.get(type(module))
        self.stack.append(module)
        try:
            if emit is None:  # a container or a layer with its own forward: trace what it runs
                return original(module, *args, **kwargs)
            self.busy += 1
            try:
                out = original(module, *args, **kwargs)
            finally:
                self.busy -= 1
            if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
                self.fail("a layer called with other than one tensor is not exported")
            emit(self, module, args[0], out)  # applied to a constant (positions into an Embedding): recorded too
            return out
        finally:
            self.stack.pop()

    def op(self, name, original, emit, args, kwargs):
        if self.busy or not any(self.on_tape(a) for a in _flat(args, kwargs)):
            return original(*args, **kwargs)
        self.busy += 1
        try:
            out = original(*args, **kwargs)
        finally:
            self.busy -= 1
        emit(self, out, *args, **kwargs)
        return out

    # ----- helpers for emitters -----
    def reshape(self, x, out) -> None:
        """Reshape x to out's shape, keeping the batch axis dynamic."""
        shape = list(out.shape)
        batch = None
        if self.batch(x) == 0 and shape and x.shape:
            if shape[0] == x.shape[0]:
                shape[0], batch = 0, 0  # copy the batch size at run time
            elif shape[0] % x.shape[0] == 0:
                shape[0] = -1  # the batch folded into the first axis
        self.set(out, self.node("Reshape", [self.name(x), self.ints(shape)]), batch)


@contextmanager
def _patched(tracer: _Tracer):
    """Module.__call__, GLUE's Tensor methods and functions replaced by recording wrappers for the trace."""
    saved = []

    def patch(owner, attr, wrapper):
        saved.append((owner, attr, owner.__dict__.get(attr, _MISSING)))
        setattr(owner, attr, wrapper)

    original_call = Module.__call__

    def call(module, *args, **kwargs):
        return tracer.call(module, original_call, args, kwargs)

    patch(Module, "__call__", call)
    for attr, emit in TENSOR_GLUE.items():
        original = getattr(Tensor, attr)
        patch(Tensor, attr, _method(tracer, attr, original, emit))
    for attr, emit in FUNCTION_GLUE.items():
        original = getattr(F, attr)
        patch(F, attr, _function(tracer, attr, original, emit))
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)


_MISSING = object()


def _method(tracer, attr, original, emit):
    def wrapper(self, *args, **kwargs):
        return tracer.op(attr, original, emit, (self, *args), kwargs)

    wrapper.__name__ = attr
    return wrapper


def _function(tracer, attr, original, emit):
    def wrapper(*args, **kwargs):
        return tracer.op(attr, original, emit, args, kwargs)

    wrapper.__name__ = attr
    return wrapper


def _flat(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, (tuple, list)):
            yield from a
        else:
            yield a


# ----- layers: one emitter each (tracer, module, input tensor, output tensor) --------------------------------
def _unary(op_type, **attrs):
    def emit(t, m, x, out):
        t.set(out, t.node(op_type, [t.name(x)], **attrs), t.batch(x))

    return emit


def _same(t, m, x, out):
    t.set(out, t.name(x), t.batch(x))


def _linear(t, x, weight, bias, out):
    if x.ndim == 2:
        inputs = [t.name(x), t.name(weight)] + ([t.name(bias)] if bias is not None else [])
        t.set(out, t.node("Gemm", inputs, transB=1), t.batch(x))
        return
    y = t.node("MatMul", [t.name(x), t.node("Transpose", [t.name(weight)], perm=[1, 0])])
    if bias is not None:
        y = t.node("Add", [y, t.name(bias)])
    t.set(out, y, t.batch(x))


def _linear_layer(t, m, x, out):
    _linear(t, x, m.weight, m.bias, out)


def _conv(t, m, x, out):
    if m.padding_mode != "zeros":
        t.fail(f"padding_mode={m.padding_mode!r} is not exported (only 'zeros')")
    n = len(m.kernel_size)
    if m.padding == "valid":
        pairs = [(0, 0)] * n
    elif m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        pairs = [(s // 2, s - s // 2) for s in total]
    else:
        pairs = [(p, p) for p in m.padding]
    pads = [lo for lo, _ in pairs] + [hi for _, hi in pairs]
    inputs = [t.name(x), t.name(m.weight)] + ([t.name(m.bias)] if m.bias is not None else [])
    y = t.node(
        "Conv",
        inputs,
        kernel_shape=list(m.kernel_size),
        strides=list(m.stride),
        dilations=list(m.dilation),
        pads=pads,
        group=m.groups,
    )
    t.set(out, y, t.batch(x))


def _batch_norm(t, m, x, out):
    if m.running_mean is None:
        t.fail(
            "BatchNorm without running statistics (track_running_stats=False) normalises with the batch's own "
            "statistics in eval mode: not exported"
        )
    c = m.num_features
    dtype = m.running_mean.data.dtype
    scale = t.name(m.weight) if m.weight is not None else t.const(np.ones(c, dtype))
    bias = t.name(m.bias) if m.bias is not None else t.const(np.zeros(c, dtype))
    y = t.node(
        "BatchNormalization",
        [t.name(x), scale, bias, t.name(m.running_mean), t.name(m.running_var)],
        epsilon=float(m.eps),
    )
    t.set(out, y, t.batch(x))


def _layer_norm(t, m, x, out):
    _layer_norm_op(t, x, m.normalized_shape, m.weight, m.bias, m.eps, out)


def _layer_norm_op(t, x, shape, weight, bias, eps, out):
    dtype = x.data.dtype
    scale = t.name(weight) if weight is not None else t.const(np.ones(shape, dtype))
    inputs = [t.name(x), scale] + ([t.name(bias)] if bias is not None else [])
    y = t.node("LayerNormalization", inputs, axis=-len(shape), epsilon=float(eps))
    t.set(out, y, t.batch(x))


def _gelu_op(t, x, approximate, out):
    if t.opset >= 20:
        t.set(out, t.node("Gelu", [t.name(x)], approximate=approximate), t.batch(x))
        return
    dtype = x.data.dtype
    xn = t.name(x)
    if approximate == "tanh":
        cube = t.node("Mul", [t.node("Mul", [xn, xn]), xn])
        inner = t.node("Add", [xn, t.node("Mul", [cube, t.const(np.asarray(0.044715, dtype))])])
        core = t.node("Tanh", [t.node("Mul", [inner, t.const(np.asarray(math.sqrt(2 / math.pi), dtype))])])
    else:
        core = t.node("Erf", [t.node("Mul", [xn, t.const(np.asarray(1 / math.sqrt(2), dtype))])])
    half_x = t.node("Mul", [xn, t.const(np.asarray(0.5, dtype))])
    y = t.node("Mul", [half_x, t.node("Add", [core, t.const(np.asarray(1.0, dtype))])])
    t.set(out, y, t.batch(x))


def _gelu_layer(t, m, x, out):
    _gelu_op(t, x, m.approximate, out)


def _softmax_layer(op_type):
    def emit(t, m, x, out):
        if m.dim is None:
            t.fail(f"{type(m).__name__}(dim=None): give dim")
        t.set(out, t.node(op_type, [t.name(x)], axis=int(m.dim)), t.batch(x))

    return emit


def _pairs(value, n):
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def _max_pool(n):
    def emit(t, m, x, out):
        if m.return_indices:
            t.fail("return_indices=True is not exported")
        pad = _pairs(m.padding, n)
        y = t.node(
            "MaxPool",
            [t.name(x)],
            kernel_shape=_pairs(m.kernel_size, n),
            strides=_pairs(m.stride, n),
            pads=pad + pad,
            dilations=_pairs(m.dilation, n),
            ceil_mode=int(bool(m.ceil_mode)),
        )
        t.set(out, y, t.batch(x))

    return emit


def _avg_pool(n):
    def emit(t, m, x, out):
        if getattr(m, "divisor_override", None) is not None:
            t.fail("divisor_override is not exported")
        pad = _pairs(m.padding, n)
        y = t.node(
            "AveragePool",
            [t.name(x)],
            kernel_shape=_pairs(m.kernel_size, n),
            strides=_pairs(m.stride, n),
            pads=pad + pad,
            ceil_mode=int(bool(m.ceil_mode)),
            count_include_pad=int(bool(m.count_include_pad)),
        )
        t.set(out, y, t.batch(x))

    return emit


def _adaptive_avg_pool2d(t, m, x, out):
    size = _pairs(m.output_size, 2)
    h, w = x.shape[-2:]
    size = [h if s is None else s for s in size[:1]] + [w if s is None else s for s in size[1:]]
    if size == [1, 1]:
        t.set(out, t.node("GlobalAveragePool", [t.name(x)]), t.batch(x))
    elif h % size[0] == 0 and w % size[1] == 0:
        kernel = [h // size[0], w // size[1]]
        t.set(out, t.node("AveragePool", [t.name(x)], kernel_shape=kernel, strides=kernel), t.batch(x))
    else:
        t.fail(f"output_size {tuple(size)} does not divide the input's {h}x{w}: not exported")


def _flatten_layer(t, m, x, out):
    _flatten_op(t, x, m.start_dim, m.end_dim, out)


def _flatten_op(t, x, start_dim, end_dim, out):
    if x.ndim >= 2 and start_dim % x.ndim == 1 and end_dim % x.ndim == x.ndim - 1:
        t.set(out, t.node("Flatten", [t.name(x)], axis=1), t.batch(x))
    else:
        t.reshape(x, out)


def _embedding(t, m, x, out):
    t.set(out, t.node("Gather", [t.name(m.weight), t.name(x)], axis=0), t.batch(x))


LAYERS = {
    Linear: _linear_layer,
    Conv1d: _conv,
    Conv2d: _conv,
    BatchNorm1d: _batch_norm,
    BatchNorm2d: _batch_norm,
    LayerNorm: _layer_norm,
    ReLU: _unary("Relu"),
    LeakyReLU: lambda t, m, x, out: _unary("LeakyRelu", alpha=float(m.negative_slope))(t, m, x, out),
    GELU: _gelu_layer,
    Sigmoid: _unary("Sigmoid"),
    Tanh: _unary("Tanh"),
    Softmax: _softmax_layer("Softmax"),
    LogSoftmax: _softmax_layer("LogSoftmax"),
    MaxPool1d: _max_pool(1),
    MaxPool2d: _max_pool(2),
    AvgPool1d: _avg_pool(1),
    AvgPool2d: _avg_pool(2),
    AdaptiveAvgPool2d: _adaptive_avg_pool2d,
    Flatten: _flatten_layer,
    Embedding: _embedding,
    _Dropout: _same,
    Identity: _same,
}


# ----- tensor ops in custom forwards: emit(tracer, out, *args, **kwargs) -------------------------------------
def _binary(op_type, reverse=False):
    def emit(t, out, a, b):
        tensor = a if isinstance(a, Tensor) else b
        x, y = t.name(a, like=tensor), t.name(b, like=tensor)
        if reverse:
            x, y = y, x
        batch = t.batch(a) if t.batch(a) is not None else t.batch(b)
        t.set(out, t.node(op_type, [x, y]), batch)

    return emit


def _unary_op(op_type):
    def emit(t, out, x, *args, **kwargs):
        t.set(out, t.node(op_type, [t.name(x)]), t.batch(x))

    return emit


def _identity_op(t, out, x, *args, **kwargs):
    t.set(out, t.name(x), t.batch(x))


def _softmax_op(op_type):
    def emit(t, out, x, dim=None, *args, **kwargs):
        dim = kwargs.get("dim", dim)
        if dim is None:
            t.fail(f"{op_type}(dim=None): give dim")
        t.set(out, t.node(op_type, [t.name(x)], axis=int(dim)), t.batch(x))

    return emit


def _reshape_op(t, out, x, *shape, **kwargs):
    t.reshape(x, out)


def _flatten_method(t, out, x, start_dim=0, end_dim=-1):
    _flatten_op(t, x, start_dim, end_dim, out)


def _transpose_op(t, out, x, dim0=0, dim1=1):
    n = x.ndim
    perm = list(range(n))
    perm[dim0 % n], perm[dim1 % n] = perm[dim1 % n], perm[dim0 % n]
    _permute(t, out, x, perm)


def _permute_op(t, out, x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    _permute(t, out, x, [d % x.ndim for d in dims])


def _permute(t, out, x, perm):
    batch = t.batch(x)
    t.set(out, t.node("Transpose", [t.name(x)], perm=perm), perm.index(batch) if batch is not None else None)


def _split_op(t, out, x, split_size_or_sections, dim=0):
    axis = dim % x.ndim
    sizes = [o.shape[axis] for o in out]
    batch = t.batch(x)
    if batch == axis:
        t.fail("split along the batch axis is not exported")
    names = t.node("Split", [t.name(x), t.ints(sizes, "split")], n_out=len(out), axis=axis)
    for o, name in zip(out, names if len(out) > 1 else [names]):
        t.set(o, name, batch)


def _getitem_op(t, out, x, index):
    items = index if isinstance(index, tuple) else (index,)
    if any(i is None or i is Ellipsis for i in items) or len(items) > x.ndim:
        t.fail(f"indexing with {index!r} is not exported (slices, ints and lists of ints are)")
    name, batch = t.name(x), t.batch(x)
    axis = 0  # the axis of `name` the next index entry applies to
    for in_axis, item in enumerate(items):
        if isinstance(item, slice):
            size = x.shape[in_axis]
            start, stop, step = item.indices(size)
            if (start, stop, step) != (0, size, 1):
                if axis == batch:
                    t.fail("slicing the batch axis is not exported")
                end = stop if stop >= 0 else -(2**62)  # a negative step running past index 0
                name = t.node("Slice", [name, t.ints([start]), t.ints([end]), t.ints([axis]), t.ints([step])])
            axis += 1
        elif isinstance(item, (int, np.integer)) or (
            isinstance(item, list) and all(isinstance(i, (int, np.integer)) for i in item)
        ):
            if axis == batch:
                t.fail("indexing the batch axis is not exported")
            name = t.node("Gather", [name, t.ints(item, "index")], axis=axis)
            if isinstance(item, list):
                axis += 1
            elif batch is not None and batch > axis:
                batch -= 1
        else:
            t.fail(f"indexing with {type(item).__name__} is not exported (slices, ints and lists of ints are)")
    t.set(out, name, batch)


def _linear_op(t, out, x, weight, bias=None):
    _linear(t, x, weight, bias, out)


def _gelu_op_f(t, out, x, approximate="none"):
    _gelu_op(t, x, approximate, out)


def _leaky_relu_op(t, out, x, negative_slope=0.01, *args, **kwargs):
    t.set(out, t.node("LeakyRelu", [t.name(x)], alpha=float(negative_slope)), t.batch(x))


def _dropout_op(t, out, x, p=0.5, training=True, *args, **kwargs):
    if training and p > 0:
        t.fail("F.dropout(training=True) in eval-mode export: pass training=self.training")
    t.set(out, t.name(x), t.batch(x))


def _layer_norm_f(t, out, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    _layer_norm_op(t, x, shape, weight, bias, eps, out)


def _sdpa_op(t, out, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if dropout_p:
        t.fail(f"scaled_dot_product_attention(dropout_p={dropout_p}) in eval-mode export: pass 0.0 when not training")
    if enable_gqa or q.shape[:-2] != k.shape[:-2]:
        t.fail("scaled_dot_product_attention with grouped or broadcast heads is not exported")
    dtype = q.data.dtype
    n = k.ndim
    perm = list(range(n - 2)) + [n - 1, n - 2]
    scores = t.node("MatMul", [t.name(q), t.node("Transpose", [t.name(k)], perm=perm)])
    factor = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = t.node("Mul", [scores, t.const(np.asarray(factor, dtype))])
    length, source = q.shape[-2], k.shape[-2]
    if is_causal:
        mask = np.where(np.tril(np.ones((length, source), dtype=bool)), 0.0, -np.inf).astype(dtype)
        scores = t.node("Add", [scores, t.const(mask, "causal_mask")])
    if attn_mask is not None:
        if attn_mask.data.dtype == np.bool_:
            additive = np.where(attn_mask.data, 0.0, -np.inf).astype(dtype)
            scores = t.node("Add", [scores, t.const(additive, "attn_mask")])
        else:
            scores = t.node("Add", [scores, t.name(attn_mask)])
    weights = t.node("Softmax", [scores], axis=-1)
    t.set(out, t.node("MatMul", [weights, t.name(v)]), t.batch(q))


# Ops recognised on the autograd tape when no wrapper saw them: attribute-free, one input (the node's op name).
_TAPE_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "neg": "Neg", "abs": "Abs"}

TENSOR_GLUE = {
    "__add__": _binary("Add"),
    "__radd__": _binary("Add", reverse=True),
    "__sub__": _binary("Sub"),
    "__rsub__": _binary("Sub", reverse=True),
    "__mul__": _binary("Mul"),
    "__rmul__": _binary("Mul", reverse=True),
    "__truediv__": _binary("Div"),
    "__rtruediv__": _binary("Div", reverse=True),
    "__matmul__": _binary("MatMul"),
    "__neg__": _unary_op("Neg"),
    "relu": _unary_op("Relu"),
    "sigmoid": _unary_op("Sigmoid"),
    "tanh": _unary_op("Tanh"),
    "exp": _unary_op("Exp"),
    "softmax": _softmax_op("Softmax"),
    "log_softmax": _softmax_op("LogSoftmax"),
    "reshape": _reshape_op,
    "view": _reshape_op,
    "flatten": _flatten_method,
    "transpose": _transpose_op,
    "permute": _permute_op,
    "contiguous": _identity_op,
    "split": _split_op,
    "__getitem__": _getitem_op,
}

FUNCTION_GLUE = {
    "relu": _unary_op("Relu"),
    "sigmoid": _unary_op("Sigmoid"),
    "tanh": _unary_op("Tanh"),
    "gelu": _gelu_op_f,
    "leaky_relu": _leaky_relu_op,
    "softmax": _softmax_op("Softmax"),
    "log_softmax": _softmax_op("LogSoftmax"),
    "dropout": _dropout_op,
    "linear": _linear_op,
    "layer_norm": _layer_norm_f,
    "flatten": _flatten_method,
    "scaled_dot_product_attention": _sdpa_op,
}
