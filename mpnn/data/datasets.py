"""Ready-made datasets: MNIST-1D, generated procedurally by the mnist1d package and cached as .npz.

Generation (mnist1d's make_dataset; its get_dataset would download, so it is never called) took about
0.9 s for 5000 samples here, plus 0.6 s to import mnist1d (it pulls in matplotlib and scipy); a cache hit
is a few milliseconds. The cache is written atomically (temp file + rename) under a file lock, so when
many worker processes start at once one of them generates and the others wait and load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

from mpnn.data.dataset import TensorDataset

_KEYS = ("x", "y", "x_test", "y_test")


def _mnist1d_version() -> str:
    try:
        return importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("MNIST1D: the mnist1d package is not installed (pip install mnist1d)") from None


def mnist1d_cache_path(num_samples: int = 5000, seed: int = 42, root=None) -> Path:
    """Where load_mnist1d keeps these arguments' arrays: root, else $MPNN_CACHE_DIR, else ~/.cache/mpnn."""
    if root is None:
        root = os.environ.get("MPNN_CACHE_DIR") or Path.home() / ".cache" / "mpnn"
    key = json.dumps({"num_samples": num_samples, "seed": seed, "mnist1d": _mnist1d_version()}, sort_keys=True)
    return Path(root) / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _generate(num_samples: int, seed: int) -> dict:
    """Run mnist1d's make_dataset quietly, leaving the global `random` and np.random states as they were."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": np.ascontiguousarray(data["x"], dtype=np.float32),
        "y": np.ascontiguousarray(data["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(data["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(data["y_test"], dtype=np.int64),
    }


def _read(path: Path) -> dict | None:
    """The cached arrays, or None when the file is missing or unreadable (then it is generated again)."""
    try:
        with np.load(path) as npz:
            return {key: npz[key] for key in _KEYS}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _write_atomic(path: Path, arrays: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the cache is plain data, readable like any other file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_mnist1d(num_samples: int = 5000, seed: int = 42, root=None) -> dict:
    """MNIST-1D as ``dict(x, y, x_test, y_test)``: x float32 (N, 40), y int64 in 0..9, an 80/20 split.

    ``num_samples`` counts train and test together and is rounded down to a multiple of 10 (one tenth
    per digit), as in mnist1d. Generated once per (num_samples, seed, mnist1d version), then cached.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 10:
        raise ValueError(f"MNIST1D: num_samples must be an int >= 10 (one per digit at least), got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"MNIST1D: seed must be an int in [0, 2**32), got {seed!r}")
    path = mnist1d_cache_path(int(num_samples), int(seed), root)
    arrays = _read(path)
    if arrays is not None:
        return arrays
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError as error:  # a read-only HOME, a cache dir that is a file: generate, but keep nothing
        sys.stderr.write(
            f"mpnn: cannot cache MNIST-1D in {path.parent}: {error.strerror or error}; generating it in memory "
            "(set MPNN_CACHE_DIR to a writable directory to keep it)\n"
        )
        return _generate(int(num_samples), int(seed))
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process generates; the rest wait here, then read its file
        arrays = _read(path)
        if arrays is None:
            arrays = _generate(int(num_samples), int(seed))
            try:
                _write_atomic(path, arrays)
            except OSError as error:
                sys.stderr.write(f"mpnn: cannot write the MNIST-1D cache {path}: {error.strerror or error}\n")
    return arrays


class MNIST1D(TensorDataset):
    """MNIST-1D train (or test) split as a dataset of (signal float32 (40,), label int64) samples.

    As torchvision's MNIST: ``data``, ``targets`` and ``classes``; ``transform``/``target_transform`` are
    applied per sample (which turns off the DataLoader's one-fancy-index batch path).
    """

    classes = [str(digit) for digit in range(10)]

    def __init__(
        self,
        train: bool = True,
        num_samples: int = 5000,
        seed: int = 42,
        root=None,
        transform=None,
        target_transform=None,
    ):
        arrays = load_mnist1d(num_samples, seed, root)
        x, y = (arrays["x"], arrays["y"]) if train else (arrays["x_test"], arrays["y_test"])
        super().__init__(x, y)
        self.train = train
        self.data, self.targets = self.tensors
        self.transform, self.target_transform = transform, target_transform
        self.batched_getitem = transform is None and target_transform is None

    def __getitem__(self, index):
        sample, label = super().__getitem__(index)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return sample, label

    def __repr__(self):
        split = "train" if self.train else "test"
        return f"MNIST1D({split}, {len(self)} samples, signal length {self._arrays[0].shape[1]})"
