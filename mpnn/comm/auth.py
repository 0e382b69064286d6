"""Proofs and socket credentials derived from the run's secret (HMAC-SHA256), and the ZAP gate on data sockets.

Rendezvous: challenge-response with HMAC(secret, label || nonce || rank || run id), both directions.
Data sockets: every PULL is a ZeroMQ PLAIN server (default) or CURVE server (encrypt=True) behind a ZAP handler
(pyzmq's ThreadAuthenticator) that admits only the password or the public keys derived from the secret, so a
connection that cannot prove the secret never delivers a single frame.
"""

import hashlib
import hmac
import struct

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

ZAP_DOMAIN = "mpnn"
PLAIN_USER = b"mpnn"


def mac(secret, label, *parts):
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


def verify(expected, received):
    """Constant-time comparison of two MACs (received may be any bytes a stranger sent)."""
    return isinstance(received, bytes) and hmac.compare_digest(expected, received)


class DataSocketSecurity:
    """Credentials for the ring's data sockets, derived from the secret, and the ZAP handler enforcing them."""

    def __init__(self, secret, run_id, world_size, encrypt=False):
        self.encrypt = encrypt
        self._password = mac(secret, b"mpnn-plain-password", run_id).hex().encode()
        self._keys = []  # (public, secret) z85 per rank, for CURVE
        if encrypt:
            for rank in range(world_size):
                secret_key = z85.encode(mac(secret, b"mpnn-curve-key", run_id, rank))
                self._keys.append((zmq.curve_public(secret_key), secret_key))
        self._authenticator = None

    def start(self, context):
        """Start the ZAP handler in `context`; must run before any data socket binds."""
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.start()
        if self.encrypt:
            self._authenticator.configure_curve_callback(ZAP_DOMAIN, _KeySet({pub for pub, _ in self._keys}))
        else:
            self._authenticator.configure_plain(ZAP_DOMAIN, {PLAIN_USER.decode(): self._password.decode()})

    def stop(self):
        """Stop the ZAP handler thread (idempotent)."""
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def make_server(self, sock, rank):
        """Make `sock` (a PULL about to bind) accept only peers that prove the secret."""
        sock.zap_domain = ZAP_DOMAIN.encode()
        if self.encrypt:
            sock.curve_publickey, sock.curve_secretkey = self._keys[rank]
            sock.curve_server = True
        else:
            sock.plain_server = True

    def make_client(self, sock, rank, server_rank):
        """Give `sock` (a PUSH about to connect to `server_rank`) the credentials that server admits."""
        if self.encrypt:
            sock.curve_publickey, sock.curve_secretkey = self._keys[rank]
            sock.curve_serverkey = self._keys[server_rank][0]
        else:
            sock.plain_username = PLAIN_USER
            sock.plain_password = self._password


class _KeySet:
    """CURVE credentials provider for the ZAP handler: admits exactly the ranks' public keys."""

    def __init__(self, public_keys):
        self._public_keys = public_keys

    def callback(self, domain, key):
        return domain == ZAP_DOMAIN and key in self._public_keys
