"""The typed object codec of allgather_object / broadcast_object: what a peer sends is data, never code.

No pickle on the wire: an object is encoded as a tagged tree of the values mpnn's own callers send (checkpoint
verdicts and digests, audit records, state dicts) and decoded by a parser that builds only those values, so a
peer's bytes can at worst be refused. Values, each a one-byte tag and its body (little-endian):

    N None   T True   F False   i int (int64)   I int (any size, ASCII decimal)   f float (float64)
    s str (u64 length, UTF-8)   b bytes (u64 length)   l list / t tuple (u64 count, items)
    d dict (u64 count, key and value pairs; keys any hashable value here)
    a NumPy array (dtype, u8 ndim, int64 shape, raw C-order bytes)   g NumPy scalar (dtype, raw bytes)
    x an array type a layer above registered (u8 name length, name, then its array as "a"): mpnn.runtime
      registers mpnn.Tensor, so state dicts arrive as Tensors without comm knowing the engine

Dtypes are written as NumPy's str ("<f4", "|b1") and read back only if they are plain booleans, integers,
floats or complex numbers. An encoding starts with MAGIC, nests at most MAX_DEPTH deep and is at most
MAX_OBJECT_BYTES long; a count can never exceed the bytes that are left, so decoding costs at most what was sent.
"""

import re
import struct

import numpy as np

MAGIC = b"MPO1"
MAX_OBJECT_BYTES = 1 << 30
MAX_DEPTH = 64
SUPPORTED = (
    "None, bool, int, float, str, bytes, list, tuple, dict, NumPy arrays and scalars of bool/number dtypes, "
    "and mpnn Tensors"
)

_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_DTYPE = re.compile(r"[<>|=][biufc][0-9]{1,2}")
_INT64 = (-(1 << 63), (1 << 63) - 1)


_ARRAY_TYPES: dict = {}  # class -> (name, to_array): how registered array types are sent
_REBUILD: dict = {}  # name -> from_array: how they are rebuilt


def register_array_type(cls, name, to_array, from_array):
    """Carry instances of `cls` as their array (`to_array(obj)` -> ndarray), rebuilt by `from_array(ndarray)`
    on the receiving side under `name` (both sides must register it; an unknown name is refused)."""
    _ARRAY_TYPES[cls] = (name.encode(), to_array)
    _REBUILD[name.encode()] = from_array


class ObjectError(ValueError):
    """Bytes that are not an mpnn object encoding (the message says where and why)."""


def encode(obj, what="object"):
    """The bytes of `obj`; TypeError (naming `what`) for a value the codec does not carry."""
    out = [MAGIC]
    _encode(obj, out, 0, what)
    data = b"".join(out)
    if len(data) > MAX_OBJECT_BYTES:
        raise ValueError(f"{what}: the object encodes to {len(data)} bytes, over the limit of {MAX_OBJECT_BYTES}")
    return data


def decode(data):
    """The object encoded in `data` (bytes-like); ObjectError if it is not a well-formed encoding."""
    view = memoryview(data).cast("B")
    if len(view) > MAX_OBJECT_BYTES:
        raise ObjectError(f"{len(view)} bytes, over the limit of {MAX_OBJECT_BYTES}")
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise ObjectError("it does not start with the object codec's magic (a pickle, or another program's bytes?)")
    reader = _Reader(view, len(MAGIC))
    obj = reader.value(0)
    if reader.pos != len(view):
        raise ObjectError(f"{len(view) - reader.pos} bytes follow the object")
    return obj


def _dtype_text(dtype, what):
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"{what}: cannot send NumPy dtype {dtype} (only {SUPPORTED})")
    text = dtype.str.encode()
    return bytes([len(text)]) + text


def _encode(obj, out, depth, what):
    if depth > MAX_DEPTH:
        raise ValueError(f"{what}: the object nests deeper than {MAX_DEPTH} levels")
    if obj is None:
        out.append(b"N")
    elif obj is True or obj is False:
        out.append(b"T" if obj else b"F")
    elif isinstance(obj, int) and not isinstance(obj, (bool, np.generic)):
        if _INT64[0] <= obj <= _INT64[1]:
            out += [b"i", _I64.pack(obj)]
        else:
            text = str(int(obj)).encode()
            out += [b"I", _U64.pack(len(text)), text]
    elif isinstance(obj, float) and not isinstance(obj, np.generic):
        out += [b"f", _F64.pack(obj)]
    elif isinstance(obj, str):
        text = obj.encode("utf-8", "surrogatepass")
        out += [b"s", _U64.pack(len(text)), text]
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out += [b"b", _U64.pack(len(raw)), raw]
    elif isinstance(obj, (list, tuple)):
        out += [b"l" if isinstance(obj, list) else b"t", _U64.pack(len(obj))]
        for item in obj:
            _encode(item, out, depth + 1, what)
    elif isinstance(obj, dict):
        out += [b"d", _U64.pack(len(obj))]
        for key, value in obj.items():
            _encode(key, out, depth + 1, what)
            _encode(value, out, depth + 1, what)
    elif isinstance(obj, np.ndarray):
        dtype = _dtype_text(obj.dtype, what)
        array = np.ascontiguousarray(obj)
        out += [b"a", dtype, bytes([obj.ndim]), b"".join(_I64.pack(n) for n in obj.shape), array.tobytes()]
    elif isinstance(obj, np.generic):
        out += [b"g", _dtype_text(obj.dtype, what), obj.tobytes()]
    else:
        for cls, (name, to_array) in _ARRAY_TYPES.items():
            if isinstance(obj, cls):
                array = to_array(obj)
                if not isinstance(array, np.ndarray):
                    raise TypeError(f"{what}: {name.decode()} did not turn into a NumPy array")
                out += [b"x", bytes([len(name)]), name]
                _encode(array, out, depth + 1, what)
                return
        raise TypeError(f"{what}: cannot send a {type(obj).__module__}.{type(obj).__qualname__} (only {SUPPORTED})")


class _Reader:
    def __init__(self, view, pos):
        self.view, self.pos = view, pos

    def take(self, n):
        if n < 0 or self.pos + n > len(self.view):
            raise ObjectError(f"it ends early: {n} bytes wanted at offset {self.pos} of {len(self.view)}")
        piece = self.view[self.pos : self.pos + n]
        self.pos += n
        return piece

    def count(self):
        n = _U64.unpack(self.take(8))[0]
        if n > len(self.view) - self.pos:  # every item takes at least one byte
            raise ObjectError(f"a count of {n} at offset {self.pos - 8} exceeds the bytes left")
        return n

    def dtype(self):
        text = bytes(self.take(self.take(1)[0]))
        if not _DTYPE.fullmatch(text.decode("ascii", "replace")):
            raise ObjectError(f"dtype {text!r} at offset {self.pos} is not a bool/number dtype")
        try:
            return np.dtype(text.decode())
        except TypeError:
            raise ObjectError(f"dtype {text!r} at offset {self.pos} is not a NumPy dtype") from None

    def value(self, depth):
        if depth > MAX_DEPTH:
            raise ObjectError(f"it nests deeper than {MAX_DEPTH} levels")
        tag = bytes(self.take(1))
        if tag == b"N":
            return None
        if tag == b"T":
            return True
        if tag == b"F":
            return False
        if tag == b"i":
            return _I64.unpack(self.take(8))[0]
        if tag == b"I":
            text = bytes(self.take(self.count()))
            if not re.fullmatch(rb"-?[0-9]{1,4000}", text):
                raise ObjectError(f"a malformed integer at offset {self.pos - len(text)}")
            return int(text)
        if tag == b"f":
            return _F64.unpack(self.take(8))[0]
        if tag == b"s":
            try:
                return str(self.take(self.count()), "utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise ObjectError(f"a string that is not UTF-8 before offset {self.pos}") from None
        if tag == b"b":
            return bytes(self.take(self.count()))
        if tag in (b"l", b"t"):
            items = [self.value(depth + 1) for _ in range(self.count())]
            return items if tag == b"l" else tuple(items)
        if tag == b"d":
            result = {}
            for _ in range(self.count()):
                key = self.value(depth + 1)
                try:
                    result[key] = self.value(depth + 1)
                except TypeError:
                    raise ObjectError(f"an unhashable dict key before offset {self.pos}") from None
            return result
        if tag == b"a":
            dtype = self.dtype()
            ndim = self.take(1)[0]
            shape = tuple(_I64.unpack(self.take(8))[0] for _ in range(ndim))
            if any(n < 0 for n in shape):
                raise ObjectError(f"a negative array dimension in {shape} before offset {self.pos}")
            size = 1
            for n in shape:
                size *= n
            raw = self.take(size * dtype.itemsize)
            return np.frombuffer(raw, dtype).reshape(shape).copy()
        if tag == b"g":
            dtype = self.dtype()
            return np.frombuffer(self.take(dtype.itemsize), dtype)[0].copy()
        if tag == b"x":
            name = bytes(self.take(self.take(1)[0]))
            rebuild = _REBUILD.get(name)
            if rebuild is None:
                raise ObjectError(f"a {name.decode('ascii', 'replace')!r}, which this process does not rebuild")
            array = self.value(depth + 1)
            if not isinstance(array, np.ndarray):
                raise ObjectError(f"a {name.decode()} that is not an array before offset {self.pos}")
            return rebuild(array)
        raise ObjectError(f"unknown tag {tag!r} at offset {self.pos - 1}")
