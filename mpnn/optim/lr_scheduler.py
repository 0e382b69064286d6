"""Learning-rate schedules, computed in closed form from each group's initial lr and the step count.

Every schedule is a rule ``lr(base, step)``; that is what makes them compose:
  * ``SequentialLR(opt, [LinearWarmup(opt, 100), CosineAnnealingLR(opt, T_max=900)], milestones=[100])``
    runs the warmup for steps 0-99, then the cosine from its own step 0 (as torch.optim.lr_scheduler);
  * ``ChainedScheduler([StepLR(opt, 30), LinearWarmup(opt, 5)])`` applies the rules one after the other
    to the same step (the second sees the first's lr as its base): for multiplicative schedules the
    factors multiply, as in PyTorch.
Composites nest. Call ``step()`` once after each ``optimizer.step()``, and only on the outermost schedule.
"""

from __future__ import annotations

import bisect
import copy
import math

from mpnn.optim.optimizer import Optimizer


class LRScheduler:
    """Base: sets every group's 'lr' to ``_lr(initial_lr, last_epoch, group index)`` on construction and step()."""

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: {type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def _lr(self, base: float, step: int, group: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list:
        """The lrs this schedule gives at its current step."""
        return [self._lr(base, self.last_epoch, i) for i, base in enumerate(self.base_lrs)]

    def _apply(self):
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def step(self) -> None:
        """Advance one step and write the new lrs into the optimizer's groups."""
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list:
        """The lrs last written into the optimizer, one per parameter group."""
        return list(self._last_lr)

    _unsaved = ("optimizer",)

    def state_dict(self) -> dict:
        """Everything but the optimizer (and functions), as plain numbers and lists."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in self._unsaved}

    def load_state_dict(self, state_dict: dict) -> None:
        own = self.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        if unknown or "last_epoch" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: not a state dict of this schedule "
                f"(unknown keys {unknown}, expected {sorted(own)})"
            )
        if len(state_dict.get("base_lrs", ())) != len(self.base_lrs):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: saved for {len(state_dict.get('base_lrs', ()))} "
                f"parameter groups, this optimizer has {len(self.base_lrs)}"
            )
        self.__dict__.update(copy.deepcopy(dict(state_dict)))


def _positive_int(name, who, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}")


class StepLR(LRScheduler):
    """lr = base * gamma ** (step // step_size)."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        _positive_int("step_size", "StepLR", step_size)
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer)

    def _lr(self, base, step, group):
        return base * self.gamma ** (step // self.step_size)


class ExponentialLR(LRScheduler):
    """lr = base * gamma ** step."""

    def __init__(self, optimizer, gamma: float):
        self.gamma = gamma
        super().__init__(optimizer)

    def _lr(self, base, step, group):
        return base * self.gamma**step


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base - eta_min) * (1 + cos(pi * step / T_max)) / 2 (periodic past T_max, as torch)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0):
        _positive_int("T_max", "CosineAnnealingLR", T_max)
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer)

    def _lr(self, base, step, group):
        return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * step / self.T_max)) / 2


class LinearWarmup(LRScheduler):
    """lr rises linearly from base * start_factor at step 0 to base at warmup_steps, then stays there.

    The same as torch's LinearLR(start_factor, end_factor=1.0, total_iters=warmup_steps); follow it
    with another schedule through SequentialLR.
    """

    def __init__(self, optimizer, warmup_steps: int, start_factor: float = 1.0 / 3):
        _positive_int("warmup_steps", "LinearWarmup", warmup_steps)
        if not 0.0 < start_factor <= 1.0:
            raise ValueError(f"LinearWarmup: start_factor must be in (0, 1], got {start_factor!r}")
        self.warmup_steps, self.start_factor = warmup_steps, start_factor
        super().__init__(optimizer)

    def _lr(self, base, step, group):
        return base * (self.start_factor + (1.0 - self.start_factor) * min(step, self.warmup_steps) / self.warmup_steps)


class LambdaLR(LRScheduler):
    """lr = base * lr_lambda(step), one function for all groups or one per group (not saved in state_dict)."""

    _unsaved = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer, lr_lambda):
        n = len(optimizer.param_groups) if isinstance(optimizer, Optimizer) else 0
        lambdas = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else [lr_lambda] * n
        if len(lambdas) != n or not all(callable(f) for f in lambdas):
            raise ValueError(f"LambdaLR: expected one function or {n} functions (one per group), got {lr_lambda!r}")
        self.lr_lambdas = lambdas
        super().__init__(optimizer)

    def _lr(self, base, step, group):
        return base * self.lr_lambdas[group](step)


class _Composite(LRScheduler):
    """Shared checks and state of schedules made of other schedules."""

    _unsaved = ("optimizer", "_schedulers")

    def __init__(self, optimizer, schedulers):
        schedulers = list(schedulers)
        who = type(self).__name__
        if not schedulers:
            raise ValueError(f"{who}: expects at least one scheduler")
        for i, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler):
                raise TypeError(f"{who}: scheduler {i} is a {type(s).__name__}, not an LRScheduler")
            if s.optimizer is not optimizer:
                raise ValueError(f"{who}: scheduler {i} is bound to a different optimizer than the others")
        self._schedulers = schedulers
        super().__init__(optimizer)

    def state_dict(self):
        state = super().state_dict()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        inner = state.pop("_schedulers", None)
        if inner is None or len(inner) != len(self._schedulers):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected states of {len(self._schedulers)} "
                f"schedulers, got {None if inner is None else len(inner)}"
            )
        for s, sd in zip(self._schedulers, inner):
            s.load_state_dict(sd)
        super().load_state_dict(state)


class SequentialLR(_Composite):
    """Schedule i runs from step milestones[i-1] on, counting its own steps from 0 there."""

    def __init__(self, optimizer, schedulers, milestones):
        milestones = list(milestones)
        if (
            len(milestones) != len(schedulers) - 1
            or milestones != sorted(milestones)
            or any(m <= 0 for m in milestones)
            or len(set(milestones)) != len(milestones)
        ):
            raise ValueError(
                f"SequentialLR: milestones must be {len(schedulers) - 1} increasing positive "
                f"steps (one fewer than schedulers), got {milestones}"
            )
        self.milestones = milestones
        super().__init__(optimizer, schedulers)

    def _lr(self, base, step, group):
        i = bisect.bisect_right(self.milestones, step)
        return self._schedulers[i]._lr(base, step - (self.milestones[i - 1] if i else 0), group)


class ChainedScheduler(_Composite):
    """All schedules at the same step, each applied to the lr the previous one gave."""

    def __init__(self, schedulers, optimizer: Optimizer | None = None):
        schedulers = list(schedulers)
        if optimizer is None and schedulers:
            optimizer = getattr(schedulers[0], "optimizer", None)
        super().__init__(optimizer, schedulers)

    def _lr(self, base, step, group):
        for s in self._schedulers:
            base = s._lr(base, step, group)
        return base
