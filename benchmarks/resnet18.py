"""ResNet-18 (CIFAR variant) on mpnn and on PyTorch, side by side in one process, one thread each.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/resnet18.py            # img/s, ratios, RSS
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/resnet18.py --layers   # + per-layer table

The model is written once against torch's API (``build(lib)`` gets torch or mpnn): 3x3 stem conv 64 stride 1,
no max-pool, 32x32 input, BasicBlocks [2, 2, 2, 2] with 64/128/256/512 channels, 1x1 stride-2 conv + BN
shortcuts, global average pool, linear to 10 classes; SGD momentum 0.9, batch 32, cross-entropy. Train img/s
is the median over --reps timed steps (forward, backward, optimizer step) after warm-up, the libraries
interleaved step by step (benchmarks/timing.py) so that load from other processes hits both alike; eval img/s
likewise for no_grad forwards in eval mode. Peak RSS (VmHWM) of a training process: each library trains
--rss-steps steps in a fresh subprocess of its own (mpnn's calls mpnn.init(), as a training script does).
--layers prints each layer kind of the model at its shapes, forward and backward, both libraries (median
thread CPU ms), and the mpnn/torch time ratio (<1: mpnn faster); `x` is how often the model runs it; the sums
weigh each kind by it, BatchNorm in train mode for a training step, in eval mode for an eval forward.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy, Numba or torch start their thread pools

import argparse  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import side_by_side  # noqa: E402

BATCH = 32


def build(lib, num_classes=10):
    """ResNet-18 for 32x32 inputs, written once against torch's API; ``lib`` is torch or mpnn."""
    nn, F = lib.nn, lib.nn.functional

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out = out + self.shortcut(x)
            return F.relu(out)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            blocks, cin = [], 64
            for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layers(out)
            out = F.adaptive_avg_pool2d(out, 1).flatten(1)
            return self.fc(out)

    return ResNet18()


def init_like(model, lib, seed=0):
    """The same initial weights in both libraries (He-normal convs, uniform linear, BN ones and zeros)."""
    rng = np.random.default_rng(seed)
    with lib.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if len(shape) == 4:
                values = rng.normal(0.0, np.sqrt(2.0 / (shape[1] * shape[2] * shape[3])), size=shape)
            elif len(shape) == 2:
                values = rng.uniform(-1, 1, size=shape) / np.sqrt(shape[1])
            elif name.endswith("weight"):
                values = np.ones(shape)
            else:
                values = np.zeros(shape)
            p.copy_(lib.from_numpy(values.astype(np.float32)))


def libraries(names=("mpnn", "torch")):
    libs = {}
    for name in names:
        if name == "torch":
            import torch

            torch.set_num_threads(1)
            libs["torch"] = torch
        else:
            import numba

            import mpnn

            numba.set_num_threads(1)
            mpnn.init()  # as a training script starts: a world of one, flush-to-zero, freed memory kept mapped
            libs["mpnn"] = mpnn
    return libs


class Trainer:
    """One library's model, SGD optimizer, a fixed batch, and its train and eval steps."""

    def __init__(self, lib, x, y):
        self.lib = lib
        self.model = build(lib)
        init_like(self.model, lib)
        self.opt = lib.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = lib.from_numpy(x), lib.from_numpy(y)

    def train_step(self):
        self.model.train()
        loss = self.lib.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def eval_step(self):
        self.model.eval()
        with self.lib.no_grad():
            return self.model(self.x)


def data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=BATCH).astype(np.int64)
    return x, y


def speed(reps, warmup):
    libs = libraries()
    x, y = data()
    trainers = {name: Trainer(lib, x, y) for name, lib in libs.items()}
    names = list(trainers)
    train = side_by_side([trainers[n].train_step for n in names], reps, warmup)
    evals = side_by_side([trainers[n].eval_step for n in names], reps, warmup)
    return names, train, evals


def rss_child(name, steps):
    """Train `steps` steps of one library in this (fresh) process; print its peak RSS in bytes."""
    libs = libraries((name,))
    x, y = data()
    tr = Trainer(libs[name], x, y)
    for _ in range(steps):
        tr.train_step()
    print(peak_rss_self())


def peak_rss_self():
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec. ru_maxrss does not on Linux (a
    child started from this benchmark's big parent reported the parent's 1165 MiB for both libraries)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(name, steps):
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--rss-child", name, "--rss-steps", str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


# ----- per-layer-kind table -----------------------------------------------------------------------------------


def _layer_cases():
    """(label, count in the model, make(lib) -> (forward(), backward-ready forward+backward()))."""
    cases = []

    def conv(cin, cout, k, s, hw):
        pad = k // 2

        def make(lib, rng):
            x = lib.from_numpy(rng.standard_normal((BATCH, cin, hw, hw)).astype(np.float32)).requires_grad_()
            w = lib.from_numpy(
                (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
            ).requires_grad_()
            oh = (hw + 2 * pad - k) // s + 1
            g = lib.from_numpy(rng.standard_normal((BATCH, cout, oh, oh)).astype(np.float32))
            conv2d = lib.nn.functional.conv2d
            return (lambda: conv2d(x, w, None, s, pad)), (lambda: conv2d(x, w, None, s, pad).backward(g)), (x, w)

        return make

    cases.append(("conv 3x3 s1 3->64 32x32 (stem)", 1, conv(3, 64, 3, 1, 32)))
    for c, hw, n in ((64, 32, 4), (128, 16, 3), (256, 8, 3), (512, 4, 3)):
        cases.append((f"conv 3x3 s1 {c}->{c} {hw}x{hw}", n, conv(c, c, 3, 1, hw)))
    for c, hw in ((64, 32), (128, 16), (256, 8)):
        cases.append((f"conv 3x3 s2 {c}->{2 * c} {hw}->{hw // 2}", 1, conv(c, 2 * c, 3, 2, hw)))
    for c, hw in ((64, 32), (128, 16), (256, 8)):
        cases.append((f"conv 1x1 s2 {c}->{2 * c} {hw}->{hw // 2}", 1, conv(c, 2 * c, 1, 2, hw)))

    def bn(c, hw, training):
        def make(lib, rng):
            m = lib.nn.BatchNorm2d(c)
            m.train(training)
            x = lib.from_numpy(rng.standard_normal((BATCH, c, hw, hw)).astype(np.float32)).requires_grad_()
            g = lib.from_numpy(rng.standard_normal((BATCH, c, hw, hw)).astype(np.float32))
            return (lambda: m(x)), (lambda: m(x).backward(g)), (x, m.weight, m.bias)

        return make

    for c, hw, n in ((64, 32, 5), (128, 16, 5), (256, 8, 5), (512, 4, 5)):
        cases.append((f"batchnorm train {c}x{hw}x{hw}", n, bn(c, hw, True)))
    for c, hw, n in ((64, 32, 5), (128, 16, 5), (256, 8, 5), (512, 4, 5)):  # what the eval img/s runs
        cases.append((f"batchnorm eval {c}x{hw}x{hw}", n, bn(c, hw, False)))

    def unary(c, hw, fn):
        def make(lib, rng):
            x = lib.from_numpy(rng.standard_normal((BATCH, c, hw, hw)).astype(np.float32)).requires_grad_()
            g = lib.from_numpy(rng.standard_normal((BATCH, c, hw, hw)).astype(np.float32))
            f = fn(lib)
            return (lambda: f(x)), (lambda: f(x).backward(g)), (x,)

        return make

    for c, hw, n in ((64, 32, 5), (128, 16, 4), (256, 8, 4), (512, 4, 4)):
        cases.append((f"relu {c}x{hw}x{hw}", n, unary(c, hw, lambda lib: lib.nn.functional.relu)))

    def residual(c, hw):
        def make(lib, rng):
            a = lib.from_numpy(rng.standard_normal((BATCH, c, hw, hw)).astype(np.float32)).requires_grad_()
            b = lib.from_numpy(rng.standard_normal((BATCH, c, hw, hw)).astype(np.float32)).requires_grad_()
            g = lib.from_numpy(rng.standard_normal((BATCH, c, hw, hw)).astype(np.float32))
            return (lambda: a + b), (lambda: (a + b).backward(g)), (a, b)

        return make

    for c, hw in ((64, 32), (128, 16), (256, 8), (512, 4)):
        cases.append((f"residual add {c}x{hw}x{hw}", 2, residual(c, hw)))

    def pool(lib, rng):
        x = lib.from_numpy(rng.standard_normal((BATCH, 512, 4, 4)).astype(np.float32)).requires_grad_()
        g = lib.from_numpy(rng.standard_normal((BATCH, 512)).astype(np.float32))
        f = lib.nn.functional.adaptive_avg_pool2d
        return (lambda: f(x, 1).flatten(1)), (lambda: f(x, 1).flatten(1).backward(g)), (x,)

    cases.append(("global avg pool 512x4x4", 1, pool))

    def linear(lib, rng):
        m = lib.nn.Linear(512, 10)
        x = lib.from_numpy(rng.standard_normal((BATCH, 512)).astype(np.float32)).requires_grad_()
        y = lib.from_numpy(rng.integers(0, 10, BATCH).astype(np.int64))
        ce = lib.nn.functional.cross_entropy
        return (lambda: ce(m(x), y)), (lambda: ce(m(x), y).backward()), (x, m.weight, m.bias)

    cases.append(("linear 512->10 + cross-entropy", 1, linear))
    return cases


def _clear(tensors):
    for t in tensors:
        t.grad = None


def layer_table(reps):
    libs = libraries()
    names = list(libs)
    rows = []
    for label, count, make in _layer_cases():
        made = {}
        for n in names:
            fwd, both, leaves = make(libs[n], np.random.default_rng(0))

            def fb(both=both, leaves=leaves):
                _clear(leaves)
                both()

            made[n] = (fwd, fb)
        fwd = [cpu for _, cpu in side_by_side([made[n][0] for n in names], reps)]
        fb = [cpu for _, cpu in side_by_side([made[n][1] for n in names], reps)]
        rows.append((label, count, fwd, [b - f for b, f in zip(fb, fwd)]))

    # the optimizer: SGD momentum over ResNet-18's parameters with gradients in place
    x, y = data()
    steps = []
    for n in names:
        tr = Trainer(libs[n], x, y)
        tr.train_step()
        steps.append(tr.opt.step)
    opt = [cpu for _, cpu in side_by_side(steps, reps)]
    rows.append(("SGD momentum step (11.2M params)", 1, opt, [0.0, 0.0]))

    print(f"\nper layer kind, batch {BATCH}, median thread CPU ms (x: times in the model; ratio: mpnn/torch time)")
    cols = ("mpnn fwd", "torch fwd", "ratio", "mpnn bwd", "torch bwd", "ratio")
    print(f"{'layer':<34}{'x':>3}" + "".join(f"{h:>{7 if h == 'ratio' else 10}}" for h in cols))
    tot = np.zeros(4)  # a training step's kinds (BatchNorm in train mode, the optimizer)
    ev = np.zeros(2)  # an eval forward's kinds (BatchNorm in eval mode, no optimizer)
    for label, count, f, b in rows:
        rb = f"{b[0] / b[1]:7.2f}" if b[1] > 0 else f"{'':7}"
        fwd = f"{f[0] * 1e3:10.2f}{f[1] * 1e3:10.2f}{f[0] / f[1]:7.2f}"
        print(f"{label:<34}{count:>3}{fwd}{b[0] * 1e3:10.2f}{b[1] * 1e3:10.2f}{rb}")
        if not label.startswith("batchnorm eval"):
            tot += count * np.array([f[0], f[1], b[0], b[1]])
        if not label.startswith(("batchnorm train", "SGD")):
            ev += count * np.array([f[0], f[1]])
    print(
        f"{'sum over a training step':<34}{'':>3}{tot[0] * 1e3:10.1f}{tot[1] * 1e3:10.1f}{tot[0] / tot[1]:7.2f}"
        f"{tot[2] * 1e3:10.1f}{tot[3] * 1e3:10.1f}{tot[2] / tot[3]:7.2f}"
    )
    print(f"{'fwd + bwd + step, all kinds':<34}{'':>3}{(tot[0] + tot[2]) * 1e3:10.1f}{(tot[1] + tot[3]) * 1e3:10.1f}")
    print(f"{'sum over an eval forward':<34}{'':>3}{ev[0] * 1e3:10.1f}{ev[1] * 1e3:10.1f}{ev[0] / ev[1]:7.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15, help="timed steps (medians)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", action="store_true", help="also print the per-layer-kind table")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--rss-steps", type=int, default=5)
    p.add_argument("--rss-child", choices=("mpnn", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.rss_steps)
        return
    import torch

    t0 = time.perf_counter()
    names, train, evals = speed(args.reps, args.warmup)
    print(f"ResNet-18 (CIFAR variant), batch {BATCH}, one thread each; torch {torch.__version__}")
    print(f"median of {args.reps} steps after {args.warmup} warm-up, wall (thread CPU):")
    for name, (tw, tc), (ew, ec) in zip(names, train, evals):
        train_s = f"train {BATCH / tw:7.1f} img/s ({BATCH / tc:7.1f})"
        print(f"  {name:6s} {train_s}   eval {BATCH / ew:7.1f} img/s ({BATCH / ec:7.1f})")
    print(
        f"  ratio mpnn/torch: train {train[1][0] / train[0][0]:.2f}x ({train[1][1] / train[0][1]:.2f}x cpu), "
        f"eval {evals[1][0] / evals[0][0]:.2f}x ({evals[1][1] / evals[0][1]:.2f}x cpu)"
    )
    if not args.no_rss:
        rss = {name: peak_rss(name, args.rss_steps) for name in names}
        print(
            f"peak RSS of a training process ({args.rss_steps} steps, fresh subprocess each): "
            + ", ".join(f"{n} {v / 2**20:.0f} MiB" for n, v in rss.items())
            + f"; mpnn/torch {rss['mpnn'] / rss['torch']:.2f}"
        )
    if args.layers:
        layer_table(max(5, args.reps))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
