"""Rendezvous: rank 0 serves a ROUTER at MPNN_RENDEZVOUS; each other rank proves it holds the secret, then
hands in its data endpoints and receives the table of everyone's.

    rank r -> 0:  HELLO  {"rank", "run", "nonce": client nonce}
    0 -> rank r:  CHALLENGE  server nonce, HMAC(secret, "server" | client nonce | r | run id)
    rank r -> 0:  PROOF  info JSON, HMAC(secret, "client" | server nonce | r | run id | info JSON)
    0 -> rank r:  TABLE  table JSON, HMAC(secret, "table" | client nonce | r | run id | table JSON)
                  or DENIED reason / FAILED reason
Both sides prove the secret; only JSON is parsed (never pickle), and only after its MAC checks out, except
the small HELLO. A stranger's junk, replays or wrong proofs are answered DENIED and change nothing.
"""

import json
import os
import time

import zmq

from .auth import mac, verify
from .errors import AuthError, CommError, CommTimeout

NONCE_BYTES = 32
MAX_REQUEST_BYTES = 64 * 1024
MAX_PENDING = 1024


def _seconds_left(deadline):
    return max(0.0, deadline - time.monotonic())


def serve(context, address, run_id, world_size, secret, own_info, deadline):
    """Rank 0: admit ranks 1..n-1 once each proves the secret; return (table, router). The caller closes the
    router after the first barrier, so every rank surely received the table."""
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.maxmsgsize = MAX_REQUEST_BYTES
    try:
        router.bind(address)
    except zmq.ZMQError as error:
        router.close()
        raise CommError(
            f"rank 0 cannot serve the rendezvous at {address}: {error} (set MPNN_RENDEZVOUS to tcp://HOST:<free port>)"
        ) from None
    pending = {}  # router identity -> (rank, client nonce, server nonce)
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
            parts = router.recv_multipart()
            identity, request = parts[0], parts[1:]
            reply = _handle(request, identity, pending, joined, run_id, world_size, secret)
            if reply is not None:
                router.send_multipart([identity, *reply])
        table = json.dumps([joined[rank][2] for rank in range(world_size)]).encode()
        for rank in range(1, world_size):
            identity, client_nonce, _ = joined[rank]
            router.send_multipart([identity, b"TABLE", table, mac(secret, b"table", client_nonce, rank, run_id, table)])
    except BaseException:
        router.close()
        raise
    return json.loads(table), router


def _handle(request, identity, pending, joined, run_id, world_size, secret):
    """One request from the ROUTER: returns the reply frames (or None to stay silent)."""
    if len(request) == 2 and request[0] == b"HELLO":
        try:
            hello = json.loads(request[1])
            rank, client_nonce = int(hello["rank"]), bytes.fromhex(hello["nonce"])
            run = str(hello["run"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):  # Infinity; "[[[[..." 64 KB deep
            return [b"DENIED", b"malformed HELLO"]
        if run != run_id:
            return [b"DENIED", f"this rendezvous serves run {run_id!r}, not {run!r}".encode()]
        if not 0 < rank < world_size or len(client_nonce) != NONCE_BYTES:
            return [b"DENIED", f"rank must be in 1..{world_size - 1} with a {NONCE_BYTES}-byte nonce".encode()]
        if len(pending) >= MAX_PENDING:
            pending.pop(next(iter(pending)))
        server_nonce = os.urandom(NONCE_BYTES)
        pending[identity] = (rank, client_nonce, server_nonce)
        return [b"CHALLENGE", server_nonce, mac(secret, b"server", client_nonce, rank, run_id)]
    if len(request) == 3 and request[0] == b"PROOF" and identity in pending:
        rank, client_nonce, server_nonce = pending.pop(identity)
        info_json, proof = request[1], request[2]
        if not verify(mac(secret, b"client", server_nonce, rank, run_id, info_json), proof):
            return [b"DENIED", b"bad proof: this process does not hold the run's secret"]
        if rank in joined:
            return [b"DENIED", f"rank {rank} has already joined this world".encode()]
        info = json.loads(info_json)
        joined[rank] = (identity, client_nonce, info)
        return None
    return [b"DENIED", b"unexpected request"]


def join(context, address, rank, run_id, load_secret, reload_secret, prepare, deadline):
    """Rank r > 0: prove the secret to rank 0, hand in `prepare(secret)` (this rank's endpoint info) and return
    (secret, table). With reload_secret the secret file is re-read until it matches rank 0's (a stale file
    from an earlier run may be read before rank 0 replaces it)."""
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.maxmsgsize = 64 * 1024 * 1024
    dealer.connect(address)
    try:
        client_nonce = os.urandom(NONCE_BYTES)
        hello = {"rank": rank, "run": run_id, "nonce": client_nonce.hex()}
        dealer.send_multipart([b"HELLO", json.dumps(hello).encode()])
        reply = _receive(dealer, address, rank, deadline, b"CHALLENGE", 3)
        server_nonce, server_proof = reply[1], reply[2]
        while True:
            secret = load_secret()
            if verify(mac(secret, b"server", client_nonce, rank, run_id), server_proof):
                break
            if not reload_secret or time.monotonic() > deadline:
                raise AuthError(
                    f"the rendezvous at {address} (rank 0) could not prove it holds the run's secret: "
                    "the ranks read different secret files, or a foreign process holds that port"
                )
            time.sleep(0.05)
        info_json = json.dumps(prepare(secret)).encode()
        dealer.send_multipart([b"PROOF", info_json, mac(secret, b"client", server_nonce, rank, run_id, info_json)])
        reply = _receive(dealer, address, rank, deadline, b"TABLE", 3)
        if not verify(mac(secret, b"table", client_nonce, rank, run_id, reply[1]), reply[2]):
            raise AuthError(f"rank {rank} received a peer table from {address} that is not signed with the secret")
        return secret, json.loads(reply[1])
    finally:
        dealer.close()


def _receive(dealer, address, rank, deadline, expected, length):
    """Wait for the `expected` reply from rank 0; DENIED/FAILED replies and silence become errors."""
    while True:
        if not dealer.poll(_seconds_left(deadline) * 1000):
            raise CommTimeout(
                f"rank {rank} got no {expected.decode()} from the rendezvous at {address} (rank 0) "
                "within the timeout: rank 0 is not up, or another rank has not joined",
                silent_rank=0,
            )
        reply = dealer.recv_multipart()
        if reply[0] == b"DENIED" and len(reply) == 2:
            raise AuthError(
                f"rank {rank} was refused by the rendezvous at {address}: {reply[1].decode('utf-8', 'replace')}"
            )
        if reply[0] == b"FAILED" and len(reply) == 2:
            raise CommTimeout(reply[1].decode("utf-8", "replace"))
        if reply[0] == expected and len(reply) == length:
            return reply
