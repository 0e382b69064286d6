"""Replayed optimizer steps: Adam, AdamW and SGD without their per-parameter Python.

``Adam.step`` spends ~4 us of Python per parameter around a kernel call of ~0.7 us on a small tensor (grad checks,
flat views, scalar casts, the bias corrections, write-back); the MNIST-1D models have 6-8 parameters. A replayed
step calls the same kernels (``mpnn.optim.kernels``) with the same scalars, computed the same way, so its results
are the same bits; what it drops is the work whose answer cannot change between replays: flat views of the
parameters and state arrays (rechecked by identity each step) and the casts of hyperparameters that did not change.

Every step checks what the plan assumed (the groups' parameter lists, each parameter's array, its gradient's shape
and contiguity, its state arrays); anything else, and a hyperparameter it does not cover (amsgrad with a missing
buffer, a closure), hands the step to the optimizer's own ``step()`` for that call. The global optimizer-step hooks
run around it as around ``step()`` (telemetry closes its step line there).
"""

from __future__ import annotations

import math

import numpy as np

from mpnn import hooks
from mpnn.optim.adam import Adam, AdamW
from mpnn.optim.kernels import adam_update, sgd_update
from mpnn.optim.sgd import SGD

from .kernels import ADAM_CHUNK, adam_update_all

_EMPTY: dict = {}


def _empty(dt):
    e = _EMPTY.get(dt)
    if e is None:
        e = _EMPTY[dt] = np.empty(0, dtype=dt)
    return e


class _Param:
    __slots__ = ("p", "data", "flat", "shape", "dtype", "state", "bufs", "flats")

    def __init__(self, p, state):
        self.p = p
        self.data = p.data
        self.flat = p.data.reshape(-1)
        self.shape = p.data.shape
        self.dtype = p.data.dtype
        self.state = state
        self.bufs = ()
        self.flats = ()


def _plan(opt):
    groups = []
    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            d = p.data
            if d.dtype.kind != "f" or not d.flags.c_contiguous or not d.flags.writeable:
                return None
            params.append(_Param(p, opt.state.get(p)))  # (state[p] would add an empty entry)
        groups.append((group, group["params"], len(group["params"]), params))
    return groups


def _adam_at_once(opt, plan, reciprocal):
    """The usual Adam step, one kernels.adam_update_all call per group and ADAM_CHUNK parameters: ``prepare()``
    checks what the plan assumed (as gather does, all before anything moves) and returns ``apply``, or None when a
    group mixes dtypes or step counts, uses AMSGrad, or anything moved (the general path then decides). The scalars
    are Adam.step's, computed the same way, and the per-element arithmetic is adam_update's: the same bits.

    Measured (MNIST-1D MLP, 6 parameters; Python only, every kernel a no-op): gather and the per-parameter body
    19.6 us a step, this 5-6 us; the hyperparameters' NumPy scalars are made again only when a group's values
    change, the tuples of parameter and state arrays only when a gradient is missing or a state array was
    replaced."""
    ngroups = len(plan)
    uniform = [all(q.dtype == params[0].dtype for q in params) if params else False for _, _, _, params in plan]
    caches = [{} for _ in plan]

    def prepare():
        groups = opt.param_groups
        if len(groups) != ngroups:
            return None
        states = opt.state
        work = []
        for (group, plist, n, params), g, same, cache in zip(plan, groups, uniform, caches):
            if g is not group or group["params"] is not plist or len(plist) != n or not same or group["amsgrad"]:
                return None
            grads = []
            step = None
            whole = True
            for q in params:
                p = q.p
                gt = p.grad
                if gt is None:
                    whole = False
                    continue
                gd = gt.data
                st = states.get(p)
                if (
                    p.data is not q.data
                    or st is not q.state
                    or gd.shape != q.shape
                    or gd.dtype != q.dtype
                    or not gd.flags.c_contiguous
                ):
                    return None
                s = st.get("step")
                if s is None or (step is not None and s != step):
                    return None
                step = s
                bufs = q.bufs
                avg, sq = st.get("exp_avg"), st.get("exp_avg_sq")
                if len(bufs) != 2 or avg is not bufs[0] or sq is not bufs[1]:
                    for b in (avg, sq):
                        if b is None or b.shape != q.shape or b.dtype != q.dtype or not b.flags.c_contiguous:
                            return None
                    q.bufs, q.flats = (avg, sq), (avg.reshape(-1), sq.reshape(-1))
                    cache.pop("arrays", None)
                grads.append(gd.reshape(-1))
            if step is None:  # no gradient in this group
                continue
            arrays = cache.get("arrays") if whole else None
            if arrays is None:
                present = [q for q in params if q.p.grad is not None]
                pad = (_empty(present[0].dtype),) * ((-len(present)) % ADAM_CHUNK)
                arrays = (
                    tuple([q.flat for q in present]) + pad,
                    tuple([q.flats[0] for q in present]) + pad,
                    tuple([q.flats[1] for q in present]) + pad,
                    [q.state for q in present],
                    [q.p._ver for q in present],
                    pad,
                )
                if whole:
                    cache["arrays"] = arrays
            beta1, beta2 = group["betas"]
            key = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            scalars = cache.get("scalars")
            if scalars is None or scalars[0] != key:
                t = params[0].dtype.type
                scalars = cache["scalars"] = (key, t, t(group["lr"]), t(beta1), t(beta2), t(group["eps"]),
                                              t(group["weight_decay"]))  # fmt: skip
            work.append((group, step + 1, tuple(grads) + arrays[5], arrays, scalars))
        return work

    def apply(work):
        for group, step, grads, arrays, scalars in work:
            (lr_f, beta1, beta2, _, _), t, lr, b1, b2, eps, wd = scalars
            step_size = t(lr_f / (1.0 - beta1**step))  # Adam.step's arithmetic
            bc2_sqrt = t(1.0 / math.sqrt(1.0 - beta2**step)) if reciprocal else t(math.sqrt(1.0 - beta2**step))
            decoupled = bool(group["decoupled_weight_decay"])
            maximize = bool(group["maximize"])
            params, avgs, sqs, states, versions, _ = arrays
            for c in range(0, len(params), ADAM_CHUNK):
                e = c + ADAM_CHUNK
                adam_update_all(
                    params[c:e], grads[c:e], avgs[c:e], sqs[c:e], lr, b1, b2, eps, wd, decoupled, maximize, step_size,
                    bc2_sqrt, reciprocal,
                )  # fmt: skip
            for st in states:
                st["step"] = step
            for v in versions:
                v.value += 1

    return prepare, apply


def replay_step(opt, fuse=False):
    """A callable that replays ``opt.step()`` (for Adam, AdamW and SGD), or None for other optimizers. fuse
    (mpnn.compile's): Adam's per-element bias correction as a multiply by its reciprocal (see
    kernels.adam_update_all), within an ulp of Adam.step's update instead of its bits."""
    kind = type(opt)
    if kind not in (Adam, AdamW, SGD):
        return None
    plan = _plan(opt)
    if plan is None:
        return None
    ngroups = len(opt.param_groups)
    fallback = opt.step  # with its hooks: when the plan no longer holds, the step is the optimizer's own
    adam = kind is not SGD

    def gather():
        """[(group, [(param plan, flat grad, state flats)])] when every assumption holds, else None; checks all
        before any parameter moves, so that a fallback never follows half a step."""
        groups = opt.param_groups
        if len(groups) != ngroups:
            return None
        states = opt.state
        work = []
        for (group, plist, n, params), g in zip(plan, groups):
            if g is not group or group["params"] is not plist or len(plist) != n:
                return None
            if adam:
                if group["amsgrad"]:
                    return None
                names = ("exp_avg", "exp_avg_sq")
            else:
                names = ("momentum_buffer",) if group["momentum"] != 0 else ()
            items = []
            for q in params:
                p = q.p
                gt = p.grad
                if gt is None:
                    continue
                gd = gt.data
                st = states.get(p)
                if p.data is not q.data or st is not q.state or gd.shape != q.shape or not gd.flags.c_contiguous:
                    return None
                if adam and "step" not in st:
                    return None
                bufs = tuple([st.get(k) for k in names])
                if bufs != q.bufs or len(bufs) != len(q.bufs):  # identity first (== on arrays is never reached)
                    for b in bufs:
                        if b is None or b.shape != q.shape or not b.flags.c_contiguous:
                            return None
                    q.bufs, q.flats = bufs, tuple([b.reshape(-1) for b in bufs])
                items.append((q, gd.reshape(-1), q.flats))
            work.append((group, items))
        return work

    def sgd_body(work):
        for group, items in work:
            momentum = group["momentum"]
            cast_dtype = None
            for q, gf, flats in items:
                dt = q.data.dtype
                if cast_dtype is None or dt != cast_dtype:
                    cast_dtype, t = dt, dt.type
                    lr, mu, damp, wd = t(group["lr"]), t(momentum), t(group["dampening"]), t(group["weight_decay"])
                    nesterov, maximize = bool(group["nesterov"]), bool(group["maximize"])
                if momentum != 0:
                    sgd_update(q.flat, gf, flats[0], lr, mu, damp, wd, nesterov, maximize, False)
                else:
                    sgd_update(q.flat, gf, _empty(dt), lr, mu, damp, wd, False, maximize, False)
                q.p._ver.value += 1

    def adam_body(work):
        for group, items in work:
            decoupled = bool(group["decoupled_weight_decay"])
            beta1, beta2 = group["betas"]
            maximize = bool(group["maximize"])
            cast_dtype = None
            last_step = None
            for q, gf, flats in items:
                dt = q.data.dtype
                if cast_dtype is None or dt != cast_dtype:
                    cast_dtype, t = dt, dt.type
                    lr, b1, b2, eps, wd = t(group["lr"]), t(beta1), t(beta2), t(group["eps"]), t(group["weight_decay"])
                    no_max = _empty(dt)
                    last_step = None
                st = q.state
                step = st["step"] = st["step"] + 1
                if step != last_step:  # Adam.step's arithmetic, once per distinct step count
                    last_step = step
                    step_size = t(group["lr"] / (1.0 - beta1**step))
                    bc2_sqrt = t(math.sqrt(1.0 - beta2**step))
                adam_update(
                    q.flat,
                    gf,
                    flats[0],
                    flats[1],
                    no_max,
                    lr,
                    b1,
                    b2,
                    eps,
                    wd,
                    decoupled,
                    False,
                    maximize,
                    step_size,
                    bc2_sqrt,
                )
                q.p._ver.value += 1

    body = adam_body if adam else sgd_body
    prepare, apply = _adam_at_once(opt, plan, bool(fuse)) if adam else (None, None)

    def run():
        work = prepare() if prepare is not None else None
        if work is not None:
            steps = apply
        else:
            work = gather()
            if work is None:
                fallback()
                return
            steps = body
        around = hooks.optimizer_step_hooks
        if not around:
            steps(work)
            return
        around = tuple(around)
        for pre, _ in around:
            if pre is not None:
                pre(opt, (), {})
        opt._in_step = True
        try:
            steps(work)
        finally:
            opt._in_step = False
        for _, post in around:
            if post is not None:
                post(opt, (), {})

    return run
