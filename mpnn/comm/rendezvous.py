"""Rendezvous: rank 0 serves a ROUTER at MPNN_RENDEZVOUS; each other rank proves it holds the secret, then
hands in its data endpoints and receives the table of everyone's.

    rank r -> 0:  HELLO  {"rank", "run", "nonce": client nonce}
    0 -> rank r:  CHALLENGE  server nonce, HMAC(secret, "server" | client nonce | r | run id)
    rank r -> 0:  PROOF  info JSON, HMAC(secret, "client" | server nonce | r | run id | info JSON)
    0 -> rank r:  TABLE  table JSON, HMAC(secret, "table" | client nonce | r | run id | table JSON)
                  or DENIED reason / FAILED reason
Both sides prove the secret; only JSON is parsed (never pickle), and only after its MAC checks out, except
the small HELLO. Underneath, the ROUTER is a CURVE server behind the ZAP handler (auth.py): it admits only the
keys of ranks 1..n-1, derived from the secret, and rank r's messages carry user id r. A stranger fails the CURVE
handshake (it cannot know rank 0's public key) before ZeroMQ takes in a single message from it, so floods of
connections, HELLOs or many-frame messages cost rank 0 no memory; a joining rank can never be evicted by them.
Messages are read frame by frame and anything over MAX_PARTS frames or MAX_REQUEST_BYTES bytes is dropped
unread (ZeroMQ's maxmsgsize bounds frames, not messages). Each rank has at most one pending join: a newer HELLO
with the same rank's key (only a holder of the secret has it) replaces the older, which is told so, by address.
"""

import json
import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from .auth import mac, rendezvous_keypair, verify
from .errors import AuthError, CommError, CommTimeout

NONCE_BYTES = 32
MAX_REQUEST_BYTES = 64 * 1024  # per message, all its frames together (and per frame: maxmsgsize)
MAX_PARTS = 3  # frames of the longest request (PROOF, info, proof) after the ROUTER's identity frame
HANDSHAKE_FAILURES = 3  # failed CURVE handshakes with rank 0 after which a joining rank gives up
SECRET_RETRY_S = 0.25  # how often a joining rank that may hold a stale secret file reads it again
BACKLOG = 1024  # pending TCP connections (ZeroMQ's default, 100, let a burst of strangers' connects fill the
# listen queue: the kernel then drops SYNs, a joining rank's too, and its connect waits 1, 3, 7 s... to be retried)


def _seconds_left(deadline):
    return max(0.0, deadline - time.monotonic())


def serve(context, address, run_id, world_size, secret, own_info, deadline, security):
    """Rank 0: admit ranks 1..n-1 once each proves the secret; return (table, router). The caller closes the
    router after the first barrier, so every rank surely received the table. `security` (auth.DataSocketSecurity,
    its ZAP handler started) makes the ROUTER a CURVE server admitting only the ranks' keys."""
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.maxmsgsize = MAX_REQUEST_BYTES
    router.backlog = BACKLOG
    security.make_rendezvous_server(router)
    try:
        router.bind(address)
    except zmq.ZMQError as error:
        router.close()
        raise CommError(
            f"rank 0 cannot serve the rendezvous at {address}: {error} (set MPNN_RENDEZVOUS to tcp://HOST:<free port>)"
        ) from None
    pending = {}  # rank -> (router identity, client nonce, server nonce, peer address): one join per rank
    joined = {0: (None, None, own_info)}  # rank -> (identity, client nonce, info)
    try:
        while len(joined) < world_size:
            if not router.poll(_seconds_left(deadline) * 1000):
                missing = sorted(set(range(world_size)) - set(joined))
                message = (
                    f"rendezvous at {address}: rank(s) {missing} did not join within the timeout "
                    f"(ranks {sorted(joined)} did)"
                )
                for identity, _, _ in list(joined.values())[1:]:
                    router.send_multipart([identity, b"FAILED", message.encode()])
                raise CommTimeout(message, silent_rank=missing[0])
            identity, request, sender, address_of = _read_request(router)
            if request is None:
                continue  # over the frame or byte cap: dropped unread, unanswered
            reply = _handle(request, identity, sender, address_of, pending, joined, run_id, world_size, secret)
            for target, frames in reply:
                router.send_multipart([target, *frames])
        table = json.dumps([joined[rank][2] for rank in range(world_size)]).encode()
        for rank in range(1, world_size):
            identity, client_nonce, _ = joined[rank]
            router.send_multipart([identity, b"TABLE", table, mac(secret, b"table", client_nonce, rank, run_id, table)])
    except BaseException:
        router.close()
        raise
    return json.loads(table), router


def _read_request(router):
    """One message from the ROUTER, read frame by frame: (identity, request frames ([] when over MAX_PARTS frames,
    None when over MAX_REQUEST_BYTES bytes), the sender's rank from its CURVE user id or None, its peer address)."""
    first = router.recv(copy=False)
    identity = first.bytes
    try:
        sender = int(first.get("User-Id"))
    except (zmq.ZMQError, ValueError, TypeError):
        sender = None
    try:
        address = first.get("Peer-Address")
    except zmq.ZMQError:
        address = "an unknown address"
    request, size, parts = [], 0, 0
    while router.getsockopt(zmq.RCVMORE):
        frame = router.recv(copy=False)
        size, parts = size + len(frame.buffer), parts + 1
        if parts <= MAX_PARTS and size <= MAX_REQUEST_BYTES:
            request.append(frame.bytes)
        else:
            request = []  # the rest is read and dropped, frame by frame: nothing of it is kept
    if size > MAX_REQUEST_BYTES:
        return identity, None, sender, address  # as an oversized frame: dropped, unanswered
    return identity, request, sender, address  # [] (too many frames) is answered "unexpected request"


def _handle(request, identity, sender, address, pending, joined, run_id, world_size, secret):
    """One request from the ROUTER: returns [(identity, reply frames), ...] (empty to stay silent)."""
    if len(request) == 2 and request[0] == b"HELLO":
        try:
            hello = json.loads(request[1])
            rank, client_nonce = int(hello["rank"]), bytes.fromhex(hello["nonce"])
            run = str(hello["run"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):  # Infinity; "[[[[..." 64 KB deep
            return [(identity, [b"DENIED", b"malformed HELLO"])]
        if run != run_id:
            return [(identity, [b"DENIED", f"this rendezvous serves run {run_id!r}, not {run!r}".encode()])]
        if not 0 < rank < world_size or len(client_nonce) != NONCE_BYTES:
            denial = f"rank must be in 1..{world_size - 1} with a {NONCE_BYTES}-byte nonce"
            return [(identity, [b"DENIED", denial.encode()])]
        if sender != rank:
            return [(identity, [b"DENIED", f"this connection holds rank {sender}'s key, not rank {rank}'s".encode()])]
        replies = []
        older = pending.get(rank)
        if older is not None and older[0] != identity:  # only a holder of the secret (rank's key) gets here
            notice = (
                f"the rendezvous is flooded by connections from {address}: a newer join as rank {rank} from there "
                f"replaced this one (it holds rank {rank}'s key: only a holder of the run's secret does)"
            )
            replies.append((older[0], [b"DENIED", notice.encode()]))
        server_nonce = os.urandom(NONCE_BYTES)
        pending[rank] = (identity, client_nonce, server_nonce, address)
        replies.append((identity, [b"CHALLENGE", server_nonce, mac(secret, b"server", client_nonce, rank, run_id)]))
        return replies
    if len(request) == 3 and request[0] == b"PROOF":
        rank = next((r for r, entry in pending.items() if entry[0] == identity), None)
        if rank is None:
            return [(identity, [b"DENIED", b"PROOF without a pending HELLO on this connection"])]
        _, client_nonce, server_nonce, _ = pending.pop(rank)
        info_json, proof = request[1], request[2]
        if not verify(mac(secret, b"client", server_nonce, rank, run_id, info_json), proof):
            return [(identity, [b"DENIED", b"bad proof: this process does not hold the run's secret"])]
        if rank in joined:
            return [(identity, [b"DENIED", f"rank {rank} has already joined this world".encode()])]
        info = json.loads(info_json)
        joined[rank] = (identity, client_nonce, info)
        return []
    return [(identity, [b"DENIED", b"unexpected request (neither a HELLO nor a PROOF)"])]


def join(context, address, rank, run_id, load_secret, reload_secret, prepare, deadline):
    """Rank r > 0: prove the secret to rank 0, hand in `prepare(secret)` (this rank's endpoint info) and return
    (secret, table). With reload_secret the secret file is re-read until it matches rank 0's (a stale file
    from an earlier run may be read before rank 0 replaces it): the CURVE keys, and so the connection, follow it."""
    secret = load_secret()
    client_nonce = os.urandom(NONCE_BYTES)
    hello = json.dumps({"rank": rank, "run": run_id, "nonce": client_nonce.hex()}).encode()
    link = _Dealer(context, address, rank, run_id, secret)
    try:
        link.send([b"HELLO", hello])
        while True:  # the CHALLENGE, once the CURVE handshake with rank 0 succeeds
            slice_end = min(deadline, time.monotonic() + SECRET_RETRY_S) if reload_secret else deadline
            reply = _receive(link, address, rank, slice_end, b"CHALLENGE", 3, final=slice_end >= deadline)
            if reply is not None:
                break
            newer = load_secret()
            if newer != secret:  # rank 0 replaced a stale secret file: start over with the new keys
                secret = newer
                link.close()
                link = _Dealer(context, address, rank, run_id, secret)
                link.send([b"HELLO", hello])
        server_nonce, server_proof = reply[1], reply[2]
        if not verify(mac(secret, b"server", client_nonce, rank, run_id), server_proof):
            raise AuthError(
                f"the rendezvous at {address} (rank 0) could not prove it holds the run's secret: "
                "the ranks read different secret files, or a foreign process holds that port"
            )
        info_json = json.dumps(prepare(secret)).encode()
        link.send([b"PROOF", info_json, mac(secret, b"client", server_nonce, rank, run_id, info_json)])
        reply = _receive(link, address, rank, deadline, b"TABLE", 3)
        if not verify(mac(secret, b"table", client_nonce, rank, run_id, reply[1]), reply[2]):
            raise AuthError(f"rank {rank} received a peer table from {address} that is not signed with the secret")
        return secret, json.loads(reply[1])
    finally:
        link.close()


class _Dealer:
    """A joining rank's DEALER to the rendezvous: a CURVE client with this rank's key that trusts only rank 0's
    key (both derived from `secret`), watched by a monitor so that failed handshakes can be told from silence."""

    def __init__(self, context, address, rank, run_id, secret):
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.maxmsgsize = 64 * 1024 * 1024
        self.sock.curve_publickey, self.sock.curve_secretkey = rendezvous_keypair(secret, run_id, rank)
        self.sock.curve_serverkey = rendezvous_keypair(secret, run_id, 0)[0]
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | _FAILED_EVENTS)
        self.failed = 0
        self.sock.connect(address)

    def send(self, frames):
        self.sock.send_multipart(frames)

    def poll(self, timeout_s):
        """True when a reply is ready within `timeout_s`; counts failed handshakes meanwhile."""
        end = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            events = dict(poller.poll(max(0.0, end - time.monotonic()) * 1000))
            if self.monitor in events:
                while self.monitor.poll(0):
                    recv_monitor_message(self.monitor)
                    self.failed += 1
            if self.sock in events:
                return True
            if time.monotonic() >= end or self.failed >= HANDSHAKE_FAILURES:
                return False

    def close(self):
        self.sock.disable_monitor()
        self.monitor.close()
        self.sock.close()


_FAILED_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH


def _receive(link, address, rank, deadline, expected, length, final=True):
    """Wait for the `expected` reply from rank 0; DENIED/FAILED replies, failed handshakes and silence become errors.
    With final=False, silence and failed handshakes until `deadline` return None instead (the caller retries)."""
    while True:
        if not link.poll(_seconds_left(deadline)):
            if link.failed >= HANDSHAKE_FAILURES and final:
                raise AuthError(
                    f"the rendezvous at {address} (rank 0) could not prove it holds the run's secret: rank {rank}'s "
                    f"CURVE handshake with it failed {link.failed} times (the ranks read different secret files, "
                    "or a foreign process holds that port)"
                )
            if not final:
                link.failed = 0
                return None
            raise CommTimeout(
                f"rank {rank} got no {expected.decode()} from the rendezvous at {address} (rank 0) "
                "within the timeout: rank 0 is not up, or another rank has not joined",
                silent_rank=0,
            )
        reply = link.sock.recv_multipart()
        if reply[0] == b"DENIED" and len(reply) == 2:
            raise AuthError(
                f"rank {rank} was refused by the rendezvous at {address}: {reply[1].decode('utf-8', 'replace')}"
            )
        if reply[0] == b"FAILED" and len(reply) == 2:
            raise CommTimeout(reply[1].decode("utf-8", "replace"))
        if reply[0] == expected and len(reply) == length:
            return reply
