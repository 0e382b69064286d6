"""Proofs and socket credentials derived from the run's secret (HMAC-SHA256), and the ZAP gate on data sockets.

Rendezvous: challenge-response with HMAC(secret, label || nonce || rank || run id), both directions.
Data sockets: every connection is authenticated per edge, not with a login shared by all ranks. Rank r's PULL
admits exactly one peer, its ring predecessor p = (r - 1) % n, through this process's own ZAP handler:
- CURVE (encrypt=True): each rank's keypair is derived from the secret; rank r admits only p's public key, so
  nobody else (another rank included) can feed it, and every (re)connection runs a fresh CURVE handshake.
- PLAIN (the default, "no confidentiality" but never "no authentication"): rank r draws a fresh random edge
  nonce when it binds and announces it over the authenticated rendezvous; p connects once with the one-time
  proof HMAC(secret, "mpnn-edge" | run id | p | r | nonce) as its PLAIN password. The ZAP handler admits that
  proof once and never again, and p's PUSH never reconnects (reconnect_ivl -1): a proof is bound to the run,
  both ranks and this socket's life, so one captured (by whoever binds a dead rank's port) opens nothing. A
  dropped connection is not re-made: the next collective times out naming the rank, as for a dead one.
No reusable credential leaves a process: PLAIN sends only the one-time proof, CURVE never sends a key.
The rendezvous ROUTER (rendezvous.py) is a CURVE server too, under its own ZAP domain, admitting only the keys of
ranks 1..n-1 derived from the secret; a message's user id is its rank. Both gates run in one handler thread.
"""

import hashlib
import hmac
import os
import struct
import threading

import zmq
from zmq.utils import z85

ZAP_DOMAIN = "mpnn"
RENDEZVOUS_DOMAIN = "mpnn-rendezvous"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
EDGE_NONCE_BYTES = 32


def mac(secret: bytes, label: bytes, *parts: bytes | str | int) -> bytes:
    """HMAC-SHA256 over a label and length-prefixed parts (bytes, str or int), so no two inputs collide."""
    digest = hmac.new(secret, label, hashlib.sha256)
    for part in parts:
        if isinstance(part, int):
            part = str(part).encode()
        elif isinstance(part, str):
            part = part.encode()
        digest.update(struct.pack("<Q", len(part)))
        digest.update(part)
    return digest.digest()


def verify(expected: bytes, received: object) -> bool:
    """Constant-time comparison of two MACs (received may be any bytes a stranger sent)."""
    return isinstance(received, bytes) and hmac.compare_digest(expected, received)


def rendezvous_keypair(secret: bytes, run_id: str, rank: int) -> tuple[bytes, bytes]:
    """The CURVE (public, secret) z85 keys of `rank` at the rendezvous: rank 0's is the server's."""
    secret_key = z85.encode(mac(secret, b"mpnn-rendezvous-key", run_id, rank))
    return zmq.curve_public(secret_key), secret_key


def edge_proof(secret: bytes, run_id: str, client: int, server: int, nonce: bytes) -> bytes:
    """The one-time PLAIN password with which rank `client` connects to rank `server` (hex of an HMAC)."""
    return mac(secret, b"mpnn-edge", run_id, client, server, nonce).hex().encode()


class DataSocketSecurity:
    """Credentials for one rank's data sockets, derived from the secret, and the ZAP handler enforcing them.

    `nonce` (hex, in this rank's rendezvous info as "edge") is what the previous rank's one-time proof is bound to.
    """

    def __init__(self, secret: bytes, run_id: str, world_size: int, encrypt: bool = False) -> None:
        self.encrypt = encrypt
        self._secret, self._run_id, self._world_size = secret, run_id, world_size
        self.nonce = os.urandom(EDGE_NONCE_BYTES)
        self._keys: list[tuple[bytes, bytes]] = []  # (public, secret) z85 per rank, for CURVE
        if encrypt:
            for rank in range(world_size):
                secret_key = z85.encode(mac(secret, b"mpnn-curve-key", run_id, rank))
                self._keys.append((zmq.curve_public(secret_key), secret_key))
        self._handler = ZapHandler()

    def start(self, context: zmq.Context) -> None:
        """Start the ZAP handler in `context`; must run before any data socket binds."""
        self._handler.start(context)

    def stop(self) -> None:
        """Stop the ZAP handler thread (idempotent)."""
        self._handler.stop()

    @property
    def refused(self) -> list[str]:
        """Why the ZAP handler refused connections so far (the first MAX_REFUSED), one line each."""
        return list(self._handler.refused)

    def make_server(self, sock: zmq.Socket, rank: int) -> None:
        """Make `sock` (rank's PULL, about to bind) admit only rank's ring predecessor, once per proof."""
        client = (rank - 1) % self._world_size
        sock.zap_domain = ZAP_DOMAIN.encode()
        if self.encrypt:
            sock.curve_publickey, sock.curve_secretkey = self._keys[rank]
            sock.curve_server = True
            self._handler.admit_key(ZAP_DOMAIN, z85.decode(self._keys[client][0]), client)
        else:
            sock.plain_server = True
            proof = edge_proof(self._secret, self._run_id, client, rank, self.nonce)
            self._handler.admit_once(str(client).encode(), proof, client)

    def make_rendezvous_server(self, sock: zmq.Socket) -> None:
        """Make `sock` (rank 0's rendezvous ROUTER, about to bind) a CURVE server that admits only ranks 1..n-1,
        each by its key derived from the secret: a stranger's connection fails its handshake before ZeroMQ takes
        in a single message from it, so it can cost rank 0 no memory. The user id of a message is its rank."""
        sock.zap_domain = RENDEZVOUS_DOMAIN.encode()
        sock.curve_publickey, sock.curve_secretkey = rendezvous_keypair(self._secret, self._run_id, 0)
        sock.curve_server = True
        for rank in range(1, self._world_size):
            public, _ = rendezvous_keypair(self._secret, self._run_id, rank)
            self._handler.admit_key(RENDEZVOUS_DOMAIN, z85.decode(public), rank)

    def make_client(self, sock: zmq.Socket, rank: int, server_rank: int, server_nonce: str | None = None) -> None:
        """Give `sock` (rank's PUSH, about to connect to `server_rank`) the credentials that server admits;
        `server_nonce` is the "edge" hex that server announced at the rendezvous (PLAIN only)."""
        if self.encrypt:
            sock.curve_publickey, sock.curve_secretkey = self._keys[rank]
            sock.curve_serverkey = self._keys[server_rank][0]
            return
        try:
            nonce = bytes.fromhex(server_nonce or "")
        except ValueError:
            nonce = b""
        if len(nonce) != EDGE_NONCE_BYTES:
            raise ValueError(f"rank {server_rank} announced no valid edge nonce at the rendezvous")
        sock.reconnect_ivl = -1  # the proof is good once: a lost connection is a failure, never re-made
        sock.plain_username = str(rank).encode()
        sock.plain_password = edge_proof(self._secret, self._run_id, rank, server_rank, nonce)


MAX_REFUSED = 100  # refusals remembered for diagnosis; a flood of strangers costs no more memory


class ZapHandler:
    """This process's ZAP handler (RFC 27), a REP socket on the well-known inproc endpoint of a context. It admits
    CURVE clients by public key, and PLAIN clients by (username, one-time password), each password once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[tuple[bytes, bytes], int] = {}  # (ZAP domain, CURVE public key) -> the rank it belongs to
        self._once: dict[bytes, tuple[bytes, int]] = {}  # PLAIN username -> (password, rank); removed once used
        self.refused: list[str] = []
        self._stop_endpoint = f"inproc://mpnn-zap-stop-{id(self):x}"
        self._context: zmq.Context | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def admit_key(self, domain: str, key: bytes, rank: int) -> None:
        with self._lock:
            self._keys[(domain.encode(), key)] = rank

    def admit_once(self, username: bytes, password: bytes, rank: int) -> None:
        with self._lock:
            self._once[username] = (password, rank)

    def start(self, context: zmq.Context) -> None:
        self._context = context
        self._thread = threading.Thread(target=self._serve, args=(context,), name="mpnn-zap", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error

    def stop(self) -> None:
        """Wake the handler through its stop pipe (it blocks, never polls on a timer) and wait for it to end."""
        if self._thread is not None and self._context is not None:
            waker = self._context.socket(zmq.PAIR)
            waker.linger = 0
            waker.connect(self._stop_endpoint)
            try:
                waker.send(b"", zmq.NOBLOCK)  # the handler's end of the pipe is bound as long as it runs
            except zmq.Again:
                pass  # it has ended already
            self._thread.join()
            waker.close()
            self._thread = None

    def _serve(self, context: zmq.Context) -> None:
        try:
            sock = context.socket(zmq.REP)
            sock.linger = 0
            stop = context.socket(zmq.PAIR)
            stop.linger = 0
            stop.bind(self._stop_endpoint)
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as error:
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if stop in events:
                    return
                request = sock.recv_multipart()
                sock.send_multipart(self._reply(request))
        finally:
            sock.close()
            stop.close()

    def _reply(self, request: list[bytes]) -> list[bytes]:
        version, request_id = (request + [b"", b""])[:2]
        if len(request) < 6 or version != b"1.0":
            return [b"1.0", request_id, b"400", b"malformed ZAP request", b"", b""]
        domain, address, mechanism, credentials = request[2], request[3], request[5], request[6:]
        rank, reason = None, ""
        with self._lock:
            if mechanism == b"CURVE" and len(credentials) == 1 and (domain, credentials[0]) in self._keys:
                rank = self._keys[(domain, credentials[0])]
            elif domain != ZAP_DOMAIN.encode():
                reason = "wrong ZAP domain"
            elif mechanism == b"PLAIN" and len(credentials) == 2 and self._matches_once(*credentials):
                rank = self._once.pop(credentials[0])[1]  # good once: a replay is refused
            else:
                reason = f"{mechanism.decode('ascii', 'replace')} credentials of no admitted peer"
        if rank is None:
            if len(self.refused) < MAX_REFUSED:
                self.refused.append(f"{address.decode('utf-8', 'replace')}: {reason}")
            return [b"1.0", request_id, b"400", reason.encode(), b"", b""]
        return [b"1.0", request_id, b"200", b"OK", str(rank).encode(), b""]

    def _matches_once(self, username: bytes, password: bytes) -> bool:
        expected = self._once.get(username)
        return expected is not None and hmac.compare_digest(expected[0], password)
