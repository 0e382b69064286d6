"""Malformed files never give a traceback (issue 17, "No record lost"): a deeply nested or NaN-bearing line in
audit.jsonl, a record used as the head, audit.jsonl being a directory, a nested or ill-typed manifest.json, mpnn.load
with deeply nested metadata or negative offsets/shapes, a nested line in a telemetry file: each is one message
naming the file and what is wrong."""

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from mpnn.checkpoint.layout import MANIFEST, InvalidCheckpoint, _body_digest, read_manifest, verify_files
from mpnn.core.serialize import CheckpointError, load, save
from mpnn.launch.resume import newest_checkpoint
from mpnn.plugins.audit.cli import audit
from mpnn.plugins.audit.keys import create_key, load_key
from mpnn.plugins.audit.trail import AUDIT_FILE, HEAD_FILE, verify
from mpnn.telemetry.reader import read_rank_log
from test_audit import full_run

NESTED = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "audit.key"
    create_key(path)
    return path


@pytest.fixture
def run_dir(tmp_path, key):
    path = tmp_path / "runs" / "run-1"
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"run_id": "run-1", "config": {}}))
    full_run(path, key)
    return path


def verdict_of(run_dir, key):
    return verify(run_dir, load_key(key, create=False))


# ----- the audit trail ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, why",
    [
        (NESTED.encode(), "line 3 (after record 1) is not an audit record"),
        (b'{"seq": NaN}', "line 3 (after record 1) is not an audit record"),
    ],
    ids=["nested", "nan"],
)
def test_nested_or_nan_line_in_the_trail_is_named(run_dir, key, line, why):
    rows = (run_dir / AUDIT_FILE).read_bytes().splitlines()
    rows.insert(2, line)
    (run_dir / AUDIT_FILE).write_bytes(b"".join(r + b"\n" for r in rows))
    verdict = verdict_of(run_dir, key)
    assert not verdict.ok and verdict.message.startswith(why), verdict.message


def test_record_with_nan_fields_is_not_a_record(run_dir, key):
    rows = (run_dir / AUDIT_FILE).read_bytes().splitlines()
    record = json.loads(rows[1])
    rows[1] = json.dumps({**record, "data": {"x": float("nan")}}).encode()
    (run_dir / AUDIT_FILE).write_bytes(b"".join(r + b"\n" for r in rows))
    verdict = verdict_of(run_dir, key)
    assert not verdict.ok and "line 2 (after record 0) is not an audit record" in verdict.message, verdict.message


def test_record_used_as_the_head_is_named(run_dir, key):
    rows = (run_dir / AUDIT_FILE).read_bytes().splitlines()
    (run_dir / HEAD_FILE).write_bytes(rows[-1])
    verdict = verdict_of(run_dir, key)
    assert not verdict.ok and f"{HEAD_FILE} is not a signed head" in verdict.message, verdict.message


def test_head_with_ill_typed_fields_is_named(run_dir, key):
    head = json.loads((run_dir / HEAD_FILE).read_text())
    (run_dir / HEAD_FILE).write_text(json.dumps({**head, "seq": "9"}))
    verdict = verdict_of(run_dir, key)
    assert not verdict.ok and f"{HEAD_FILE} is not a signed head" in verdict.message, verdict.message


def test_trail_that_is_a_directory_is_named(tmp_path, key):
    run_dir = tmp_path / "run"
    (run_dir / AUDIT_FILE).mkdir(parents=True)
    verdict = verdict_of(run_dir, key)
    assert not verdict.ok and verdict.message == f"{run_dir / AUDIT_FILE} is not a regular file", verdict.message
    result = CliRunner().invoke(audit, ["verify", str(run_dir), "--key", str(key)])
    assert result.exit_code == 1 and "Traceback" not in result.output and result.exception.__class__ is SystemExit


# ----- checkpoint manifests -------------------------------------------------------------------------------------
def write_manifest_text(checkpoint, body):
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / MANIFEST).write_text(json.dumps({**body, "manifest_sha256": _body_digest(body)}))


GOOD = {"format": "mpnn-checkpoint", "version": 1, "step": 4, "epoch": 0, "world_size": 1, "files": {}}


def test_nested_manifest_is_an_invalid_checkpoint_not_a_recursion_error(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / MANIFEST).write_text(NESTED)
    with pytest.raises(InvalidCheckpoint, match="is not a checkpoint manifest"):
        read_manifest(checkpoint)
    assert newest_checkpoint(tmp_path) == (
        None,
        ["step-00000004: manifest.json is not a checkpoint manifest (corrupted)"],
    )


@pytest.mark.parametrize(
    "files",
    [
        {"model.safetensors": "abc"},
        {"model.safetensors": {"bytes": "12", "sha256": "0" * 64}},
        {"model.safetensors": {"bytes": 12, "sha256": 5}},
        {"model.safetensors": {"bytes": -1, "sha256": "0" * 64}},
        ["model.safetensors"],
    ],
)
def test_ill_typed_manifest_is_an_invalid_checkpoint_not_a_type_error(tmp_path, files):
    checkpoint = tmp_path / "step-00000004"
    write_manifest_text(checkpoint, {**GOOD, "files": files})
    (checkpoint / "model.safetensors").write_bytes(bytes(12))
    with pytest.raises(InvalidCheckpoint, match="manifest.json"):
        manifest, _ = read_manifest(checkpoint)
        verify_files(checkpoint, manifest, ["model.safetensors"])


# ----- mpnn.load ------------------------------------------------------------------------------------------------
def rewrite_meta(path, edit):
    """Rewrite an mpnn.save file's JSON table through `edit`, keeping its header and checksum consistent."""
    from mpnn.core import serialize

    raw = path.read_bytes()
    header, payload = raw[: serialize._HEADER.size], raw[serialize._HEADER.size :]
    (meta_len,) = struct.unpack_from("<Q", payload, 0)
    meta = edit(payload[8 : 8 + meta_len].decode())
    data = payload[serialize._aligned(8 + meta_len) :]
    new_meta = meta.encode()
    body = struct.pack("<Q", len(new_meta)) + new_meta
    body += bytes(serialize._aligned(len(body)) - len(body)) + data
    magic, version, flags, _, _ = serialize._HEADER.unpack(header)
    import hashlib

    blank = serialize._HEADER.pack(magic, version, flags, len(body), bytes(32))
    digest = hashlib.sha256(blank + body).digest()
    path.write_bytes(serialize._HEADER.pack(magic, version, flags, len(body), digest) + body)


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda m: m.replace('"root":', '"deep":' + NESTED + ',"root":'), "nested too deeply"),
        (lambda m: m.replace('"offset": 0', '"offset": -64').replace('"offset":0', '"offset":-64'), "offset"),
        (
            lambda m: m.replace('"shape": [2, 3]', '"shape": [-2, -3]').replace('"shape":[2,3]', '"shape":[-2,-3]'),
            "shape",
        ),
    ],
)
def test_load_of_malformed_metadata_is_one_checkpoint_error(tmp_path, edit, why):
    path = tmp_path / "state.mpnn"
    save({"w": np.ones((2, 3), np.float32)}, path)
    before = path.read_bytes()
    rewrite_meta(path, edit)
    assert path.read_bytes() != before
    with pytest.raises(CheckpointError, match=why) as error:
        load(path)
    assert str(path) in str(error.value)


# ----- telemetry ------------------------------------------------------------------------------------------------
def test_nested_telemetry_line_is_a_bad_line(tmp_path):
    path = tmp_path / "worker-0.jsonl"
    path.write_text('{"t": 1.0, "rank": 0, "event": "start"}\n' + NESTED + '\n{"t": 2.0, "rank": 0, "step": 1}\n')
    log = read_rank_log(path, 0)
    assert log.bad_lines == 1 and len(log.events) == 1 and len(log.steps) == 1


# ----- no record lost: a rank stopped by SIGTERM ------------------------------------------------------------------
STOPPED = """
import sys, time
import numpy as np
import mpnn
from mpnn import nn
mpnn.init()
model = nn.Linear(4, 2)
opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
x, y = mpnn.from_numpy(np.ones((8, 4), np.float32)), mpnn.from_numpy(np.zeros(8, np.int64))
for _ in range(20):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print("twenty steps done")  # block-buffered: stdout is a pipe
open(sys.argv[1], "w").write("ready")
time.sleep(120)
"""


def test_rank_stopped_by_sigterm_keeps_its_telemetry_and_log(tmp_path):
    import os
    import signal

    from mpnn.telemetry.reader import load_run
    from test_launch import start_launcher, wait_for, write_script

    script = write_script(tmp_path, STOPPED)
    marker = tmp_path / "ready"
    proc, run_id = start_launcher(tmp_path, ["-n", "1", str(script), str(marker)])
    wait_for(marker.exists, 60, "20 steps")
    os.kill(proc.pid, signal.SIGTERM)  # the launcher stops its workers with SIGTERM
    proc.communicate(timeout=30)
    run_dir = tmp_path / "runs" / run_id
    assert len(load_run(run_dir).ranks[0].steps) == 20
    assert "twenty steps done" in (run_dir / "worker-0.log").read_text()


# ----- same host: host name and boot id ------------------------------------------------------------------------
def test_same_host_means_same_host_name_and_boot_id(monkeypatch):
    from mpnn.comm import communicator, hostid

    boot = open(hostid.BOOT_ID).read().strip()
    assert hostid.host_identity().endswith(f" boot {boot}")
    me = {"rank": 0, "host": hostid.host_identity(), "ipc": "ipc://a", "tcp": "tcp://10.0.0.1:1"}
    # a container on another machine with the same host name: another boot id, so tcp, never ipc/shared memory
    monkeypatch.setattr(hostid, "boot_id", lambda: "another-machine")
    peer = {"rank": 1, "host": hostid.host_identity(), "ipc": "ipc://b", "tcp": "tcp://10.0.0.2:1"}
    assert peer["host"] != me["host"] and communicator._pick_endpoint(peer, me) == "tcp://10.0.0.2:1"


# ----- the dataset cache ----------------------------------------------------------------------------------------
def test_unwritable_dataset_cache_is_one_line_and_the_data_still_loads(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mnist1d")
    from mpnn.data.datasets import load_mnist1d

    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("")
    monkeypatch.delenv("MPNN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(blocker / "home"))  # no cache dir can be made there (as root, too)
    data = load_mnist1d(num_samples=100, seed=3)
    assert data["x"].shape == (80, 40)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpnn: cannot cache MNIST-1D in {blocker / 'home'}"), err
