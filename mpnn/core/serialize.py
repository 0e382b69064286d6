"""Checkpoint files: save/load nested dicts, lists and tuples of arrays, Tensors, numbers and strings.

No pickle: the structure is JSON, the arrays raw bytes. Layout (little-endian):

    0   magic b"MPNNCKPT"        8   format version (u32)     12  flags (u32, 0)
    16  payload length (u64)     24  SHA-256 (32 bytes)       56  reserved (8 zero bytes)
    64  payload: JSON length (u64), JSON {"arrays": [...], "root": ...}, then each array's bytes
        in C order at a 64-byte-aligned offset named in the JSON table.

The SHA-256 covers the header (with the digest field zeroed) and the payload, so a one-byte edit
anywhere is caught. save writes a temp file in the same directory, fsyncs it, renames it over the
target and fsyncs the directory: a crash leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import OrderedDict

import numpy as np

from mpnn import hooks
from mpnn.core.tensor import Tensor

MAGIC = b"MPNNCKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s8x")  # magic, version, flags, payload length, digest, reserved
_DIGEST_AT = 24
_ALIGN = 64
_ARRAY_KINDS = "biufc"


class CheckpointError(ValueError):
    """A file that is not a whole, unedited mpnn checkpoint; the message names the file and the fault."""

    def __init__(self, path, reason: str):
        super().__init__(f"load: {path}: {reason}")
        self.path, self.reason = path, reason


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# ----- encoding: Python structure -> JSON-able tree + list of arrays -------------------------------
def _encode(obj, arrays: list, where: str, active: set):
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return int(obj) if isinstance(obj, int) else float(obj)
    if isinstance(obj, (Tensor, np.ndarray, np.generic)):
        arr = np.asarray(obj.data if isinstance(obj, Tensor) else obj)
        if arr.dtype.kind not in _ARRAY_KINDS or arr.dtype.fields is not None:
            raise TypeError(
                f"save: cannot store an array of dtype {arr.dtype} at {where} "
                f"(only bool, integer, float and complex arrays)"
            )
        arrays.append(arr if arr.flags.c_contiguous else np.array(arr, order="C"))
        return {"scalar" if isinstance(obj, np.generic) else "array": len(arrays) - 1}
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in active:
            raise ValueError(f"save: the object contains itself at {where}")
        active.add(id(obj))
        if isinstance(obj, dict):
            tag = "odict" if isinstance(obj, OrderedDict) else "dict"
            out = {
                tag: [
                    [_encode(k, arrays, f"{where} (a key)", active), _encode(v, arrays, f"{where}[{k!r}]", active)]
                    for k, v in obj.items()
                ]
            }
        else:
            items = [_encode(v, arrays, f"{where}[{i}]", active) for i, v in enumerate(obj)]
            out = {"tuple": items} if isinstance(obj, tuple) else items
        active.discard(id(obj))
        return out
    raise TypeError(
        f"save: cannot store a {type(obj).__name__} at {where}; checkpoints hold dicts, lists, "
        f"tuples, arrays, Tensors, numbers, strings and None"
    )


register_save_hook = hooks.register_save_hook  # fn(path, sha256) after every save: the audit trail records checkpoints


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(obj, path, *, notify: bool = True) -> None:
    """Write ``obj`` to ``path`` atomically (Tensors are stored as NumPy arrays).

    notify=False skips the save hooks: mpnn.Checkpointer reports a whole checkpoint once, not file by file."""
    path = os.fspath(path)
    arrays: list = []
    root = _encode(obj, arrays, "obj", set())
    table, end = [], 0
    for arr in arrays:
        start = _aligned(end)
        table.append({"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": start, "nbytes": arr.nbytes})
        end = start + arr.nbytes
    meta = json.dumps({"arrays": table, "root": root}, separators=(",", ":")).encode("utf-8")
    data_start = _aligned(8 + len(meta))
    payload_len = data_start + end

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OSError(exc.errno, f"save: cannot write a checkpoint next to {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            digest = hashlib.sha256(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, payload_len, bytes(32)))
            f.write(bytes(_HEADER.size))  # placeholder until the digest is known
            out = _HashingWriter(f, digest)
            out.write(struct.pack("<Q", len(meta)) + meta)
            for entry, arr in zip(table, arrays):
                out.pad_to(data_start + entry["offset"])
                out.write(arr.reshape(-1).view(np.uint8))
            out.pad_to(payload_len)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0, payload_len, digest.digest()))
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
    if notify and hooks.save_hooks:
        digest_hex = _file_sha256(path)
        for fn in tuple(hooks.save_hooks):
            fn(path, digest_hex)


class _HashingWriter:
    """Writes payload pieces to the file and the digest at once, tracking the payload offset."""

    def __init__(self, f, digest):
        self.f, self.digest, self.pos = f, digest, 0

    def write(self, raw) -> None:
        self.digest.update(raw)
        self.f.write(raw)
        self.pos += len(raw)

    def pad_to(self, offset: int) -> None:
        self.write(bytes(offset - self.pos))


def fsync_directory(directory) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- decoding ----------------------------------------------------------------------------------
def load(path, map_location=None):
    """Read a checkpoint written by save; arrays come back as NumPy arrays.

    ``map_location`` is accepted for PyTorch habits and must be None or 'cpu'. Raises CheckpointError
    naming the file for a bad magic, an unknown version, truncation, extra bytes or a checksum mismatch.
    """
    if map_location not in (None, "cpu"):
        raise ValueError(f"load: mpnn runs on the CPU only, got map_location={map_location!r}")
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = f.read(_HEADER.size)
        if not header.startswith(MAGIC):
            if header and MAGIC.startswith(header):
                raise CheckpointError(path, f"truncated: the file is only {size} bytes")
            raise CheckpointError(path, f"not an mpnn checkpoint (bad magic {header[:8]!r}, expected {MAGIC!r})")
        if len(header) < _HEADER.size:
            raise CheckpointError(
                path, f"truncated: the file is {size} bytes, shorter than the {_HEADER.size}-byte header"
            )
        _, version, _, payload_len, recorded = _HEADER.unpack(header)
        if version != FORMAT_VERSION:
            raise CheckpointError(
                path,
                f"unsupported format version {version} (this mpnn reads version "
                f"{FORMAT_VERSION}), or a corrupted header",
            )
        have = size - _HEADER.size
        if have < payload_len:
            raise CheckpointError(
                path, f"truncated: the header promises {payload_len} payload bytes, the file holds {have}"
            )
        if have > payload_len:
            raise CheckpointError(path, f"{have - payload_len} unexpected bytes after the payload (corrupted)")
        payload = bytearray(payload_len)
        f.readinto(payload)
    digest = hashlib.sha256(header[:_DIGEST_AT] + bytes(32) + header[_DIGEST_AT + 32 :])
    digest.update(payload)
    if digest.digest() != recorded:
        raise CheckpointError(
            path,
            f"checksum mismatch: the content's SHA-256 is {digest.hexdigest()[:16]}..., "
            f"the header records {recorded.hex()[:16]}... (corrupted or edited)",
        )
    try:
        return _decode_payload(payload)
    except RecursionError:
        raise CheckpointError(path, "malformed structure (its metadata is nested too deeply)") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(path, f"malformed structure ({str(exc)[:200]})") from None


def _decode_payload(payload: bytearray):
    (meta_len,) = struct.unpack_from("<Q", payload, 0)
    meta = json.loads(payload[8 : 8 + meta_len].decode("utf-8"))
    data_start = _aligned(8 + meta_len)
    arrays = []
    for entry in meta["arrays"]:
        dtype = np.dtype(entry["dtype"])
        shape = tuple(int(n) for n in entry["shape"])
        if any(n < 0 for n in shape):
            raise ValueError(f"negative shape {list(shape)}")
        if int(entry["offset"]) < 0:
            raise ValueError(f"negative offset {entry['offset']}")
        count = int(np.prod(shape, dtype=np.int64))
        start = data_start + int(entry["offset"])
        if (
            dtype.kind not in _ARRAY_KINDS
            or dtype.fields is not None
            or count * dtype.itemsize != entry["nbytes"]
            or start + entry["nbytes"] > len(payload)
        ):
            raise ValueError(f"bad array entry {entry}")
        arrays.append(np.frombuffer(payload, dtype=dtype, count=count, offset=start).reshape(shape))
    return _decode(meta["root"], arrays)


def _decode(node, arrays):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unknown node {str(node)[:60]}")
    ((tag, value),) = node.items()
    if tag == "array":
        return arrays[value]
    if tag == "scalar":
        return arrays[value][()]
    if tag == "tuple":
        return tuple(_decode(v, arrays) for v in value)
    if tag in ("dict", "odict"):
        pairs = ((_decode(k, arrays), _decode(v, arrays)) for k, v in value)
        return OrderedDict(pairs) if tag == "odict" else dict(pairs)
    raise ValueError(f"unknown tag {tag!r}")
