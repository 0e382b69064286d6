"""Adam and AdamW as torch.optim documents them: bias-corrected moments, eps outside the square root."""

from __future__ import annotations

import math

import numpy as np

from mpnn.optim.kernels import adam_update
from mpnn.optim.optimizer import Optimizer, checked_grad, flat_view, write_back

_NO_MAX = {}  # dtype -> empty array passed as max_exp_avg_sq when amsgrad is off


class Adam(Optimizer):
    """Adam; ``weight_decay`` adds wd * param to the gradient (L2), as torch.optim.Adam does, or, with
    ``decoupled_weight_decay=True``, multiplies the parameter by 1 - lr * wd first (AdamW).

    torch's signature; ``foreach``, ``fused`` and ``capturable`` are accepted and change nothing (see
    Optimizer._check_implementation_flags); ``differentiable=True`` is refused. All of them are kept in each
    parameter group, as torch keeps them, so state_dicts carry the same keys.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=maximize,
                foreach=foreach,
                capturable=capturable,
                differentiable=differentiable,
                fused=fused,
                decoupled_weight_decay=decoupled_weight_decay,
            ),
        )

    def _validate(self, group):
        name = type(self).__name__
        for key in ("lr", "eps", "weight_decay"):
            if not group[key] >= 0.0:
                raise ValueError(f"{name}: invalid {key} value: {group[key]!r} (must be >= 0)")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}: invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")

    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure()'s loss if given."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            decoupled = bool(group["decoupled_weight_decay"])
            beta1, beta2 = group["betas"]
            amsgrad, maximize = bool(group["amsgrad"]), bool(group["maximize"])
            cast_dtype = None
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                dt = p.data.dtype
                if cast_dtype is None or dt != cast_dtype:  # (a dtype compares equal to None)
                    cast_dtype, t = dt, dt.type
                    lr, b1, b2, eps, wd = t(group["lr"]), t(beta1), t(beta2), t(group["eps"]), t(group["weight_decay"])
                    no_max = _NO_MAX.setdefault(dt, np.empty(0, dtype=dt))
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = np.zeros(p.data.shape, dtype=dt)
                    state["exp_avg_sq"] = np.zeros(p.data.shape, dtype=dt)
                if amsgrad and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = np.zeros(p.data.shape, dtype=dt)
                step = state["step"] = state["step"] + 1
                step_size = group["lr"] / (1.0 - beta1**step)
                bc2_sqrt = math.sqrt(1.0 - beta2**step)
                flat = flat_view(p.data)
                adam_update(
                    flat,
                    checked_grad(p, i),
                    state["exp_avg"].reshape(-1),
                    state["exp_avg_sq"].reshape(-1),
                    state["max_exp_avg_sq"].reshape(-1) if amsgrad else no_max,
                    lr,
                    b1,
                    b2,
                    eps,
                    wd,
                    decoupled,
                    amsgrad,
                    maximize,
                    t(step_size),
                    t(bc2_sqrt),
                )
                write_back(p, flat)
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay: param *= 1 - lr * weight_decay before the Adam update.

    torch's signature (``inspect.signature(AdamW).parameters`` lists ``fused``, which nanoGPT checks for);
    the implementation flags are documented on Adam.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )
