"""Index samplers (as torch.utils.data): sequential, random, batched, and distributed across ranks.

Each sampler that can also gives one pass's whole order as an int64 array (``_epoch_indices``), which the
DataLoader slices into batches without a Python loop over indices. Samplers that shuffle expose
``state_dict``/``load_state_dict`` so that a resumed run draws the same order again.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from mpnn import hooks
from mpnn.core import random as mpnn_random
from mpnn.worldspec import current_world


def default_generator() -> np.random.Generator:
    """A private Generator seeded by one draw from mpnn's global generator, so manual_seed fixes it."""
    return np.random.default_rng(int(mpnn_random.generator().integers(2**63)))


def _check_positive_int(value, name: str, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{owner}: {name} should be a positive integer value, but got {name}={value!r}")


class Sampler:
    """Iterates over dataset indices; subclasses define __iter__ and usually __len__."""

    def __iter__(self):
        raise NotImplementedError(f"{type(self).__name__} must define __iter__")


class SequentialSampler(Sampler):
    """0, 1, ..., len(data_source) - 1, every pass."""

    def __init__(self, data_source):
        self.data_source = data_source

    def _epoch_indices(self) -> np.ndarray:
        return np.arange(len(self.data_source), dtype=np.int64)

    def __iter__(self):
        return iter(range(len(self.data_source)))

    def __len__(self):
        return len(self.data_source)


class RandomSampler(Sampler):
    """A fresh random order each pass (with replacement: ``num_samples`` independent draws).

    ``generator`` is an np.random.Generator; when None, a private one is seeded from mpnn's global
    generator at construction, so call mpnn.manual_seed before building the sampler (or DataLoader).
    """

    def __init__(
        self,
        data_source,
        replacement: bool = False,
        num_samples: int | None = None,
        generator: np.random.Generator | None = None,
    ):
        if not isinstance(replacement, bool):
            raise TypeError(
                f"RandomSampler: replacement should be a boolean value, but got replacement={replacement!r}"
            )
        if num_samples is not None:
            _check_positive_int(num_samples, "num_samples", "RandomSampler")
        if generator is not None and not isinstance(generator, np.random.Generator):
            raise TypeError(f"RandomSampler: generator must be an np.random.Generator, got {type(generator).__name__}")
        self.data_source = data_source
        self.replacement = replacement
        self._num_samples = num_samples
        self.generator = default_generator() if generator is None else generator

    @property
    def num_samples(self) -> int:
        return len(self.data_source) if self._num_samples is None else int(self._num_samples)

    def _epoch_indices(self) -> np.ndarray:
        n, k = len(self.data_source), self.num_samples
        if n == 0:
            if k and self._num_samples is not None:
                raise ValueError(f"RandomSampler: cannot draw num_samples={k} from an empty dataset")
            return np.empty(0, dtype=np.int64)
        if self.replacement:
            return self.generator.integers(0, n, size=k, dtype=np.int64)
        # As torch: whole permutations, then the first k % n of one more.
        parts = [self.generator.permutation(n) for _ in range(k // n)]
        if k % n:
            parts.append(self.generator.permutation(n)[: k % n])
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def __iter__(self):
        return iter(self._epoch_indices().tolist())

    def __len__(self):
        return self.num_samples

    def state_dict(self) -> dict:
        """The generator's state now; loading it makes the next pass repeat the order drawn from here."""
        return {"generator": copy.deepcopy(self.generator.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.generator.bit_generator.state = copy.deepcopy(state["generator"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"RandomSampler.load_state_dict: not a state from RandomSampler.state_dict ({exc!r})"
            ) from None


class BatchSampler(Sampler):
    """Groups another sampler's indices into lists of ``batch_size`` (the last one shorter unless drop_last)."""

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        _check_positive_int(batch_size, "batch_size", "BatchSampler")
        if not isinstance(drop_last, bool):
            raise ValueError(f"BatchSampler: drop_last should be a boolean value, but got drop_last={drop_last!r}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = drop_last

    def __iter__(self):
        if hasattr(self.sampler, "_epoch_indices"):
            order = self.sampler._epoch_indices()
            stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
            for start in range(0, stop, self.batch_size):
                yield order[start : start + self.batch_size].tolist()
            return
        batch = []
        for idx in self.sampler:
            batch.append(idx)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def state_dict(self) -> dict | None:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None

    def load_state_dict(self, state) -> None:
        if state is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)


def register_set_epoch_hook(hook):
    """Call ``hook(sampler, epoch)`` after every DistributedSampler.set_epoch (the plugin runtime tracks epochs)."""
    return hooks.register_sampler_hooks(set_epoch=hook)


def register_first_pass_hook(hook):
    """Call ``hook(sampler, indices)`` once per DistributedSampler, on its first pass: the audit trail
    fingerprints each rank's shard from it."""
    return hooks.register_sampler_hooks(first_pass=hook)


def world_from_env():
    """This process's WorldSpec from whichever launcher started it (mpnn launch, torchrun, mpirun, srun), or a
    world of one; the one parse mpnn.init() joins too (mpnn.worldspec.current_world)."""
    try:
        return current_world()
    except ValueError as error:
        raise ValueError(f"DistributedSampler: {error}") from None


class DistributedSampler(Sampler):
    """This rank's shard of the dataset, with PyTorch's exact algorithm.

    The order is a permutation seeded by ``seed + epoch`` (the same on every rank), padded by repeating
    its head until it divides evenly (or cut, with drop_last); rank r takes positions r, r + R, r + 2R, ...
    Call ``set_epoch(epoch)`` before each epoch for a new shuffle.
    """

    def __init__(
        self,
        dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        given = (num_replicas, rank)
        if num_replicas is None or rank is None:
            spec = world_from_env()
            num_replicas = spec.world_size if num_replicas is None else num_replicas
            rank = spec.rank if rank is None else rank
        _check_positive_int(num_replicas, "num_replicas", "DistributedSampler")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            rank_from = f"{rank!r}" if given[1] is not None else f"{rank} (from {spec.rank_var or 'the default'})"
            world_from = "" if given[0] is not None else f" from {spec.world_size_var or 'the default world of one'}"
            raise ValueError(
                f"DistributedSampler: invalid rank {rank_from}, rank should be in the interval "
                f"[0, {num_replicas - 1}] (num_replicas={num_replicas}{world_from})"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"DistributedSampler: seed must be a non-negative int, got {seed!r}")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._passes = 0
        n = len(dataset)
        if self.drop_last and n % self.num_replicas:
            self.num_samples = math.ceil((n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def _epoch_indices(self) -> np.ndarray:
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(n)
        else:
            order = np.arange(n, dtype=np.int64)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > n:
            order = np.concatenate([order, np.resize(order, self.total_size - n)])  # repeats the head cyclically
        shard = order[self.rank : self.total_size : self.num_replicas]
        self._passes += 1
        if self._passes == 1:
            for hook in tuple(hooks.sampler_first_pass_hooks):
                hook(self, shard)
        return shard

    def __iter__(self):
        return iter(self._epoch_indices().tolist())

    def __len__(self):
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the shuffle of ``epoch`` (every rank must pass the same value)."""
        self.epoch = int(epoch)
        for hook in tuple(hooks.sampler_epoch_hooks):
            hook(self, self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"DistributedSampler.load_state_dict: not a state from DistributedSampler.state_dict ({exc!r})"
            ) from None
