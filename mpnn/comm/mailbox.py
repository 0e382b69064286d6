"""Same-host all-reduce of small arrays through shared-memory mailboxes, waited for by spinning briefly, then by
blocking on a futex, not by sockets.

Why: below 32 KB an all-reduce is latency, and on the socket ring each hop is a ZeroMQ send, poll and receive
from Python: measured on the 2-core machine, a 20 KB mean all-reduce of 2 ranks took 65-95 us that way, most of
it in pyzmq calls, which is a fifth of a small model's data-parallel step. Here a rank copies its array into
its own mailbox, publishes the collective's number, waits until every rank has published the same number, and
reduces all mailboxes itself, in rank order, so every rank gets bit-identical results.

Waiting is adaptive: spin for at most SPIN_S (the main thread in pure Python; another thread, e.g. the
communication thread that overlaps backward, with sched_yield between checks so it lets go of the GIL), and stop
spinning at once when a check comes back late (this process was descheduled: the cores are contended); then block
in the kernel on a futex word of the awaited rank's control line (FUTEX_WAIT through ctypes, which lets go of the
GIL too), in slices of at most BLOCK_S so timeouts, aborts and mismatches are still seen. A publishing rank bumps
its futex word and calls FUTEX_WAKE only when a peer has said it sleeps on it, so the uncontended path makes no
system call. Why: a waiter that spins, or yields (20,000 checks) and then polls every 50 us, burns CPU that
other processes on a loaded machine need: measured on the 2-core machine, a rank whose peer came 0.5 s late used
17% of a core waiting (27% for 50 ms), with the futex 0.5%, and the 20 KB all-reduce still takes ~19.5 us when
both ranks are there (the spin answers it; no system call). In the 2-rank MNIST-1D CNN step (1,000 steps) 17
and 31 of the ~1,000 all-reduces of ranks 0 and 1 blocked, the rest found the peer there or within the spin; under
a competing load (benchmarks/contention.py) the step stayed within noise of the spinning version's. Without
futexes (not Linux, or MPNN_FUTEX=0) the blocking phase sleeps, backing off from 50 us to 1 ms.

Each rank's mailbox lives in its shared-memory file (shm.SharedSlots, after the two large-path slots):
    control line: published mark | aborted at seq | announced seq | header length | header | abort message |
                  futex word (uint32, bumped at each publish and abort) | sleeping on (int32: rank + 1)
A mark is (seq << 20) + k for the k-th synchronisation point inside collective seq: the all-reduce here has one,
the large shared-memory path (shm.py) two per block, a barrier one.
    two data slots of SMALL_BYTES; mailbox collective number k uses slot k % 2.
Rank r rewrites slot k % 2 only in collective k + 2, which it starts after seeing every rank publish k + 1,
and a rank publishes k + 1 only after it has finished reading collective k: one wait per all-reduce is enough.
Every collective (socket ones too) is announced: its sequence number and wire header (frames.pack) go into the
control line under a seqlock, so a rank waiting here sees at once that a peer runs something else at the same
point (CollectiveMismatch naming both), a peer that aborted (its flag), or no peer at all (CommTimeout naming
the silent rank). Stores are ordered by a full memory fence before each publish and after each read of a
peer's number: x86-64 keeps stores in order anyway, aarch64 does not.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import platform
import sys
import threading
import time
from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from . import frames
from .errors import CollectiveMismatch, CommError, CommTimeout

SMALL_BYTES = 32 * 1024  # the largest array that goes through the mailbox
CONTROL_BYTES = 1024
HEADER_MAX = 224  # wire header bytes kept in the control line (40 + 8 * ndim: up to 23 dims)
MESSAGE_AT = 32 + HEADER_MAX  # then the error of a rank that aborted, UTF-8, cut to fit
WAKE_AT = CONTROL_BYTES - 8  # the futex word (uint32), then which rank this one sleeps on (int32, rank + 1)
MAILBOX_BYTES = CONTROL_BYTES + 2 * SMALL_BYTES
_PUBLISHED, _ABORTED, _ANNOUNCED, _HEADER_LEN = range(4)  # int64 words of the control line
SPIN_S = 100e-6  # spin this long at most: a peer on its own core answers within it (a 20 KB all-reduce: ~19 us)
LATE_S = 30e-6  # a check (or sched_yield) that took longer: something else ran on this core; block now
BLOCK_S = 0.01  # one futex wait at most this long, then look at the peers' state and the deadline again
SLEEP_S, SLEEP_MAX_S = 50e-6, 1e-3  # without futexes: sleep, doubling from SLEEP_S to SLEEP_MAX_S
PHASE_BITS = 20


def wanted(world_size):
    """Whether a same-host world uses mailboxes: MPNN_MAILBOX=1 or 0 decides; by default only when every rank can
    have a core of its own. With more ranks than cores a waiting rank spun or yielded on the core of the rank it
    waited for: measured with 4 ranks on 2 cores, 3.9 ms (1.7-2.4 ms median, again) per 20 KB all-reduce against
    0.6 ms on the sockets, which block in the kernel. Since waits block on a futex after a short spin the same
    took 0.25-0.30 ms median, 0.57-0.65 ms mean (sockets 0.56-0.62 ms mean): no longer a cliff. The MNIST-1D CNN
    step of 4 ranks on 2 cores (median of 3 runs, load ~3) took 1.8 ms with MPNN_MAILBOX=1, spinning or blocking
    alike, against 3.1 ms on the sockets: "auto" could turn them on here too, once measured on more than one model.
    Every rank of the host decides alike (same environment, same machine)."""
    setting = os.environ.get("MPNN_MAILBOX", "auto").strip().lower()
    if setting in ("1", "true", "yes"):
        return True
    if setting in ("0", "false", "no"):
        return False
    return world_size <= (os.cpu_count() or 1)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared futexes (no FUTEX_PRIVATE_FLAG): the word is in a file several processes map


class Futex:
    """futex(2) wait and wake on a 32-bit word of shared memory, through libc's syscall(); ctypes lets go of the GIL
    for the call. `Futex.load()` is None where there is none (not Linux, an unknown machine, MPNN_FUTEX=0)."""

    def __init__(self, syscall: Any, number: int) -> None:
        self._syscall, self._number = syscall, number

    @classmethod
    def load(cls) -> Futex | None:
        number = _SYS_FUTEX.get(platform.machine().lower())
        if not sys.platform.startswith("linux") or number is None or os.environ.get("MPNN_FUTEX", "1") == "0":
            return None
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            return None
        syscall.restype = ctypes.c_long
        syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
        futex = cls(syscall, number)
        word = ctypes.c_uint32(0)
        if futex.wait(ctypes.addressof(word), 1, 0.0) != -1 or ctypes.get_errno() != errno.EAGAIN:  # the word is 0
            return None  # no futex(2) here (ENOSYS, or a sandbox that forbids it)
        return futex

    def wait(self, address: int, expected: int, timeout_s: float) -> int:
        """Sleep while the word at `address` holds `expected`, until woken or `timeout_s` passed; -1 (errno set)
        at once if it holds something else, on a timeout or a signal. Callers look at what they wait for again."""
        seconds = max(timeout_s, 0.0)
        timeout = _Timespec(int(seconds), int((seconds % 1.0) * 1e9))
        return self._syscall(self._number, address, _FUTEX_WAIT, expected, ctypes.byref(timeout))

    def wake(self, address: int) -> int:
        """Wake every process sleeping on the word at `address`."""
        return self._syscall(self._number, address, _FUTEX_WAKE, 0x7FFFFFFF, None)


FUTEX: Futex | None = Futex.load()


@intrinsic
def _full_fence(typingctx):
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True)
def memory_fence():
    """A sequentially consistent fence: stores before it are visible to other cores before stores after it."""
    _full_fence()


class Mailboxes:
    """Every rank's mailbox, as views into the shared-memory files SharedSlots mapped."""

    def __init__(self, slots, world_size, rank, tag, timeout):
        self.rank, self.world_size, self.tag, self.timeout = rank, world_size, tag, timeout
        self._control = [slots.region(r, 0, CONTROL_BYTES) for r in range(world_size)]
        self._words = [c[:32].view(np.int64) for c in self._control]
        self._data = [slots.region(r, CONTROL_BYTES, 2 * SMALL_BYTES) for r in range(world_size)]
        self._wake = [c[WAKE_AT : WAKE_AT + 4].view(np.uint32) for c in self._control]  # futex words
        self._sleeping_on = [c[WAKE_AT + 4 : WAKE_AT + 8].view(np.int32) for c in self._control]
        self._wake_addresses = [w.ctypes.data for w in self._wake]
        self._peer_flags = [self._sleeping_on[k] for k in range(world_size) if k != rank]
        self._bumps = int(self._wake[rank][0])  # this rank's futex word, as last written
        self.futex = FUTEX
        self.spin_s = SPIN_S
        self.waits = {"spun": 0, "blocked": 0}  # how waits that found a peer missing ended
        self._count = 0  # mailbox all-reduces so far (the same on every rank while they agree)
        self.bytes_sent = self.bytes_recv = 0  # payload other ranks read from this mailbox / this rank read from theirs
        self._seq, self._call, self._header, self._key = 0, None, b"", None
        self._mark = 0  # the last synchronisation point this rank published
        memory_fence()  # compiled now, not inside the first collective

    # -- every collective ----------------------------------------------------------------------------------
    def announce(self, call, seq):
        """Tell the other ranks which collective this rank now runs (a seqlock: header first, then seq)."""
        header = _header(call, seq, self.tag)
        self._seq, self._call, self._header = seq, call, header
        self._mark = seq << PHASE_BITS
        self._key = frames.unpack(header).call.key()
        words = self._words[self.rank]
        words[_ANNOUNCED] = -1  # being rewritten
        memory_fence()
        self._control[self.rank][32 : 32 + len(header)] = np.frombuffer(header, np.uint8)
        words[_HEADER_LEN] = len(header)
        memory_fence()
        words[_ANNOUNCED] = seq  # no wake-up: a peer asleep here looks again within BLOCK_S, or when this rank
        # publishes (waking it at every announce would wake it twice per collective it waits in)

    def mark_aborted(self, error, between=False):
        """Record that this rank aborted its current collective (or, `between` collectives, the next one) with
        `error`: a peer waiting in it, or finishing it, fails at once with that error instead of timing out or
        completing a collective its peers gave up on."""
        message = str(error).encode("utf-8", "replace")[: WAKE_AT - MESSAGE_AT - 1]
        control = self._control[self.rank]
        control[MESSAGE_AT : MESSAGE_AT + len(message)] = np.frombuffer(message, np.uint8)
        control[MESSAGE_AT + len(message)] = 0
        memory_fence()
        self._words[self.rank][_ABORTED] = self._seq + 1 if between else max(self._seq, 1)
        self._wake_sleepers(always=True)

    # -- the all-reduce ------------------------------------------------------------------------------------
    def allreduce(self, flat, ufunc, accumulate, divide_by):
        """All-reduce the contiguous 1-D `flat` (at most SMALL_BYTES) in place; the call must be announced."""
        n, r = self.world_size, self.rank
        start = (self._count % 2) * SMALL_BYTES
        self._count += 1
        size = flat.nbytes
        mine = self._data[r][start : start + size].view(flat.dtype)
        mine[...] = flat
        self.bytes_sent += size * (n - 1)  # every other rank reads this mailbox whole ...
        self.bytes_recv += size * (n - 1)  # ... and this rank reads theirs
        self.sync()
        views = [self._data[k][start : start + size].view(flat.dtype) for k in range(n)]
        total = views[0].astype(accumulate, copy=True)
        for view in views[1:]:
            ufunc(total, view, out=total)
        if divide_by:
            np.divide(total, divide_by, out=total)
        flat[...] = total

    def sync(self):
        """Return once every rank has reached the same synchronisation point of the current (announced)
        collective; what a rank wrote to shared memory before it is then visible to all. A barrier is one."""
        self._mark += 1
        memory_fence()
        self._words[self.rank][_PUBLISHED] = self._mark
        self._wake_sleepers()
        self._wait_for_all(self._seq, self._mark)

    barrier = sync

    def _wake_sleepers(self, always: bool = False) -> None:
        """Bump this rank's futex word; wake whoever sleeps on it (`always`: whether or not one said so)."""
        self._bumps = (self._bumps + 1) & 0xFFFFFFFF
        self._wake[self.rank][0] = self._bumps
        memory_fence()  # the bump is visible before the sleepers' flags are read (they set theirs, then read it)
        if self.futex is None:
            return
        me = self.rank + 1
        for flag in self._peer_flags:
            if always or flag[0] == me:
                self.futex.wake(self._wake_addresses[self.rank])
                return

    def _wait_for_all(self, seq, mark):
        pending = [k for k in range(self.world_size) if k != self.rank]
        checks, deadline = 0, time.monotonic() + self.timeout
        yielding = threading.current_thread() is not threading.main_thread()  # let go of the GIL between checks
        then = time.perf_counter()
        spin_until, blocked, sleep_s = then + self.spin_s, False, SLEEP_S
        while True:
            pending = [k for k in pending if self._words[k][_PUBLISHED] < mark or not self._agrees(k, seq)]
            if not pending:
                memory_fence()  # the peers' data is read only after their published numbers were seen
                for k in range(self.world_size):
                    if 0 < self._words[k][_ABORTED] <= seq:  # it contributed, then gave up on this collective
                        raise self._peer_aborted(k)
                if checks:
                    self.waits["blocked" if blocked else "spun"] += 1
                return
            checks += 1
            if checks % 64 == 0 or blocked:
                self._check_peers(pending, seq, mark, deadline)
            now = time.perf_counter()
            if now < spin_until and now - then < LATE_S:
                if yielding:
                    os.sched_yield()
                then = now
                continue
            blocked = True
            if self.futex is not None:
                self._block(pending[0], seq, mark, deadline)
            else:
                time.sleep(sleep_s)
                sleep_s = min(2 * sleep_s, SLEEP_MAX_S)

    def _block(self, k: int, seq: int, mark: int, deadline: float) -> None:
        """Sleep on rank k's futex word until it publishes, announces or aborts (or BLOCK_S or the deadline pass)."""
        sleeping_on = self._sleeping_on[self.rank]
        sleeping_on[0] = k + 1
        memory_fence()  # the flag is visible before the word is read (k bumps the word, then reads the flag)
        expected = int(self._wake[k][0])
        memory_fence()
        try:
            if self._words[k][_PUBLISHED] < mark or not self._agrees(k, seq):  # still missing: sleep
                self.futex.wait(self._wake_addresses[k], expected, min(BLOCK_S, max(deadline - time.monotonic(), 0)))
        finally:
            sleeping_on[0] = 0

    def _check_peers(self, pending: list[int], seq: int, mark: int, deadline: float) -> None:
        for k in pending:
            self._check_peer(k, seq, mark)
        if time.monotonic() > deadline:
            raise CommTimeout(
                f"rank {pending[0]} is silent: rank {self.rank} waited {self.timeout:g} s for it in "
                f"{self._where()} (stuck, dead, or not calling it)",
                silent_rank=pending[0],
            )

    def _agrees(self, k, seq):
        """Whether rank k, which reached this rank's mark in collective `seq`, ran the same collective there
        (raises if it did not); False when its control line changed while being read (look again)."""
        words = self._words[k]
        announced = int(words[_ANNOUNCED])
        if announced != seq:
            return announced > seq  # past it: it finished this collective, so it agreed with everyone
        header = bytes(self._control[k][32 : 32 + min(max(int(words[_HEADER_LEN]), 0), HEADER_MAX)])
        memory_fence()
        if int(words[_ANNOUNCED]) != seq:
            return False
        if header != self._header:
            self._raise_mismatch(k, header, seq)
        return True

    def _check_peer(self, k, seq, mark):
        """Fail now if rank k aborted, or announced another collective at this point without contributing here."""
        words = self._words[k]
        announced = int(words[_ANNOUNCED])
        header = b""
        if announced >= seq:
            length = int(words[_HEADER_LEN])
            header = bytes(self._control[k][32 : 32 + min(max(length, 0), HEADER_MAX)])
        memory_fence()
        if int(words[_ANNOUNCED]) != announced:
            return  # it moved on while this was read; look again next time
        if words[_PUBLISHED] >= mark:
            return  # it did reach this point (it published before announcing anything later)
        if announced < seq:
            if words[_ABORTED]:
                raise self._peer_aborted(k)
            return  # still on its way here
        if announced > seq:
            raise CollectiveMismatch(
                f"collective mismatch: rank {self.rank} is at collective #{seq} calling {self._call.describe()} "
                f"but rank {k} went past it without contributing (it is at collective #{announced})",
                ranks=(self.rank, k),
            )
        self._raise_mismatch(k, header, seq)
        if words[_ABORTED]:
            raise self._peer_aborted(k)

    def _peer_aborted(self, k):
        """The error rank k aborted with (as an ABORT frame would carry it), naming where this rank waited."""
        memory_fence()
        raw = bytes(self._control[k][MESSAGE_AT:WAKE_AT]).split(b"\0", 1)[0].decode("utf-8", "replace")
        error = CommError(raw or f"rank {k} aborted while rank {self.rank} waited for it in {self._where()}")
        error.origin = k
        return error

    def _raise_mismatch(self, k, header, seq):
        """Raise CollectiveMismatch if rank k's announced `header` is not the collective this rank runs."""
        theirs = frames.unpack(header)
        if theirs is None or theirs.call.key() != self._key:
            described = theirs.call.describe() if theirs is not None else "an unreadable collective"
            raise CollectiveMismatch(
                f"collective mismatch: rank {self.rank} called {self._call.describe()} but rank {k} called "
                f"{described} at collective #{seq}",
                ranks=(self.rank, k),
            )

    def _where(self):
        return f"{self._call.describe()} at collective #{self._seq}"


def _header(call, seq, tag):
    """The call's wire header as every rank writes it (sender 0: ranks that agree write the same bytes), with the
    shape flattened when it has too many dimensions for the control line."""
    header = frames.pack(frames.KIND_DATA, call, 0, 0, seq, tag)
    if len(header) <= HEADER_MAX:
        return header
    return frames.pack(frames.KIND_DATA, call, 0, 0, seq, tag, (math.prod(call.shape),))
