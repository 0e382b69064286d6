"""Handwritten digits (scikit-learn's load_digits: 1,797 8x8 images, no download) with a small residual CNN,
read from memory-mapped ArrayShards through the fused Numba transforms (issue 13).

python launch/digits.py --seed 0
mpnn launch -n 2 launch/digits.py              # the global batch is split across ranks

The images (values 0..16) are scaled to uint8 0..255 and split 80/20 by a fixed permutation (the same for
every --seed), written as shards (in the run directory under `mpnn launch`, else --data-dir or a temporary
directory), and read with RandomCrop(8, padding=1) + ToTensor + Normalize for training (no flip: digits are
not mirror-symmetric), ToTensor + Normalize for testing. Needs scikit-learn: pip install 'mpnn[digits]'.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import mpnn
from mpnn import nn
from mpnn.data import ArrayShards, DataLoader, DistributedSampler
from mpnn.data import transforms as T

SPLIT_SEED = 0  # the train/test permutation: fixed, so every seed and world size tests on the same 359 images


def load_digits_uint8():
    """(images uint8 (1797, 8, 8, 1), labels int64): load_digits' 0..16 values scaled to 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            "digits: needs scikit-learn (pip install 'mpnn[digits]' or pip install scikit-learn)"
        ) from None
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def split(images, labels, test_fraction=0.2):
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def write_shards(root, shard_size=512):
    """Write the train and test splits as ArrayShards under ``root``/train and ``root``/test."""
    images, labels = load_digits_uint8()
    (train_x, train_y), (test_x, test_y) = split(images, labels)
    ArrayShards.write(os.path.join(root, "train"), train_x, train_y, shard_size=shard_size, overwrite=True)
    ArrayShards.write(os.path.join(root, "test"), test_x, test_y, shard_size=shard_size, overwrite=True)


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the input (a 1x1 stride-2 conv-bn when the shape changes), then relu."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.bn1(self.conv1(x)).relu()
        h = self.bn2(self.conv2(h))
        return (h + (x if self.shortcut is None else self.shortcut(x))).relu()


class ResidualCNN(nn.Module):
    """Stem conv-bn-relu (1 -> 32), blocks 32 @ 8x8 and 64 @ 4x4, global average pool, linear to 10."""

    def __init__(self, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = Block(width, width)
        self.block2 = Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        h = self.block2(self.block1(self.stem(x)))
        return self.fc(self.pool(h).flatten(1))


def accuracy(model, loader):
    model.eval()
    correct = total = 0
    with mpnn.no_grad():
        for x, y in loader:
            correct += int((model(x).numpy().argmax(1) == y.numpy()).sum())
            total += len(y)
    model.train()
    return correct / total


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split across ranks")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--width", type=int, default=32, help="channels of the first block (the second has twice)")
    p.add_argument("--prefetch", type=int, default=2, help="batches the loader prepares ahead (0: none)")
    p.add_argument("--data-dir", default=None, help="where the shards go (default: run dir, else a temp dir)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    if args.seed < 0 or args.prefetch < 0 or not args.lr > 0:
        p.error("--seed and --prefetch must be >= 0 and --lr > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    comm = mpnn.init()
    world, rank = comm.world_size, comm.rank
    if args.batch_size % world:
        raise SystemExit(f"digits: --batch-size {args.batch_size} does not split evenly over {world} ranks")
    with tempfile.TemporaryDirectory(prefix="mpnn-digits-") as scratch:
        root = args.data_dir or (
            os.path.join(os.environ["MPNN_RUN_DIR"], "digits-shards") if os.environ.get("MPNN_RUN_DIR") else scratch
        )
        if world > 1 and not (args.data_dir or os.environ.get("MPNN_RUN_DIR")):
            raise SystemExit("digits: with several ranks, pass --data-dir (a directory every rank can read)")
        if rank == 0:
            write_shards(root)
        comm.barrier()  # the other ranks open the shards once rank 0 has written them
        return train(args, comm, root)


def train(args, comm, root):
    world, rank = comm.world_size, comm.rank
    mpnn.manual_seed(args.seed)
    train_raw = ArrayShards(os.path.join(root, "train"))
    pixels = np.concatenate([a.reshape(-1) for a in train_raw.shard_images]).astype(np.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    train_set = ArrayShards(
        os.path.join(root, "train"),
        transform=T.Compose([T.RandomCrop(8, padding=1), T.ToTensor(), T.Normalize([mean], [std])], seed=args.seed),
    )
    test_set = ArrayShards(os.path.join(root, "test"), transform=T.Compose([T.ToTensor(), T.Normalize([mean], [std])]))
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(
        train_set, batch_size=args.batch_size // world, sampler=sampler, drop_last=True, prefetch=args.prefetch
    )
    test_loader = DataLoader(test_set, batch_size=len(test_set))
    model = ResidualCNN(args.width)
    if world > 1:
        model = mpnn.DataParallel(model)  # starts from rank 0's weights; averages gradients in backward
    opt = mpnn.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(loader)
    schedule = mpnn.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    mpnn.telemetry.plan(total_steps=steps)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            schedule.step()
        if rank == 0 and ((epoch + 1) % 10 == 0 or epoch + 1 == args.epochs):
            print(
                f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss.item():.4f}  test acc "
                f"{accuracy(model, test_loader):.4f}  {time.perf_counter() - start:.1f} s",
                flush=True,
            )
    acc = accuracy(model, test_loader)
    if rank == 0:
        print(f"final test accuracy {acc:.4f} (seed {args.seed}, {args.epochs} epochs, world {world})", flush=True)
    return acc


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
