"""The launcher's parts on their own: pinning plan, environment, secret file, run ids, log tails, exit wording,
and the live view's telemetry follower, status line and rich rendering."""

import io
import json
import os
import re
import socket
import stat
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from mpnn.launch.env import TORCHRUN_VARS, RunContext, World, rendezvous_address, script_master_port, worker_env
from mpnn.launch.errors import LaunchError
from mpnn.launch.layout import Core, Layout
from mpnn.launch.liveview import RichView, TelemetryFollower, describe_event, status_line
from mpnn.launch.output import MAX_LINE_BYTES, TAIL_BYTES, PipeReader, tail_lines
from mpnn.launch.pinning import pin_plan, thread_pinned_to
from mpnn.launch.rundir import check_run_id, new_run_id
from mpnn.launch.secret import check_secret_file, fresh_secret_file
from mpnn.launch.supervise import describe_returncode, exit_status
from mpnn.worldspec import spec_from_env


def test_pin_plan_without_topology_is_round_robin():
    def unknown(*cpus):
        return Layout(Path("/nowhere"), cpus, tuple(Core((cpu,)) for cpu in cpus), unknown="no topology")

    assert pin_plan(5, unknown(0, 2, 5)).cpus == (0, 2, 5, 0, 2)
    assert pin_plan(2, unknown(7)).cpus == (7, 7)


def test_thread_pinning_is_per_thread_and_restored():
    before = os.sched_getaffinity(0)
    core = min(before)
    seen = {}
    other = threading.Thread(target=lambda: seen.setdefault("other", os.sched_getaffinity(0)))
    with thread_pinned_to(core):
        seen["inside"] = os.sched_getaffinity(0)
        other.start()
        other.join()
    assert seen["inside"] == {core}
    assert os.sched_getaffinity(0) == before
    # a thread started while pinned inherits the mask, like a forked child does
    assert seen["other"] == {core}


def test_worker_env_for_second_node():
    world = World(nproc_per_node=3, nnodes=2, node_rank=1)
    assert world.world_size == 6 and world.local_global_ranks() == [3, 4, 5]
    run = RunContext("r1", Path("/runs/r1"), "tcp://10.0.0.1:29500", Path("/tmp/s"), 7.0, ("a:x=1", "b"))
    env = worker_env({"MKL_NUM_THREADS": "4", "HOME": "/h"}, world, 2, run)
    assert {k: env[k] for k in env if k.startswith("MPNN_")} == {
        "MPNN_RANK": "5",
        "MPNN_WORLD_SIZE": "6",
        "MPNN_LOCAL_RANK": "2",
        "MPNN_LOCAL_WORLD_SIZE": "3",
        "MPNN_NNODES": "2",
        "MPNN_NODE_RANK": "1",
        "MPNN_RUN_ID": "r1",
        "MPNN_RUN_DIR": "/runs/r1",
        "MPNN_RENDEZVOUS": "tcp://10.0.0.1:29500",
        "MPNN_SECRET_FILE": "/tmp/s",
        "MPNN_TIMEOUT": "7",
        "MPNN_PLUGINS": "a:x=1;b",
        "MPNN_RESTART_COUNT": "0",
        "MPNN_MAX_RESTARTS": "0",
    }
    assert (env["MKL_NUM_THREADS"], env["OMP_NUM_THREADS"], env["HOME"]) == ("4", "1", "/h")


def test_worker_env_has_torchruns_names_which_the_world_parse_reads_after_mpnns():
    """torchrun-style scripts (nanoGPT's `ddp = int(os.environ.get('RANK', -1)) != -1`) see a distributed run;
    MASTER_PORT is never the rendezvous port; an inherited elastic agent's variables are dropped."""
    world = World(nproc_per_node=3, nnodes=2, node_rank=1)
    run = RunContext("r1", Path("/runs/r1"), "tcp://10.0.0.1:29500", Path("/tmp/s"), 7.0)
    inherited = {
        "RANK": "9",
        "WORLD_SIZE": "99",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": "old",
        "ROLE_RANK": "9",
        "OMPI_COMM_WORLD_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "1",
    }
    env = worker_env(inherited, world, 2, run)
    assert {k: env[k] for k in TORCHRUN_VARS} == {
        "RANK": "5",
        "LOCAL_RANK": "2",
        "WORLD_SIZE": "6",
        "LOCAL_WORLD_SIZE": "3",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29501",
    }  # the same on every node
    assert not [k for k in env if k.startswith(("TORCHELASTIC_", "ROLE_"))]
    spec = spec_from_env(env)  # MPNN_* wins over torchrun's (and Open MPI's) names: mpnn's rendezvous, not MASTER_PORT
    assert (spec.launcher, spec.rank, spec.world_size, spec.local_rank, spec.node_rank, spec.nnodes) == (
        "mpnn",
        5,
        6,
        2,
        1,
        2,
    )
    assert spec.rendezvous == "tcp://10.0.0.1:29500"
    chosen = worker_env({}, World(nproc_per_node=2), 1, replace(run, rendezvous="tcp://[::1]:7000", master_port=4321))
    assert (chosen["RANK"], chosen["WORLD_SIZE"], chosen["MASTER_ADDR"], chosen["MASTER_PORT"]) == (
        "1",
        "2",
        "::1",
        "4321",
    )


def test_script_master_port_is_free_and_never_the_rendezvous_port():
    rendezvous = rendezvous_address(None, None)
    taken = int(rendezvous.rsplit(":", 1)[1])
    ports = {script_master_port(rendezvous, 1) for _ in range(5)}
    assert taken not in ports and all(1024 <= p < 65536 for p in ports)
    for port in ports:  # free: a script (torch.distributed's store) can bind it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
    assert script_master_port("tcp://node0:29500", 2) == 29501 and script_master_port("tcp://n:65535", 3) == 65534


def test_rendezvous_address():
    assert rendezvous_address("node0", 29500) == "tcp://node0:29500"
    assert rendezvous_address("::1", 29500) == "tcp://[::1]:29500"
    host, port = rendezvous_address(None, None).rsplit(":", 1)
    assert host == "tcp://127.0.0.1" and 1024 <= int(port) < 65536


def test_fresh_secret_file_is_private_and_removed():
    with fresh_secret_file() as path:
        text = path.read_text()
        assert len(text) == 64 and bytes.fromhex(text)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.exists() and not path.parent.exists()


def test_check_secret_file(tmp_path):
    good = tmp_path / "good"
    good.write_text("x" * 64)
    good.chmod(0o600)
    assert check_secret_file(good) == good.resolve()
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(LaunchError, match="must be a non-empty regular file"):
        check_secret_file(empty)
    with pytest.raises(LaunchError, match="No such file"):
        check_secret_file(tmp_path / "missing")
    good.chmod(0o640)
    with pytest.raises(LaunchError, match="mode 0640 lets others read it"):
        check_secret_file(good)


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden", "-x", "sp ace", "x" * 129])
def test_bad_run_ids_are_refused(bad):
    with pytest.raises(LaunchError, match="--run-id"):
        check_run_id(bad)


def test_new_run_ids_are_valid_and_distinct():
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(check_run_id(i) == i for i in ids)


def test_tail_lines(tmp_path):
    log = tmp_path / "w.log"
    assert tail_lines(log) == []
    lines = [f"line {i} " + "x" * 100 for i in range(2000)]  # more than TAIL_BYTES
    log.write_text("\n".join(lines) + "\n")
    assert log.stat().st_size > TAIL_BYTES
    assert tail_lines(log, 20) == lines[-20:]
    assert tail_lines(log, 10_000)[0] in lines  # the cut first line of the window is dropped
    log.write_bytes(b"ok\n\xff\xfe broken utf-8\nlast without newline")
    assert tail_lines(log, 2) == ["\ufffd\ufffd broken utf-8", "last without newline"]


def test_pipe_reader_tees_lines_and_splits_endless_ones(tmp_path):
    read_fd, write_fd = os.pipe()
    got = []
    reader = PipeReader(3, os.fdopen(read_fd, "rb"), tmp_path / "w.log", lambda rank, line: got.append((rank, line)))
    reader.start()
    data = b"first\r\n" + b"y" * (MAX_LINE_BYTES + 10) + b"\nno newline at the end"
    with os.fdopen(write_fd, "wb") as w:
        w.write(data)
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert (tmp_path / "w.log").read_bytes() == data
    assert got == [(3, "first"), (3, "y" * MAX_LINE_BYTES), (3, "y" * 10), (3, "no newline at the end")]


def test_returncode_wording():
    assert describe_returncode(0) == "exited with code 0"
    assert describe_returncode(3) == "exited with code 3"
    assert describe_returncode(-9) == "killed by SIGKILL"
    assert describe_returncode(-15) == "killed by SIGTERM"
    assert describe_returncode(-63) == "killed by signal 63"
    assert [exit_status(c) for c in (0, 3, -9, -15)] == [0, 3, 137, 143]


def append(path, text):
    with open(path, "ab") as f:
        f.write(text.encode())


def test_telemetry_follower_reads_incrementally(tmp_path):
    follower = TelemetryFollower(tmp_path, [0, 1])
    assert follower.poll() == [] and follower.latest == {}  # no files yet
    f0, f1 = tmp_path / "worker-0.jsonl", tmp_path / "worker-1.jsonl"
    append(f0, json.dumps({"event": "start", "rank": 0, "total_steps": 100}) + "\n")
    append(f0, json.dumps({"step": 1, "loss": 2.5, "step_s": 0.1}) + "\n" + '{"step": 2, "lo')  # half a line
    append(f1, "not json\n[1, 2]\n" + json.dumps({"step": 1, "loss": 2.7, "step_s": 0.2}) + "\n")
    events = follower.poll()
    assert events == [(0, {"event": "start", "rank": 0, "total_steps": 100})]
    assert follower.total_steps == 100
    assert follower.latest == {0: {"step": 1, "loss": 2.5, "step_s": 0.1}, 1: {"step": 1, "loss": 2.7, "step_s": 0.2}}
    append(f0, 'ss": 2.25, "step_s": 0.125}\n')
    assert follower.poll() == []
    assert follower.latest[0] == {"step": 2, "loss": 2.25, "step_s": 0.125}
    f1.write_text(json.dumps({"step": 7}) + "\n")  # replaced by a shorter file: read from the start
    follower.poll()
    assert follower.latest[1] == {"step": 7}


def test_status_line():
    latest = {
        0: {"step": 12, "loss": 0.5, "step_s": 0.1},
        1: {"step": 11, "loss": 0.7, "step_s": 0.25},
        2: {"step": 12, "loss": 0.6, "step_s": "bad"},
    }
    assert status_line(latest, 100, 3, 3) == (
        "step 11/100 · loss 0.5 · 4 steps/s · slowest rank 1 (0.25 s/step) · 3/3 running"
    )
    assert status_line({1: {"step": 4}}, None, 1, 2) == "step 4 · 1/2 running"
    assert status_line({}, None, 2, 2) == "2/2 workers running · waiting for telemetry"
    assert describe_event(2, {"event": "restart", "t": 1.0, "rank": 2, "attempt": 1}) == "[2] event restart attempt=1"


def test_rich_view_shows_lines_events_and_status(tmp_path):
    from rich.console import Console

    out = io.StringIO()
    view = RichView(tmp_path, [0, 1], console=Console(file=out, force_terminal=True, width=120))
    view.line(1, "hello from one")
    append(
        tmp_path / "worker-0.jsonl",
        json.dumps({"event": "start", "total_steps": 10})
        + "\n"
        + json.dumps({"step": 5, "loss": 1.25, "step_s": 0.5})
        + "\n",
    )
    append(tmp_path / "worker-1.jsonl", json.dumps({"step": 6, "loss": 1.5, "step_s": 0.25}) + "\n")
    view.refresh(running=2)
    view.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # drop the terminal's control codes
    assert "[1] hello from one" in text and "[0] event start total_steps=10" in text
    assert "step 5/10 · loss 1.25 · 2 steps/s · slowest rank 0 (0.5 s/step) · 2/2 running" in text
