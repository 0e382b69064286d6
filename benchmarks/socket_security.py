"""What authenticating the data sockets costs: PUSH/PULL throughput under ZeroMQ NULL, PLAIN and CURVE.

Two processes, one PUSH -> PULL edge as the ring uses it (zero-copy sends, receives into a preallocated
buffer), over tcp loopback and ipc, for messages of 64 KB to 64 MB. Prints GB/s per mechanism and the ratio
CURVE/NULL measured in the same run. Usage: python benchmarks/socket_security.py [--seconds 0.6]
"""

import argparse
import multiprocessing
import os
import tempfile
import time

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

SIZES = [64 << 10, 1 << 20, 8 << 20, 64 << 20]
MECHANISMS = ["null", "plain", "curve"]


def _secure(sock, mechanism, server, keys):
    if mechanism == "plain":
        if server:
            sock.plain_server = True
        else:
            sock.plain_username, sock.plain_password = b"u", b"p"
    elif mechanism == "curve":
        (server_public, server_secret), (client_public, client_secret) = keys
        if server:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_server = server_public, server_secret, True
        else:
            sock.curve_publickey, sock.curve_secretkey = client_public, client_secret
            sock.curve_serverkey = server_public


class _OneKey:
    def __init__(self, key):
        self.key = key

    def callback(self, domain, key):
        return key == self.key


def _receiver(endpoint, mechanism, keys, size, count, ready):
    context = zmq.Context()
    authenticator = None
    if mechanism != "null":  # as mpnn runs them: behind a ZAP handler that checks the credential
        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        authenticator.configure_plain("bench", {"u": "p"})
        authenticator.configure_curve_callback("bench", _OneKey(keys[1][0]))
    pull = context.socket(zmq.PULL)
    pull.zap_domain = b"bench"
    _secure(pull, mechanism, True, keys)
    pull.bind(endpoint)
    ready.put(pull.last_endpoint.decode())
    buf = np.empty(size, np.uint8)
    for _ in range(count + 1):
        pull.recv_into(buf)
    pull.close(linger=0)
    if authenticator is not None:
        authenticator.stop()
    context.term()


def measure(endpoint, mechanism, size, seconds):
    """GB/s of one PUSH -> PULL edge for `size`-byte messages under `mechanism`."""
    keys = (zmq.curve_keypair(), zmq.curve_keypair())
    count = max(3, int(seconds * 2e9 / size))
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Queue()
    child = spawn.Process(target=_receiver, args=(endpoint, mechanism, keys, size, count, ready))
    child.start()
    bound = ready.get(timeout=30)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.sndhwm = 4
    _secure(push, mechanism, False, keys)
    push.connect(bound)
    payload = np.ones(size, np.uint8)
    push.send(payload[:1].copy())  # handshake done before the clock starts
    push.send(payload, copy=False)  # warm
    start = time.perf_counter()
    for _ in range(count - 1):
        push.send(payload, copy=False)
    child.join()
    elapsed = time.perf_counter() - start
    push.close(linger=0)
    context.term()
    return (count - 1) * size / elapsed / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.6, help="about how long each cell sends")
    args = parser.parse_args()
    print(f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, {os.cpu_count()} CPUs")
    scratch = tempfile.mkdtemp(prefix="mpnn-bench-")
    for transport in ("tcp", "ipc"):
        for size in SIZES:
            rates = {}
            for mechanism in MECHANISMS:
                endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{scratch}/{mechanism}-{size}"
                rates[mechanism] = measure(endpoint, mechanism, size, args.seconds)
            cells = "  ".join(f"{name} {rate:5.2f} GB/s" for name, rate in rates.items())
            print(f"{transport} {size >> 10:>6} KB  {cells}  curve/null {rates['curve'] / rates['null']:.2f}")
    os.rmdir(scratch) if not os.listdir(scratch) else None


if __name__ == "__main__":
    main()
