"""Optimizer base: parameter groups, per-parameter state and PyTorch's state_dict layout.

``state_dict()`` is ``{'state': {index: {name: array}}, 'param_groups': [{..., 'params': [index, ...]}]}``
with parameters numbered in group order, so a checkpoint maps back onto a freshly built optimizer.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections import defaultdict

import numpy as np

from mpnn import hooks
from mpnn.core.inplace import bump_version
from mpnn.core.tensor import Tensor, enable_grad


def flat_view(array: np.ndarray) -> np.ndarray:
    """A 1-d C-contiguous view of ``array`` (a contiguous copy if it is strided) for the update kernels."""
    return array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)


def write_back(param: Tensor, flat: np.ndarray) -> None:
    """Copy a kernel's result back when flat_view had to copy a strided parameter, and count the in-place
    update in the parameter's version (a backward that saved the old value then raises, as in torch)."""
    if not param.data.flags.c_contiguous:
        param.data[...] = flat.reshape(param.data.shape)
    bump_version(param)


def checked_grad(param: Tensor, index: int) -> np.ndarray:
    """The parameter's gradient as a flat array, after checking it has the parameter's shape."""
    g = param.grad.data
    if g.shape != param.data.shape:
        raise ValueError(
            f"optimizer step: parameter {index} has shape {param.data.shape} but its .grad has shape {g.shape}"
        )
    return flat_view(g)


def register_optimizer_step_pre_hook(hook):
    """Call ``hook(optimizer, args, kwargs)`` before every ``step()`` of every optimizer (as torch's)."""
    return hooks.register_optimizer_step_hooks(pre=hook)


def register_optimizer_step_post_hook(hook):
    """Call ``hook(optimizer, args, kwargs)`` after every ``step()`` of every optimizer (as torch's)."""
    return hooks.register_optimizer_step_hooks(post=hook)


def _with_step_hooks(step):
    """Wrap a subclass's step so the global hooks run around it once (not again for super().step())."""

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        around = hooks.optimizer_step_hooks
        if not around or self.__dict__.get("_in_step"):
            return step(self, *args, **kwargs)
        around = tuple(around)
        for pre, _ in around:
            if pre is not None:
                pre(self, args, kwargs)
        self._in_step = True
        try:
            out = step(self, *args, **kwargs)
        finally:
            self._in_step = False
        for _, post in around:
            if post is not None:
                post(self, args, kwargs)
        return out

    return wrapper


class Optimizer:
    """Holds ``param_groups`` (dicts of 'params' plus hyperparameters) and ``state`` (per parameter)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _with_step_hooks(cls.__dict__["step"])

    def __init__(self, params, defaults: dict):
        self.defaults = defaults
        self.state = defaultdict(dict)
        self.param_groups = []
        if isinstance(params, (Tensor, dict)):
            raise TypeError(
                f"{type(self).__name__}: params should be an iterable of Tensors or of dicts, "
                f"got a {type(params).__name__}"
            )
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__}: optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def _validate(self, group: dict) -> None:
        """Raise ValueError naming a bad hyperparameter value; each optimizer checks its own."""

    @staticmethod
    def _check_implementation_flags(name: str, group: dict) -> None:
        """torch's implementation switches, which select how an update is computed, not what it computes.

        ``foreach`` (torch: one multi-tensor kernel over all parameters) and ``fused`` (torch: one fused kernel
        per parameter, CUDA/CPU) are accepted and have no effect: mpnn always updates each parameter with one
        fused Numba pass. ``capturable`` (torch: CUDA-graph capture of the step) has nothing to do on the CPU.
        ``differentiable=True`` (torch: record the step itself on the tape) is refused: mpnn's steps are not
        differentiable, and ignoring it would silently give wrong higher-order results.
        """
        if group.get("fused") and group.get("foreach"):
            raise RuntimeError(f"{name}: `fused` and `foreach` cannot be `True` together.")
        if group.get("differentiable"):
            raise NotImplementedError(
                f"{name}: differentiable=True (autograd through the optimizer step) is not supported by mpnn"
            )

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters with its own hyperparameters (the rest from the defaults).

        As torch 2.6+, the parameters may be given as (name, tensor) pairs (``model.named_parameters()``): the
        group then keeps their names under 'param_names' (saved in state_dict).
        """
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise TypeError(f"{name}: a parameter group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{name}: parameters must be given in an ordered collection, not a set")
        elif params is None:
            raise ValueError(f"{name}: a parameter group needs a 'params' entry")
        params = list(params)
        gi = len(self.param_groups)
        param_names = None
        if params and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
            param_names = [n for n, _ in params]
            params = [p for _, p in params]
        if self.param_groups and (param_names is not None) != ("param_names" in self.param_groups[0]):
            raise ValueError(
                f"{name}: all optimizer param groups should be with/without names; group {gi} is "
                f"{'named' if param_names is not None else 'unnamed'} and group 0 is not"
            )
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"{name}: can only optimize Tensors, but parameter {i} of group {gi} is a {type(p).__name__}"
                )
            if not p.is_leaf:
                raise ValueError(
                    f"{name}: can't optimize a non-leaf Tensor (parameter {i} of group {gi}, shape "
                    f"{p.data.shape}, made by {p.grad_fn.op}); pass leaves such as model.parameters()"
                )
            if p.data.dtype.kind != "f":
                raise TypeError(
                    f"{name}: can only optimize floating-point Tensors, parameter {i} of group {gi} is {p.data.dtype}"
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{name}: parameter group {gi} lists the same parameter more than once")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError(f"{name}: some parameters appear in more than one parameter group")
        group = dict(param_group, params=params)
        if param_names is not None:
            group["param_names"] = param_names
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate(group)
        self._check_implementation_flags(name, group)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero in place) the .grad of every parameter this optimizer updates."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.data[...] = 0

    @staticmethod
    def _closure_loss(closure):
        if closure is None:
            return None
        with enable_grad():
            return closure()

    def step(self, closure=None):
        raise NotImplementedError

    # ----- state_dict -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{'state': {param index: {name: array copy}}, 'param_groups': [hyperparameters + 'params' indices]}."""
        index, groups, start = {}, [], 0
        for group in self.param_groups:
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            index.update((id(p), i) for p, i in zip(group["params"], packed["params"]))
            start += len(group["params"])
            groups.append(packed)
        state = {index[id(p)]: {k: _pack(k, v) for k, v in s.items()} for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state saved by state_dict onto this optimizer's parameters.

        Every check runs before anything changes: group count, parameters per group, state shapes.
        """
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else "-"
            raise ValueError(
                f"{name}: expected a dict with 'state' and 'param_groups', got a "
                f"{type(state_dict).__name__} with keys {keys}"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}: the loaded state dict has {len(saved_groups)} parameter groups, this "
                f"optimizer has {len(self.param_groups)}"
            )
        for gi, (saved, own) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"{name}: parameter group {gi} has {len(saved['params'])} parameters in the "
                    f"loaded state dict but {len(own['params'])} in this optimizer"
                )
        by_index = dict(
            zip(
                itertools.chain.from_iterable(g["params"] for g in saved_groups),
                itertools.chain.from_iterable(g["params"] for g in self.param_groups),
            )
        )
        new_state = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key not in by_index:
                raise ValueError(
                    f"{name}: state for parameter index {key!r} matches no parameter "
                    f"(the groups list indices {sorted(by_index)})"
                )
            new_state[by_index[key]] = {k: _unpack(name, key, k, v, by_index[key]) for k, v in saved.items()}
        new_groups = []
        for saved, own in zip(saved_groups, self.param_groups):
            group = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
            group["params"] = own["params"]
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._validate(group)
            self._check_implementation_flags(name, group)
            new_groups.append(group)
        self.state, self.param_groups = new_state, new_groups

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {group[k]}" for k in sorted(group) if k != "params")
        return "\n".join(lines) + "\n)"


def _pack(key, value):
    if key == "step":
        return np.asarray(value, dtype=np.float32)  # a float32 scalar, as torch keeps it
    return value.copy() if isinstance(value, np.ndarray) else copy.deepcopy(value)


def _unpack(name, index, key, value, param):
    value = value.data if isinstance(value, Tensor) else value
    if key == "step":
        step = np.asarray(value)
        if step.size != 1 or step.dtype.kind not in "iuf":
            raise ValueError(f"{name}: 'step' of parameter {index} must be one number, got {value!r}")
        return int(step.item())
    if isinstance(value, np.ndarray):
        if value.shape != param.data.shape:
            raise ValueError(
                f"{name}: state '{key}' of parameter {index} has shape {value.shape} but the "
                f"parameter has shape {param.data.shape}"
            )
        return np.array(value, dtype=param.data.dtype if value.dtype.kind == "f" else value.dtype, order="C")
    return copy.deepcopy(value)
