"""mpnn.compile on the MNIST-1D steps: mpnn eager, mpnn compiled, torch eager, torch.compile, one thread, one process.

    python benchmarks/compile.py [--model mlp cnn] [--steps 50] [--repeats 15] [--no-torch-compile]
    python benchmarks/compile.py --profile [--model cnn]     # where a replayed step's time goes, kernel by kernel
    python benchmarks/compile.py --floor                     # the MLP's compiled step against its kernels alone

Each step is the whole recipe on pre-cut batches of 100: zero_grad, forward, cross-entropy, backward, Adam. The four
variants run interleaved (block of steps of one, then the next, ...), so load on a shared machine hits them alike;
each figure is the median over repeats of a block's mean step time (and, per block, the median of its ratio to the
mpnn eager block of the same repeat). Also printed: the capture call's cost against an eager step, in this process
(the first capture, and the median of 5 more on fresh models: one call of ~2.5 ms is often preempted on a loaded
machine and read 7 ms at load 5, with the garbage collector off too) and in two fresh ones (Numba's on-disk cache
warm; against a warm eager step and against a fresh model's first eager step, which also makes Adam's state and the
first .grad arrays; with the time Numba spends inside the capture call and the first replay), and tracemalloc's
peak and net per block of eager and of compiled steps (peak: what a step allocates at once; net flat = nothing
accumulates).

--profile times every kernel call a replayed step makes (the replay modules' kernel names wrapped with timers,
~0.2 us each) and, in a second program whose kernels are all no-ops, the Python and NumPy glue around them; then,
in a third, each entry of the program (forward forms, each backward form inside the reverse pass, the optimizer
step) on its own.

--floor runs the MLP's step three ways interleaved: eager, compiled, and its floor: the replay's own kernel calls
on the same arrays written out as straight-line Python (mlp_floor_step), checked first to train bit for bit as
the compiled step does. The floor's ratio to eager is the best any replay of these kernels can reach; the compiled
step's distance from it is what the replay's Python costs.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402


def _sibling(name):
    """Import benchmarks/<name>.py under <name>_bench (benchmarks/mnist1d.py would shadow the mnist1d package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MNIST1D_BENCH = _sibling("mnist1d")


def load_models():
    return MNIST1D_BENCH.load_example("mnist1d").MODELS


def data(n=10, batch=100, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((batch, 40)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int64))
        for _ in range(n)
    ]


def mpnn_training(name):
    """(model, Adam, the eager step) for an MNIST-1D model, seeded."""
    import mpnn

    mpnn.manual_seed(0)
    model = load_models()[name]()
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)

    def step(x, y):
        opt.zero_grad()
        loss = mpnn.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, opt, step


def mpnn_step(name, compiled):
    import mpnn

    step = mpnn_training(name)[2]
    return mpnn.compile(step) if compiled else step


def torch_step(name, compiled):
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MNIST1D_BENCH.torch_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fwd = torch.compile(model) if compiled else model

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def eager_step_time(eager, mb):
    """The median of 9 single eager steps after 5 warm ones (one step alone is at the mercy of a busy machine)."""
    for i in range(5):
        eager(*mb[i % 10])
    times = []
    for i in range(9):
        t0 = time.perf_counter()
        eager(*mb[i % 10])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _timed_with_numba(fn):
    """(wall seconds of fn(), seconds of it in Numba's compiler lock: loading kernels from its cache or compiling)."""
    from numba.core import event

    spent = [0.0]
    with event.install_timer("numba:compiler_lock", lambda d: spent.__setitem__(0, d)):
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    return wall, spent[0]


def capture_probe(name):
    """In a fresh process: a warm eager step, a fresh model's first eager step (it makes Adam's state and the first
    .grad arrays, as a capture does), then the compiled step's first call (capture) and its first replay (Numba's
    kernels from its cache), each with the time Numba took inside it."""
    import mpnn

    mb = [(mpnn.from_numpy(x), mpnn.from_numpy(y)) for x, y in data()]
    eager = mpnn_step(name, False)
    t_eager = eager_step_time(eager, mb)
    first = mpnn_step(name, False)
    t_first, _ = _timed_with_numba(lambda: first(*mb[0]))
    comp = mpnn_step(name, True)
    t_capture, numba_capture = _timed_with_numba(lambda: comp(*mb[0]))
    t_replay, numba_replay = _timed_with_numba(lambda: comp(*mb[1]))
    values = (t_capture, t_eager, t_replay, t_first, numba_capture, numba_replay)
    print(" ".join(f"{v * 1e3:.2f}" for v in values))


def mlp_floor_step(model, opt):
    """The MNIST-1D MLP's training step as the replay runs it (fuse=True), written out as straight-line calls of
    the same kernels on the model's own arrays: no signature, guards, hooks, .grad tensors, version counts or
    reverse-pass bookkeeping. What a replay with no Python of its own around its kernels would cost: the floor
    of mpnn.compile's step time with these kernels (see floor())."""
    from mpnn.capture.kernels import (
        ADAM_CHUNK,
        adam_update_all,
        bias_add,
        bias_relu,
        bias_relu_add,
        column_sum,
        cross_entropy_forward,
        relu_backward_colsum,
        scale_into,
    )

    l1, l2, l3 = model.linear1, model.linear2, model.linear3
    w1, b1, w2, b2, w3, b3 = (t.data for t in (l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias))
    params = [l1.weight, l1.bias, l2.weight, l2.bias, l3.weight, l3.bias]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]
    f32 = np.float32
    n, hidden = 100, w1.shape[0]
    a = {k: np.empty((n, hidden), f32) for k in ("o1", "h1", "o2", "r2", "h", "d3", "m2", "dx2", "s", "m1")}
    logits, grad, d = np.empty((n, 10), f32), np.empty((n, 10), f32), np.empty((n, 10), f32)
    grads = [np.empty_like(p.data) for p in params]
    state = [opt.state[p] for p in params]
    pad = (np.empty(0, f32),) * (-len(params) % ADAM_CHUNK)
    flat = lambda arrays: tuple(x.reshape(-1) for x in arrays) + pad  # noqa: E731
    pf, gf = flat([p.data for p in params]), flat(grads)
    mf, vf = flat([st["exp_avg"] for st in state]), flat([st["exp_avg_sq"] for st in state])
    group = opt.param_groups[0]
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    hyper = (f32(lr), f32(beta1), f32(beta2), f32(eps), f32(group["weight_decay"]))
    count = [state[0]["step"]]

    def step(x, y):
        xd, yd = x.data, y.data
        np.matmul(xd, w1.T, out=a["o1"])
        bias_relu(a["o1"], b1, a["h1"])
        np.matmul(a["h1"], w2.T, out=a["o2"])
        bias_relu_add(a["o2"], b2, a["r2"], a["h1"], a["h"], False)
        np.matmul(a["h"], w3.T, out=logits)
        bias_add(logits, b3)
        total, labelled, _ = cross_entropy_forward(logits, yd, -100, grad)
        scale_into(grad.reshape(-1), f32(1.0 / labelled), d.reshape(-1))
        np.matmul(d, w3, out=a["d3"])
        np.matmul(d.T, a["h"], out=grads[4])
        column_sum(d, grads[5])
        relu_backward_colsum(a["d3"], a["r2"], a["m2"], grads[3])
        np.matmul(a["m2"], w2, out=a["dx2"])
        np.matmul(a["m2"].T, a["h1"], out=grads[2])
        np.add(a["d3"], a["dx2"], out=a["s"])
        relu_backward_colsum(a["s"], a["h1"], a["m1"], grads[1])
        np.matmul(a["m1"].T, xd, out=grads[0])
        count[0] += 1
        t = count[0]
        step_size, bc2 = f32(lr / (1.0 - beta1**t)), f32(1.0 / math.sqrt(1.0 - beta2**t))
        adam_update_all(pf, gf, mf, vf, *hyper, False, False, step_size, bc2, True)
        return total / labelled

    def matmuls_only(x, y):
        """The step's eight matmuls on the same arrays and nothing else: no training, only the time OpenBLAS
        takes, a bound no replay of these kernels can go under."""
        xd = x.data
        np.matmul(xd, w1.T, out=a["o1"])
        np.matmul(a["h1"], w2.T, out=a["o2"])
        np.matmul(a["h"], w3.T, out=logits)
        np.matmul(d, w3, out=a["d3"])
        np.matmul(d.T, a["h"], out=grads[4])
        np.matmul(a["m2"], w2, out=a["dx2"])
        np.matmul(a["m2"].T, a["h1"], out=grads[2])
        np.matmul(a["m1"].T, xd, out=grads[0])

    step.matmuls_only = matmuls_only
    return step


def floor_trains_alike(batches, steps=20):
    """(whether the floor step trains bit for bit as the compiled step, the compiled step, the floor step): both
    from one start (a seeded MLP after one eager step, then the capture on one side and an eager step, which a
    capture is, on the other), compared after `steps` steps on `batches`."""
    import mpnn

    def fresh():
        model, opt, step = mpnn_training("mlp")
        step(*batches[0])  # Adam's state exists from here on
        return model, opt, step

    model_c, _, eager_c = fresh()
    compiled = mpnn.compile(eager_c)
    compiled(*batches[1])  # the capture: an eager step
    model_f, opt_f, eager_f = fresh()
    eager_f(*batches[1])
    floor_step = mlp_floor_step(model_f, opt_f)
    for i in range(steps):
        compiled(*batches[i % len(batches)])
        floor_step(*batches[i % len(batches)])
    same = all(np.array_equal(pc.data, pf.data) for pc, pf in zip(model_c.parameters(), model_f.parameters()))
    return same, compiled, floor_step


def floor(steps=50, repeats=21):
    """The MLP's eager, compiled and floor steps (mlp_floor_step) interleaved in one process: how close the
    replay is to what its kernels alone cost, and the best compiled/eager ratio those kernels allow. First checks
    that the floor step computes the compiled step's training (floor_trains_alike), else prints no figures."""
    import mpnn

    batches = [(mpnn.from_numpy(x), mpnn.from_numpy(y)) for x, y in data()]
    same, compiled, floor_step = floor_trains_alike(batches)
    if not same:  # the same kernels on the same arrays in the same order: anything else is a different step
        raise SystemExit("mlp floor: the floor step does not train bit for bit as the compiled step: no figures")
    print("mlp floor: after 20 steps from one start, the compiled and the floor step's parameters are the same bits")
    eager = mpnn_training("mlp")[2]
    variants = {
        "mpnn eager": eager,
        "mpnn compiled": compiled,
        "floor (kernels only)": floor_step,
        "its matmuls alone": floor_step.matmuls_only,
    }
    for fn in variants.values():
        for i in range(20):
            fn(*batches[i % 10])
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            for i in range(steps):
                fn(*batches[i % 10])
            times[k].append((time.perf_counter() - t0) / steps)
    print(f"mlp: median step over {repeats} blocks of {steps} steps, one thread; load {os.getloadavg()[0]:.2f}")
    for k, v in times.items():
        ratio = statistics.median([a / b for a, b in zip(v, times["mpnn eager"])])
        print(f"  {k:22s} {statistics.median(v) * 1e3:7.3f} ms   {ratio:5.3f}x mpnn eager (per block)")


PROFILED = {
    "replay": ("swap_relu", "swap_relu_backward", "matmul_abt", "bias_relu", "relu_backward", "relu_forward",
               "cross_entropy_forward", "scale_into", "column_sum", "_mm", "bias_add", "relu_backward_colsum",
               "pack_weight_bias", "im2col_rows", "col2im_rows", "im2col_channel_major",
               "col2im_channel_major", "relu_in_place",
               "im2col_channel_major_s2", "col2im_channel_major_s2"),
    "optim": ("adam_update", "adam_update_all"),
}  # fmt: skip


def profile(name, steps=2000):
    """Per-kernel time of a replayed step (the best of 3 runs of `steps`), then its Python glue alone."""
    import types

    import mpnn
    from mpnn.capture import optim as capture_optim
    from mpnn.capture import replay

    acc, calls = {}, {}

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
            calls[label] = calls.get(label, 0) + 1
            return out

        return wrapper

    def namespace(module, names, prefix, stub=None):
        ns = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
        for n in names:
            setattr(ns, n, stub or timed(prefix + n, getattr(module, n)))
        return ns

    names = [n for n in PROFILED["replay"] if hasattr(replay, n)]  # (an older mpnn may lack some)
    saved = {k: getattr(replay, k) for k in ("np", "CK", *names)}
    saved_optim = {k: getattr(capture_optim, k) for k in PROFILED["optim"] if hasattr(capture_optim, k)}
    mb = [(mpnn.from_numpy(x), mpnn.from_numpy(y)) for x, y in data()]

    def program():
        comp = mpnn_step(name, True)
        comp(*mb[0])
        return next(iter(comp._cache.values()))

    def run(prog, n):
        t0 = time.perf_counter()
        for i in range(n):
            prog.run(mb[i % 10])
        return time.perf_counter() - t0

    try:
        replay.np = namespace(np, ["matmul", "copyto", "add"], "np.")
        replay.CK = namespace(replay.CK, ["im2col", "col2im", "swap_leading_axes"], "CK.")
        for n in names:
            setattr(replay, n, timed(n, saved[n]))
        for k, v in saved_optim.items():
            setattr(capture_optim, k, timed(k, v))
        prog = program()
        run(prog, 200)
        best = None
        for _ in range(3):
            acc.clear()
            calls.clear()
            total = run(prog, steps)
            if best is None or total < best[0]:
                best = (total, dict(acc), dict(calls))
        # the glue alone: every kernel a no-op (values are garbage; the Python path is the same)
        noop = lambda *a, **k: None  # noqa: E731
        replay.np = namespace(np, ["matmul"], "", stub=noop)
        replay.CK = namespace(saved["CK"], ["im2col", "col2im", "swap_leading_axes"], "", stub=noop)
        for n in names:
            setattr(replay, n, noop)
        replay._mm = lambda a, b, out=None, work=None: out
        replay.cross_entropy_forward = lambda *a: (1.0, 1, -1)
        for k in saved_optim:
            setattr(capture_optim, k, noop)
        with np.errstate(all="ignore"):
            glue_prog = program()
            run(glue_prog, 200)
            glue = min(run(glue_prog, steps) for _ in range(3))
    finally:
        for k, v in saved.items():
            setattr(replay, k, v)
        for k, v in saved_optim.items():
            setattr(capture_optim, k, v)
    total, acc, calls = best
    per = total / steps * 1e6
    print(f"{name}: replayed step {per:.1f} us (best of 3 x {steps} steps); load {os.getloadavg()[0]:.2f}")
    kernels = 0.0
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        us = v / steps * 1e6
        kernels += us
        print(f"  {k:24s} {us:7.1f} us  {calls[k] // steps:2d} calls  {us / per * 100:5.1f}%")
    print(f"  {'(kernels, timed)':24s} {kernels:7.1f} us; the rest {per - kernels:.1f} us")
    print(f"  {'Python + NumPy glue':24s} {glue / steps * 1e6:7.1f} us (every kernel a no-op)")


def _label(fn):
    """A replay entry's name without the closure scaffolding: '_conv_im2col.<locals>.backward' -> 'conv_im2col
    backward'."""
    q = getattr(fn, "__qualname__", type(fn).__name__)
    parts = [x for x in q.split(".") if x != "<locals>"]
    return " ".join([parts[0].strip("_")] + parts[-1:]) if len(parts) > 1 else parts[0].strip("_")


def entries(name, steps=2000):
    """Each entry of a replayed step's program (forward forms, the reverse pass with each backward form in it, the
    optimizer step) timed on its own, in program order: the best of 3 runs of `steps`, us a step."""
    import mpnn

    mb = [(mpnn.from_numpy(x), mpnn.from_numpy(y)) for x, y in data()]
    comp = mpnn_step(name, True)
    comp(*mb[0])
    prog = next(iter(comp._cache.values()))
    acc = {}

    def timed(key, fn):
        def wrapper(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    rows = []
    for i, step in enumerate(prog.steps):
        rows.append(((i,), _label(step), 0))
        prog.steps[i] = timed((i,), step)
        if step.__qualname__.endswith("_backward_step.<locals>.backward"):
            reverse = dict(zip(step.__code__.co_freevars, step.__closure__))["reverse"].cell_contents
            cell = dict(zip(reverse.__code__.co_freevars, reverse.__closure__))["steps"]
            forms = []
            for j, (key, bwd, targets, fin) in enumerate(cell.cell_contents):
                rows.append(((i, j), _label(bwd), 1))
                forms.append((key, timed((i, j), bwd), targets, fin))
            cell.cell_contents = tuple(forms)
    for i in range(200):
        prog.run(mb[i % 10])
    best = None
    for _ in range(3):
        acc.clear()
        t0 = time.perf_counter()
        for i in range(steps):
            prog.run(mb[i % 10])
        total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, dict(acc))
    total, acc = best
    print(f"{name}: per program entry, us a step (the entries' own timers included), step {total / steps * 1e6:.1f}")
    for key, label, depth in rows:
        inner = sum(v for k, v in acc.items() if len(k) == 2 and k[0] == key[0]) if depth == 0 else 0.0
        us = acc.get(key, 0.0) / steps * 1e6
        note = f"   (the reverse pass's own {us - inner / steps * 1e6:.1f})" if inner else ""
        print(f"  {'  ' * depth}{label:36s} {us:7.1f}{note}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="where a replayed step's time goes, kernel by kernel")
    p.add_argument("--floor", action="store_true", help="the MLP's step against its kernels alone (mlp_floor_step)")
    p.add_argument("--capture-probe", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor:
        floor(args.steps, args.repeats)
        return
    if args.capture_probe:
        capture_probe(args.capture_probe)
        return
    if args.profile:
        for name in args.model:
            profile(name)
            entries(name)
        return
    import torch

    import mpnn

    batches = data()
    mb = [(mpnn.from_numpy(x), mpnn.from_numpy(y)) for x, y in batches]
    tb = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    print(f"one thread; load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__}")
    for name in args.model:
        variants = {"mpnn eager": (mpnn_step(name, False), mb), "mpnn compiled": None}
        # capture cost: the compiled step's first call against an eager step (the median of 9, after 5 warm ones)
        eager = variants["mpnn eager"][0]
        t_eager = eager_step_time(eager, mb)
        comp = mpnn_step(name, True)
        t0 = time.perf_counter()
        comp(*mb[0])
        t_capture = time.perf_counter() - t0
        variants["mpnn compiled"] = (comp, mb)
        more = []
        for _ in range(5):  # fresh models: each first call is a capture
            fresh = mpnn_step(name, True)
            t0 = time.perf_counter()
            fresh(*mb[0])
            more.append(time.perf_counter() - t0)
        t_capture_median = statistics.median(more)
        variants["torch eager"] = (torch_step(name, False), tb)
        if not args.no_torch_compile:
            tc = torch_step(name, True)
            t0 = time.perf_counter()
            try:
                tc(*tb[0])
                print(f"{name}: torch.compile first call {time.perf_counter() - t0:.1f} s")
                variants["torch.compile"] = (tc, tb)
            except Exception as exc:  # no C++ compiler, inductor failure: say so, time the rest
                print(f"{name}: torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        for fn, bs in variants.values():
            for i in range(10):
                fn(*bs[i % 10])
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, (fn, bs) in variants.items():
                t0 = time.perf_counter()
                for i in range(args.steps):
                    fn(*bs[i % 10])
                times[k].append((time.perf_counter() - t0) / args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["mpnn eager"]
        print(f"\n{name}: median step over {args.repeats} blocks of {args.steps} steps")
        # and the median of each block's ratio to the mpnn eager block just before it (steadier under load: the
        # blocks of one repeat run back to back)
        per_block = {k: statistics.median([a / b for a, b in zip(v, times["mpnn eager"])]) for k, v in times.items()}
        for k, v in med.items():
            print(
                f"  {k:14s} {v * 1e3:7.3f} ms   {v / base:5.2f}x mpnn eager (per block {per_block[k]:4.2f}x)   "
                f"{v / med['torch eager']:5.2f}x torch eager"
            )
        print(
            f"  capture call {t_capture * 1e3:.2f} ms = {t_capture / t_eager:.2f}x an eager step "
            f"({t_eager * 1e3:.2f} ms), median of 5 more {t_capture_median * 1e3:.2f} ms = "
            f"{t_capture_median / t_eager:.2f}x; stats {comp.stats}"
        )
        for k in (1, 2):  # a new process's first call: Numba's kernels come from its on-disk cache
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--capture-probe", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            cap, eag, rep, first, numba_cap, numba_rep = (float(v) for v in out[-6:])
            print(
                f"  fresh process {k}: capture call {cap:.2f} ms (Numba {numba_cap:.2f}) = {cap / eag:.2f}x its eager "
                f"step ({eag:.2f} ms), {cap / first:.2f}x a fresh model's first eager step ({first:.2f} ms); "
                f"first replay {rep:.2f} ms (Numba {numba_rep:.2f})"
            )
        # Python's free lists (tuples, floats) keep up to a few thousand freed objects that tracemalloc still counts:
        # they fill over the first ~2,000 steps, so measure after those
        for fn, label in ((eager, "eager"), (comp, "compiled")):
            for i in range(2000):
                fn(*mb[i % 10])
            tracemalloc.start()
            blocks = []
            for _ in range(5):
                tracemalloc.reset_peak()
                b0 = tracemalloc.get_traced_memory()[0]
                for i in range(200):
                    fn(*mb[i % 10])
                cur, peak = tracemalloc.get_traced_memory()
                blocks.append((peak - b0, cur - b0))
            tracemalloc.stop()
            print(
                f"  tracemalloc per block of 200 {label} steps after 2,000 (peak above start = what one step holds "
                "at once, net): " + ", ".join(f"{pk / 1024:.0f}/{net / 1024:+.1f} KiB" for pk, net in blocks)
            )


if __name__ == "__main__":
    main()
