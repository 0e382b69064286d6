"""Per-sample data transforms (as torchvision.transforms): Compose, Lambda, Normalize.

They act on NumPy arrays or mpnn Tensors and return the same kind; they are data preparation, so no
gradient flows through them. (torchvision's ToTensor converts HWC uint8 images; mpnn's samples are
already arrays, which the DataLoader turns into Tensors, so there is no ToTensor here.)
"""

from __future__ import annotations

import numpy as np

from mpnn.core.tensor import Tensor


class Compose:
    """Apply several transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"Compose: every transform must be callable, got {type(t).__name__}")

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Lambda:
    """A user function as a transform."""

    def __init__(self, lambd):
        if not callable(lambd):
            raise TypeError(f"Lambda: argument should be callable, got {type(lambd).__name__}")
        self.lambd = lambd

    def __call__(self, x):
        return self.lambd(x)

    def __repr__(self):
        return f"Lambda({getattr(self.lambd, '__name__', self.lambd)!r})"


class Normalize:
    """``(x - mean) / std`` per channel, the channel being a sample's first dim (each feature of a 1-D sample).

    ``mean`` and ``std`` are numbers or sequences of one value per channel, as torchvision's Normalize.
    """

    def __init__(self, mean, std, inplace: bool = False):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if self.mean.ndim > 1 or self.std.ndim > 1:
            raise ValueError(
                f"Normalize: mean and std must be numbers or 1-D sequences, got shapes "
                f"{self.mean.shape} and {self.std.shape}"
            )
        if np.any(self.std == 0):
            raise ValueError(f"Normalize: std evaluated to zero, leading to division by zero (std={std!r})")
        self.inplace = inplace

    def __call__(self, x):
        arr = x.data if isinstance(x, Tensor) else np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"Normalize: input should be a floating-point array, got dtype {arr.dtype}")
        mean, std = self.mean.astype(arr.dtype), self.std.astype(arr.dtype)
        if mean.ndim == 1:
            if arr.ndim == 0 or mean.size not in (1, arr.shape[0]):
                raise ValueError(f"Normalize: {mean.size} channel means do not fit a sample of shape {arr.shape}")
            mean = mean.reshape((-1,) + (1,) * (arr.ndim - 1))
        if std.ndim == 1:
            if arr.ndim == 0 or std.size not in (1, arr.shape[0]):
                raise ValueError(f"Normalize: {std.size} channel stds do not fit a sample of shape {arr.shape}")
            std = std.reshape((-1,) + (1,) * (arr.ndim - 1))
        if self.inplace:
            out = arr
            np.subtract(out, mean, out=out)
            np.divide(out, std, out=out)
        else:
            out = (arr - mean) / std
        return Tensor._from_array(out) if isinstance(x, Tensor) else out

    def __repr__(self):
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"
