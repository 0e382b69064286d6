"""Map-style datasets (as torch.utils.data): the Dataset protocol, TensorDataset, Subset and random_split.

A dataset whose ``batched_getitem`` is True also accepts a 1-D integer index array in ``__getitem__`` and
returns the whole batch at once (one fancy-index per array), which is the DataLoader's fast path.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from mpnn.core.tensor import Tensor
from mpnn.data.sampler import default_generator


class Dataset:
    """A map from integer index to sample; subclasses define __getitem__ and __len__."""

    batched_getitem = False  # True: __getitem__(index_array) returns the stacked batch in one call

    def __getitem__(self, index):
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__")

    def __len__(self):
        raise NotImplementedError(f"{type(self).__name__} must define __len__")


def _as_array(x, position: int) -> np.ndarray:
    """An input of TensorDataset as a NumPy array (Tensors share their data; lists follow mpnn.tensor)."""
    if isinstance(x, Tensor):
        return x.data
    if isinstance(x, np.ndarray):
        return x
    try:
        return Tensor(x).data
    except (TypeError, ValueError) as exc:
        raise TypeError(f"TensorDataset: argument {position} is not array-like ({exc})") from None


def _check_batch_index(index, length: int, name: str) -> np.ndarray:
    """An index array/list/slice as an integer array; ints out of [-length, length) raise IndexError."""
    if isinstance(index, slice):
        return np.arange(length)[index]
    idx = np.asarray(index)
    if idx.dtype.kind not in "iu" and idx.size:
        raise TypeError(f"{name}: a batch index must hold integers, got dtype {idx.dtype}")
    return idx.astype(np.intp, copy=False)


class TensorDataset(Dataset):
    """Samples are the i-th rows of equally long arrays or Tensors: ``ds[i] == (x[i], y[i], ...)``."""

    batched_getitem = True

    def __init__(self, *tensors):
        if not tensors:
            raise ValueError("TensorDataset: needs at least one array or tensor")
        arrays = tuple(_as_array(t, i) for i, t in enumerate(tensors))
        for i, a in enumerate(arrays):
            if a.ndim == 0:
                raise ValueError(f"TensorDataset: argument {i} is 0-d; every input needs a first (sample) dim")
        lengths = [a.shape[0] for a in arrays]
        if len(set(lengths)) != 1:
            shapes = ", ".join(str(a.shape) for a in arrays)
            raise ValueError(
                f"TensorDataset: all inputs must have the same first dim (size mismatch between "
                f"tensors): got shapes {shapes}"
            )
        self._arrays = arrays
        self.tensors = tuple(Tensor._from_array(a) for a in arrays)

    def __len__(self):
        return self._arrays[0].shape[0]

    def __getitem__(self, index):
        """One sample (a tuple of Tensors) for an int; the stacked batch for an index array, list or slice."""
        if isinstance(index, (np.ndarray, list, slice)):
            idx = (
                index
                if type(index) is np.ndarray and index.dtype == np.intp
                else _check_batch_index(index, len(self), "TensorDataset")
            )
            try:
                return tuple([Tensor._from_array(a[idx]) for a in self._arrays])
            except IndexError:
                bad = idx[(idx >= len(self)) | (idx < -len(self))]
                raise IndexError(
                    f"TensorDataset: index {bad[0]} out of range for a dataset of {len(self)} samples"
                ) from None
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"TensorDataset: index must be an int or an integer array, got {type(index).__name__}"
            ) from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"TensorDataset: index {i} out of range for a dataset of {len(self)} samples")
        return tuple(Tensor._from_array(a[i, ...]) for a in self._arrays)


class Subset(Dataset):
    """The samples of ``dataset`` at ``indices``, in that order."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = indices
        self._index_array = np.asarray(indices, dtype=np.intp).reshape(-1)

    @property
    def batched_getitem(self):
        return getattr(self.dataset, "batched_getitem", False)

    def __len__(self):
        return len(self._index_array)

    def __getitem__(self, index):
        if isinstance(index, (np.ndarray, list, slice)):
            try:
                return self.dataset[self._index_array[_check_batch_index(index, len(self), "Subset")]]
            except IndexError:
                raise IndexError(f"Subset: a batch index is out of range for a subset of {len(self)} samples") from None
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"Subset: index must be an int or an integer array, got {type(index).__name__}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"Subset: index {i} out of range for a subset of {len(self)} samples")
        return self.dataset[int(self._index_array[i])]


def random_split(dataset, lengths, generator: np.random.Generator | None = None) -> list[Subset]:
    """Split a dataset into non-overlapping random subsets of the given lengths (or fractions summing to 1).

    ``generator`` defaults to mpnn's global generator (mpnn.core.random), so manual_seed fixes the split.
    """
    n = len(dataset)
    lengths = list(lengths)
    if lengths and all(isinstance(f, float) for f in lengths) and math.isclose(sum(lengths), 1.0):
        if any(f < 0 for f in lengths):
            raise ValueError(f"random_split: fractions must be non-negative, got {lengths}")
        sizes = [int(math.floor(n * f)) for f in lengths]
        for i in range(n - sum(sizes)):  # hand out the remainder round-robin, as torch does
            sizes[i % len(sizes)] += 1
        lengths = sizes
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 for k in lengths):
        raise ValueError(f"random_split: lengths must be non-negative ints or fractions summing to 1, got {lengths}")
    if sum(lengths) != n:
        raise ValueError(
            f"random_split: sum of input lengths {sum(lengths)} does not equal the length of the input dataset {n}"
        )
    gen = default_generator() if generator is None else generator
    order = gen.permutation(n)
    offsets = np.cumsum([0] + lengths)
    return [Subset(dataset, order[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
