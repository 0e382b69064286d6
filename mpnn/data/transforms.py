"""Data transforms (as torchvision.transforms): Compose, Lambda, Normalize, and the image family RandomCrop,
RandomHorizontalFlip and ToTensor over uint8 NHWC batches (or single HWC images).

They act on NumPy arrays or mpnn Tensors and return the same kind; they are data preparation, so no
gradient flows through them. Random transforms draw their parameters from a generator that Compose (or the
transform alone) owns; a ``key`` (the DataLoader passes rank, sampler epoch, loader pass and batch number)
seeds a fresh generator per batch, so runs repeat exactly and a resumed run sees the same crops.

``Compose([RandomCrop/RandomHorizontalFlip ..., ToTensor(), Normalize(...)])`` is recognised as one
fusible chain and runs as a single Numba pass from uint8 NHWC into a float32 NCHW buffer (the kernels are in
transform_kernels.py); ArrayShards runs that pass straight from its memory-mapped shards.
"""

from __future__ import annotations

import operator

import numpy as np

from mpnn.core.tensor import Tensor
from mpnn.data import transform_kernels as kernels

_KEY_BOUND = 2**63


def _check_key(key, owner: str) -> tuple:
    """A per-batch key as a tuple of non-negative ints (the entropy of a SeedSequence)."""
    try:
        parts = tuple(key)
    except TypeError:
        raise TypeError(f"{owner}: key must be a tuple of non-negative ints, got {key!r}") from None
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, np.integer)) or not 0 <= part < _KEY_BOUND:
            raise ValueError(f"{owner}: key must be a tuple of non-negative ints, got {key!r}")
    return tuple(int(p) for p in parts)


def _check_seed(seed, owner: str) -> int:
    if seed is None:
        from mpnn.core import random as mpnn_random

        return int(mpnn_random.generator().integers(_KEY_BOUND))  # mpnn.manual_seed fixes it
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _KEY_BOUND:
        raise ValueError(f"{owner}: seed must be a non-negative int, got {seed!r}")
    return int(seed)


class _Seeded:
    """Owns a seed: without a key, draws continue one generator; with a key, each key gets its own."""

    def _init_seed(self, seed, owner):
        self.seed = _check_seed(seed, owner)
        self._generator = np.random.default_rng(self.seed)

    def generator_for(self, key=None) -> np.random.Generator:
        if key is None:
            return self._generator
        return np.random.default_rng([self.seed, *_check_key(key, type(self).__name__)])


def _as_image_batch(x, owner: str):
    """(uint8 NHWC array, was_tensor, was_single_image) from a uint8 NHWC batch or HWC image, array or Tensor."""
    is_tensor = isinstance(x, Tensor)
    arr = x.data if is_tensor else np.asarray(x)
    if arr.dtype != np.uint8:
        raise TypeError(f"{owner}: expected uint8 images (NHWC batch or HWC image), got dtype {arr.dtype}")
    if arr.ndim not in (3, 4):
        raise ValueError(f"{owner}: expected an NHWC batch or an HWC image, got shape {arr.shape}")
    single = arr.ndim == 3
    return (arr[None] if single else arr), is_tensor, single


def _restore(out, is_tensor, single):
    out = out[0] if single else out
    return Tensor._from_array(out) if is_tensor else out


class _ImageMaps:
    """Per-sample affine maps from output pixel (y, x) to source pixel (y + row_shift, col_start + col_step*x)
    of one batch, built up transform by transform; out_h/out_w is the image size after the chain so far."""

    __slots__ = ("row_shift", "col_start", "col_step", "height", "width", "out_h", "out_w")

    def __init__(self, n, height, width):
        self.row_shift = np.zeros(n, np.int64)
        self.col_start = np.zeros(n, np.int64)
        self.col_step = np.ones(n, np.int64)
        self.height, self.width = height, width
        self.out_h, self.out_w = height, width


class RandomCrop(_Seeded):
    """Crop a random ``size`` window after zero-padding each side by ``padding`` (torchvision's RandomCrop with
    fill=0, padding_mode="constant"). The offsets are drawn as torchvision's: top in [0, H + 2p - h]."""

    def __init__(self, size, padding=0, seed=None):
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            size = (int(size), int(size))
        try:
            height, width = (operator.index(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"RandomCrop: size must be an int or a pair of ints, got {size!r}") from None
        if height <= 0 or width <= 0:
            raise ValueError(f"RandomCrop: size must be positive, got {size!r}")
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
            raise ValueError(f"RandomCrop: padding must be a non-negative int, got {padding!r}")
        self.size, self.padding = (height, width), int(padding)
        self._init_seed(seed, "RandomCrop")

    def draw(self, rng: np.random.Generator, maps: _ImageMaps) -> None:
        """Draw this batch's offsets and compose the crop onto ``maps`` (crop after what came before)."""
        p, (h, w) = self.padding, self.size
        padded_h, padded_w = maps.out_h + 2 * p, maps.out_w + 2 * p
        if padded_h < h or padded_w < w:
            raise ValueError(
                f"RandomCrop: required crop size {(h, w)} is larger than the padded input image size "
                f"{(padded_h, padded_w)}"
            )
        n = len(maps.row_shift)
        top = rng.integers(0, padded_h - h + 1, size=n)
        left = rng.integers(0, padded_w - w + 1, size=n)
        # Output x reads the previous image at x + left - p; the previous image's x reads the source at
        # col_start + col_step * x (zero outside the source: padding at any step is outside it, as one crop
        # and one flip compose; Compose fuses at most one crop).
        maps.row_shift += top - p
        maps.col_start += maps.col_step * (left - p)
        maps.out_h, maps.out_w = h, w

    def __call__(self, x, key=None):
        return _apply_maps(self, x, key)

    def __repr__(self):
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip(_Seeded):
    """Mirror each image left-right with probability ``p`` (drawn per image, as torchvision's ``rand < p``)."""

    def __init__(self, p=0.5, seed=None):
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self._init_seed(seed, "RandomHorizontalFlip")

    def draw(self, rng: np.random.Generator, maps: _ImageMaps) -> None:
        flip = rng.random(len(maps.row_shift)) < self.p
        # Flipped output x reads the previous image at out_w - 1 - x.
        maps.col_start[flip] += maps.col_step[flip] * (maps.out_w - 1)
        maps.col_step[flip] *= -1

    def __call__(self, x, key=None):
        return _apply_maps(self, x, key)

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


def _apply_maps(transform, x, key):
    """Run one crop/flip transform alone: uint8 NHWC (or HWC) in, uint8 of the same layout out."""
    arr, is_tensor, single = _as_image_batch(x, type(transform).__name__)
    n, height, width, channels = arr.shape
    maps = _ImageMaps(n, height, width)
    transform.draw(transform.generator_for(key), maps)
    out = np.empty((n, maps.out_h, maps.out_w, channels), np.uint8)
    kernels.warmup()
    kernels.affine_u8(arr, maps.row_shift, maps.col_start, maps.col_step, out)
    return _restore(out, is_tensor, single)


class ToTensor:
    """uint8 NHWC (or HWC) images -> float32 NCHW (or CHW) in [0, 1]: ``float32(x) / 255``, as torchvision's."""

    def __call__(self, x):
        arr, is_tensor, single = _as_image_batch(x, "ToTensor")
        n, height, width, channels = arr.shape
        maps = _ImageMaps(n, height, width)
        out = np.empty((n, channels, height, width), np.float32)
        rows = np.arange(n, dtype=np.int64)
        kernels.warmup()
        kernels.fused_to_float_nchw(
            arr,
            rows,
            rows,
            maps.row_shift,
            maps.col_start,
            maps.col_step,
            np.zeros(channels, np.float32),
            np.ones(channels, np.float32),
            out,
        )
        return _restore(out, is_tensor, single)

    def __repr__(self):
        return "ToTensor()"


class Compose(_Seeded):
    """Apply several transforms in order.

    Random transforms inside draw from the Compose's generator (``seed``; None draws one from mpnn's global
    generator, so mpnn.manual_seed fixes it); ``key`` seeds a fresh generator for one call. A chain of
    RandomCrop (at most one) and RandomHorizontalFlip (at most one), then ToTensor, then optionally one
    Normalize, on uint8 NHWC input, runs fused in one Numba pass with exactly the unfused chain's result.
    """

    def __init__(self, transforms, seed=None):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"Compose: every transform must be callable, got {type(t).__name__}")
        self._init_seed(seed, "Compose")
        self.fused = _FusedImageChain.detect(self.transforms)

    def __call__(self, x, key=None):
        rng = self.generator_for(key)
        if self.fused is not None and _is_uint8_images(x):
            arr, is_tensor, single = _as_image_batch(x, "Compose")
            rows = np.arange(arr.shape[0], dtype=np.int64)
            maps = self.fused.draw(rng, arr.shape[0], arr.shape[1], arr.shape[2])
            out = self.fused.empty_output(maps, arr.shape[0], arr.shape[3])
            self.fused.run(arr, rows, rows, maps, out)
            return _restore(out, is_tensor, single)
        for t in self.transforms:
            if isinstance(t, (RandomCrop, RandomHorizontalFlip)):
                arr, is_tensor, single = _as_image_batch(x, type(t).__name__)
                maps = _ImageMaps(*arr.shape[:3])
                t.draw(rng, maps)
                out = np.empty((arr.shape[0], maps.out_h, maps.out_w, arr.shape[3]), np.uint8)
                kernels.warmup()
                kernels.affine_u8(arr, maps.row_shift, maps.col_start, maps.col_step, out)
                x = _restore(out, is_tensor, single)
            else:
                x = t(x)
        return x

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def _is_uint8_images(x) -> bool:
    arr = x.data if isinstance(x, Tensor) else x
    return isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim in (3, 4)


class _FusedImageChain:
    """A Compose's crop/flip/ToTensor/Normalize chain as one kernel: draw the maps, then run per source array."""

    def __init__(self, geometric, normalize):
        self.geometric = geometric  # the RandomCrop / RandomHorizontalFlip instances, in order
        self.normalize = normalize  # the Normalize after ToTensor, or None

    @classmethod
    def detect(cls, transforms):
        """The fused form of ``transforms``, or None when the chain is not exactly the fusible shape."""
        geometric, rest = [], list(transforms)
        while rest and type(rest[0]) in (RandomCrop, RandomHorizontalFlip):
            geometric.append(rest.pop(0))
        crops = sum(type(t) is RandomCrop for t in geometric)
        flips = len(geometric) - crops
        if crops > 1 or flips > 1 or not rest or type(rest.pop(0)) is not ToTensor:
            return None
        normalize = None
        if rest and type(rest[0]) is Normalize and not rest[0].inplace:
            normalize = rest.pop(0)
        return cls(geometric, normalize) if not rest else None

    def draw(self, rng, n, height, width) -> _ImageMaps:
        maps = _ImageMaps(n, height, width)
        for t in self.geometric:
            t.draw(rng, maps)
        return maps

    @staticmethod
    def empty_output(maps, n, channels) -> np.ndarray:
        return np.empty((n, channels, maps.out_h, maps.out_w), np.float32)

    def channel_stats(self, channels):
        """float32 mean and std per channel, as Normalize casts them for a float32 input."""
        if self.normalize is None:
            return np.zeros(channels, np.float32), np.ones(channels, np.float32)
        stats = []
        for values in (self.normalize.mean, self.normalize.std):
            values = values.astype(np.float32)
            if values.ndim == 0 or values.size == 1:
                values = np.full(channels, values.reshape(-1)[0] if values.ndim else values, np.float32)
            elif values.size != channels:
                raise ValueError(f"Normalize: {values.size} channel values do not fit images of {channels} channels")
            stats.append(np.ascontiguousarray(values))
        return stats[0], stats[1]

    def run(self, src, rows, dest, maps, out) -> None:
        """Write out[dest[k]] from src[rows[k]] (uint8 NHWC, e.g. a memory-mapped shard) in one pass."""
        mean, std = self.channel_stats(src.shape[3])
        kernels.warmup()
        kernels.fused_to_float_nchw(src, rows, dest, maps.row_shift, maps.col_start, maps.col_step, mean, std, out)


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
    """``(x - mean) / std`` per channel: dim 1 of a 4-D (NCHW) batch, else a sample's first dim (CHW images,
    each feature of a 1-D sample), as torchvision's channel dim -3 for images.

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
        if not (np.all(np.isfinite(self.mean)) and np.all(np.isfinite(self.std))):
            raise ValueError(f"Normalize: mean and std must be finite, got mean={mean!r}, std={std!r}")
        if np.any(self.std == 0):
            raise ValueError(f"Normalize: std evaluated to zero, leading to division by zero (std={std!r})")
        self.inplace = inplace

    def __call__(self, x):
        arr = x.data if isinstance(x, Tensor) else np.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"Normalize: input should be a floating-point array, got dtype {arr.dtype}")
        channel_dim = 1 if arr.ndim == 4 else 0
        mean, std = self.mean.astype(arr.dtype), self.std.astype(arr.dtype)
        if mean.ndim == 1:
            if arr.ndim == 0 or mean.size not in (1, arr.shape[channel_dim]):
                raise ValueError(f"Normalize: {mean.size} channel means do not fit a sample of shape {arr.shape}")
            mean = mean.reshape((-1,) + (1,) * (arr.ndim - 1 - channel_dim))
        if std.ndim == 1:
            if arr.ndim == 0 or std.size not in (1, arr.shape[channel_dim]):
                raise ValueError(f"Normalize: {std.size} channel stds do not fit a sample of shape {arr.shape}")
            std = std.reshape((-1,) + (1,) * (arr.ndim - 1 - channel_dim))
        if self.inplace:
            out = arr
            np.subtract(out, mean, out=out)
            np.divide(out, std, out=out)
        else:
            out = (arr - mean) / std
        return Tensor._from_array(out) if isinstance(x, Tensor) else out

    def __repr__(self):
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"
