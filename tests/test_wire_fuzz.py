"""Bad input on the wire: hypothesis throws random bytes, truncated and mutated frames, oversize lengths and random
multipart messages at a live 2-rank world's rendezvous and data ports while it runs collectives; the workers turn
it away, never crash or hang, and every collective is still right. The frame parser itself is fuzzed in-process
with what only an authenticated peer could deliver: it raises CommError or accepts, nothing else. Frames state
their byte order: the header is little-endian, payload dtypes are little-endian, a big-endian array is refused."""

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from commworld import free_port, run_world, values
from mpnn.comm import CommError, Communicator, frames
from mpnn.comm.auth import DataSocketSecurity
from mpnn.comm.transport import RingLink

FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00"  # signature + version 3.0: the peer starts a handshake
# A whole NULL-mechanism greeting, then a long command frame announcing 2**63 - 1 bytes: an oversize length.
OVERSIZE = ZMTP_GREETING + b"NULL".ljust(20, b"\x00") + bytes(32) + b"\x06" + (2**63 - 1).to_bytes(8, "big") + bytes(64)
RUN_ID = "fuzz-run"


def valid_header(call, seq=1, sender=0, kind=frames.KIND_DATA, run_id=RUN_ID):
    return frames.pack(kind, call, sender, sender, seq, frames.run_tag(run_id))


calls = st.builds(
    frames.Call,
    op=st.integers(0, 255),
    reduce=st.integers(0, 255),
    dtype=st.integers(0, 255),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6).map(tuple),
    root=st.integers(0, 2**32 - 1),
)


@st.composite
def hostile_headers(draw):
    """Random bytes, or a valid header (of a random or plausible call) truncated, extended or with bytes flipped."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    call = draw(st.one_of(calls, st.just(frames.Call(frames.ALLREDUCE, 1, 2, (10,)))))
    header = bytearray(
        valid_header(
            call, seq=draw(st.integers(0, 3)), sender=draw(st.integers(0, 2**32 - 1)), kind=draw(st.integers(0, 255))
        )
    )
    for _ in range(draw(st.integers(0, 4))):
        header[draw(st.integers(0, len(header) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(header) + 16))
    return bytes(header[:cut]) + draw(st.binary(max_size=16)) if cut > len(header) else bytes(header[:cut])


@pytest.fixture(scope="module")
def link():
    """Rank 1's edge of a 2-rank ring, never connected: frames are put straight into its read-ahead stash."""
    context = zmq.Context()
    security = DataSocketSecurity(os.urandom(32), RUN_ID, 2)
    ring_link = RingLink(context, 1, 2, RUN_ID, 0.2, security)
    yield ring_link
    ring_link.close()
    context.term()


@FUZZ
@given(header=hostile_headers(), payload=st.binary(max_size=64))
def test_frame_parser_accepts_or_raises_comm_error(link, header, payload):
    decoded = frames.unpack(header)
    assert decoded is None or isinstance(decoded, frames.Header)
    expected_call = frames.Call(frames.ALLREDUCE, 1, 2, (10,))
    link.begin(expected_call, 1)
    link._stash.clear()
    link._stash.append((header, zmq.Frame(payload)))
    buf = np.zeros(10, np.float32)
    try:
        link.recv_into(buf)
    except CommError as error:
        assert str(error)
    else:  # only rank 0's exact frame of this collective, with a payload of exactly the right size, is taken in
        assert header == valid_header(expected_call) and len(payload) == buf.nbytes


def test_header_and_payloads_are_little_endian():
    call = frames.Call(frames.ALLREDUCE, 1, frames.DTYPE_CODES[np.dtype("float32")], (3, 70000))
    header = frames.pack(frames.KIND_DATA, call, 258, 259, 2**40 + 5, frames.run_tag(RUN_ID))
    fields = frames.FIXED.size
    assert header[12:16] == (258).to_bytes(4, "little") and header[16:20] == (259).to_bytes(4, "little")
    assert header[24:32] == (2**40 + 5).to_bytes(8, "little")
    assert header[fields + 8 : fields + 16] == (70000).to_bytes(8, "little", signed=True)
    assert all(dtype.str[0] in "<|" for dtype in frames.DTYPES)  # "<f4" on any host; "|u1" has no order
    with pytest.raises(TypeError, match=">f4"):
        Communicator().allreduce(np.ones(3, ">f4"))


# -- a live world under fire ---------------------------------------------------------------------------------
def fuzzed_world_worker(shared):
    """Rank 1 joins only once the rendezvous fuzzing is over; then both ranks publish their data endpoints and run
    checked collectives until the test says stop (rank 0 broadcasts the decision, so both stop together)."""
    from mpnn.comm import init_from_env

    shared = Path(shared)
    rank = int(os.environ["MPNN_RANK"])
    if rank == 1:
        end = time.monotonic() + 60
        while not (shared / "join").exists() and time.monotonic() < end:
            time.sleep(0.02)
    comm = init_from_env()
    (shared / f"endpoint-{rank}.tmp").write_text(comm.endpoint)
    os.replace(shared / f"endpoint-{rank}.tmp", shared / f"endpoint-{rank}")
    rounds, wrong = 0, []
    stop = np.zeros(1, np.int64)
    end = time.monotonic() + 60
    while not stop[0]:
        rounds += 1
        for size in (100, 50_000):  # the small-array path and the ring's reduce-scatter + all-gather
            a = np.arange(size, dtype=np.float32) * (comm.rank + 1)
            comm.allreduce(a)
            if not np.array_equal(a, np.arange(size, dtype=np.float32) * 3):
                wrong.append(f"allreduce of {size} in round {rounds}")
        if comm.allgather_object((comm.rank, rounds)) != [(0, rounds), (1, rounds)]:
            wrong.append(f"allgather_object in round {rounds}")
        stop[0] = comm.rank == 0 and ((shared / "stop").exists() or time.monotonic() > end)
        comm.broadcast(stop, root=0)
    comm.close()
    return rounds, wrong


def _wait_for(predicate, what, timeout=30.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _raw_tcp(port, data):
    """Connect, write `data` (the peer may hang up midway), close."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass


def _hello(rank=1, run=RUN_ID, nonce=None):
    return json.dumps({"rank": rank, "run": run, "nonce": (nonce or os.urandom(32)).hex()}).encode()


NASTY_HELLOS = [  # JSON that parses but breaks naive checks: int(inf) overflows, deep nesting recurses
    b'{"rank": Infinity, "run": "fuzz-run", "nonce": "00"}',
    b"[" * 60_000,
    b'{"rank": NaN}',
    b'[1, "x"]',
]
rendezvous_messages = st.one_of(
    st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    st.tuples(
        st.just(b"HELLO"),
        st.one_of(
            st.binary(max_size=300),
            st.builds(
                _hello,
                rank=st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5), st.none()),
                run=st.one_of(st.just(RUN_ID), st.text(max_size=10)),
                nonce=st.binary(max_size=40),
            ),
            st.builds(
                lambda data: json.dumps(data).encode(),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: (
                        st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(["rank", "run", "nonce"]), inner, max_size=3)
                    ),
                    max_leaves=8,
                ),
            ),
        ),
    ).map(list),
    st.tuples(st.just(b"PROOF"), st.binary(max_size=200), st.binary(max_size=40)).map(list),
)


def _fuzz_rendezvous(context, port, secret):
    """Fuzz the rendezvous protocol as a holder of rank 1's CURVE key (strangers fail the handshake before any
    message is taken in, so only a key holder reaches the parser; the raw TCP bytes come from strangers)."""
    from mpnn.comm.auth import rendezvous_keypair

    address = f"tcp://127.0.0.1:{port}"
    client_keys, server_key = rendezvous_keypair(secret, RUN_ID, 1), rendezvous_keypair(secret, RUN_ID, 0)[0]

    @FUZZ
    @given(message=rendezvous_messages, raw=st.binary(max_size=512), greet=st.booleans(), hello_first=st.booleans())
    @example(message=[b"HELLO", NASTY_HELLOS[0]], raw=b"", greet=True, hello_first=False)
    @example(message=[b"HELLO", NASTY_HELLOS[1]], raw=b"", greet=False, hello_first=True)
    @example(message=[b"HELLO", NASTY_HELLOS[2]], raw=b"", greet=False, hello_first=False)
    @example(message=[b"HELLO", NASTY_HELLOS[3]], raw=b"", greet=False, hello_first=False)
    @example(message=[b"HELLO", b"x" * 200_000], raw=b"", greet=False, hello_first=True)
    @example(message=[b"HELLO", _hello()], raw=OVERSIZE, greet=False, hello_first=False)
    def fuzz(message, raw, greet, hello_first):
        _raw_tcp(port, (ZMTP_GREETING if greet else b"") + raw)
        dealer = context.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.curve_publickey, dealer.curve_secretkey = client_keys
        dealer.curve_serverkey = server_key
        dealer.connect(address)
        try:
            if hello_first:  # a real CHALLENGE first, so the PROOF path (pending identity) is reached too
                dealer.send_multipart([b"HELLO", _hello()])
                assert dealer.poll(5000), "rank 0's rendezvous stopped answering"
                assert dealer.recv_multipart()[0] == b"CHALLENGE"
            dealer.send_multipart(message)
            oversize = sum(map(len, message)) > 64 * 1024
            answered = dealer.poll(500 if oversize else 5000)
            assert answered != oversize, f"answered={answered} to a message of {sum(map(len, message))} bytes"
            if answered:
                assert dealer.recv_multipart()[0] in (b"DENIED", b"CHALLENGE")
        finally:
            dealer.close()

    fuzz()


def _fuzz_data_ports(context, endpoints):
    ports = [int(endpoint.rsplit(":", 1)[1]) for endpoint in endpoints]
    guessed_password = os.urandom(32).hex().encode()  # the shape of the real one (64 hex digits), not its value

    @FUZZ
    @given(
        target=st.sampled_from(ports),
        raw=st.binary(max_size=512),
        greet=st.booleans(),
        mechanism=st.sampled_from(["null", "plain", "curve"]),
        parts=st.lists(st.one_of(hostile_headers(), st.binary(max_size=2048)), min_size=1, max_size=4),
    )
    @example(target=ports[0], raw=OVERSIZE, greet=False, mechanism="plain", parts=[b"x" * 200_000])
    @example(target=ports[1], raw=OVERSIZE, greet=False, mechanism="null", parts=[OVERSIZE])
    def fuzz(target, raw, greet, mechanism, parts):
        _raw_tcp(target, (ZMTP_GREETING if greet else b"") + raw)
        push = context.socket(zmq.PUSH)
        push.linger = 0
        if mechanism == "plain":
            push.plain_username, push.plain_password = b"mpnn", guessed_password
        elif mechanism == "curve":
            push.curve_publickey, push.curve_secretkey = zmq.curve_keypair()
            push.curve_serverkey = zmq.curve_keypair()[0]
        push.connect(f"tcp://127.0.0.1:{target}")
        try:
            push.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            pass
        time.sleep(0.02)  # long enough for the handshake to be tried and refused
        push.close()

    fuzz()


def test_fuzzed_ports_leave_a_running_world_correct():
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mpnn-fuzz-") as shared:
        shared_dir = Path(shared)
        outcome = {}
        secret_file = shared_dir / "secret"
        secret = os.urandom(32)
        secret_file.write_text(secret.hex())
        secret_file.chmod(0o600)
        env = {"MPNN_TRANSPORT": "tcp", "MPNN_RENDEZVOUS": f"tcp://127.0.0.1:{port}", "MPNN_RUN_ID": RUN_ID}
        env["MPNN_SECRET_FILE"] = str(secret_file)
        world = threading.Thread(
            target=lambda: outcome.update(
                results=run_world(fuzzed_world_worker, 2, (shared,), init=False, comm_timeout=30, deadline=90, env=env)
            ),
            daemon=True,
        )
        world.start()
        context = zmq.Context()
        try:
            _wait_for(lambda: _port_open(port), "rank 0's rendezvous")
            _fuzz_rendezvous(context, port, secret)
            (shared_dir / "join").touch()
            _wait_for(lambda: all((shared_dir / f"endpoint-{r}").exists() for r in (0, 1)), "the world to form")
            endpoints = [(shared_dir / f"endpoint-{r}").read_text() for r in (0, 1)]
            _fuzz_data_ports(context, endpoints)
        finally:
            (shared_dir / "join").touch()  # on a failed assertion too: every rank gets to its end
            (shared_dir / "stop").touch()
            context.destroy(linger=0)
            world.join(timeout=150)
        assert not world.is_alive()
        for rounds, wrong in values(outcome["results"]):
            assert rounds >= 2 and wrong == []
