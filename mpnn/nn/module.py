"""Module and Parameter: the PyTorch-shaped way to hold learnable state and save it by dotted name.

Attribute assignment registers things: a Parameter goes to ``_parameters``, a Module to ``_modules``,
a tensor assigned to a name made by ``register_buffer`` stays a buffer. ``state_dict`` walks the tree
in PyTorch's order (own parameters, own persistent buffers, then children) with PyTorch's keys.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np

from mpnn.core.inplace import bump_version
from mpnn.core.tensor import Tensor, is_device, to_dtype


class Parameter(Tensor):
    """A Tensor that a Module registers as learnable; requires grad by default and shares ``data``."""

    __slots__ = ()

    def __init__(self, data=None, requires_grad: bool = True):
        if data is None:
            data = np.empty(0, dtype=np.float32)
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


_IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

# Bumped by every attribute assignment, deletion and registration on any Module (train()/eval() and private plain
# attributes, "_name" = a value that is not a Parameter, Module or buffer, excepted): a cheap "did anything change"
# for mpnn.compile, which rechecks the modules of a captured step only when this moved.
_changes = [0]


def attribute_changes() -> int:
    """How many attribute assignments, deletions and registrations all Modules have seen, private plain attributes
    aside (mpnn.compile's guard)."""
    return _changes[0]


def _addindent(text: str, spaces: int) -> str:
    lines = text.split("\n")
    return lines[0] if len(lines) == 1 else "\n".join([lines[0]] + [" " * spaces + ln for ln in lines[1:]])


class Module:
    """Base class of every layer and model: registration, traversal, train/eval, state_dict."""

    def __init__(self):
        d = self.__dict__
        d["training"] = True
        d["_parameters"] = OrderedDict()
        d["_buffers"] = OrderedDict()
        d["_non_persistent_buffers_set"] = set()
        d["_modules"] = OrderedDict()

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f'Module [{type(self).__name__}] is missing the required "forward" function')

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ----- registration -----------------------------------------------------------------------
    def _check_ready(self, what: str):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {what} before Module.__init__() call")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter (or None, a declared but absent one such as bias=False) under ``name``."""
        _changes[0] += 1
        self._check_ready("parameter")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"cannot assign '{type(param).__name__}' object to parameter '{name}' (nn.Parameter or None required)"
            )
        self._check_name(name, "parameter")
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Add non-learnable state (running statistics); persistent buffers go into state_dict."""
        _changes[0] += 1
        self._check_ready("buffer")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(
                f"cannot assign '{type(tensor).__name__}' object to buffer '{name}' (mpnn Tensor or None required)"
            )
        self._check_name(name, "buffer")
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        """Add a child module under ``name`` (its parameters get the prefix ``name.``)."""
        _changes[0] += 1
        self._check_ready("module")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {type(module).__name__} is not a Module subclass")
        self._check_name(name, "module")
        self._modules[name] = module

    register_module = add_module

    def _check_name(self, name, kind):
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"{kind} name must be a non-empty string without '.', got {name!r}")
        own = {"parameter": "_parameters", "buffer": "_buffers", "module": "_modules"}[kind]
        d = self.__dict__
        if name in d or any(name in d[store] for store in ("_parameters", "_buffers", "_modules") if store != own):
            raise KeyError(f"attribute '{name}' already exists")

    def __setattr__(self, name, value):
        d = self.__dict__
        params, buffers, modules = d.get("_parameters"), d.get("_buffers"), d.get("_modules")
        if (
            name[:1] != "_"
            or isinstance(value, (Parameter, Module))
            or any(store is not None and name in store for store in (params, buffers, modules))
        ):  # a private plain attribute is the module's own bookkeeping (DataParallel's step count): not counted
            _changes[0] += 1
        if isinstance(value, Parameter):
            self._check_ready("parameters")
            self._forget(name)
            params[name] = value
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as parameter '{name}' (nn.Parameter or None expected)"
                )
            params[name] = None
        elif isinstance(value, Module):
            self._check_ready("child module")
            self._forget(name)
            modules[name] = value
        elif modules is not None and name in modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as child module '{name}' (nn.Module or None expected)"
                )
            modules[name] = None
        elif buffers is not None and name in buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as buffer '{name}' (mpnn Tensor or None expected)"
                )
            buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name):
        d = self.__dict__
        d.pop(name, None)
        for store in ("_parameters", "_buffers", "_modules"):
            d[store].pop(name, None)
        d["_non_persistent_buffers_set"].discard(name)

    def __getattr__(self, name):
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            registered = d.get(store)
            if registered is not None and name in registered:
                return registered[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name):
        _changes[0] += 1  # (rare: counted whatever the name)
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if name in d.get(store, ()):
                del d[store][name]
                d["_non_persistent_buffers_set"].discard(name)
                return
        object.__delattr__(self, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers) | set(self._modules))

    # ----- traversal --------------------------------------------------------------------------
    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """Yield (dotted name, module) for this module and every descendant, each once."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(memo, f"{prefix}.{name}" if prefix else name, remove_duplicate)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        seen = set()
        for name, child in self._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                yield name, child

    def children(self):
        for _, m in self.named_children():
            yield m

    def _named_members(self, store, prefix, recurse, remove_duplicate):
        seen = set()
        mods = self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate) if recurse else [(prefix, self)]
        for mod_prefix, mod in mods:
            for name, value in mod.__dict__[store].items():
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), value

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """Yield (dotted name, Parameter), each shared parameter once, in registration order."""
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True):
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # ----- modes and bulk changes -------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        if not isinstance(mode, bool):
            raise ValueError(f"train: training mode is expected to be boolean, got {mode!r}")
        for m in self.modules():
            m.__dict__["training"] = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero in place) every parameter's .grad."""
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.data[...] = 0

    def apply(self, fn) -> Module:
        """Call ``fn(module)`` on every child (recursively), then on self, as torch's apply."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def to(self, *args, dtype=None, device=None, non_blocking: bool = False, memory_format=None) -> Module:
        """Cast floating parameters and buffers to ``dtype``; the only device is 'cpu'.

        Accepts torch's forms: ``to(device)``, ``to(dtype)``, ``to(device, dtype)``, ``to(tensor)`` (its dtype)
        and the keywords. ``non_blocking`` and ``memory_format`` are accepted and have nothing to do on the CPU.
        As in PyTorch, each Parameter object is kept (optimizers still hold it) but a cast gives it a new array.
        """
        for arg in args:
            if isinstance(arg, Tensor):
                dtype = arg.data.dtype
            elif is_device(arg):
                device = arg
            elif arg is not None:
                dtype = arg
        if device is not None and str(getattr(device, "type", device)).split(":")[0] != "cpu":
            raise ValueError(f"to: mpnn runs on the CPU only, got device {str(device)!r}")
        if dtype is None:
            return self
        dt = to_dtype(dtype)
        if dt.kind != "f":
            raise TypeError(f"to: Module.to only accepts floating point dtypes, got {dt}")
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data.dtype.kind == "f" and t.data.dtype != dt:
                t.data = t.data.astype(dt)
                if t.grad is not None:
                    t.grad.data = t.grad.data.astype(dt)
        return self

    def cpu(self) -> Module:
        """Every tensor already lives on the CPU: returns self (as torch's ``cpu()`` for a CPU module)."""
        return self

    def cuda(self, device=None) -> Module:
        raise ValueError("cuda: mpnn runs on the CPU only; use .to('cpu') or leave the module where it is")

    def half(self) -> Module:
        return self.to(np.float16)

    # ----- lookup by dotted name ----------------------------------------------------------------
    def get_submodule(self, target: str) -> Module:
        """The module at dotted path ``target`` ('' is self), as torch's get_submodule."""
        mod = self
        for item in target.split(".") if target else ():
            child = mod._modules.get(item) if isinstance(mod, Module) else None
            if child is None:
                raise AttributeError(f"{type(mod).__name__} has no attribute `{item}`")
            mod = child
        return mod

    def get_parameter(self, target: str) -> Parameter:
        module_path, _, name = target.rpartition(".")
        mod = self.get_submodule(module_path)
        p = mod._parameters.get(name)
        if not isinstance(p, Parameter):
            raise AttributeError(f"`{name}` is not an nn.Parameter of {type(mod).__name__}")
        return p

    def get_buffer(self, target: str) -> Tensor:
        module_path, _, name = target.rpartition(".")
        mod = self.get_submodule(module_path)
        if name not in mod._buffers or mod._buffers[name] is None:
            raise AttributeError(f"`{name}` is not a buffer of {type(mod).__name__}")
        return mod._buffers[name]

    def float(self) -> Module:
        return self.to(np.float32)

    def double(self) -> Module:
        return self.to(np.float64)

    # ----- state_dict -------------------------------------------------------------------------
    def _state_tensors(self, prefix: str = "", out=None) -> OrderedDict[str, Tensor]:
        """Every tensor state_dict saves, by its PyTorch key, in PyTorch's order (shared ones repeated)."""
        out = OrderedDict() if out is None else out
        for name, p in self._parameters.items():
            if p is not None:
                out[prefix + name] = p
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers_set:
                out[prefix + name] = b
        for name, child in self._modules.items():
            if child is not None:
                child._state_tensors(prefix + name + ".", out)
        return out

    def state_dict(self, prefix: str = "", keep_vars: bool = False) -> OrderedDict[str, Tensor]:
        """Parameters and persistent buffers by dotted name, as torch's: detached tensors that share each one's
        storage (``sd[k].copy_(w)`` under no_grad writes into the model; ``copy.deepcopy`` it for a snapshot);
        the parameters themselves if keep_vars."""
        tensors = self._state_tensors(prefix)
        if keep_vars:
            return tensors
        return OrderedDict((k, t.detach()) for k, t in tensors.items())

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy arrays (or Tensors) into the existing parameters and buffers, in place.

        Every missing key, unexpected key and shape mismatch is listed in one RuntimeError (missing and
        unexpected ones only when strict); nothing is copied unless all checks pass. Returns
        (missing_keys, unexpected_keys) as PyTorch's NamedTuple.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"load_state_dict: expected a dict of arrays, got {type(state_dict).__name__}")
        own = self._state_tensors()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        problems, values = [], {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            value = value.data if isinstance(value, Tensor) else value
            if not isinstance(value, (np.ndarray, np.generic, int, float, bool)):
                problems.append(f'value for "{key}" is a {type(value).__name__}, not an array or Tensor.')
                continue
            value = np.asarray(value)
            if value.dtype.kind not in "biuf":
                problems.append(f'value for "{key}" has dtype {value.dtype}, not a numeric array.')
            elif value.shape != target.data.shape:
                problems.append(
                    f"size mismatch for {key}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {target.data.shape}."
                )
            else:
                values[key] = value
        if strict:
            if unexpected:
                problems.insert(0, "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
            if missing:
                problems.insert(0, "Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(problems))
        for key, value in values.items():
            np.copyto(own[key].data, value, casting="unsafe")
            bump_version(own[key])
        return _IncompatibleKeys(missing, unexpected)

    # ----- printing ---------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The text inside this module's parentheses in repr (layer settings); override in layers."""
        return ""

    def __repr__(self):
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = [f"({name}): " + _addindent(repr(child), 2) for name, child in self._modules.items()]
        if not child_lines and len(extra_lines) <= 1:
            return f"{type(self).__name__}({extra})"
        return f"{type(self).__name__}(\n  " + "\n  ".join(extra_lines + child_lines) + "\n)"
