"""ArrayShards: an image dataset kept on disk as memory-mapped .npy shards (uint8 NHWC images, int64 labels).

A directory holds ``images-NNNNN.npy`` / ``labels-NNNNN.npy`` pairs and ``manifest.json``, which lists each
file with its shape, dtype, size in bytes and SHA-256. Opening checks every file's presence, size, header,
shape and dtype against the manifest (``verify=True`` also hashes every byte); the data itself is only ever
mapped (np.load(mmap_mode="r")), so a data set larger than memory opens in milliseconds and a batch touches
only its own rows. A batch is gathered straight from the maps into its output buffer: uint8 NHWC, or with a
fused transform chain (mpnn.data.transforms.Compose) float32 NCHW in the same single pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from mpnn.core.tensor import Tensor
from mpnn.data import transform_kernels as kernels
from mpnn.data.dataset import Dataset, _check_batch_index

MANIFEST = "manifest.json"
FORMAT = "mpnn.ArrayShards"
VERSION = 1
_IMAGE_DTYPE, _LABEL_DTYPE = np.dtype(np.uint8), np.dtype(np.int64)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.npy")
_TOP_KEYS = {"format", "version", "rows", "image_shape", "image_dtype", "label_dtype", "shards"}
_SHARD_KEYS = {"rows", "images", "labels"}
_FILE_KEYS = {"file", "shape", "dtype", "bytes", "sha256"}


class ManifestError(ValueError):
    """An ArrayShards directory whose manifest or files do not match; the message names the file and key."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_constant(name):
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key {duplicates[0]!r}")
    return dict(pairs)


def _read_manifest(path: Path) -> dict:
    """The manifest as a dict; any JSON error (syntax, NaN/Infinity, duplicate keys, absurd nesting) is one
    ManifestError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"ArrayShards: {path}: no manifest (write one with ArrayShards.write)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"ArrayShards: {path}: cannot read the manifest ({exc})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ManifestError(f"ArrayShards: {path}: malformed JSON (nested too deeply)") from None
    except ValueError as exc:
        raise ManifestError(f"ArrayShards: {path}: malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"ArrayShards: {path}: the manifest must be a JSON object, got {type(data).__name__}")
    return data


class _Checker:
    """Type checks on the parsed manifest, each failure one ManifestError naming the manifest and key path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str):
        raise ManifestError(f"ArrayShards: {self.path}: {key}: {message}")

    def keys(self, obj, expected: set, key: str) -> None:
        if not isinstance(obj, dict):
            self.fail(key, f"must be an object, got {type(obj).__name__} {obj!r:.60}")
        missing, unknown = sorted(expected - obj.keys()), sorted(obj.keys() - expected)
        if missing:
            self.fail(f"{key}.{missing[0]}" if key else missing[0], "missing")
        if unknown:
            self.fail(f"{key}.{unknown[0]}" if key else unknown[0], "unknown key")

    def count(self, value, key: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"must be an int >= {minimum}, got {value!r:.60}")
        return value

    def shape(self, value, key: str) -> tuple:
        if not isinstance(value, list):
            self.fail(key, f"must be a list of ints, got {value!r:.60}")
        return tuple(self.count(v, f"{key}[{i}]") for i, v in enumerate(value))

    def text(self, value, key: str) -> str:
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {value!r:.60}")
        return value


def _check_manifest(data: dict, path: Path) -> dict:
    """The manifest's shard table, every key checked for presence and type and the sizes for consistency."""
    check = _Checker(path)
    check.keys(data, _TOP_KEYS, "")
    if data["format"] != FORMAT:
        check.fail("format", f"expected {FORMAT!r}, got {data['format']!r:.60}")
    if data["version"] != VERSION or isinstance(data["version"], bool):
        check.fail("version", f"expected {VERSION}, got {data['version']!r:.60}")
    total = check.count(data["rows"], "rows")
    image_shape = check.shape(data["image_shape"], "image_shape")
    if len(image_shape) != 3 or min(image_shape) < 1:
        check.fail("image_shape", f"must be [height, width, channels] of positive ints, got {list(image_shape)}")
    for key, want in (("image_dtype", _IMAGE_DTYPE), ("label_dtype", _LABEL_DTYPE)):
        if check.text(data[key], key) != want.name:
            check.fail(key, f"must be {want.name!r}, got {data[key]!r}")
    if not isinstance(data["shards"], list):
        check.fail("shards", f"must be a list, got {type(data['shards']).__name__}")
    seen, rows_sum = set(), 0
    for i, shard in enumerate(data["shards"]):
        where = f"shards[{i}]"
        check.keys(shard, _SHARD_KEYS, where)
        rows = check.count(shard["rows"], f"{where}.rows")
        rows_sum += rows
        for part, dtype, shape in (
            ("images", _IMAGE_DTYPE, (rows, *image_shape)),
            ("labels", _LABEL_DTYPE, (rows,)),
        ):
            entry, key = shard[part], f"{where}.{part}"
            check.keys(entry, _FILE_KEYS, key)
            name = check.text(entry["file"], f"{key}.file")
            if not _FILE_NAME.fullmatch(name) or name == MANIFEST:
                check.fail(f"{key}.file", f"must be a plain .npy file name in the directory, got {name!r}")
            if name in seen:
                check.fail(f"{key}.file", f"{name!r} is listed twice")
            seen.add(name)
            if check.shape(entry["shape"], f"{key}.shape") != shape:
                check.fail(f"{key}.shape", f"expected {list(shape)} (rows {rows}), got {entry['shape']}")
            if check.text(entry["dtype"], f"{key}.dtype") != dtype.name:
                check.fail(f"{key}.dtype", f"must be {dtype.name!r}, got {entry['dtype']!r}")
            check.count(entry["bytes"], f"{key}.bytes")
            if not _SHA256.fullmatch(check.text(entry["sha256"], f"{key}.sha256")):
                check.fail(f"{key}.sha256", f"must be 64 lowercase hex digits, got {entry['sha256']!r:.80}")
    if rows_sum != total:
        check.fail("rows", f"is {total} but the shards hold {rows_sum} rows")
    return data


def _open_file(root: Path, entry: dict, key: str, dtype: np.dtype, verify: bool, manifest: Path) -> np.ndarray:
    """One shard file, mapped read-only, after checking it against its manifest entry."""
    path = root / entry["file"]
    where = f"ArrayShards: {path} ({manifest.name} {key})"
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ManifestError(f"{where}: missing") from None
    if size != entry["bytes"]:
        raise ManifestError(f"{where}: {size} bytes on disk, the manifest says {entry['bytes']}")
    if verify and _sha256(path) != entry["sha256"]:
        raise ManifestError(f"{where}: SHA-256 checksum mismatch (the file changed since it was written)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ManifestError(f"{where}: not a readable .npy file ({exc})") from None
    if array.dtype != dtype:
        raise ManifestError(f"{where}: dtype is {array.dtype}, the manifest says {dtype.name}")
    if array.shape != tuple(entry["shape"]):
        raise ManifestError(f"{where}: shape is {list(array.shape)}, the manifest says {entry['shape']}")
    if not array.flags.c_contiguous:
        raise ManifestError(f"{where}: stored in Fortran order; ArrayShards needs C order")
    return array


def _write_npy_atomic(path: Path, array: np.ndarray) -> dict:
    """Save ``array`` as ``path`` (temp file + fsync + rename) and return its manifest entry."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {
        "file": path.name,
        "shape": list(array.shape),
        "dtype": array.dtype.name,
        "bytes": os.stat(path).st_size,
        "sha256": _sha256(path),
    }


def _group_by_shard(shard_ids: np.ndarray):
    """(shard, positions in the batch) for each shard a batch touches, positions in batch order."""
    if len(shard_ids) == 0:
        return []
    first = shard_ids[0]
    if (shard_ids == first).all():  # one shard: no sort
        return [(int(first), np.arange(len(shard_ids), dtype=np.int64))]
    order = np.argsort(shard_ids, kind="stable")
    sorted_ids = shard_ids[order]
    cuts = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
    return [(int(sorted_ids[part[0]]), order[part]) for part in np.split(np.arange(len(order)), cuts)]


class ArrayShards(Dataset):
    """A dataset of (image, label) rows from memory-mapped shards written by ``ArrayShards.write``.

    ``ds[i]`` is (uint8 HWC image, int64 label) as Tensors, or the transform's output for the image;
    ``ds[indices]`` and ``ds.get_batch(indices, key=)`` gather a batch with one copy from the maps (with a
    fusible ``transform``, the copy is the transform's float32 NCHW output). ``verify=True`` checks every
    file's SHA-256 on open; sizes, headers, shapes and dtypes are always checked.
    """

    batched_getitem = True

    def __init__(self, root, transform=None, verify: bool = False):
        self.root = Path(root)
        manifest = self.root / MANIFEST
        self.manifest = _check_manifest(_read_manifest(manifest), manifest)
        self.image_shape = tuple(self.manifest["image_shape"])
        self.shard_images, self.shard_labels = [], []
        for i, shard in enumerate(self.manifest["shards"]):
            for part, dtype, into in (
                ("images", _IMAGE_DTYPE, self.shard_images),
                ("labels", _LABEL_DTYPE, self.shard_labels),
            ):
                into.append(_open_file(self.root, shard[part], f"shards[{i}].{part}", dtype, verify, manifest))
        rows = [len(a) for a in self.shard_labels]
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self._length = int(self._starts[-1])
        self.transform = transform

    @classmethod
    def write(cls, root, images, labels, shard_size: int = 10000, *, overwrite: bool = False) -> ArrayShards:
        """Write uint8 NHWC ``images`` and integer ``labels`` as shards of ``shard_size`` rows plus the
        manifest (written last, atomically), and open them. Refuses a directory that already has a manifest
        unless ``overwrite``."""
        images = images.data if isinstance(images, Tensor) else images
        labels = labels.data if isinstance(labels, Tensor) else labels
        if not isinstance(images, np.ndarray) or images.dtype != _IMAGE_DTYPE or images.ndim != 4:
            what = f"dtype {images.dtype}, shape {images.shape}" if isinstance(images, np.ndarray) else type(images)
            raise TypeError(f"ArrayShards.write: images must be a uint8 NHWC array, got {what}")
        if min(images.shape[1:]) < 1:
            raise ValueError(f"ArrayShards.write: images of shape {images.shape} have an empty dimension")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise TypeError(
                f"ArrayShards.write: labels must be a 1-D integer array, got dtype {labels.dtype}, shape {labels.shape}"
            )
        if len(labels) != len(images):
            raise ValueError(f"ArrayShards.write: {len(images)} images but {len(labels)} labels")
        if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
            raise ValueError("ArrayShards.write: a label does not fit int64")
        labels = labels.astype(_LABEL_DTYPE, copy=False)
        if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
            raise ValueError(f"ArrayShards.write: shard_size must be a positive int, got {shard_size!r}")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        manifest_path = root / MANIFEST
        old_files = set()
        if manifest_path.exists():
            if not overwrite:
                raise FileExistsError(f"ArrayShards.write: {manifest_path} exists (pass overwrite=True to replace it)")
            with contextlib.suppress(ManifestError):
                old = _check_manifest(_read_manifest(manifest_path), manifest_path)
                old_files = {s[p]["file"] for s in old["shards"] for p in ("images", "labels")}
        shards = []
        count = max(1, math.ceil(len(images) / shard_size))
        for i in range(count):
            part = slice(i * shard_size, (i + 1) * shard_size)
            shards.append(
                {
                    "rows": len(labels[part]),
                    "images": _write_npy_atomic(root / f"images-{i:05d}.npy", images[part]),
                    "labels": _write_npy_atomic(root / f"labels-{i:05d}.npy", labels[part]),
                }
            )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "rows": len(labels),
            "image_shape": list(images.shape[1:]),
            "image_dtype": _IMAGE_DTYPE.name,
            "label_dtype": _LABEL_DTYPE.name,
            "shards": shards,
        }
        fd, tmp = tempfile.mkstemp(dir=root, prefix=MANIFEST + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, manifest_path)
        for name in old_files - {s[p]["file"] for s in shards for p in ("images", "labels")}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root / name)
        return cls(root)

    def __len__(self):
        return self._length

    def locate(self, indices: np.ndarray):
        """(shard number, row within the shard) for each dataset index (already in range, non-negative)."""
        shard_ids = np.searchsorted(self._starts, indices, side="right") - 1
        return shard_ids, indices - self._starts[shard_ids]

    def _normalized(self, indices) -> np.ndarray:
        idx = _check_batch_index(indices, len(self), "ArrayShards").reshape(-1).astype(np.int64, copy=False)
        bad = (idx >= len(self)) | (idx < -len(self))
        if bad.any():
            raise IndexError(f"ArrayShards: index {idx[bad][0]} out of range for a dataset of {len(self)} samples")
        return np.where(idx < 0, idx + len(self), idx)

    def get_batch(self, indices, key=None, out=None):
        """(images, labels) Tensors for ``indices``, gathered straight from the maps into one buffer.

        Images are uint8 NHWC, or the transform's output: a fused Compose writes float32 NCHW in the same
        pass (into ``out`` when given), any other transform runs on the gathered uint8 batch. ``key`` seeds
        the transform's random draws for this batch (the DataLoader passes rank, epochs and batch number).
        """
        from mpnn.data.transforms import Compose

        idx = self._normalized(indices)
        n = len(idx)
        labels = np.empty(n, _LABEL_DTYPE)
        fused = self.transform.fused if isinstance(self.transform, Compose) else None
        shard_ids, rows = self.locate(idx)
        groups = _group_by_shard(shard_ids)
        kernels.warmup()
        if fused is not None:
            height, width, channels = self.image_shape
            maps = fused.draw(self.transform.generator_for(key), n, height, width)
            shape = (n, channels, maps.out_h, maps.out_w)
            if out is None:
                out = fused.empty_output(maps, n, channels)
            elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
                raise ValueError(f"ArrayShards.get_batch: out must be a C-contiguous float32 array of shape {shape}")
            for shard, positions in groups:
                fused.run(self.shard_images[shard], rows[positions], positions, maps, out)
                kernels.gather_labels(self.shard_labels[shard], rows[positions], positions, labels)
            return Tensor._from_array(out), Tensor._from_array(labels)
        images = np.empty((n, *self.image_shape), _IMAGE_DTYPE) if out is None else out
        if images.shape != (n, *self.image_shape) or images.dtype != _IMAGE_DTYPE:
            raise ValueError(f"ArrayShards.get_batch: out must be a uint8 array of shape {(n, *self.image_shape)}")
        for shard, positions in groups:
            kernels.gather_rows_u8(self.shard_images[shard], rows[positions], positions, images)
            kernels.gather_labels(self.shard_labels[shard], rows[positions], positions, labels)
        if self.transform is not None:
            images = self.transform(images, key=key) if isinstance(self.transform, Compose) else self.transform(images)
        images = images if isinstance(images, Tensor) else Tensor._from_array(images)
        return images, Tensor._from_array(labels)

    def __getitem__(self, index):
        """(image, label) for an int; the stacked batch for an index array, list or slice."""
        if isinstance(index, (np.ndarray, list, slice)):
            return self.get_batch(index)
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"ArrayShards: index must be an int or an integer array, got {type(index).__name__}"
            ) from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"ArrayShards: index {i} out of range for a dataset of {len(self)} samples")
        images, labels = self.get_batch(np.array([i], np.int64))
        return Tensor._from_array(images.data[0]), Tensor._from_array(labels.data[0])

    def __repr__(self):
        shards = len(self.shard_images)
        return f"ArrayShards({str(self.root)!r}, {len(self)} rows of {self.image_shape}, {shards} shards)"
