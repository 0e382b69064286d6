"""Data loading shaped after torch.utils.data: datasets (incl. memory-mapped ArrayShards), samplers (incl.
DistributedSampler), DataLoader (with background prefetch), transforms (fused Numba image pipeline)."""

from mpnn.data import transforms
from mpnn.data.dataset import Dataset, Subset, TensorDataset, random_split
from mpnn.data.datasets import MNIST1D, load_mnist1d
from mpnn.data.loader import DataLoader, default_collate, default_convert
from mpnn.data.sampler import BatchSampler, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from mpnn.data.shards import ArrayShards, ManifestError

__all__ = [
    "ArrayShards",
    "BatchSampler",
    "DataLoader",
    "Dataset",
    "DistributedSampler",
    "MNIST1D",
    "ManifestError",
    "RandomSampler",
    "Sampler",
    "SequentialSampler",
    "Subset",
    "TensorDataset",
    "default_collate",
    "default_convert",
    "load_mnist1d",
    "random_split",
    "transforms",
]
