"""mpnn.data: DistributedSampler against a port of PyTorch's algorithm, DataLoader batching and exact
resume, MNIST-1D generation and caching, transforms."""

import json
import math
import random
import threading
import time

import numpy as np
import pytest

from mpnn.core import random as mpnn_random
from mpnn.core.tensor import Tensor
from mpnn.data import (
    MNIST1D,
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    load_mnist1d,
    random_split,
    transforms,
)
from mpnn.data import datasets as datasets_module
from mpnn.worldspec import world_variables

# ----- DistributedSampler -------------------------------------------------------------------------


def reference_distributed_indices(n, num_replicas, rank, shuffle, seed, epoch, drop_last):
    """torch.utils.data.DistributedSampler.__iter__, line by line, with NumPy's permutation for randperm."""
    if drop_last and n % num_replicas != 0:
        num_samples = math.ceil((n - num_replicas) / num_replicas)
    else:
        num_samples = math.ceil(n / num_replicas)
    total_size = num_samples * num_replicas
    if shuffle:
        indices = np.random.default_rng(seed + epoch).permutation(n).tolist()
    else:
        indices = list(range(n))
    if not drop_last:
        padding_size = total_size - len(indices)
        if padding_size <= len(indices):
            indices += indices[:padding_size]
        else:
            indices += (indices * math.ceil(padding_size / len(indices)))[:padding_size]
    else:
        indices = indices[:total_size]
    assert len(indices) == total_size
    indices = indices[rank:total_size:num_replicas]
    assert len(indices) == num_samples
    return indices


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_sampler_matches_torch_algorithm_and_shards_are_disjoint_and_complete(drop_last, shuffle):
    for world in range(1, 9):
        for n in (1, 2, 7, 10, 13, 24, 31):
            shards = []
            for rank in range(world):
                sampler = DistributedSampler(
                    range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last
                )
                sampler.set_epoch(3)
                got = list(sampler)
                assert got == reference_distributed_indices(n, world, rank, shuffle, 5, 3, drop_last)
                assert len(sampler) == len(got)
                assert all(isinstance(i, int) for i in got)
                shards.append(got)
            lengths = {len(s) for s in shards}
            assert len(lengths) == 1, "every rank gets the same number of samples"
            flat = [i for s in shards for i in s]
            assert all(0 <= i < n for i in flat)
            if drop_last:
                assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint, nothing padded
            else:
                assert set(flat) == set(range(n))  # complete
                assert len(flat) == math.ceil(n / world) * world
                counts = np.bincount(flat, minlength=n)
                assert counts.max() <= math.ceil(len(flat) / n)  # padding repeats evenly


def test_distributed_sampler_epochs_and_seeds():
    def order(seed, epoch, rank=0):
        s = DistributedSampler(range(100), num_replicas=2, rank=rank, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) != order(0, 1), "a new epoch reshuffles"
    assert order(0, 1) == order(0, 1), "same seed and epoch, same order in a fresh instance"
    assert order(0, 0) != order(1, 0)
    assert sorted(order(7, 2, 0) + order(7, 2, 1)) == list(range(100))


def test_distributed_sampler_state_dict_restores_epoch_and_seed():
    s = DistributedSampler(range(50), num_replicas=3, rank=1, seed=11)
    s.set_epoch(4)
    state = json.loads(json.dumps(s.state_dict()))
    fresh = DistributedSampler(range(50), num_replicas=3, rank=1)
    fresh.load_state_dict(state)
    assert list(fresh) == list(s) == reference_distributed_indices(50, 3, 1, True, 11, 4, False)
    with pytest.raises(ValueError, match="DistributedSampler.load_state_dict"):
        fresh.load_state_dict({"epoch": 1})


def clear_world(monkeypatch):
    """Remove every variable the world parse reads (this machine's own MPNN_*, SLURM_*, ... included)."""
    for name, _ in world_variables():
        monkeypatch.delenv(name)


# What each launcher puts in rank r's environment, for a world of 3 ranks.
LAUNCHER_ENVS = {
    "mpnn": lambda r: {
        "MPNN_RANK": r,
        "MPNN_WORLD_SIZE": 3,
        "MPNN_LOCAL_RANK": r,
        "MPNN_LOCAL_WORLD_SIZE": 3,
        "MPNN_NNODES": 1,
        "MPNN_NODE_RANK": 0,
        "MPNN_RUN_ID": "r",
        "MPNN_RENDEZVOUS": "tcp://127.0.0.1:9",
        # `mpnn launch` sets torchrun's names too; they agree, and MPNN_* is what is read
        "RANK": r,
        "WORLD_SIZE": 3,
        "LOCAL_RANK": r,
        "LOCAL_WORLD_SIZE": 3,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": 29999,
    },
    "torchrun": lambda r: {
        "RANK": r,
        "WORLD_SIZE": 3,
        "LOCAL_RANK": r,
        "LOCAL_WORLD_SIZE": 3,
        "GROUP_RANK": 0,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": 29500,
        "TORCHELASTIC_RUN_ID": "job",
    },
    "mpirun": lambda r: {
        "OMPI_COMM_WORLD_RANK": r,
        "OMPI_COMM_WORLD_SIZE": 3,
        "OMPI_COMM_WORLD_LOCAL_RANK": r,
        "OMPI_COMM_WORLD_LOCAL_SIZE": 3,
        "OMPI_COMM_WORLD_NODE_RANK": 0,
        "OMPI_MCA_ess_base_jobid": 7,
    },
    # across hosts without any address: joining would need MPNN_RENDEZVOUS, reading rank and world does not
    "mpirun-2-hosts": lambda r: {
        "OMPI_COMM_WORLD_RANK": r,
        "OMPI_COMM_WORLD_SIZE": 3,
        "OMPI_COMM_WORLD_LOCAL_RANK": r % 2,
        "OMPI_COMM_WORLD_LOCAL_SIZE": 2,
    },
    "srun": lambda r: {
        "SLURM_PROCID": r,
        "SLURM_NTASKS": 3,
        "SLURM_STEP_NUM_TASKS": 3,
        "SLURM_LOCALID": r,
        "SLURM_NODEID": 0,
        "SLURM_STEP_NUM_NODES": 1,
        "SLURM_STEP_TASKS_PER_NODE": "3",
        "SLURM_JOB_ID": 77,
        "SLURM_STEP_ID": 0,
    },
    "srun-2-nodes": lambda r: {
        "SLURM_PROCID": r,
        "SLURM_NTASKS": 3,
        "SLURM_STEP_NUM_TASKS": 3,
        "SLURM_LOCALID": r % 2,
        "SLURM_NODEID": r // 2,
        "SLURM_STEP_NUM_NODES": 2,
        "SLURM_STEP_TASKS_PER_NODE": "2,1",
        "SLURM_JOB_ID": 78,
        "SLURM_STEP_ID": 0,
        "SLURM_STEP_NODELIST": "cn[1-2]",
    },
}


def set_world(monkeypatch, env):
    clear_world(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("launcher", sorted(LAUNCHER_ENVS))
@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_sampler_reads_every_launchers_world(monkeypatch, launcher, shuffle):
    """DistributedSampler(dataset) alone shards by the launcher's rank and world size: mpnn launch, torchrun,
    mpirun and srun alike (before the one parse, all but mpnn's gave every rank the whole data set)."""
    n, world = 12, 3
    shards = []
    for rank in range(world):
        set_world(monkeypatch, LAUNCHER_ENVS[launcher](rank))
        s = DistributedSampler(range(n), shuffle=shuffle, seed=5)
        assert (s.num_replicas, s.rank, len(s)) == (world, rank, n // world)
        shards.append(list(s))
        assert shards[-1] == reference_distributed_indices(n, world, rank, shuffle, 5, 0, False)
    assert sorted(i for shard in shards for i in shard) == list(range(n))  # disjoint and covering


def test_distributed_sampler_outside_any_launcher_is_the_whole_data_set(monkeypatch):
    clear_world(monkeypatch)
    s = DistributedSampler(range(10), shuffle=False)
    assert (s.num_replicas, s.rank, list(s)) == (1, 0, list(range(10)))


@pytest.mark.parametrize("launcher", ["mpnn", "torchrun", "mpirun", "srun"])
def test_distributed_sampler_explicit_arguments_win(monkeypatch, launcher):
    set_world(monkeypatch, LAUNCHER_ENVS[launcher](1))
    s = DistributedSampler(range(10), num_replicas=2, rank=0, shuffle=False)
    assert (s.num_replicas, s.rank, list(s)) == (2, 0, [0, 2, 4, 6, 8])
    assert (DistributedSampler(range(10), rank=2).num_replicas, DistributedSampler(range(10), num_replicas=5).rank) == (
        3,
        1,
    )


@pytest.mark.parametrize(
    "launcher, rank_var, size_var",
    [
        ("mpnn", "MPNN_RANK", "MPNN_WORLD_SIZE"),
        ("torchrun", "RANK", "WORLD_SIZE"),
        ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
    ],
)
def test_distributed_sampler_refuses_a_rank_outside_the_world(monkeypatch, launcher, rank_var, size_var):
    set_world(monkeypatch, LAUNCHER_ENVS[launcher](2))
    with pytest.raises(ValueError, match=rf"invalid rank 3, .*\[0, 2\] \(num_replicas=3 from {size_var}\)"):
        DistributedSampler(range(10), rank=3)
    with pytest.raises(ValueError, match=rf"invalid rank 2 \(from {rank_var}\), .*\[0, 1\] \(num_replicas=2\)"):
        DistributedSampler(range(10), num_replicas=2)
    monkeypatch.setenv(rank_var, "3")  # the launcher's own rank outside its world: the parse names both variables
    with pytest.raises(
        ValueError,
        match=rf"DistributedSampler: .*rank 3 \({rank_var}=3\) is outside the world of "
        rf"size 3 \({size_var}=3\)",
    ):
        DistributedSampler(range(10))
    monkeypatch.setenv(rank_var, "two")
    with pytest.raises(ValueError, match=f"{rank_var} must be an integer, got 'two'"):
        DistributedSampler(range(10))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_replicas=2, rank=2), r"invalid rank 2"),
        (dict(num_replicas=2, rank=-1), r"invalid rank -1"),
        (dict(num_replicas=0, rank=0), r"num_replicas should be a positive integer"),
        (dict(num_replicas=2, rank=0, seed=-1), r"seed must be a non-negative int"),
    ],
)
def test_distributed_sampler_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DistributedSampler(range(10), **kwargs)


# ----- samplers and datasets ----------------------------------------------------------------------


def test_random_sampler_is_a_permutation_and_follows_manual_seed():
    mpnn_random.manual_seed(123)
    first = list(RandomSampler(range(30)))
    mpnn_random.manual_seed(123)
    again = list(RandomSampler(range(30)))
    assert first == again
    assert sorted(first) == list(range(30)) and first != list(range(30))
    sampler = RandomSampler(range(30))
    assert list(sampler) != list(sampler), "each pass draws a new order"
    drawn = list(RandomSampler(range(4), num_samples=10, generator=np.random.default_rng(0)))
    assert len(drawn) == 10 and sorted(drawn[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]
    with_replacement = list(
        RandomSampler(range(4), replacement=True, num_samples=50, generator=np.random.default_rng(0))
    )
    assert len(with_replacement) == 50 and set(with_replacement) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="num_samples should be a positive integer"):
        RandomSampler(range(4), num_samples=0)
    with pytest.raises(TypeError, match="np.random.Generator"):
        RandomSampler(range(4), generator=7)


def test_batch_sampler_groups_and_drops_last():
    assert list(BatchSampler(SequentialSampler(range(7)), 3, False)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(BatchSampler(SequentialSampler(range(7)), 3, True)) == [[0, 1, 2], [3, 4, 5]]
    assert list(BatchSampler(range(5), 2, False)) == [[0, 1], [2, 3], [4]]  # any iterable sampler
    assert len(BatchSampler(range(7), 3, False)) == 3 and len(BatchSampler(range(7), 3, True)) == 2
    with pytest.raises(ValueError, match="batch_size should be a positive integer"):
        BatchSampler(range(5), 0, False)


def test_tensor_dataset_items_batches_and_errors():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)
    ds = TensorDataset(x, Tensor(y))
    assert len(ds) == 10
    xi, yi = ds[3]
    np.testing.assert_array_equal(xi.data, x[3])
    assert yi.item() == 3 and yi.dtype == np.int64
    xb, yb = ds[np.array([4, 1])]
    np.testing.assert_array_equal(xb.data, x[[4, 1]])
    np.testing.assert_array_equal(ds[[0, 9]][1].data, [0, 9])
    with pytest.raises(IndexError, match="TensorDataset: index 10 out of range for a dataset of 10"):
        ds[10]
    with pytest.raises(IndexError, match="TensorDataset: index 12 out of range"):
        ds[np.array([0, 12])]
    with pytest.raises(ValueError, match=r"same first dim.*\(10, 2\), \(9,\)"):
        TensorDataset(x, y[:9])


def test_subset_and_random_split():
    ds = TensorDataset(np.arange(10) * 10)
    sub = Subset(ds, [7, 2, 5])
    assert len(sub) == 3 and sub[0][0].item() == 70 and sub[-1][0].item() == 50
    np.testing.assert_array_equal(sub[np.array([2, 0])][0].data, [50, 70])
    with pytest.raises(IndexError, match="Subset: index 3 out of range"):
        sub[3]
    parts = random_split(ds, [3, 7], generator=np.random.default_rng(0))
    assert [len(p) for p in parts] == [3, 7]
    values = sorted(int(p[i][0].item()) for p in parts for i in range(len(p)))
    assert values == list(range(0, 100, 10))
    assert [len(p) for p in random_split(range(10), [0.5, 0.3, 0.2])] == [5, 3, 2]
    with pytest.raises(ValueError, match="does not equal the length of the input dataset 10"):
        random_split(ds, [3, 3])


# ----- DataLoader ---------------------------------------------------------------------------------


class RowDataset(Dataset):
    """A dataset without batched indexing: the DataLoader must collate it sample by sample."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _batches(loader):
    return [[t.data.copy() for t in batch] for batch in loader]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_shapes_dtypes_len_and_contents(batched, drop_last):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3)).astype(np.float32)
    y = np.arange(10, dtype=np.int64)
    ds = TensorDataset(x, y) if batched else RowDataset(x, y)
    loader = DataLoader(ds, batch_size=4, drop_last=drop_last)
    batches = _batches(loader)
    assert len(loader) == len(batches) == (2 if drop_last else 3)
    assert [b[0].shape for b in batches] == [(4, 3), (4, 3)] + ([] if drop_last else [(2, 3)])
    for xb, yb in batches:
        assert xb.dtype == np.float32 and yb.dtype == np.int64
    used = 8 if drop_last else 10
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x[:used])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y[:used])

    shuffled = _batches(DataLoader(ds, batch_size=4, shuffle=True, seed=3, drop_last=drop_last))
    labels = np.concatenate([b[1] for b in shuffled])
    assert len(labels) == used and len(set(labels.tolist())) == used
    assert not np.array_equal(labels, y[:used])
    np.testing.assert_array_equal(np.concatenate([b[0] for b in shuffled]), x[labels])  # rows stay paired


def test_loader_fast_path_and_per_sample_path_agree():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 5)).astype(np.float32)
    y = rng.integers(0, 10, 23)
    fast = _batches(DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, seed=9))
    slow = _batches(DataLoader(RowDataset(x, y), batch_size=5, shuffle=True, seed=9))
    assert len(fast) == len(slow) == 5
    for (fx, fy), (sx, sy) in zip(fast, slow):
        np.testing.assert_array_equal(fx, sx)
        np.testing.assert_array_equal(fy, sy)
        assert fy.dtype == sy.dtype == np.int64


def test_loader_keeps_float64_and_collates_nested_samples():
    x64 = np.linspace(0, 1, 12).reshape(6, 2)
    (xb,) = next(iter(DataLoader(TensorDataset(x64), batch_size=6)))
    assert xb.dtype == np.float64
    np.testing.assert_array_equal(xb.data, x64)

    class Dicts(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"signal": np.full(3, i, dtype=np.float32), "weight": 0.5 * i, "label": i, "name": f"s{i}"}

    batch = next(iter(DataLoader(Dicts(), batch_size=3)))
    assert batch["signal"].shape == (3, 3) and batch["signal"].dtype == np.float32
    assert batch["weight"].dtype == np.float32 and batch["weight"].tolist() == [0.0, 0.5, 1.0]
    assert batch["label"].dtype == np.int64 and batch["label"].tolist() == [0, 1, 2]
    assert batch["name"] == ["s0", "s1", "s2"]

    single = list(DataLoader(TensorDataset(np.arange(3)), batch_size=None))
    assert len(single) == 3 and single[2][0].item() == 2 and single[2][0].shape == ()


def test_loader_custom_sampler_batch_sampler_and_collate_fn():
    ds = TensorDataset(np.arange(10, dtype=np.float32))
    got = [b[0].tolist() for b in DataLoader(ds, batch_size=2, sampler=[9, 8, 7, 6, 5])]
    assert got == [[9.0, 8.0], [7.0, 6.0], [5.0]]
    got = [b[0].tolist() for b in DataLoader(ds, batch_sampler=[[1, 2, 3], [0]])]
    assert got == [[1.0, 2.0, 3.0], [0.0]]
    sums = list(DataLoader(ds, batch_size=5, collate_fn=lambda samples: sum(s[0].item() for s in samples)))
    assert sums == [10.0, 35.0]


def test_loader_bad_arguments():
    ds = TensorDataset(np.arange(10))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(
            ValueError, match=f"DataLoader: batch_size should be a positive integer value, but got batch_size={bad!r}"
        ):
            DataLoader(ds, batch_size=bad)
    with pytest.raises(ValueError, match="sampler option is mutually exclusive with shuffle"):
        DataLoader(ds, sampler=SequentialSampler(ds), shuffle=True)
    with pytest.raises(ValueError, match="batch_sampler option is mutually exclusive"):
        DataLoader(ds, batch_size=4, batch_sampler=[[0, 1]])
    with pytest.raises(ValueError, match="mutually exclusive with drop_last"):
        DataLoader(ds, batch_size=None, drop_last=True)
    with pytest.raises(ValueError, match="either generator or seed"):
        DataLoader(ds, shuffle=True, seed=1, generator=np.random.default_rng(1))
    with pytest.raises(IndexError, match="TensorDataset: index 10 out of range"):
        list(DataLoader(ds, batch_size=2, sampler=[0, 10]))
    with pytest.warns(UserWarning, match="num_workers=2 is ignored"):
        DataLoader(ds, num_workers=2)


def _resume_check(make_loader, epochs, cut_epoch, cut_batch, before_epoch=lambda loader, e: None):
    """Run make_loader(0) for `epochs`; in another make_loader(0) stop at (cut_epoch, cut_batch), save, load
    into make_loader(1) (built differently: only the loaded state can make it match) and finish there: the
    concatenation must equal the uninterrupted run batch for batch."""
    full_loader = make_loader(0)
    full = []
    for e in range(epochs):
        before_epoch(full_loader, e)
        full.append(_batches(full_loader))

    first = make_loader(0)
    for e in range(cut_epoch):
        before_epoch(first, e)
        _batches(first)
    before_epoch(first, cut_epoch)
    it = iter(first)
    head = [[t.data.copy() for t in next(it)] for _ in range(cut_batch)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == cut_epoch and state["batches_consumed"] == cut_batch

    resumed = make_loader(1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    start = state["epoch"]
    before_epoch(resumed, start)
    tail = _batches(resumed)
    assert len(head) + len(tail) == len(full[cut_epoch])
    for got, want in zip(head + tail, full[cut_epoch]):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    for e in range(start + 1, epochs):
        before_epoch(resumed, e)
        later = _batches(resumed)
        assert len(later) == len(full[e])
        for got, want in zip(later, full[e]):
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(full[0], full[1])), "epochs differ"


@pytest.mark.parametrize("batched", [True, False])
def test_loader_resumes_mid_epoch_exactly_with_random_sampler(batched):
    x = np.random.default_rng(2).standard_normal((37, 4)).astype(np.float32)
    y = np.arange(37)
    ds = TensorDataset(x, y) if batched else RowDataset(x, y)

    def make(variant):
        mpnn_random.manual_seed(100 + variant)
        return DataLoader(ds, batch_size=5, shuffle=True)

    _resume_check(make, epochs=4, cut_epoch=1, cut_batch=3)
    _resume_check(make, epochs=3, cut_epoch=0, cut_batch=0)
    _resume_check(make, epochs=3, cut_epoch=2, cut_batch=7)  # a whole epoch consumed, iterator not yet ended


def test_loader_resumes_mid_epoch_exactly_with_distributed_sampler():
    x = np.random.default_rng(3).standard_normal((50, 2)).astype(np.float32)
    ds = TensorDataset(x, np.arange(50))

    def make(variant):
        sampler = DistributedSampler(ds, num_replicas=3, rank=2, seed=4 if variant == 0 else 99)
        return DataLoader(ds, batch_size=4, sampler=sampler)

    def set_epoch(loader, epoch):
        loader.sampler.set_epoch(epoch)

    _resume_check(make, epochs=3, cut_epoch=1, cut_batch=2, before_epoch=set_epoch)
    loader = make(0)
    with pytest.raises(ValueError, match=r"batches_consumed=9 is outside \[0, 5\]"):
        loader.load_state_dict({"epoch": 0, "batches_consumed": 9, "sampler": None})
    with pytest.raises(ValueError, match="DataLoader.load_state_dict: expected a dict"):
        loader.load_state_dict({"epoch": 0})


def test_loader_fast_path_per_batch_cost():
    """The MNIST-1D recipe's shape: 4000x40 float32, batches of 100, shuffled. Measured 4.7 us per batch on
    the 2-core dev machine; per-sample collation costs 73 us, which this bound catches."""
    rng = np.random.default_rng(0)
    ds = TensorDataset(rng.standard_normal((4000, 40)).astype(np.float32), rng.integers(0, 10, 4000))
    loader = DataLoader(ds, batch_size=100, shuffle=True, seed=0)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        count = sum(1 for _ in range(25) for _ in loader)
        best = min(best, (time.perf_counter() - t0) / count)
    assert count == 1000
    assert best < 50e-6, f"{best * 1e6:.1f} us per batch"


# ----- MNIST-1D -----------------------------------------------------------------------------------


def test_mnist1d_shapes_dtypes_labels_and_matches_mnist1d(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    data = load_mnist1d(num_samples=200, seed=7, root=tmp_path)
    assert random.getstate() == py_state, "generation leaves Python's global RNG alone"
    assert np.array_equal(np.random.get_state()[1], np_state[1]), "and NumPy's legacy global RNG"
    assert data["x"].shape == (160, 40) and data["x_test"].shape == (40, 40)
    assert data["x"].dtype == data["x_test"].dtype == np.float32
    assert data["y"].dtype == data["y_test"].dtype == np.int64
    assert set(np.unique(np.concatenate([data["y"], data["y_test"]]))) == set(range(10))

    args = get_dataset_args()
    args.num_samples, args.seed = 200, 7
    reference = make_dataset(args)
    np.testing.assert_array_equal(data["x"], reference["x"].astype(np.float32))
    np.testing.assert_array_equal(data["y_test"], reference["y_test"])

    train, test = MNIST1D(True, 200, 7, root=tmp_path), MNIST1D(False, 200, 7, root=tmp_path)
    assert len(train) == 160 and len(test) == 40
    signal, label = train[5]
    assert signal.shape == (40,) and signal.dtype == np.float32 and label.dtype == np.int64
    np.testing.assert_array_equal(signal.data, data["x"][5])
    xb, yb = next(iter(DataLoader(test, batch_size=16)))
    assert xb.shape == (16, 40) and yb.shape == (16,)
    np.testing.assert_array_equal(yb.data, data["y_test"][:16])


def test_mnist1d_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = load_mnist1d(num_samples=100, seed=3, root=tmp_path / "a")
    again = load_mnist1d(num_samples=100, seed=3, root=tmp_path / "b")  # generated afresh elsewhere
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other = load_mnist1d(num_samples=100, seed=4, root=tmp_path / "a")
    assert not np.array_equal(first["x"], other["x"])
    assert len(list((tmp_path / "a").glob("mnist1d-*.npz"))) == 2
    assert not list((tmp_path / "a").glob("*.tmp")), "no temp file left behind"

    def must_not_generate(*args):
        raise AssertionError("cache miss: make_dataset was called again")

    monkeypatch.setattr(datasets_module, "_generate", must_not_generate)
    cached = load_mnist1d(num_samples=100, seed=3, root=tmp_path / "a")
    np.testing.assert_array_equal(cached["x"], first["x"])
    monkeypatch.setenv("MPNN_CACHE_DIR", str(tmp_path / "a"))
    np.testing.assert_array_equal(MNIST1D(num_samples=100, seed=3).data.data, first["x"])


def test_mnist1d_concurrent_loaders_generate_once_and_corrupt_cache_regenerates(tmp_path, monkeypatch):
    real_generate = datasets_module._generate
    calls = []

    def slow_generate(num_samples, seed):
        calls.append(seed)
        time.sleep(0.2)
        return real_generate(num_samples, seed)

    monkeypatch.setattr(datasets_module, "_generate", slow_generate)
    results = [None] * 4

    def worker(i):
        results[i] = load_mnist1d(num_samples=50, seed=1, root=tmp_path)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1], "one loader generated, the others waited for its file"
    for r in results[1:]:
        np.testing.assert_array_equal(r["x"], results[0]["x"])

    path = datasets_module.mnist1d_cache_path(50, 1, tmp_path)
    path.write_bytes(b"not a zip file")
    regenerated = load_mnist1d(num_samples=50, seed=1, root=tmp_path)
    assert calls == [1, 1]
    np.testing.assert_array_equal(regenerated["x"], results[0]["x"])


def test_mnist1d_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="MNIST1D: num_samples must be an int >= 10"):
        load_mnist1d(num_samples=5, root=tmp_path)
    with pytest.raises(ValueError, match="MNIST1D: seed must be an int"):
        load_mnist1d(seed=-1, root=tmp_path)


# ----- transforms ---------------------------------------------------------------------------------


def test_transforms_normalize_compose_lambda():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    mean, std = [0.5, -1.0, 2.0], [2.0, 0.5, 4.0]
    got = transforms.Normalize(mean, std)(x)
    want = (x - np.array(mean, dtype=np.float32)[:, None]) / np.array(std, dtype=np.float32)[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    as_tensor = transforms.Normalize(1.0, 2.0)(Tensor(x))
    assert isinstance(as_tensor, Tensor)
    np.testing.assert_allclose(as_tensor.data, (x - 1.0) / 2.0, rtol=1e-6)
    pipeline = transforms.Compose([transforms.Normalize(0.0, 2.0), transforms.Lambda(lambda a: a + 1)])
    np.testing.assert_allclose(pipeline(x), x / 2 + 1, rtol=1e-6)
    with pytest.raises(ValueError, match="std evaluated to zero"):
        transforms.Normalize(0.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="2 channel means do not fit a sample of shape"):
        transforms.Normalize([0.0, 1.0], 1.0)(x)
    with pytest.raises(TypeError, match="Normalize: input should be a floating-point array"):
        transforms.Normalize(0.0, 1.0)(np.arange(3))


def test_mnist1d_transform_applies_per_sample(tmp_path):
    ds = MNIST1D(num_samples=50, seed=2, root=tmp_path, transform=transforms.Normalize(1.0, 2.0))
    raw = load_mnist1d(num_samples=50, seed=2, root=tmp_path)["x"]
    xb, _ = next(iter(DataLoader(ds, batch_size=4)))
    np.testing.assert_allclose(xb.data, (raw[:4] - 1.0) / 2.0, rtol=1e-6)


class EpochShuffledBatches:
    """A user batch sampler (no _epoch_indices, so the loader steps through it) with its own state."""

    def __init__(self, n, size, seed):
        self.n, self.size, self.seed, self.epoch = n, size, seed, 0

    def __iter__(self):
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n).tolist()
        return iter([order[i : i + self.size] for i in range(0, self.n, self.size)])

    def __len__(self):
        return math.ceil(self.n / self.size)

    def state_dict(self):
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch, self.seed = state["epoch"], state["seed"]


def test_loader_resumes_mid_epoch_exactly_with_a_user_batch_sampler():
    ds = RowDataset(np.random.default_rng(4).standard_normal((29, 3)).astype(np.float32), np.arange(29))

    def make(variant):
        return DataLoader(ds, batch_sampler=EpochShuffledBatches(29, 4, seed=1 if variant == 0 else 50))

    def set_epoch(loader, epoch):
        loader.batch_sampler.epoch = epoch

    _resume_check(make, epochs=3, cut_epoch=1, cut_batch=5, before_epoch=set_epoch)
