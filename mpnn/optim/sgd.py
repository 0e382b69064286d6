"""SGD with momentum, dampening, Nesterov momentum, weight decay and maximize, as torch.optim.SGD."""

from __future__ import annotations

import numpy as np

from mpnn.optim.kernels import sgd_update
from mpnn.optim.optimizer import Optimizer, checked_grad, flat_view, write_back

_NO_BUFFER = {}  # dtype -> empty array passed as the momentum buffer when momentum is 0


class SGD(Optimizer):
    """Stochastic gradient descent; the momentum buffer starts as the first (decayed) gradient.

    torch's signature; ``foreach`` and ``fused`` are accepted and change nothing, ``differentiable=True`` is
    refused (see Optimizer._check_implementation_flags).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
                foreach=foreach,
                differentiable=differentiable,
                fused=fused,
            ),
        )

    def _validate(self, group):
        for key in ("lr", "momentum", "weight_decay"):
            if not group[key] >= 0.0:
                raise ValueError(f"SGD: invalid {key} value: {group[key]!r} (must be >= 0)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"SGD: Nesterov momentum requires a momentum and zero dampening, got momentum="
                f"{group['momentum']!r}, dampening={group['dampening']!r}"
            )

    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure()'s loss if given."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            momentum = group["momentum"]
            cast_dtype = None
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                dt = p.data.dtype
                if cast_dtype is None or dt != cast_dtype:  # (a dtype compares equal to None)
                    cast_dtype, t = dt, dt.type
                    lr, mu, damp, wd = t(group["lr"]), t(momentum), t(group["dampening"]), t(group["weight_decay"])
                    no_buffer = _NO_BUFFER.setdefault(dt, np.empty(0, dtype=dt))
                flat = flat_view(p.data)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    first = buf is None
                    if first:
                        buf = state["momentum_buffer"] = np.empty(p.data.shape, dtype=dt)
                    sgd_update(
                        flat,
                        checked_grad(p, i),
                        buf.reshape(-1),
                        lr,
                        mu,
                        damp,
                        wd,
                        bool(group["nesterov"]),
                        bool(group["maximize"]),
                        first,
                    )
                else:
                    sgd_update(
                        flat, checked_grad(p, i), no_buffer, lr, mu, damp, wd, False, bool(group["maximize"]), False
                    )
                write_back(p, flat)
        return loss
