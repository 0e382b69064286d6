"""Checkpoint files: exact round trips, every corruption caught naming the file, atomic replacement."""

import math
import os
from collections import OrderedDict

import numpy as np
import pytest

from mpnn.core import serialize
from mpnn.core.serialize import CheckpointError, load, save
from mpnn.core.tensor import Tensor


def _nested():
    rng = np.random.default_rng(0)
    return {
        "model": OrderedDict(
            [
                ("0.weight", rng.standard_normal((3, 4)).astype(np.float32)),
                ("0.bias", np.zeros(3, np.float64)),
                ("bn.num_batches_tracked", np.array(7, dtype=np.int64)),
            ]
        ),
        "optim": {
            "state": {0: {"step": np.float32(3.0), "exp_avg": rng.standard_normal(5)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False}],
        },
        "misc": [None, True, 2**70, -5, 1.5, float("inf"), "ünïcode ✓", (1, (2, "x")), []],
        "dtypes": [
            np.arange(6, dtype=np.float16).reshape(2, 3),
            np.array([True, False]),
            np.array([1 + 2j], dtype=np.complex64),
            np.arange(4, dtype=">i4"),
            np.zeros((0, 3)),
            np.arange(12.0).reshape(3, 4).T,
            np.array(2.5),
            np.uint8(200),
        ],
        "tensor": Tensor(np.array([[1.0, 2.0]], dtype=np.float32)),
        (1, "tuple-key"): "value",
    }


def _assert_same(a, b):
    if isinstance(a, Tensor):
        a = a.data
    if isinstance(a, (np.ndarray, np.generic)):
        assert type(b) is type(a) or isinstance(b, np.ndarray), (type(a), type(b))
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
    elif isinstance(a, dict):
        assert type(b) is type(a) and list(b) == list(a)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(b) == len(a)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert type(b) is type(a) and b == a


def test_round_trip_keeps_structure_types_dtypes_and_values(tmp_path):
    obj = _nested()
    obj["misc"].append(float("nan"))
    path = tmp_path / "ck.mpnn"
    save(obj, path)
    back = load(str(path))
    _assert_same(obj, back)
    assert isinstance(back["tensor"], np.ndarray)  # Tensors come back as arrays
    assert isinstance(back["dtypes"][-1], np.uint8)  # NumPy scalars stay scalars
    back["model"]["0.weight"][0, 0] = 99.0  # loaded arrays are writable
    assert back["model"]["0.weight"][0, 0] == 99.0


def test_round_trip_of_an_empty_structure_and_a_bare_array(tmp_path):
    for obj in ({}, [], np.arange(3)):
        save(obj, tmp_path / "x")
        _assert_same(obj, load(tmp_path / "x"))


def test_every_single_byte_edit_is_caught_naming_the_file(tmp_path):
    path = tmp_path / "ck.mpnn"
    save({"w": np.arange(5, dtype=np.float32), "lr": 0.1, "name": "net"}, path)
    raw = path.read_bytes()
    edited = tmp_path / "edited.mpnn"
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        edited.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError) as info:
            load(edited)
        assert str(edited) in str(info.value)
        if i < 8:
            assert "bad magic" in str(info.value)
        elif i >= serialize._HEADER.size:
            assert "checksum mismatch" in str(info.value)


def test_truncation_is_caught_at_any_length(tmp_path):
    path = tmp_path / "ck.mpnn"
    save({"w": np.arange(100, dtype=np.float64)}, path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.mpnn"
    for n in [1, 5, 8, 20, 63, 64, 65, len(raw) // 2, len(raw) - 1]:
        cut.write_bytes(raw[:n])
        with pytest.raises(CheckpointError, match="truncated") as info:
            load(cut)
        assert str(cut) in str(info.value)
    cut.write_bytes(raw + b"\0")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        load(cut)


def test_not_a_checkpoint_and_an_unknown_version(tmp_path):
    other = tmp_path / "model.pt"
    other.write_bytes(b"\x80\x04\x95 this is a pickle, not a checkpoint")
    with pytest.raises(CheckpointError, match="bad magic") as info:
        load(other)
    assert str(other) in str(info.value)
    other.write_bytes(b"")
    with pytest.raises(CheckpointError, match="bad magic"):
        load(other)
    path = tmp_path / "ck"
    save([1], path)
    raw = bytearray(path.read_bytes())
    raw[8:12] = (7).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="unsupported format version 7"):
        load(path)


def test_unsupported_values_are_refused_naming_where(tmp_path):
    with pytest.raises(TypeError, match=r"obj\['a'\]\[1\]") as info:
        save({"a": [1, {2, 3}]}, tmp_path / "x")
    assert "set" in str(info.value)
    with pytest.raises(TypeError, match="dtype object"):
        save({"a": np.array([object()])}, tmp_path / "x")
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        save(loop, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failure_mid_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ck.mpnn"
    old = {"version": "old", "w": np.ones(1000)}
    save(old, path)
    before = path.read_bytes()
    calls = []
    real_write = serialize._HashingWriter.write

    def failing_write(self, raw):
        calls.append(len(raw))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(self, raw)

    monkeypatch.setattr(serialize._HashingWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        save({"version": "new", "w": np.zeros(1000), "v": np.zeros(1000)}, path)
    assert len(calls) == 3
    assert path.read_bytes() == before
    _assert_same(old, load(path))
    assert os.listdir(tmp_path) == ["ck.mpnn"]


def test_failure_at_fsync_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.mpnn"
    save([1, 2], path)

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(serialize.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        save([3, 4], path)
    monkeypatch.undo()
    assert load(path) == [1, 2]
    assert os.listdir(tmp_path) == ["ck.mpnn"]


def test_save_replaces_an_existing_file_and_names_a_missing_directory(tmp_path):
    path = tmp_path / "ck.mpnn"
    save({"a": 1}, path)
    save({"a": 2}, path)
    assert load(path) == {"a": 2}
    missing = tmp_path / "no" / "such" / "ck.mpnn"
    with pytest.raises(OSError, match="ck.mpnn"):
        save({"a": 1}, missing)


def test_map_location_other_than_cpu_is_refused(tmp_path):
    save([1], tmp_path / "x")
    assert load(tmp_path / "x", map_location="cpu") == [1]
    with pytest.raises(ValueError, match="cuda"):
        load(tmp_path / "x", map_location="cuda")
