"""MNIST-1D training step, mpnn against PyTorch CPU, one thread each, in one run; prints the ratios.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/mnist1d.py [--steps 400] [--repeats 7]

The step is the whole recipe: next batch from the loader, forward, cross-entropy, backward, Adam.
A second table leaves each library's DataLoader out (both cycle through the same pre-cut batches), so the
engines are compared alone. Each figure is the median over repeats of the mean step time of a block of
steps, after warm-up.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


def load_example(name):
    """Import launch/<name>.py as a module named <name>_example (launch/mnist1d.py would shadow the
    mnist1d package if its folder were put on sys.path)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_blocks(step, steps, repeats, warmup):
    for _ in range(warmup):
        step()
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - t0) / steps)
    return statistics.median(blocks)


def _endless(loader):
    """Batches forever: a new pass of the loader (a reshuffle) each time one ends."""
    while True:
        yield from loader


def _batches(x, y, batch, use_loader, wrap, make_loader):
    """An endless batch iterator: through the library's DataLoader, or over the same pre-cut batches."""
    if use_loader:
        return _endless(make_loader())
    return _endless([(wrap(x[i : i + batch]), wrap(y[i : i + batch])) for i in range(0, len(x) - batch + 1, batch)])


def mpnn_step(model_name, x, y, batch, use_loader=True):
    import mpnn

    MODELS = load_example("mnist1d").MODELS
    from mpnn.data import DataLoader, TensorDataset

    mpnn.manual_seed(0)
    model = MODELS[model_name]()
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)
    batches = _batches(
        x,
        y,
        batch,
        use_loader,
        mpnn.from_numpy,
        lambda: DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True),
    )

    def step():
        xb, yb = next(batches)
        opt.zero_grad()
        loss = mpnn.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()

    return step


def torch_model(model_name):
    """The MNIST-1D MLP or CNN of launch/mnist1d.py, written in torch (benchmarks/compile.py uses it too)."""
    from torch import nn

    if model_name == "mlp":

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear1, self.linear2, self.linear3 = nn.Linear(40, 256), nn.Linear(256, 256), nn.Linear(256, 10)

            def forward(self, x):
                h = self.linear1(x).relu()
                h = h + self.linear2(h).relu()
                return self.linear3(h)
    else:

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv1d(1, 25, 5, stride=2, padding=1)
                self.conv2 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
                self.conv3 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
                self.linear = nn.Linear(125, 10)

            def forward(self, x):
                h = x.view(x.shape[0], 1, x.shape[-1])
                h = self.conv3(self.conv2(self.conv1(h).relu()).relu()).relu()
                return self.linear(h.view(h.shape[0], -1))

    return Net()


def torch_step(model_name, x, y, batch, use_loader=True, flush_denormal=False):
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.set_flush_denormal(flush_denormal)
    torch.manual_seed(0)
    model = torch_model(model_name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = _batches(
        x,
        y,
        batch,
        use_loader,
        torch.from_numpy,
        lambda: torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
            batch_size=batch,
            shuffle=True,
            drop_last=True,
        ),
    )

    def step():
        xb, yb = next(batches)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument(
        "--torch-flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True): PyTorch's Adam also slows on denormal moments once a "
        "model fits (mpnn flushes them inside its fused update); this gives torch the same help",
    )
    args = p.parse_args()
    print(
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} "
        f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE')} threads=1"
    )
    from mpnn.data.datasets import load_mnist1d

    data = load_mnist1d()
    x, y = data["x"], data["y"]
    for use_loader in (True, False):
        print("with each library's DataLoader" if use_loader else "without DataLoaders (same pre-cut batches)")
        print(f"{'model':6s} {'mpnn ms/step':>13s} {'torch ms/step':>14s} {'mpnn/torch':>11s}")
        for name in ("mlp", "cnn"):
            m = time_blocks(mpnn_step(name, x, y, args.batch_size, use_loader), args.steps, args.repeats, args.warmup)
            t = time_blocks(
                torch_step(name, x, y, args.batch_size, use_loader, args.torch_flush_denormal),
                args.steps,
                args.repeats,
                args.warmup,
            )
            print(f"{name:6s} {1e3 * m:13.3f} {1e3 * t:14.3f} {m / t:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
