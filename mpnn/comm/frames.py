"""The wire header: a fixed little-endian struct on every frame describing the collective its sender is running.

Layout (40 bytes + 8 per dimension):
    magic "MPNN" | version u8 | kind u8 | op u8 | reduce u8 | dtype u8 | ndim u8 | pad 2
    | sender u32 | origin u32 | root u32 | seq u64 | run tag 8 bytes | shape: ndim x i64
A receiver compares the header with the collective it is itself running, so ranks that disagree fail at once
with a message naming both sides. ABORT frames carry an error (kind in `op`, suspect rank in `root`) instead;
WAITING frames (empty payload) say that their sender has waited a whole timeout on its own predecessor.
Byte order is explicit on both parts of a frame: the header is a '<' struct, and payload dtypes are the
little-endian ones in DTYPES, so a big-endian array (or host) is refused by name instead of being misread.
"""

import hashlib
import struct
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np

MAGIC = b"MPNN"
VERSION = 1
FIXED = struct.Struct("<4sBBBBBBxxIIIQ8s")
FIXED_FIELDS = 12

KIND_DATA, KIND_ABORT, KIND_WAITING = 1, 2, 3

ALLREDUCE, BROADCAST, ALLGATHER, REDUCE_SCATTER, BARRIER, ALLGATHER_OBJECT, BROADCAST_OBJECT = range(1, 8)
OP_NAMES = {
    ALLREDUCE: "allreduce",
    BROADCAST: "broadcast",
    ALLGATHER: "allgather",
    REDUCE_SCATTER: "reduce_scatter",
    BARRIER: "barrier",
    ALLGATHER_OBJECT: "allgather_object",
    BROADCAST_OBJECT: "broadcast_object",
}
REDUCE_CODES = {"sum": 1, "mean": 2, "max": 3}
REDUCE_NAMES = {code: name for name, code in REDUCE_CODES.items()}
DTYPES = [np.dtype(code) for code in ("<f2", "<f4", "<f8", "<i4", "<i8", "|u1")]  # payloads are little-endian
DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES, start=1)}

NO_RANK = 0xFFFFFFFF  # "no suspect" in ABORT frames
ABORT_TIMEOUT, ABORT_MISMATCH, ABORT_OTHER = 1, 2, 3


def run_tag(run_id):
    """Eight bytes identifying the run on every frame."""
    return hashlib.sha256(run_id.encode()).digest()[:8]


class Call(NamedTuple):
    """What one rank is doing in one collective: op, reduction, dtype, shape, root."""

    op: int
    reduce: int = 0
    dtype: int = 0
    shape: tuple = ()
    root: int = 0

    def key(self):
        """The fields every rank must agree on (allgather and object collectives may differ in size)."""
        if self.op in (ALLGATHER,):
            return (self.op, self.dtype)
        if self.op in (BARRIER, ALLGATHER_OBJECT):
            return (self.op,)
        if self.op == BROADCAST_OBJECT:
            return (self.op, self.root)
        return (self.op, self.reduce, self.dtype, self.shape, self.root)

    def describe(self):
        """Human form, e.g. "allreduce(float32, shape (10,), op='sum')"."""
        name = OP_NAMES.get(self.op, f"op#{self.op}")
        args = []
        if self.op in (ALLREDUCE, BROADCAST, ALLGATHER, REDUCE_SCATTER):
            args.append(DTYPES[self.dtype - 1].name if 0 < self.dtype <= len(DTYPES) else f"dtype#{self.dtype}")
        if self.op in (ALLREDUCE, BROADCAST, REDUCE_SCATTER):
            args.append(f"shape {self.shape}")
        if self.reduce:
            args.append(f"op={REDUCE_NAMES.get(self.reduce, self.reduce)!r}")
        if self.op in (BROADCAST, BROADCAST_OBJECT):
            args.append(f"root={self.root}")
        return f"{name}({', '.join(args)})"


@dataclass(frozen=True)
class Header:
    """A decoded frame header."""

    kind: int
    call: Call
    sender: int
    origin: int
    seq: int
    tag: bytes


@cache
def _layout(ndim):
    """The full header struct for `ndim` dimensions."""
    return struct.Struct(FIXED.format + "q" * ndim)


def pack(kind, call, sender, origin, seq, tag, shape=None):
    """Encode a header; `shape` overrides call.shape (allgather pieces carry their own shape)."""
    shape = call.shape if shape is None else shape
    return _layout(len(shape)).pack(
        MAGIC, VERSION, kind, call.op, call.reduce, call.dtype, len(shape), sender, origin, call.root, seq, tag, *shape
    )


def unpack(data):
    """Decode a header, or return None when `data` is not an mpnn header of this version."""
    if len(data) < FIXED.size:
        return None
    magic, version, kind, op, reduce, dtype, ndim, sender, origin, root, seq, tag = FIXED.unpack_from(data)
    if magic != MAGIC or version != VERSION or len(data) != FIXED.size + 8 * ndim:
        return None
    shape = _layout(ndim).unpack(data)[FIXED_FIELDS:]
    return Header(kind, Call(op, reduce, dtype, shape, root), sender, origin, seq, tag)
