"""Multi-node restarts (`mpnn launch --nnodes N --max-restarts R`): the agents' protocol with node 0's store
(mpnn/launch/agents.py) in one process, the choice of the checkpoint every node verified, and two launchers on
this host as two nodes over loopback: a rank failing on either node restarts both, a node that never rejoins fails
the run naming it, a stranger cannot speak to the store. The same across two network-namespace hosts, with a
SIGKILL on each, is in tests/test_multihost.py."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq

from mpnn.checkpoint.layout import write_manifest
from mpnn.launch.agents import Agent, AgentAbort, Store, common_checkpoint, verified_checkpoints
from mpnn.launch.env import free_port
from test_launch import (
    REPO,
    launch_env,
    leftover_processes,
    reap_leftovers,  # noqa: F401  (autouse: kills what a failed test left running)
    wait_for,
    write_script,
)

SECRET = bytes(range(32))


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def made(context):
    """make(...) -> (address, store, agents) of one run's store and its agents, all closed after the test."""
    opened = []

    def make(nnodes=2, max_restarts=1, rdzv_timeout=20.0, silent_s=10.0, min_nodes=None):
        address = f"tcp://127.0.0.1:{free_port()}"
        nodes = (min_nodes or nnodes, nnodes)
        store = Store(context, address, "run-a", SECRET, nodes, max_restarts, rdzv_timeout, silent_s, last_call_s=1.0)
        agents = [Agent(context, address, "run-a", SECRET, node, rdzv_timeout) for node in range(nnodes)]
        opened.append((store, agents))
        return address, store, agents

    yield make
    for store, agents in opened:
        for agent in agents:
            agent.close()
        store.close(wait_s=0)


def _never():
    return False


def _join_all(agents, offers):
    """JOIN every agent (the store answers only when all have), then collect each one's GO."""
    for agent, offer in zip(agents, offers):
        agent._send("JOIN", checkpoints=offer)
    gos = []
    for agent in agents:
        verdict = None
        deadline = time.monotonic() + 10
        while verdict is None and time.monotonic() < deadline:
            verdict = agent.receive(0.2)
        assert verdict is not None and verdict[0] == "GO", verdict
        gos.append(verdict[1])
    return gos


def test_a_failure_anywhere_stops_every_node_and_the_next_round_resumes_from_the_common_checkpoint(made):
    _, store, agents = made()
    gos = _join_all(agents, [{}, {}])
    assert [g["round"] for g in gos] == [0, 0] and [g["resume"] for g in gos] == [None, None]
    agents[1].report_failed(3, 4242, "killed by SIGKILL")
    stops = [agent.verdict(_never) for agent in agents]
    failed = {"node": 1, "rank": 3, "pid": 4242, "how": "killed by SIGKILL"}
    stop = {"round": 0, "next": True, "restart": 1, "failed": failed, "joined": None}
    assert stops == [("STOP", stop)] * 2
    agents[0].report_failed(0, 99, "exited with code 1")  # a consequence, reported late: ignored
    for agent in agents:
        agent.round = 1
    offers = [
        {"step-00000900": "c", "step-00000500": "a", "step-00000400": "b"},
        {"step-00000500": "a", "step-00000400": "b"},
    ]
    gos = _join_all(agents, offers)
    passed_over = ["step-00000900: node(s) [1] cannot verify it"]
    go = {"round": 1, "resume": "step-00000500", "passed_over": passed_over, "nodes": [0, 1]}
    assert gos == [go, go]
    agents[0].report_done()
    assert agents[0].receive(0.5) is None  # the run is over only when every node is done
    agents[1].report_done()
    assert [agent.verdict(_never) for agent in agents] == [("END", {})] * 2
    store.close()
    assert store.ended == "end"


def test_no_restart_left_is_a_final_stop(made):
    _, store, agents = made(max_restarts=0)
    _join_all(agents, [{}, {}])
    agents[0].report_failed(0, 7, "exited with code 3")
    assert agents[1].verdict(_never) == (
        "STOP",
        {
            "round": 0,
            "next": False,
            "restart": None,
            "failed": {"node": 0, "rank": 0, "pid": 7, "how": "exited with code 3"},
            "joined": None,
        },
    )
    store.close()
    assert store.ended == "stop"


def test_a_node_that_does_not_rejoin_fails_the_run_naming_it(made):
    _, store, agents = made(rdzv_timeout=1.0)
    _join_all(agents, [{}, {}])
    agents[1].report_failed(1, 5, "killed by SIGTERM")
    for agent in agents:
        assert agent.verdict(_never)[0] == "STOP"
        agent.round = 1
    started = time.monotonic()
    with pytest.raises(
        AgentAbort,
        match=r"node\(s\) \[1\] did not join round 1 within --rdzv-timeout 1 s "
        r"\(node\(s\) \[0\] did; the run needs every node\)",
    ):
        agents[0].join(dict, _never)
    assert time.monotonic() - started < 5


def test_a_silent_launcher_stops_the_round_naming_its_node(made):
    _, store, agents = made(silent_s=1.0)
    _join_all(agents, [{}, {}])
    agents[1].close()  # node 1's launcher is gone: no more heartbeats
    verdict = None
    deadline = time.monotonic() + 10
    while verdict is None and time.monotonic() < deadline:
        verdict = agents[0].receive(0.2)
    assert verdict == (
        "STOP",
        {
            "round": 0,
            "next": True,
            "restart": 1,
            "failed": {
                "node": 1,
                "rank": None,
                "pid": None,
                "how": "was lost with its launcher, which went silent (1 s without a heartbeat)",
            },
            "joined": None,
        },
    )


def test_a_leaving_node_ends_the_run_on_every_other(made):
    _, store, agents = made()
    _join_all(agents, [{}, {}])
    agents[0].leave("node 0's launcher got SIGTERM")
    with pytest.raises(AgentAbort, match="node 0 left the run: node 0's launcher got SIGTERM"):
        agents[1].verdict(_never)


def test_a_silent_store_ends_the_agents_wait(context):
    address = f"tcp://127.0.0.1:{free_port()}"
    store = Store(context, address, "run-a", SECRET, (1, 1), 0, 20.0)
    agent = Agent(context, address, "run-a", SECRET, 0, 20.0, silent_s=1.0)
    assert agent.receive(0.5) is None  # a PONG proves the store lives
    store._closing.set()  # the store's launcher is gone
    store.close(wait_s=0)
    with pytest.raises(AgentAbort, match=r"the agents' store at tcp://127.0.0.1:\d+ \(node 0's launcher\) went silent"):
        agent.receive(5.0)
    agent.close()


def test_without_the_secret_nobody_speaks_to_the_store(made, context):
    """A stranger (another secret), and a node rank the store does not admit, get no answer; a raw TCP client that
    writes garbage disturbs nothing; the real agents still run their round."""
    address, store, agents = made()
    stranger = Agent(context, address, "run-a", b"x" * 32, 1, 20.0)
    outsider = Agent(context, address, "run-a", SECRET, 5, 20.0)  # the secret, but no node 5 in this run
    host, port = address.removeprefix("tcp://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"\xff" * 4096)
    for intruder in (stranger, outsider):
        intruder._send("JOIN", checkpoints={})
        intruder._send("LEAVE", why="forged")
        assert intruder.receive(1.0) is None
    gos = _join_all(agents, [{}, {}])
    assert [g["round"] for g in gos] == [0, 0]


def test_a_flood_of_strangers_connections_does_not_keep_the_nodes_out(made):
    """500 TCP connections held open by a stranger (no secret: each fails the CURVE handshake, or never starts
    it): both agents still join and get their GO."""
    address, store, agents = made()
    host, port = address.removeprefix("tcp://").split(":")
    held = []
    try:
        for _ in range(500):
            held.append(socket.create_connection((host, int(port)), timeout=5))
            held[-1].sendall(b"\xff\x00" * 8)
        gos = _join_all(agents, [{}, {}])
        assert [g["round"] for g in gos] == [0, 0]
    finally:
        for connection in held:
            connection.close()


ATTACKER_CODE = """
import socket, sys
secret_path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    open(secret_path).read()
    print("read the secret")
except PermissionError:
    print("secret denied")
greeting = bytes([0xFF] + [0] * 8 + [0x7F, 3, 0]) + b"CURVE".ljust(20, b"\\0") + bytes(32)
for payload in (greeting + b"\\x04\\x1a\\x05HELLO" + bytes(200), b"\\xff" * 4096):
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(payload)
        raw.settimeout(1.0)
        try:
            raw.recv(4096)
        except (socket.timeout, ConnectionError):
            pass
print("done")
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_another_local_user_gets_nothing_from_the_store(made, tmp_path):
    """As uid 4242 (setpriv), a person sharing the machine: the run's 0600 secret cannot be read, and a forged
    CURVE handshake or raw bytes on the store's port disturb nothing; the round then runs. (Messages under keys
    of a stranger's own are test_without_the_secret_nobody_speaks_to_the_store's.)"""
    secret = tmp_path / "secret"
    secret.write_text(SECRET.hex())
    secret.chmod(0o600)
    os.chmod(tmp_path, 0o755)  # the directory may be entered: the file's own mode is what stops the reader
    address, store, agents = made()
    host, port = address.removeprefix("tcp://").split(":")
    proc = subprocess.run(
        ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups", sys.executable, "-I", "-c", ATTACKER_CODE,
         str(secret), host, port],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["secret", "denied", "done"]
    gos = _join_all(agents, [{}, {}])
    assert [g["round"] for g in gos] == [0, 0] and store.ended is None


def test_min_max_a_round_starts_with_enough_nodes_and_a_late_node_grows_the_world(made):
    """--nnodes 1:3: node 0 alone starts round 0 after the last call; node 2 joining stops it without using a
    restart (max_restarts 0), is asked AGAIN with a fresh offer, and round 1 runs on nodes [0, 2]."""
    _, store, agents = made(nnodes=3, min_nodes=1, max_restarts=0)
    started = time.monotonic()
    (go,) = _join_all(agents[:1], [{}])
    assert go == {"round": 0, "resume": None, "passed_over": [], "nodes": [0]}
    assert time.monotonic() - started >= 0.9  # the last call (1 s here) for more nodes
    agents[2]._send("JOIN", checkpoints={"step-00000005": "old"})  # its offer now: stale by the next round
    assert agents[0].verdict(_never) == (
        "STOP",
        {"round": 0, "next": True, "restart": None, "failed": None, "joined": 2},
    )
    gos = {}

    def join(node):
        gos[node] = agents[node].join(lambda: {"step-00000010": "h", "step-00000005": "old"}, _never)

    agents[0].round = 1
    threads = [threading.Thread(target=join, args=(node,)) for node in (0, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    expected = {"round": 1, "resume": "step-00000010", "passed_over": [], "nodes": [0, 2]}
    assert gos == {0: expected, 2: expected} and agents[2].round == 1
    agents[2].report_failed(1, 11, "exited with code 2")  # growing used no restart; this failure has none left
    assert agents[0].verdict(_never)[1]["next"] is False


def test_min_max_the_round_waits_for_node_0(made):
    """--nnodes 1:2 with only node 1 up: no round without node 0 (rank 0 and the store live there)."""
    _, store, agents = made(nnodes=2, min_nodes=1, rdzv_timeout=2.0)
    with pytest.raises(
        AgentAbort, match=r"node\(s\) \[0\] did not join round 0 .* the run needs 1 node\(s\), node 0 among"
    ):
        agents[1].join(dict, _never)


def test_the_store_keeps_only_checkpoint_names_from_an_offer(made):
    """A JOIN's offer names checkpoints; anything else (a path) is dropped, never sent back as where to resume."""
    _, store, agents = made()
    offer = {"../../../tmp/elsewhere": "x", "step-00000100/../..": "y", "step-00000100": "z"}
    gos = _join_all(agents, [offer, offer])
    assert [g["resume"] for g in gos] == ["step-00000100"] * 2 and gos[0]["passed_over"] == []


def test_common_checkpoint_needs_one_manifest_on_every_node():
    assert common_checkpoint({0: {}, 1: {}}) == (None, [])
    assert common_checkpoint({0: {"step-00000100": "a"}, 1: {"step-00000100": "b"}}) == (
        None,
        ["step-00000100: the nodes read different manifests of it"],
    )
    assert common_checkpoint(
        {0: {"step-00001000": "x", "step-00000900": "y"}, 1: {"step-00000900": "y", "step-00001000": "x"}}
    ) == ("step-00001000", [])
    assert common_checkpoint({0: {"step-100000000": "z", "step-99999999": "w"}, 1: {"step-99999999": "w"}})[0] == (
        "step-99999999"
    )


def test_verified_checkpoints_pass_over_edited_and_incomplete_ones(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        directory = folder / f"step-{step:08d}"
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(bytes([step % 256]) * 64)
        if step != 300:
            write_manifest(directory, step, 0, 2, ["model.safetensors"])
    (folder / "step-00000200" / "model.safetensors").write_bytes(b"\0" * 64)  # edited after its manifest
    found = verified_checkpoints(tmp_path)
    assert list(found) == ["step-00000100"] and re.fullmatch(r"[0-9a-f]{64}", found["step-00000100"])
    assert verified_checkpoints(tmp_path / "nowhere") == {}


# Rank 1 (node 1) exits 3 on the first attempt; every attempt reports its environment and checks an all-reduce.
FAIL_ONCE = """
    import json, os, sys
    import numpy as np
    import mpnn
    comm = mpnn.init()
    a = np.full(5, comm.rank + 1.0, np.float32)
    comm.allreduce(a)
    assert a[0] == 3.0, a
    keys = ("MPNN_RESTART_COUNT", "MPNN_NODE_RANK", "MPNN_RESUME_FROM")
    print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
    if os.environ["MPNN_RESTART_COUNT"] == "0" and comm.rank == int(os.environ["FAIL_RANK"]):
        sys.exit(3)
    comm.barrier()
"""


def _start_nodes(tmp_path, script, run_id, flags=(), env=None):
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text(os.urandom(32).hex())
        secret.chmod(0o600)
    port = free_port()
    procs = []
    for node in range(2):
        argv = [
            sys.executable, "-m", "mpnn", "launch", "--nnodes", "2", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "--run-id", run_id,
            "--secret-file", str(secret), "--log-dir", str(tmp_path / "runs"), "--timeout", "30",
            "-n", "1", *flags, str(script),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                argv, cwd=tmp_path, env=env or launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_rank_failing_on_either_node_restarts_both(tmp_path, fail_rank):
    script = write_script(tmp_path, FAIL_ONCE)
    run_id = f"elastic-{fail_rank}"
    procs = _start_nodes(tmp_path, script, run_id, ["--max-restarts", "1"], launch_env(FAIL_RANK=str(fail_rank)))
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    for node, (out, err) in enumerate(outputs):
        envs = [json.loads(line.split("ENV ", 1)[1]) for line in out.splitlines() if "ENV " in line]
        assert envs == [
            {"MPNN_RESTART_COUNT": "0", "MPNN_NODE_RANK": str(node), "MPNN_RESUME_FROM": None},
            {"MPNN_RESTART_COUNT": "1", "MPNN_NODE_RANK": str(node), "MPNN_RESUME_FROM": None},
        ]
        pid = re.search(rf"rank {fail_rank} \(pid (\d+)\) on node {fail_rank} exited with code 3", err).group(1)
        lines = [line for line in err.splitlines() if "restart" in line]
        stopped = "; stopped the 1 other running worker(s)" if node != fail_rank else ""
        assert lines[0].startswith(
            f"mpnn launch: rank {fail_rank} (pid {pid}) on node {fail_rank} exited with code 3"
        ) and lines[0].endswith("restart 1/1: every node stops its workers and rejoins within --rdzv-timeout 300 s"), (
            lines
        )
        if node != fail_rank:
            assert stopped in lines[0] or "stopped" not in lines[0]  # the other worker may have failed first
        assert lines[1] == "mpnn launch: restart 1/1 begins, from scratch (no checkpoint saved yet) on every node"
        record = json.loads((tmp_path / "runs" / run_id / ("run.json" if node == 0 else "run-node1.json")).read_text())
        assert record["status"] == "ok" and [
            {k: r[k] for k in ("restart", "failed_rank", "failed_node", "pid", "how")} for r in record["restarts"]
        ] == [
            {
                "restart": 1,
                "failed_rank": fail_rank,
                "failed_node": fail_rank,
                "pid": int(pid),
                "how": "exited with code 3",
            }
        ]
    assert leftover_processes(run_id) == []


def test_a_node_whose_launcher_dies_fails_the_run_naming_it(tmp_path):
    """SIGKILL node 1's launcher mid-run (its guardian stops its worker): node 0's store finds it silent, restarts
    the round, and node 1 never rejoins: node 0 fails within silence + --rdzv-timeout, naming node 1."""
    script = write_script(tmp_path, "import time, mpnn\nmpnn.init()\nprint('UP', flush=True)\ntime.sleep(300)\n")
    run_id = "elastic-lost"
    procs = _start_nodes(tmp_path, script, run_id, ["--max-restarts", "2", "--rdzv-timeout", "4"])
    runs = tmp_path / "runs" / run_id
    wait_for(lambda: all((runs / f"worker-{r}.log").exists() and "UP" in (runs / f"worker-{r}.log").read_text()
                         for r in (0, 1)), timeout=60, what="both workers up")  # fmt: skip
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out, err = procs[0].communicate(timeout=60)
    took = time.monotonic() - killed
    assert procs[0].returncode == 1, err
    assert (
        "mpnn launch: node(s) [1] did not join round 1 within --rdzv-timeout 4 s (node(s) [0] did; the run needs "
        "every node); stopped 1 running worker(s) of this node" in err
    ), err
    assert "rank 1 on node 1 was lost with its launcher, which went silent (10 s without a heartbeat)" in err
    assert took < 10 + 4 + 10, took
    record = json.loads((runs / "run.json").read_text())
    why = "node(s) [1] did not join round 1 within --rdzv-timeout 4 s (node(s) [0] did; the run needs every node)"
    assert record["status"] == "failed" and record["failure"] == {"remote": why}
    procs[1].wait(timeout=10)
    wait_for(lambda: leftover_processes(run_id) == [], timeout=15, what="node 1's worker gone with its launcher")


def _checkpoints(run_dir):
    """{step: world size that wrote it} of the run's complete checkpoints."""
    found = {}
    for manifest in (run_dir / "checkpoints").glob("step-*/manifest.json"):
        try:
            found[int(manifest.parent.name[len("step-") :])] = json.loads(manifest.read_text())["world_size"]
        except (OSError, ValueError, KeyError):
            pass
    return found


def test_min_max_mnist1d_grows_to_two_nodes_and_shrinks_back_to_one(tmp_path):
    """--nnodes 1:2: node 0 trains alone; node 1 starts later and the world grows (both resume from node 0's
    checkpoint, written by a world of 1); node 1's launcher is SIGKILLed and node 0 goes on alone from the newest
    checkpoint, written by a world of 2, after the last call. The recipe still reaches its accuracy."""
    mnist1d = REPO / "launch" / "mnist1d.py"
    flags = ["--nnodes", "1:2", "--max-restarts", "1", "--checkpoint-every", "500", "--rdzv-timeout", "60"]
    run_id = "elastic-grow"
    runs = tmp_path / "runs" / run_id
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    port = free_port()

    def start(node):
        argv = [
            sys.executable, "-m", "mpnn", "launch", "--node-rank", str(node), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--run-id", run_id, "--secret-file", str(secret),
            "--log-dir", str(tmp_path / "runs"), "--timeout", "30", "-n", "1", *flags, str(mnist1d), "--model", "cnn",
        ]  # fmt: skip
        out = open(tmp_path / f"node{node}.out", "w")
        return subprocess.Popen(argv, cwd=tmp_path, env=launch_env(), stdout=out, stderr=subprocess.STDOUT)

    node0 = start(0)
    wait_for(lambda: 1 in _checkpoints(runs).values(), timeout=90, what="a checkpoint of node 0 alone")
    node1 = start(1)
    wait_for(lambda: 2 in _checkpoints(runs).values(), timeout=90, what="a checkpoint of the two-node world")
    node1.send_signal(signal.SIGKILL)
    assert node0.wait(timeout=120) == 0, (tmp_path / "node0.out").read_text()
    node1.wait(timeout=10)
    out = (tmp_path / "node0.out").read_text()
    assert "mpnn launch: node 1 joined; every node stops its workers and rejoins" in out, out
    assert re.search(r"mpnn launch: round 1 begins on nodes \[0, 1\], resuming from \S+/step-\d+", out), out
    assert "rank 1 on node 1 was lost with its launcher, which went silent" in out, out
    assert re.search(r"mpnn launch: restart 1/1 begins, resuming from \S+/step-\d+ on every node", out), out
    resumed = re.findall(r"resuming \S+, written by a world of (\d), on (\d) rank", out)
    assert resumed == [("1", "2"), ("2", "1")], out
    accuracy = float(re.search(r"final test accuracy (\d\.\d+) \(cnn, 8000 steps, world 1\)", out).group(1))
    assert accuracy >= 0.9, out
    record = json.loads((runs / "run.json").read_text())
    assert record["status"] == "ok" and record["round"] == 2 and record["world"]["nodes"] == [0]
    assert record["config"]["min_nodes"] == 1 and record["config"]["nnodes"] == 2
    assert [(r["failed_node"], r["failed_rank"]) for r in record["restarts"]] == [(1, 1)]
    wait_for(lambda: leftover_processes(run_id) == [], timeout=15, what="no process left")


def test_flags_of_multi_node_restarts_are_checked_before_anything_starts(tmp_path):
    script = write_script(tmp_path, "print('never')\n")
    env = launch_env()
    for flags, message in [
        (["--rdzv-timeout", "0"], "Invalid value for '--rdzv-timeout'"),
        (["--master-port", "65534"], "--master-port 65534: --max-restarts with --nnodes > 1 needs port 65536"),
    ]:
        result = subprocess.run(
            [
                sys.executable, "-m", "mpnn", "launch", "--nnodes", "2", "--master-addr", "127.0.0.1",
                "--run-id", "flags", "--secret-file", str(tmp_path / "absent"), "--max-restarts", "1",
                "--log-dir", str(tmp_path / "runs"), *flags, str(script),
            ],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode in (1, 2) and message in result.stderr, result.stderr
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "value, message",
    [("2:1", "'2:1': need 1 <= MIN <= MAX"), ("0", "'0': need 1 <= MIN <= MAX"), ("a:b", "'a:b' is not a node count")],
)
def test_a_bad_node_count_is_one_clear_error(tmp_path, value, message):
    script = write_script(tmp_path, "print('never')\n")
    result = subprocess.run(
        [sys.executable, "-m", "mpnn", "launch", "--nnodes", value, "--log-dir", str(tmp_path / "runs"), str(script)],
        env=launch_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "Invalid value for '--nnodes'" in result.stderr and message in result.stderr
    assert not (tmp_path / "runs").exists()
