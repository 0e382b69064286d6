"""Model weights in safetensors, the format Hugging Face and PyTorch users exchange weights in.

    mpnn.save_safetensors(model.state_dict(), "model.safetensors", metadata={"epoch": "3"})
    model.load_state_dict(mpnn.load_safetensors("model.safetensors"))

Written and read through the `safetensors` package's NumPy API (pip install 'mpnn[safetensors]'; imported only
here, when called). A file holds a flat {name: array} map, a JSON header and raw little-endian bytes, no pickle.

Tied weights (one Parameter under two names, as nanoGPT's wte.weight and lm_head.weight): every name is saved
with its own copy of the bytes. safetensors.torch refuses tensors that share storage, but a file with one entry per
name loads with plain `safetensors.torch.load_file` + `load_state_dict` (strict) in torch and in mpnn, and
`load_state_dict` copies both entries into the one Parameter, so the weights stay tied. The cost is the tied
matrix's bytes twice on disk.

dtypes: float16, float32, float64, int32, int64 and bool load as they are; any other dtype in a file (bfloat16,
int8, uint8, float8, ...) is refused naming the file and the key, before any tensor is read.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from mpnn.core.serialize import fsync_directory
from mpnn.core.tensor import Tensor
from mpnn.core.tensor_base import from_array

# safetensors dtype codes mpnn holds, and the NumPy dtype each one loads as.
DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I32": "int32", "I64": "int64", "BOOL": "bool"}
_NUMPY_CODES = {np.dtype(name): code for code, name in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


class SafetensorsError(ValueError):
    """A file that is not a safetensors file mpnn can load, or a state dict it cannot save; names path and key."""


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("safetensors files need the safetensors package: pip install 'mpnn[safetensors]'") from None
    return safetensors.numpy


def save_safetensors(state_dict, path, metadata=None) -> None:
    """Write a {name: Tensor or array} map (a state_dict) to `path` as safetensors, atomically (a temporary
    file in the same directory, fsynced and renamed over `path`). metadata: a {str: str} map stored in the header.
    Each name gets its own copy of its bytes (tied weights are written under both names)."""
    path = os.fspath(path)
    if not hasattr(state_dict, "items"):
        raise TypeError(f"save_safetensors: {path}: expected a dict of tensors, got {type(state_dict).__name__}")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError(f"save_safetensors: {path}: metadata must be a dict of str to str, got {metadata!r}")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"save_safetensors: {path}: key {key!r} is not a string")
        array = value.data if isinstance(value, Tensor) else value
        if not isinstance(array, (np.ndarray, np.generic)):
            raise TypeError(f"save_safetensors: {path}: {key!r} is a {type(value).__name__}, not a Tensor or array")
        array = np.asarray(array)
        if array.dtype not in _NUMPY_CODES:
            raise SafetensorsError(
                f"save_safetensors: {path}: {key!r} has dtype {array.dtype}; mpnn writes "
                f"{', '.join(sorted(str(d) for d in _NUMPY_CODES))}"
            )
        arrays[key] = np.asarray(array, order="C")  # safetensors wants C order; it copies the bytes into the file
    raw = _safetensors_numpy().save(arrays, metadata=metadata)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def read_header(path) -> dict:
    """The JSON header of a safetensors file ({key: {dtype, shape, data_offsets}}, "__metadata__"), checked for
    shape; SafetensorsError naming the file when it is not one. FileNotFoundError when it does not exist."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"load_safetensors: {path}: not a safetensors file ({size} bytes, no header)")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(
                    f"load_safetensors: {path}: not a safetensors file (its first 8 bytes give a header of "
                    f"{length} bytes, the file has {size})"
                )
            raw = f.read(length)
    except FileNotFoundError:
        raise FileNotFoundError(f"load_safetensors: {path}: no such file") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise SafetensorsError(f"load_safetensors: {path}: not a safetensors file (its header is not JSON)") from None
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsError(f"load_safetensors: {path}: key {key!r} has a malformed header entry {entry!r}")
    return header


def load_safetensors(path) -> dict:
    """Read a safetensors file into {name: mpnn Tensor} (in the file's order), ready for Module.load_state_dict.

    FileNotFoundError for a missing file; SafetensorsError naming the file for one that is not safetensors, and
    naming the key for a dtype mpnn cannot hold (bfloat16, int8, ...)."""
    path = os.fspath(path)
    header = read_header(path)
    for key, entry in header.items():
        if key != "__metadata__" and entry["dtype"] not in DTYPES:
            raise SafetensorsError(
                f"load_safetensors: {path}: key {key!r} has dtype {entry['dtype']}, which mpnn cannot hold "
                f"(it holds {', '.join(DTYPES)}); convert it first, e.g. to F32"
            )
    try:
        arrays = _safetensors_numpy().load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError for a corrupt body
        raise SafetensorsError(f"load_safetensors: {path}: cannot read it: {type(error).__name__}: {error}") from None
    order = [key for key in header if key != "__metadata__"]
    return {key: from_array(np.asarray(arrays[key], order="C")) for key in order}


def safetensors_metadata(path) -> dict:
    """The {str: str} metadata stored in a safetensors file's header ({} when none)."""
    return dict(read_header(path).get("__metadata__") or {})
