"""Issue 16, network attacks: what another local user, or a peer on the network, gets from a run's sockets.

- A dead rank's port (item 1): with --no-encrypt / MPNN_TRANSPORT=tcp a rank dies, a second uid binds its freed
  port and waits for the survivors to reconnect. Before issue 16 it received the PLAIN password every rank shared,
  used it to feed rank 0 poisoned gradients, and had rank 0 unpickle its objects. Now each data connection carries
  a one-time proof bound to the run, both ranks and the server's fresh nonce, and the PUSH never reconnects: the
  attacker gets no connection at all, and rank 0 fails naming the dead rank.
- Data sockets admit exactly their ring predecessor, once (PLAIN) or by its key (CURVE); a replayed proof and
  another rank's key are refused.
- allgather_object / broadcast_object never unpickle: a peer's bytes are decoded by mpnn.comm.objects.

The attacker runs as uid 4242 through os.setuid in a child (it imports pyzmq as root first: /root, where the
interpreter's packages live, is closed to other users here).
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from commworld import run_world, values
from test_security import wait_for

ATTACKER = 4242

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks need root to run a second uid against")


# -- a dead rank's port ------------------------------------------------------------------------------------------
# The attacker: binds the dead rank's port as a PLAIN server behind its own ZAP handler (which records whatever
# credentials arrive and admits them), and for every data frame from rank 0 answers with a forged one, "from rank
# 1", carrying 999.0s, over a PUSH that logs into rank 0's data port with the credentials it received.
ATTACK_DEAD_PORT = """
import array, json, os, sys, time
import zmq
dead_port, victim_port, ready, seconds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
context = zmq.Context()
zap = context.socket(zmq.REP)
zap.bind("inproc://zeromq.zap.01")
pull = context.socket(zmq.PULL)
pull.zap_domain, pull.plain_server = b"mpnn", True
deadline = time.monotonic() + 10
while True:
    try:
        pull.bind(f"tcp://127.0.0.1:{{dead_port}}")
        break
    except zmq.ZMQError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
fd = os.open(ready, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.close(fd)
log = {{"credentials": [], "received": 0, "injected": 0, "reports": []}}
push = None
poller = zmq.Poller()
poller.register(zap, zmq.POLLIN)
poller.register(pull, zmq.POLLIN)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for sock, _ in poller.poll(50):
        if sock is zap:
            request = zap.recv_multipart()
            log["credentials"].append([part.decode("latin-1") for part in request[5:]])
            zap.send_multipart([b"1.0", request[1], b"200", b"OK", b"x", b""])
        else:
            header, payload = pull.recv_multipart()
            log["received"] += 1
            if push is None and log["credentials"]:
                mechanism, user, password = log["credentials"][-1]
                push = context.socket(zmq.PUSH)
                push.linger = 0
                push.plain_username, push.plain_password = user.encode("latin-1"), password.encode("latin-1")
                push.connect(f"tcp://127.0.0.1:{{victim_port}}")
            if push is not None:
                forged = header[:12] + (1).to_bytes(4, "little") * 2 + header[20:]  # sender = origin = rank 1
                poisoned = bytes(len(payload))
                if len(payload) % 4 == 0:
                    poisoned = array.array("f", [999.0] * (len(payload) // 4)).tobytes()
                push.send_multipart([forged, poisoned])
                log["injected"] += 1
print(json.dumps(log), flush=True)
context.destroy(linger=0)
"""


def dead_port_worker(comm, shared):
    """Rank 1 dies right after the ring is up; rank 0 waits until the attacker holds rank 1's port, then runs one
    all-reduce and one allgather_object, and reports what it got."""
    comm.allreduce(np.ones(4, np.float32))
    ports = [int(endpoint.rsplit(":", 1)[1]) for endpoint in comm.allgather_object(comm._link.bound[0])]
    if comm.rank == 1:  # once rank 0 surely has every frame it sent (a queued frame dies with the process)
        wait_for(lambda: Path(shared, "ports").exists(), 30, "rank 0's report of the ports")
        os._exit(0)  # dies without a word: its listening socket is gone, its port is free
    Path(shared, "ports.tmp").write_text(json.dumps(ports))
    os.rename(Path(shared, "ports.tmp"), Path(shared, "ports"))
    wait_for(lambda: Path(shared, "bound").exists(), 20, "the attacker on the dead rank's port")
    time.sleep(0.3)
    a = np.full(4, 1.5, np.float32)
    try:
        comm.allreduce(a, "mean")
        return {"allreduce": a.tolist()}
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}


@as_root
def test_a_dead_ranks_port_gives_the_attacker_nothing():
    """Issue 16 item 1, reproduced: before, the attacker received the shared PLAIN password and rank 0 averaged
    its 999.0s (500.25 where 1.5 was right). Now rank 0 never reconnects, so the attacker gets no handshake, no
    credential and no frame, and rank 0 fails with a timeout naming rank 1."""
    shared = tempfile.mkdtemp(prefix="mpnn-net-", dir="/tmp")
    os.chmod(shared, 0o1777)
    attack = {}

    def attacker():
        wait_for(lambda: Path(shared, "ports").exists(), 60, "rank 0's report of the ports")
        victim, dead = json.loads(Path(shared, "ports").read_text())
        code = textwrap.dedent(ATTACK_DEAD_PORT.format(uid=ATTACKER))
        proc = subprocess.run(
            [sys.executable, "-c", code, str(dead), str(victim), str(Path(shared, "bound")), "6"],
            capture_output=True,
            text=True,
            timeout=40,
        )
        attack["rc"], attack["out"], attack["err"] = proc.returncode, proc.stdout, proc.stderr

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        results = run_world(
            dead_port_worker,
            2,
            (shared,),
            comm_timeout=3.0,
            deadline=60,
            env={"MPNN_TRANSPORT": "tcp", "MPNN_ENCRYPT": "0"},
        )
        thread.join(timeout=40)
    finally:
        import shutil

        shutil.rmtree(shared, ignore_errors=True)
    assert attack.get("rc") == 0, attack
    log = json.loads(attack["out"])
    rank0 = results[0].value
    assert rank0 is not None, results[0].traceback
    assert log["credentials"] == [], f"the attacker received credentials: {log}; rank 0 got {rank0}"
    assert log["received"] == 0 and log["injected"] == 0, log
    assert rank0.get("error") == "CommTimeout" and "rank 1" in rank0["message"], rank0


# -- each data socket admits its predecessor only ---------------------------------------------------------------
def _handshakes(context, endpoint, configure, seconds=1.5, send=True):
    """Connect a PUSH configured by `configure` to `endpoint`, send a frame (if `send`), and return its monitor's
    events."""
    sock = context.socket(zmq.PUSH)
    sock.linger = 0
    configure(sock)
    monitor = sock.get_monitor_socket()
    sock.connect(endpoint)
    try:
        if send:
            sock.send_multipart([b"forged", b"payload"], zmq.NOBLOCK)
    except zmq.Again:
        pass
    events = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if monitor.poll(50):
            event = recv_monitor_message(monitor)["event"]
            events.append(getattr(event, "name", str(event)))
            if events[-1].startswith("HANDSHAKE_"):
                break
    sock.disable_monitor()
    monitor.close()
    sock.close()
    return events


def neighbour_only_worker(comm):
    """In a 3-rank ring (0 -> 1 -> 2 -> 0) rank 0, which holds the secret and every key, tries rank 2's data port
    (whose predecessor is rank 1): with its own CURVE key, with rank 1's key (the only admitted one, as a control),
    and, without encryption, replaying the one-time proof rank 1 already used on it."""
    endpoints = comm.allgather_object(comm._link.bound[0])
    nonces = None if comm.encrypt else comm.allgather_object(comm._security.nonce.hex())
    report = {}
    if comm.rank == 0:
        context = zmq.Context()
        security, target = comm._security, endpoints[2]
        try:
            if comm.encrypt:

                def own_key(sock):
                    sock.curve_publickey, sock.curve_secretkey = security._keys[0]
                    sock.curve_serverkey = security._keys[2][0]

                def rank1_key(sock):
                    sock.curve_publickey, sock.curve_secretkey = security._keys[1]
                    sock.curve_serverkey = security._keys[2][0]

                report["own key"] = _handshakes(context, target, own_key)
                report["rank 1's key"] = _handshakes(context, target, rank1_key, send=False)
            else:
                from mpnn.comm.auth import edge_proof

                secret = security._secret

                def replay(sock):
                    sock.plain_username = b"1"
                    sock.plain_password = edge_proof(secret, comm.run_id, 1, 2, bytes.fromhex(nonces[2]))

                def own_proof(sock):
                    sock.plain_username = b"0"
                    sock.plain_password = edge_proof(secret, comm.run_id, 0, 2, bytes.fromhex(nonces[2]))

                report["replayed proof"] = _handshakes(context, target, replay)
                report["own proof"] = _handshakes(context, target, own_proof)
        finally:
            context.destroy(linger=0)
    comm.barrier()
    a = np.full(1000, comm.rank + 1.0, np.float32)
    comm.allreduce(a)
    report["ok"] = bool(np.all(a == 6.0))
    report["refused"] = getattr(comm._security, "refused", None)
    return report


@pytest.mark.parametrize("encrypt", ["0", "1"], ids=["plain", "curve"])
def test_a_data_socket_admits_its_predecessor_only(encrypt):
    reports = values(run_world(neighbour_only_worker, 3, env={"MPNN_TRANSPORT": "tcp", "MPNN_ENCRYPT": encrypt}))
    assert all(report["ok"] for report in reports)
    events = reports[0]
    refused = ["own key"] if encrypt == "1" else ["replayed proof", "own proof"]
    for name in refused:
        assert "HANDSHAKE_FAILED_AUTH" in events[name] and "HANDSHAKE_SUCCEEDED" not in events[name], (name, events)
    if encrypt == "1":
        assert "HANDSHAKE_SUCCEEDED" in events["rank 1's key"], events  # the control: the key itself works
    assert len(reports[2]["refused"]) == len(refused), reports[2]["refused"]  # rank 2's ZAP handler said no
    assert reports[1]["refused"] == [] and reports[0]["refused"] == []


# -- objects are data, never code --------------------------------------------------------------------------------
class _Bomb:
    """Unpickling this creates a file: proof that a peer's bytes were unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bomb_worker(comm, marker, collective):
    """Rank 1 puts a pickle where its object goes (as a peer that holds the secret, or a hijacked rank, could);
    rank 0 must refuse it, naming rank 1, and unpickle nothing."""
    import pickle

    from mpnn.comm import CommError

    if comm.rank == 1:
        try:
            from mpnn.comm import objects

            objects.encode = lambda obj, what="object": pickle.dumps(obj)
        except ImportError:
            pass  # before issue 16 a pickle was the format itself
    mine = _Bomb(marker) if comm.rank == 1 else "fine"
    try:
        if collective == "allgather_object":
            got = comm.allgather_object(mine)
        else:
            got = comm.broadcast_object(mine, root=1)
        return ("returned", repr(got)[:200])
    except CommError as error:
        return ("CommError", str(error))


@pytest.mark.parametrize("collective", ["allgather_object", "broadcast_object"])
def test_a_pickle_from_a_peer_is_never_loaded(tmp_path, collective):
    marker = tmp_path / "unpickled"
    reports = values(run_world(pickle_bomb_worker, 2, (str(marker), collective)))
    assert not marker.exists(), f"rank 0 unpickled rank 1's object: {reports}"
    outcome, message = reports[0]
    assert outcome == "CommError" and "from rank 1" in message and "cannot decode" in message, reports[0]


def test_objects_round_trip_what_mpnn_sends():
    """The codec carries what mpnn's own callers (checkpoints, audit, tests' state dicts) send, types intact, and
    refuses anything else when sending, by type."""
    from mpnn.comm import objects

    state = {"state": {0: {"exp_avg": np.ones((2, 3), np.float32), "step": np.int64(4)}}, "groups": [{"lr": 1e-3}]}
    for value in [None, (3, "step-3"), [("ok", "ab" * 32), ("invalid", None)], {"rank": 1, "blob": b"\0" * 9}, state]:
        back = objects.decode(objects.encode(value))
        assert repr(back) == repr(value)
    import mpnn  # registers mpnn.Tensor with the codec (mpnn.runtime)

    weights = objects.decode(objects.encode(mpnn.nn.Linear(3, 2).state_dict()))
    assert {k: (type(v).__name__, v.shape) for k, v in weights.items()} == {
        "weight": ("Tensor", (2, 3)),
        "bias": ("Tensor", (2,)),
    }
    with pytest.raises(objects.ObjectError, match="does not rebuild"):
        objects.decode(b"MPO1x\x09evil.Type" + objects.encode(np.zeros(1))[4:])
    array = objects.decode(objects.encode(np.arange(12, dtype=np.float16).reshape(3, 4)[:, ::2]))
    assert array.dtype == np.float16 and array.tolist() == [[0, 2], [4, 6], [8, 10]] and array.flags.writeable
    for refused in [_Bomb("x"), {1, 2}, np.array([object()]), Path(".")]:
        with pytest.raises(TypeError, match="cannot send"):
            objects.encode(refused, "allgather_object")
    junks = [b"", b"\x80\x04N.", b"MPO1", b"MPO1l" + b"\xff" * 7 + b"\x7f", b"MPO1a\x03<f4\x01" + b"\xff" * 8]
    for junk in junks:
        with pytest.raises(objects.ObjectError):
            objects.decode(junk)


# -- the rendezvous under a flood (item 4) -----------------------------------------------------------------------
# The attacker speaks ZMTP by hand over plain sockets (cheap enough for thousands of connections): a NULL greeting,
# READY as a DEALER, then its message. Before issue 16 rank 0's ROUTER took in whatever followed.
FLOOD = """
import encodings.idna, json, os, socket, sys, time  # everything before dropping to uid {uid}: /root is closed
rendezvous_port, run_id, shared, mode, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
GREETING = b"\\xff" + b"\\x00" * 7 + b"\\x01\\x7f\\x03\\x01" + b"NULL".ljust(20, b"\\x00") + b"\\x00" * 32
READY = b"\\x05READY\\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER\\x08Identity" + bytes(4)
def frame(data, more):
    if len(data) < 256:
        return bytes([1 if more else 0, len(data)]) + data
    return bytes([3 if more else 2]) + len(data).to_bytes(8, "big") + data
def started():
    fd = os.open(os.path.join(shared, "started"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
def greeted(n):  # the greeting alone first: sent in one write with READY, libzmq 4.3.5 dropped the peer here
    socks = []
    for _ in range(n):
        try:
            sock = socket.create_connection(("127.0.0.1", rendezvous_port), timeout=5)
            sock.sendall(GREETING)
            socks.append(sock)
        except OSError:
            pass
    time.sleep(0.3)
    return socks
ready = bytes([4, len(READY)]) + READY
held, sent = [], 0
if mode == "frames":  # one message of `count` one-byte frames
    held = greeted(1)
    body = b"\\x01\\x01x" * (count - 1) + b"\\x00\\x01x"
    try:
        held[0].sendall(ready + frame(b"HELLO", True) + body)
        sent = len(body)
    except OSError:
        pass
    time.sleep(1.0)
    started()
else:  # `count` connections, each sending a well-formed HELLO for rank 1
    held = greeted(count)
    for i, sock in enumerate(held):
        hello = json.dumps({{"rank": 1, "run": run_id, "nonce": os.urandom(32).hex()}}).encode()
        try:
            sock.sendall(ready + frame(b"HELLO", True) + frame(hello, False))
            sent += 1
        except OSError:
            pass
        if i == len(held) // 2:  # rank 1 joins halfway through the HELLOs
            started()
end = time.monotonic() + 15
while time.monotonic() < end and not os.path.exists(os.path.join(shared, "done")):
    time.sleep(0.05)
print(json.dumps({{"sent": sent, "connections": len(held)}}), flush=True)
for sock in held:
    sock.close()
"""


def flood_worker(shared):
    """Rank 1 joins once the flood is under way; rank 0 reports what its rendezvous cost it (peak RSS, CPU s)."""
    import resource

    import psutil

    from mpnn.comm import CommError, init_from_env

    rank = int(os.environ["MPNN_RANK"])
    if rank == 1:
        wait_for(lambda: Path(shared, "started").exists(), 30, "the flood")
    me = psutil.Process()
    peak, cpu, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sum(me.cpu_times()[:2]), time.monotonic()
    try:
        comm = init_from_env()
    except CommError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    a = np.full(3, rank + 1.0)
    comm.allreduce(a)
    comm.close()
    return {
        "sum": a.tolist(),
        "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024,
        "cpu_s": sum(me.cpu_times()[:2]) - cpu,
        "wall_s": time.monotonic() - start,
    }


def _flood(mode, count):
    from commworld import free_port

    shared = tempfile.mkdtemp(prefix="mpnn-flood-", dir="/tmp")
    os.chmod(shared, 0o1777)
    port, run_id = free_port(), f"flood-{os.getpid()}"
    attack = {}

    def attacker():
        wait_for(lambda: _listening(port), 30, "rank 0's rendezvous")
        code = textwrap.dedent(FLOOD.format(uid=ATTACKER))
        proc = subprocess.run(
            [sys.executable, "-c", code, str(port), run_id, shared, mode, str(count)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        attack["rc"], attack["out"], attack["err"] = proc.returncode, proc.stdout, proc.stderr

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        env = {"MPNN_TRANSPORT": "tcp", "MPNN_RENDEZVOUS": f"tcp://127.0.0.1:{port}", "MPNN_RUN_ID": run_id}
        results = run_world(flood_worker, 2, (shared,), init=False, comm_timeout=20.0, deadline=60, env=env)
        Path(shared, "done").touch()
        thread.join(timeout=30)
    finally:
        import shutil

        shutil.rmtree(shared, ignore_errors=True)
    assert attack.get("rc") == 0, attack
    return values(results), json.loads(attack["out"])


def _listening(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@as_root
def test_a_connection_flood_cannot_evict_a_joining_rank():
    """Issue 16 item 4: 3,000 connections, each with a well-formed HELLO for rank 1, while rank 1 joins. Before, rank
    1 did not join within the timeout (the listen queue of 100 dropped connects; HELLOs that got in filled the pending
    table of 1024 and evicted joining ranks: "unexpected request"). Now a stranger fails the CURVE handshake before any
    message is taken in, the listen queue holds 1024: the run forms and computes, in bounded time."""
    reports, attack = _flood("hellos", 3000)
    assert attack["connections"] >= 1500, attack  # the flood really happened
    for report in reports:
        assert report.get("sum") == [3.0, 3.0, 3.0], reports
    assert reports[0]["wall_s"] < 30, reports


@as_root
def test_a_many_frame_message_costs_rank_0_nothing():
    """Issue 16 item 4: one message of 3,000,000 one-byte frames at the rendezvous. Before, rank 0 took it in whole
    (ZeroMQ's maxmsgsize bounds frames, not messages): hundreds of MB and seconds of CPU. Now it is refused at the
    handshake: rank 0's RSS and CPU stay flat and the run completes."""
    reports, attack = _flood("frames", 3_000_000)
    assert reports[0].get("sum") == [3.0, 3.0, 3.0], reports
    assert reports[0]["peak_rss_growth_mb"] < 32, reports
    assert reports[0]["cpu_s"] < 3.0, reports
