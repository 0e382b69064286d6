"""Failures in real worlds: mismatched collectives fail at once naming both ranks, a silent or dead rank is named
within the timeout, strangers on the data and rendezvous ports are refused while the world goes on, a rank
with the wrong secret is turned away, and nothing is left behind."""

import json
import os
import pickle
import threading
import time

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from commworld import run_world, values
from mpnn.comm import CollectiveMismatch, CommError, CommTimeout

TIMEOUT = 1.5


def _outcome(comm, call):
    """Run call(); return (error class name, message, seconds, silent rank or mismatch ranks, error on a later call)."""
    start = time.monotonic()
    try:
        call()
        error = None
    except CommError as caught:
        error = caught
    elapsed = time.monotonic() - start
    try:
        comm.barrier()
        later = None
    except CommError as caught:
        later = type(caught).__name__
    if error is None:
        return ("no error", "", elapsed, None, later)
    detail = getattr(error, "silent_rank", None) if isinstance(error, CommTimeout) else getattr(error, "ranks", None)
    return (type(error).__name__, str(error), elapsed, detail, later)


def op_mismatch_worker(comm):
    a = np.ones(10, np.float32)
    comm.allreduce(a)
    if comm.rank == 1:
        return _outcome(comm, lambda: comm.broadcast(a, root=0))
    return _outcome(comm, lambda: comm.allreduce(a))


def shape_mismatch_worker(comm, big):
    size = (300_000 if big else 10) + 2 * comm.rank
    return _outcome(comm, lambda: comm.allreduce(np.ones(size, np.float32)))


def async_mismatch_worker(comm):
    handle = comm.allreduce_async(np.ones(5 + comm.rank, np.float64))
    try:
        handle.wait()
        return "no error"
    except CollectiveMismatch as error:
        try:
            comm.allreduce_async(np.ones(3))
        except CollectiveMismatch:
            return str(error)
        return "second call did not raise"


MAILBOX_ON, MAILBOX_OFF = {"MPNN_MAILBOX": "1"}, {"MPNN_MAILBOX": "0"}  # small all-reduces: shared memory or sockets


@pytest.mark.parametrize("env", [MAILBOX_OFF, MAILBOX_ON], ids=["sockets", "mailbox"])
def test_different_ops_fail_at_once_naming_both_ranks(env):
    outcomes = values(run_world(op_mismatch_worker, 3, comm_timeout=TIMEOUT * 5, env=env))
    for name, message, elapsed, _ranks, later in outcomes:
        assert name == "CollectiveMismatch", message
        assert "broadcast(float32, shape (10,), root=0)" in message and "allreduce(float32, shape (10,)" in message
        assert "rank 1" in message and ("rank 0" in message or "rank 2" in message)
        assert elapsed < TIMEOUT, f"took {elapsed:.1f} s: the mismatch was not detected at once"
        assert later == "CollectiveMismatch"  # the communicator stays failed with the first error


@pytest.mark.parametrize(
    "big,env", [(False, MAILBOX_OFF), (False, MAILBOX_ON), (True, {})], ids=["small-sockets", "small-mailbox", "big"]
)
def test_different_shapes_fail_at_once_naming_both_ranks(big, env):
    outcomes = values(run_world(shape_mismatch_worker, 2, (big,), comm_timeout=TIMEOUT * 5, env=env))
    sizes = (300_000, 300_002) if big else (10, 12)
    for rank, (name, message, elapsed, ranks, _later) in enumerate(outcomes):
        assert name == "CollectiveMismatch" and sorted(ranks) == [0, 1], message
        assert f"shape ({sizes[0]},)" in message and f"shape ({sizes[1]},)" in message, message
        assert f"rank {rank} called" in message and elapsed < TIMEOUT


def test_async_mismatch_raises_in_wait_and_after():
    for message in values(run_world(async_mismatch_worker, 2)):
        assert "collective mismatch" in message and "shape (5,)" in message and "shape (6,)" in message


def sleeper_worker(comm, sleeper, seconds, size=50_000):
    if comm.rank == sleeper:
        time.sleep(seconds)
    return _outcome(comm, lambda: comm.allreduce(np.ones(size, np.float32)))


@pytest.mark.parametrize("size,env", [(50_000, {}), (10, MAILBOX_ON)], ids=["shared-slots", "mailbox"])
def test_silent_rank_is_named_within_the_timeout(size, env):
    outcomes = values(run_world(sleeper_worker, 3, (1, 2 * TIMEOUT + 0.5, size), comm_timeout=TIMEOUT, env=env))
    for rank in (0, 2):
        name, message, elapsed, silent, later = outcomes[rank]
        assert name == "CommTimeout" and silent == 1, message
        assert message.startswith("rank 1 is silent"), message
        assert TIMEOUT <= elapsed < 1.5 * TIMEOUT + 1.0, f"rank {rank} gave up after {elapsed:.1f} s"
    assert outcomes[1][0] in ("CommTimeout", "CommError")  # the sleeper learns of the abort when it wakes


def dead_rank_worker(comm):
    if comm.rank == 1:
        comm.barrier()
        os._exit(3)  # dies without closing anything
    # Rank 1 may die before ZeroMQ's I/O thread sent its last barrier message (seen on a loaded machine): then rank 0
    # is still in the barrier when it learns rank 1 is gone, which must fail as cleanly as the all-reduce after it.
    return _outcome(comm, lambda: (comm.barrier(), comm.allreduce(np.ones(10, np.float32))))


@pytest.mark.parametrize("env", [MAILBOX_OFF, MAILBOX_ON], ids=["sockets", "mailbox"])
def test_dead_rank_is_named_within_the_timeout(env):
    results = run_world(dead_rank_worker, 2, comm_timeout=TIMEOUT, env=env)
    assert results[0].error is None, results[0].error
    name, message, elapsed, silent, _ = results[0].value
    assert name == "CommTimeout" and silent == 1 and "rank 1" in message
    assert elapsed < 1.5 * TIMEOUT + 1.0
    assert results[1].error is not None  # exited without reporting


def foreign_data_worker(comm):
    """Rank 0 attacks rank 1's data port with a NULL, a wrong-password PLAIN and an unknown-key CURVE client,
    each sending frames forged to look like rank 0's next all-reduce; the world must not see them."""
    from mpnn.comm import frames

    endpoints = comm.allgather_object(comm.endpoint)
    events = {}
    if comm.rank == 0:
        context = zmq.Context()
        clients = {
            "null": context.socket(zmq.PUSH),
            "plain": context.socket(zmq.PUSH),
            "curve": context.socket(zmq.PUSH),
        }
        clients["plain"].plain_username, clients["plain"].plain_password = b"mpnn", b"guessed"
        public, secret = zmq.curve_keypair()
        clients["curve"].curve_publickey, clients["curve"].curve_secretkey = public, secret
        clients["curve"].curve_serverkey = comm._security._keys[1][0] if comm.encrypt else zmq.curve_keypair()[0]
        monitors = {name: sock.get_monitor_socket() for name, sock in clients.items()}
        forged_call = frames.Call(
            frames.ALLREDUCE, frames.REDUCE_CODES["sum"], frames.DTYPE_CODES[np.dtype("float32")], (1000,)
        )
        forged = frames.pack(frames.KIND_DATA, forged_call, 0, 0, comm._seq + 2, frames.run_tag(comm.run_id))
        for sock in clients.values():
            sock.linger = 0
            sock.connect(endpoints[1])
            for _ in range(3):
                sock.send_multipart([forged, np.full(1000, 1e6, np.float32).tobytes()], zmq.NOBLOCK)
        poller = zmq.Poller()
        for monitor in monitors.values():
            poller.register(monitor, zmq.POLLIN)
        events = {name: [] for name in monitors}
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            for monitor, _ in poller.poll(50):
                name = next(key for key, value in monitors.items() if value is monitor)
                event = recv_monitor_message(monitor)["event"]
                events[name].append(getattr(event, "name", str(event)))
        context.destroy(linger=0)
    comm.barrier()
    a = np.full(1000, comm.rank + 1.0, np.float32)
    comm.allreduce(a)
    b = np.full(100_000, comm.rank + 1.0, np.float32)
    comm.allreduce(b, "max")
    return {"events": events, "ok": bool(np.all(a == 3.0) and np.all(b == 2.0))}


@pytest.mark.parametrize("encrypt", ["0", "1"])
def test_strangers_on_the_data_port_are_refused(encrypt):
    reports = values(run_world(foreign_data_worker, 2, env={"MPNN_TRANSPORT": "tcp", "MPNN_ENCRYPT": encrypt}))
    assert all(report["ok"] for report in reports)
    for name, events in reports[0]["events"].items():
        assert "HANDSHAKE_SUCCEEDED" not in events, (name, events)
        assert any(event.startswith("HANDSHAKE_FAILED") for event in events), (name, events)
    if encrypt == "0":
        assert "HANDSHAKE_FAILED_AUTH" in reports[0]["events"]["plain"]  # the ZAP handler said no


class _Booby:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _attack_rendezvous(address, run_id, marker, log):
    """A stranger (no keys, or a made-up CURVE key) and an insider holding rank 1's rendezvous key (derived from
    the secret) send junk, a pickled HELLO, a HELLO, forged and replayed proofs and an oversized frame."""
    from mpnn.comm.auth import rendezvous_keypair
    from mpnn.comm.secret import read_secret

    secret = read_secret(os.environ["MPNN_SECRET_FILE"])
    context = zmq.Context()
    try:

        def dealer(keys):
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            if keys is not None:
                sock.curve_publickey, sock.curve_secretkey = keys
                sock.curve_serverkey = rendezvous_keypair(secret, run_id, 0)[0]  # even knowing rank 0's public key
            sock.connect(address)
            return sock

        def exchange(sock, *parts):
            try:
                sock.send_multipart(list(parts), zmq.NOBLOCK)
            except zmq.Again:
                return "not sent"  # no connection completed its handshake: nothing can be sent
            return sock.recv_multipart() if sock.poll(2000) else None

        nonce = os.urandom(32).hex()
        hello = json.dumps({"rank": 1, "run": run_id, "nonce": nonce}).encode()
        info = json.dumps({"rank": 1, "host": "evil", "ipc": "ipc:///tmp/evil", "tcp": None, "shm": None}).encode()
        strangers = {"null": dealer(None), "curve": dealer(zmq.curve_keypair())}
        time.sleep(0.5)  # time for their handshakes to fail
        for name, sock in strangers.items():
            log[f"{name} hello"] = exchange(sock, b"HELLO", hello)
            log[f"{name} pickle"] = exchange(sock, b"HELLO", pickle.dumps(_Booby(marker)))
        insider = dealer(rendezvous_keypair(secret, run_id, 1))
        log["junk"] = exchange(insider, b"\x00junk\xff")
        log["pickle"] = exchange(insider, b"HELLO", pickle.dumps(_Booby(marker)))
        log["hello"] = exchange(insider, b"HELLO", hello)
        log["proof"] = exchange(insider, b"PROOF", info, b"\x00" * 32)
        log["replay"] = exchange(insider, b"PROOF", info, b"\x00" * 32)
        log["oversized"] = exchange(dealer(rendezvous_keypair(secret, run_id, 1)), b"HELLO", b"x" * 200_000)
    finally:
        context.destroy(linger=0)
        with open(marker + ".done", "w"):
            pass  # rank 1 may join now


def rendezvous_attack_worker(marker):
    from mpnn.comm import init_from_env

    log = {}
    if int(os.environ["MPNN_RANK"]) == 1:
        end = time.monotonic() + 60
        while not os.path.exists(marker + ".done") and time.monotonic() < end:
            time.sleep(0.05)  # the attackers get the rendezvous to themselves first
    else:
        attacker = threading.Thread(
            target=_attack_rendezvous,
            daemon=True,
            args=(os.environ["MPNN_RENDEZVOUS"], os.environ["MPNN_RUN_ID"], marker, log),
        )
        time.sleep(0.2)
        attacker.start()
    comm = init_from_env()
    a = np.full(7, comm.rank + 1.0)
    comm.allreduce(a)
    comm.close()
    if comm.rank == 0:
        attacker.join()
    return {
        "log": {key: [part[:60] for part in reply] if isinstance(reply, list) else reply for key, reply in log.items()},
        "ok": bool(np.all(a == 3.0)),
    }


def test_strangers_at_the_rendezvous_are_refused(tmp_path):
    """Strangers fail the rendezvous's CURVE handshake: nothing they send is taken in, let alone answered. A holder
    of a rank's key (that is, of the secret) reaches the protocol, where junk, pickles and bad proofs are refused."""
    marker = str(tmp_path / "unpickled")
    reports = values(run_world(rendezvous_attack_worker, 2, (marker,), init=False, comm_timeout=60.0))
    assert all(report["ok"] for report in reports)
    log = reports[0]["log"]
    for stranger in ("null", "curve"):
        assert {log[f"{stranger} hello"], log[f"{stranger} pickle"]} <= {"not sent", None}, log  # never answered
    assert log["junk"][0] == b"DENIED" and log["pickle"] == [b"DENIED", b"malformed HELLO"]
    assert log["hello"][0] == b"CHALLENGE"  # a key holder may ask; only the secret answers the challenge
    assert log["proof"][0] == b"DENIED" and b"bad proof" in log["proof"][1]
    assert log["replay"][0] == b"DENIED"
    assert log["oversized"] is None  # dropped by MAXMSGSIZE
    assert not os.path.exists(marker)


def wrong_secret_worker():
    from mpnn.comm import init_from_env

    try:
        init_from_env()
    except CommError as error:
        return type(error).__name__, str(error)
    return "joined", ""


def test_rank_with_the_wrong_secret_is_turned_away(tmp_path):
    other = tmp_path / "other-secret"
    other.write_text(os.urandom(32).hex())
    other.chmod(0o600)
    results = values(
        run_world(
            wrong_secret_worker, 2, init=False, comm_timeout=TIMEOUT, rank_env={1: {"MPNN_SECRET_FILE": str(other)}}
        )
    )
    assert results[1][0] == "AuthError" and "could not prove it holds the run's secret" in results[1][1]
    assert results[0][0] == "CommTimeout" and "rank(s) [1] did not join" in results[0][1]


def leftovers_worker(comm):
    comm.allreduce(np.ones(100_000, np.float32))
    return {"ipc": comm._ipc_dir, "shm": comm._slots.path if comm._slots else None}


def test_nothing_is_left_behind():
    reports = values(run_world(leftovers_worker, 3))
    assert all(report["shm"] for report in reports)  # the shared-memory path was on
    for report in reports:
        assert not os.path.exists(report["ipc"]) and not os.path.exists(report["shm"])


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "srun"])
def test_foreign_launchers_on_one_host_get_a_temporary_secret(launcher):
    reports = values(run_world(foreign_launcher_worker, 2, launcher=launcher))
    assert [report[:3] for report in reports] == [(0, 2, 0), (1, 2, 1)]
    assert all(report[3] == 3.0 for report in reports)
    assert not any(os.path.exists(report[4]) for report in reports)


def foreign_launcher_worker(comm):
    from mpnn.comm import spec_from_env
    from mpnn.comm.secret import temp_secret_path

    a = np.full(3, comm.rank + 1.0)
    comm.allreduce(a)
    comm.barrier()
    return comm.rank, comm.world_size, comm.local_rank, float(a[0]), temp_secret_path(spec_from_env().run_id)
