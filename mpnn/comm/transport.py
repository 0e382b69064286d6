"""One rank's edge of the ring: PUSH to the next rank, PULL from the previous one, framed, timed and abortable.

Every message is [header, payload]. Payloads of 64 KB and more go zero-copy (copy=False, tracked, so a
collective returns only once ZeroMQ has let go of the caller's memory); smaller ones are copied, which
measured faster. Receives go straight into preallocated NumPy memory with recv_into. Every wait has a
deadline; a rank that gives up sends an ABORT frame to the next rank, which forwards it, so the whole ring
fails at once with the first rank's diagnosis instead of each rank timing out on its neighbour. A rank silent-waited
on for a whole timeout tells the next rank so (a WAITING frame): that rank then knows its predecessor is alive and
leaves the blame to the rank that waits on the truly silent one.
"""

import time
from collections import deque

import numpy as np
import zmq

from . import frames
from .errors import CollectiveMismatch, CommError, CommTimeout

ZERO_COPY_MIN = 64 * 1024
HWM = 100_000  # messages per peer; one collective queues at most one segment's chunks before it must receive
ABORT_LINGER_MS = 1000  # the one ABORT notice gets this long to leave, ample on a loaded machine too (else the
# peer waits out its whole timeout); everything else closes with LINGER 0
FLUSH_LINGER_MS = 2000  # a clean close lets the last frames of the last collective reach the next rank
NOBLOCK, SNDMORE, RCVMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.RCVMORE)  # plain ints: enum ops cost
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class RingLink:
    """The PUSH/PULL socket pair of `rank` on a ring of `world_size`, with the frame checks of frames.py."""

    def __init__(self, context, rank, world_size, run_id, timeout, security):
        self.rank, self.world_size, self.timeout = rank, world_size, float(timeout)
        self.prev, self.next = (rank - 1) % world_size, (rank + 1) % world_size
        self.tag = frames.run_tag(run_id)
        self.pull = context.socket(zmq.PULL)
        self.push = context.socket(zmq.PUSH)
        for sock in (self.pull, self.push):
            sock.linger = 0
        self.pull.rcvhwm = HWM
        self.push.sndhwm = HWM
        self.push.immediate = True  # queue only to a connected, authenticated peer: a dead peer blocks, then times out
        security.make_server(self.pull, rank)
        self._security = security  # the PUSH gets its credentials in connect(): they depend on the next rank's nonce
        self._send_poller = zmq.Poller()
        self._send_poller.register(self.push, zmq.POLLOUT)
        self._send_poller.register(self.pull, zmq.POLLIN)
        self._stash = deque()  # frames read early while waiting to send: (header bytes, payload frame)
        self._trackers = []
        self.call, self.seq = None, 0
        self._heard = False
        self._prev_waiting = False  # the previous rank said it is itself waiting, in this collective
        self._said_waiting = False
        self.bytes_sent = self.bytes_recv = 0
        self.scheme = "tcp"  # how the payload travels to the next rank: "tcp" or "ipc" (set by connect)
        self.bound = []  # endpoints the PULL socket listens on
        self.closed = False

    # -- setup -------------------------------------------------------------------------------------------
    def bind(self, endpoint):
        """Bind the PULL socket (ipc path or tcp with port 0/*) and return the endpoint actually bound."""
        try:
            self.pull.bind(endpoint)
        except zmq.ZMQError as error:
            raise CommError(f"rank {self.rank} cannot bind its data socket at {endpoint}: {error}") from None
        self.bound.append(self.pull.last_endpoint.decode())
        return self.bound[-1]

    def connect(self, endpoint, edge_nonce=None):
        """Connect the PUSH socket to the next rank's data endpoint, with the credentials that rank admits
        (`edge_nonce`: the hex nonce it announced at the rendezvous; see auth.py)."""
        self.scheme = endpoint.split("://", 1)[0]
        self._security.make_client(self.push, self.rank, self.next, edge_nonce)
        self.push.connect(endpoint)

    # -- one collective ----------------------------------------------------------------------------------
    def begin(self, call, seq):
        """Start collective number `seq`: frames sent now describe `call`; frames received must match it."""
        self.call, self.seq, self._heard = call, seq, False
        self._prev_waiting = self._said_waiting = False
        self._header = self.header()
        self._expected = frames.pack(frames.KIND_DATA, call, self.prev, self.prev, seq, self.tag)

    def header(self, origin=None, shape=None):
        """The header of a data frame this rank sends in the current collective."""
        origin = self.rank if origin is None else origin
        return frames.pack(frames.KIND_DATA, self.call, self.rank, origin, self.seq, self.tag, shape)

    def send(self, buf, header=None):
        """Send one chunk (a contiguous NumPy array) to the next rank; zero-copy from 64 KB up."""
        self._send_part(self._header if header is None else header, SNDMORE)
        if buf.nbytes >= ZERO_COPY_MIN:
            self._trackers.append(self._send_part(buf, 0, copy=False))
        else:
            self._send_part(buf, 0)
        self.bytes_sent += buf.nbytes

    def recv_into(self, buf, expected=None):
        """Receive the next chunk from the previous rank into `buf`; its header must equal `expected`."""
        header, frame = self._take(self._expected if expected is None else expected)
        self._payload_into(frame, buf)

    def recv_frame(self, nbytes):
        """Receive the next chunk from the previous rank as a zmq.Frame (no copy) of exactly `nbytes` bytes."""
        header, frame = self._take(self._expected)
        if frame is None:
            frame = self.pull.recv(copy=False)
        if frame.buffer.nbytes != nbytes:
            raise CommError(
                f"rank {self.rank} expected {nbytes} bytes from rank {self.prev} in {self._where()} "
                f"but received {frame.buffer.nbytes}"
            )
        self.bytes_recv += nbytes
        return frame

    def recv_head(self):
        """Receive the next header of a variable-size piece: (header bytes, decoded Header, payload frame)."""
        header, frame = self._take(None)
        return header, frames.unpack(header), frame

    def payload_into(self, frame, buf):
        """Copy the payload belonging to the header from recv_head into `buf`."""
        self._payload_into(frame, buf)

    def finish(self):
        """End the collective: wait until ZeroMQ has released every zero-copy buffer sent from caller memory."""
        deadline = time.monotonic() + self.timeout
        for tracker in self._trackers:
            while not tracker.done:
                if time.monotonic() > deadline:
                    raise CommTimeout(
                        f"rank {self.next} is not receiving: rank {self.rank} could not hand its "
                        f"data over in {self._where()} within {self.timeout:g} s",
                        silent_rank=self.next,
                    )
                try:
                    tracker.wait(0.05)
                except zmq.NotDone:
                    pass
        self._trackers.clear()

    # -- failure -----------------------------------------------------------------------------------------
    def abort(self, error):
        """Send an ABORT carrying `error` to the next rank (unless it started the abort), then close at once."""
        if self.closed:
            return
        origin = getattr(error, "origin", self.rank)
        if origin != self.next:
            if isinstance(error, CommTimeout):
                kind, other = frames.ABORT_TIMEOUT, error.silent_rank
            elif isinstance(error, CollectiveMismatch):
                kind, other = frames.ABORT_MISMATCH, (error.ranks or (None, None))[-1]
            else:
                kind, other = frames.ABORT_OTHER, None
            call = frames.Call(kind, root=frames.NO_RANK if other is None else other)
            header = frames.pack(frames.KIND_ABORT, call, self.rank, origin, self.seq, self.tag)
            try:
                self.push.send(header, NOBLOCK | SNDMORE)
                self.push.send(str(error).encode(), NOBLOCK)
                self.push.linger = ABORT_LINGER_MS
            except zmq.ZMQError:
                pass  # the next rank is unreachable: it will time out on its own
        self.close(linger_ms=None)

    def close(self, linger_ms=0):
        """Close both sockets (idempotent); `linger_ms` None keeps the linger already set."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.pull, self.push):
            if linger_ms is not None:
                sock.linger = linger_ms
            sock.close()

    # -- internals ---------------------------------------------------------------------------------------
    def _where(self):
        return f"{self.call.describe()} at collective #{self.seq}" if self.call else "startup"

    def _send_part(self, data, flags, copy=True):
        while True:
            try:
                return self.push.send(data, flags | NOBLOCK, copy=copy, track=not copy)
            except zmq.Again:
                self._wait_writable()

    def _wait_writable(self):
        """Wait for room toward the next rank; meanwhile read (stash) frames from the previous one, so an ABORT
        sent to this rank is seen even while it is blocked sending."""
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommTimeout(
                    f"rank {self.next} is not receiving: rank {self.rank} could not send to it for "
                    f"{self.timeout:g} s in {self._where()} (dead, stuck, or never connected)",
                    silent_rank=self.next,
                )
            events = dict(self._send_poller.poll(remaining * 1000))
            if self.push in events:
                return
            if self.pull in events:
                header = self.pull.recv(NOBLOCK)
                if not self.pull.getsockopt(RCVMORE):
                    raise CommError(
                        f"rank {self.rank} received a frame without payload from rank {self.prev} in {self._where()}"
                    )
                frame = self.pull.recv(copy=False)
                self._raise_if_abort(header, frame)
                self._stash.append((header, frame))

    def _wait_readable(self):
        """Wait for a frame from the previous rank; on silence raise a CommTimeout naming the silent rank.

        After a timeout of silence this rank tells the next one that it is waiting (so that one blames nobody
        alive). A rank that heard nothing from its predecessor in this collective then blames it, after a short
        grace in which an ABORT from further up the ring would take precedence. A rank whose predecessor joined
        but then stalled, or said it is waiting itself, grants a second timeout: the rank after the truly silent
        one sends the diagnosis down the ring.
        """
        if self.pull.poll(self.timeout * 1000, zmq.POLLIN):
            return
        self._say_waiting()
        grace = self.timeout if self._heard or self._prev_waiting else min(0.1 * self.timeout, 5.0)
        if self.pull.poll(grace * 1000, zmq.POLLIN):
            return
        if self._prev_waiting:
            message = (
                f"rank {self.prev} stopped sending: rank {self.rank} waited {self.timeout:g} s for it in "
                f"{self._where()}; it said it was waiting on rank {(self.prev - 1) % self.world_size}, "
                "but no diagnosis came down the ring"
            )
        elif self._heard:
            message = (
                f"rank {self.prev} stopped sending: rank {self.rank} waited {self.timeout:g} s for it in "
                f"{self._where()} after it had joined (it may be waiting on a rank before it)"
            )
        else:
            message = (
                f"rank {self.prev} is silent: rank {self.rank} waited {self.timeout:g} s for it in "
                f"{self._where()}, which rank {self.prev} never joined (stuck, dead, or not calling it)"
            )
        raise CommTimeout(message, silent_rank=self.prev)

    def _take(self, expected):
        """Next (header, payload frame or None=still on the socket) from the previous rank, checked against the
        collective this rank runs: equal to `expected` (fast path), or for variable-size pieces key-compatible.
        WAITING notices are noted and skipped."""
        while True:
            if self._stash:
                header, frame = self._stash.popleft()
            else:
                if not self.pull.getsockopt(EVENTS) & POLLIN:  # cheaper than catching zmq.Again
                    self._wait_readable()
                header = self.pull.recv(NOBLOCK)
                frame = None
                if not self.pull.getsockopt(RCVMORE):
                    raise CommError(
                        f"rank {self.rank} received a frame without payload from rank {self.prev} in {self._where()}"
                    )
            if header == expected:
                break
            if self._skip_waiting(header, frame):
                continue
            if frame is None:
                self._raise_if_abort(header, None)
            self._check(header)
            if expected is not None:
                raise CommError(
                    f"rank {self.rank} received an out-of-order frame from rank {self.prev} in {self._where()}"
                )
            break
        self._heard = True
        return header, frame

    def _say_waiting(self):
        """Tell the next rank, once per collective, that this rank is alive and waiting on its predecessor."""
        if self._said_waiting:
            return
        self._said_waiting = True
        header = frames.pack(frames.KIND_WAITING, frames.Call(0), self.rank, self.rank, self.seq, self.tag)
        try:
            self.push.send(header, NOBLOCK | SNDMORE)
            self.push.send(b"", NOBLOCK)
        except zmq.Again:
            pass  # no room toward the next rank: it is not waiting on this one

    def _skip_waiting(self, header, frame):
        """True (and the notice consumed) if `header` is a WAITING notice of this run; one of this collective
        means the previous rank is alive and waits on its own predecessor."""
        decoded = frames.unpack(header)
        if decoded is None or decoded.kind != frames.KIND_WAITING or decoded.tag != self.tag:
            return False
        if frame is None and self.pull.getsockopt(RCVMORE):
            self.pull.recv()
        if decoded.seq == self.seq:
            self._prev_waiting = True
        return True

    def _payload_into(self, frame, buf):
        if frame is None:
            received = self.pull.recv_into(buf)
        else:
            payload = frame.buffer
            received = payload.nbytes
            if received == buf.nbytes:
                np.copyto(buf.reshape(-1).view(np.uint8), np.frombuffer(payload, np.uint8))
        if received != buf.nbytes:
            raise CommError(
                f"rank {self.rank} expected {buf.nbytes} bytes from rank {self.prev} in {self._where()} "
                f"but received {received}"
            )
        self.bytes_recv += received

    def _raise_if_abort(self, header, frame):
        decoded = frames.unpack(header)
        if decoded is None or decoded.kind != frames.KIND_ABORT:
            return
        payload = frame.bytes if frame is not None else (self.pull.recv() if self.pull.getsockopt(RCVMORE) else b"")
        message = payload.decode("utf-8", "replace")
        other = None if decoded.call.root == frames.NO_RANK else decoded.call.root
        if decoded.call.op == frames.ABORT_TIMEOUT:
            error = CommTimeout(message, silent_rank=other)
        elif decoded.call.op == frames.ABORT_MISMATCH:
            error = CollectiveMismatch(message, ranks=(decoded.origin, other))
        else:
            error = CommError(message)
        error.origin = decoded.origin
        raise error

    def _check(self, header):
        """Explain why `header` is not what this rank expects (mismatch, foreign run, malformed) or accept it."""
        decoded = frames.unpack(header)
        if decoded is None or decoded.tag != self.tag or decoded.kind != frames.KIND_DATA:
            raise CommError(
                f"rank {self.rank} received a malformed frame (or one of another run) from rank "
                f"{self.prev} in {self._where()}"
            )
        theirs, mine = decoded.call, self.call
        if decoded.seq != self.seq:
            raise CollectiveMismatch(
                f"collective mismatch: rank {self.rank} is at collective #{self.seq} calling {mine.describe()} but "
                f"rank {decoded.sender} sent collective #{decoded.seq}, {theirs.describe()}",
                ranks=(self.rank, decoded.sender),
            )
        if theirs.key() != mine.key():
            raise CollectiveMismatch(
                f"collective mismatch: rank {self.rank} called {mine.describe()} but rank {decoded.sender} called "
                f"{theirs.describe()} at collective #{self.seq}",
                ranks=(self.rank, decoded.sender),
            )
        if decoded.sender != self.prev:
            raise CommError(
                f"rank {self.rank} received a frame claiming to come from rank {decoded.sender} "
                f"instead of rank {self.prev} in {self._where()}"
            )
