"""MNIST-1D, the paper's recipe (Greydanus 2020): an MLP or a small CNN, Adam lr 1e-2, batch 100, 8000 steps.

python launch/mnist1d.py --model cnn
mpnn launch -n 2 launch/mnist1d.py --model cnn      # the global batch of 100 is split across ranks
mpnn launch -n 2 --checkpoint-every 500 launch/mnist1d.py   # checkpoints in the run directory
python launch/mnist1d.py --checkpoint-every 500 --checkpoint-dir ckpt   # run again: resumes from ckpt
mpnn launch -n 1 --resume runs/<run-id> launch/mnist1d.py   # a 2-rank run's checkpoint goes on on 1 rank
"""

import argparse
import os
import sys
import time

# This file shares its name with the mnist1d package the data comes from: keep its folder off the path.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import mpnn
from mpnn import nn
from mpnn.data import DataLoader, DistributedSampler, TensorDataset
from mpnn.data.datasets import load_mnist1d


class MLP(nn.Module):
    """40-256-256-10 with the residual h + relu(linear2(h))."""

    def __init__(self, hidden=256):
        super().__init__()
        self.linear1 = nn.Linear(40, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, 10)

    def forward(self, x):
        h = self.linear1(x).relu()
        h = h + self.linear2(h).relu()
        return self.linear3(h)


class CNN(nn.Module):
    """Three Conv1d of 25 channels (k5/s2/p1, k3/s2/p1, k3/s2/p1) with ReLU, then Linear 125 -> 10."""

    def __init__(self, channels=25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, 10)

    def forward(self, x):
        h = x.reshape(x.shape[0], 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.reshape(h.shape[0], -1))


MODELS = {"mlp": MLP, "cnn": CNN}


def accuracy(model, x, y, batch=1000):
    model.eval()
    with mpnn.no_grad():
        correct = sum(
            int((model(mpnn.from_numpy(x[i : i + batch])).numpy().argmax(1) == y[i : i + batch]).sum())
            for i in range(0, len(x), batch)
        )
    model.train()
    return correct / len(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="cnn")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=100, help="global batch, split across ranks")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D samples (80%% train, 20%% test)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=int(os.environ.get("MPNN_CHECKPOINT_EVERY") or 0),
        help="steps between checkpoints, 0 for none (default: $MPNN_CHECKPOINT_EVERY, which "
        "`mpnn launch --checkpoint-every` sets)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where checkpoints go and are resumed from (default: the run directory of `mpnn launch`)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="capture the step once with mpnn.compile and replay it (DataParallel's all-reduces start as in eager)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    comm = mpnn.init()
    world, rank = comm.world_size, comm.rank
    if args.batch_size % world:
        raise SystemExit(f"mnist1d: --batch-size {args.batch_size} does not split evenly over {world} ranks")
    mpnn.manual_seed(args.seed)
    data = load_mnist1d(num_samples=args.num_samples)
    model = MODELS[args.model]()
    if world > 1:
        model = mpnn.DataParallel(model)  # starts from rank 0's weights; averages gradients in backward
    train = TensorDataset(data["x"], data["y"])
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    opt = mpnn.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ckpt = mpnn.Checkpointer(
        model, opt, sampler=sampler, loader=loader, every=args.checkpoint_every, directory=args.checkpoint_dir
    )
    resumed = ckpt.restore()  # the newest valid checkpoint of $MPNN_RESUME_FROM or --checkpoint-dir, if any
    if rank == 0 and resumed.resumed:
        print(f"resumed from {resumed.path} at step {resumed.step} (epoch {resumed.epoch})", flush=True)

    def train_step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    run_step = mpnn.compile(train_step) if args.compile else train_step

    mpnn.telemetry.plan(total_steps=args.steps)
    step, epoch, start = resumed.step, resumed.epoch, time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = run_step(x, y)
            step += 1
            ckpt.step(step, epoch=epoch)
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                elapsed = time.perf_counter() - start
                print(
                    f"step {step:5d}/{args.steps}  epoch {epoch}  loss {loss.item():.4f}  "
                    f"test acc {accuracy(model, data['x_test'], data['y_test']):.4f}  "
                    f"{1e3 * elapsed / (step - resumed.step):.3f} ms/step",
                    flush=True,
                )
            if step == args.steps:
                break
        epoch += 1
    acc = accuracy(model, data["x_test"], data["y_test"])
    if rank == 0:
        print(f"final test accuracy {acc:.4f} ({args.model}, {args.steps} steps, world {world})", flush=True)
    return acc


if __name__ == "__main__":
    main()
