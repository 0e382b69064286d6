"""Collective algorithms as strategies: each class says when it applies and how it runs; an ordered registry per
collective runs the first that applies (Horovod's shape: an OperationManager over ordered lists of ops).

Why: the Communicator used to pick among mailbox, gather, shared-memory and ring paths with if/elif chains in
each collective's body; a new path (compression, another transport) now is one class and one registry entry.
The mechanics stay where they were (ring.py, shm.py, mailbox.py); these classes only choose and call them, in
the same order with the same frames, so the wire protocol and the errors are those of the chains they replace.

Selection order, first match wins (the last entry of every registry always applies):
    allreduce         1. MailboxAllreduce       nbytes <= 32 KB and this world has mailboxes
                      2. GatherAllreduce        nbytes <= 32 KB: whole arrays gathered around the ring,
                                                each rank reduces them itself, in rank order (latency-bound)
                      3. SharedMemoryAllreduce  this world has shared slots: block by block through /dev/shm
                      4. RingAllreduce          pipelined ring reduce-scatter + all-gather over the sockets
    barrier           1. MailboxBarrier         this world has mailboxes: one synchronisation point (spin, then futex)
                      2. RingBarrier            an empty piece from every rank around the ring
    broadcast         1. ChainBroadcast         root -> root+1 -> ... along the ring, chunked
    allgather         1. RingAllgather          every rank's piece around the ring (allgather_object too)
    reduce_scatter    1. RingReduceScatter      ring reduce-scatter along axis 0 (np.array_split rows)
    broadcast_object  1. ChainBroadcastObject   the root's typed object bytes along the chain, size in the header
"Has shared slots" means: every rank is on this host, shared memory is on (MPNN_SHM, not 0; the Communicator's
shared_memory=True), the transport is "auto" (MPNN_TRANSPORT=tcp has none) and /dev/shm gave every rank its
file. "Has mailboxes" means it has slots and MPNN_MAILBOX says so (1, or auto with no more ranks than cores:
mailbox.wanted). Both are fixed once the world is connected (collective #1, the ring-closing barrier, and the
barrier after mapping the files run before either exists).

Hot path: a registry caches its choice per Setup (what the world offers; a new Setup whenever that changes)
and per (reduce op, dtype, size class); the size classes are cut at the byte bounds the algorithms declare
(size_bounds), so applies() may look at nbytes only through those bounds. A small all-reduce then costs one
bisect, one tuple and one dict lookup more than the chain did (~0.2 us a call, measured; the 4 KB mailbox
all-reduce takes ~17 us). Every rank must choose alike, since the algorithms' frames differ: applies() reads only
what all ranks agree on (allgather and broadcast_object pass no size: ranks' pieces differ, or only the root
knows it).
"""

from __future__ import annotations

import math
from bisect import bisect_left

import numpy as np

from . import mailbox, ring, shm

SMALL_BYTES = mailbox.SMALL_BYTES  # at most this: latency-bound; mailboxes on one host, else gather + reduce
REDUCE_UFUNCS = {"sum": np.add, "mean": np.add, "max": np.maximum}


class Setup:
    """What this rank's world offers the algorithms: rank, world size, whether every rank is on this host, the
    shared slots (shm.SharedSlots) and mailboxes (mailbox.Mailboxes), None where the world has none. Immutable:
    the Communicator makes a new one when its paths change, which also empties the cache of choices."""

    __slots__ = ("rank", "world_size", "same_host", "slots", "mailboxes", "choices")

    def __init__(self, rank, world_size, same_host=False, slots=None, mailboxes=None):
        self.rank, self.world_size, self.same_host = rank, world_size, same_host
        self.slots, self.mailboxes = slots, mailboxes
        self.choices = {}  # Registry.select's cache: (collective, op, dtype, size class) -> algorithm

    def __repr__(self):
        return (
            f"Setup(rank={self.rank}, world_size={self.world_size}, same_host={self.same_host}, "
            f"slots={self.slots is not None}, mailboxes={self.mailboxes is not None})"
        )


class Algorithm:
    """One way to run one collective. applies(setup, op, nbytes, dtype) says whether it can and should run this
    call (op: the reduction name or None; nbytes: the array's bytes, looked at only through size_bounds);
    run(link, setup, ...) runs it, with the arguments of its collective (see each registry's subclasses)."""

    name = "algorithm"
    size_bounds: tuple[int, ...] = ()  # byte counts b where applies() may change between nbytes <= b and nbytes > b

    def applies(self, setup, op, nbytes, dtype):
        return True

    def __repr__(self):
        return f"{type(self).__name__}()"


class Registry:
    """The algorithms of one collective, in selection order; select() returns the first that applies."""

    def __init__(self, collective, algorithms):
        self.collective, self.algorithms = collective, tuple(algorithms)
        self.bounds = tuple(sorted({b for algorithm in self.algorithms for b in algorithm.size_bounds}))

    def select(self, setup, op=None, nbytes=0, dtype=None):
        """The first algorithm that applies to this call (cached per setup, op, dtype and size class)."""
        key = (self.collective, op, dtype, bisect_left(self.bounds, nbytes))
        try:
            return setup.choices[key]
        except KeyError:
            choice = setup.choices[key] = self.applicable(setup, op, nbytes, dtype)[0]
            return choice

    def applicable(self, setup, op=None, nbytes=0, dtype=None):
        """Every algorithm that applies, in selection order (the first one runs)."""
        found = [a for a in self.algorithms if a.applies(setup, op, nbytes, dtype)]
        if not found:
            raise LookupError(
                f"no {self.collective} algorithm applies to op={op!r}, {nbytes} bytes of {dtype} on {setup!r}"
            )
        return found

    def __repr__(self):
        return f"Registry({self.collective!r}, {list(self.algorithms)!r})"


# -- all-reduce: run(link, setup, flat, op, accumulate) reduces the flat contiguous `flat` in place; `op` is
#    "sum", "mean" or "max"; partial results are kept in the `accumulate` dtype (float32 for float16 sums) ------
class MailboxAllreduce(Algorithm):
    """Small arrays on one host: copy into this rank's mailbox, wait (a short spin, then a futex) for every rank,
    reduce all mailboxes in rank order (mailbox.py)."""

    name = "mailbox"
    size_bounds = (SMALL_BYTES,)

    def applies(self, setup, op, nbytes, dtype):
        return nbytes <= SMALL_BYTES and setup.mailboxes is not None

    def run(self, link, setup, flat, op, accumulate):
        setup.mailboxes.allreduce(flat, REDUCE_UFUNCS[op], accumulate, setup.world_size if op == "mean" else None)


class GatherAllreduce(Algorithm):
    """Small arrays without mailboxes: gather every rank's whole array around the ring, then each rank reduces
    them itself in rank order (n - 1 hops of latency instead of the ring's 2 (n - 1))."""

    name = "gather"
    size_bounds = (SMALL_BYTES,)

    def applies(self, setup, op, nbytes, dtype):
        return nbytes <= SMALL_BYTES

    def run(self, link, setup, flat, op, accumulate):
        n = setup.world_size
        gathered = np.empty((n, flat.size), flat.dtype)
        gathered[setup.rank] = flat
        pieces = [(i * flat.size, (i + 1) * flat.size) for i in range(n)]
        ring.allgather_segments(link, gathered.reshape(-1), pieces)
        total = REDUCE_UFUNCS[op].reduce(gathered, axis=0, dtype=accumulate)
        if op == "mean":
            total /= n
        flat[...] = total


class SharedMemoryAllreduce(Algorithm):
    """Larger arrays on one host: copy in, reduce this rank's segment, copy out, block by block (shm.py)."""

    name = "shared-memory"

    def applies(self, setup, op, nbytes, dtype):
        return setup.slots is not None

    def run(self, link, setup, flat, op, accumulate):
        shm.allreduce(
            link,
            setup.slots,
            flat,
            REDUCE_UFUNCS[op],
            accumulate,
            setup.world_size if op == "mean" else None,
            setup.mailboxes,
        )


class RingAllreduce(Algorithm):
    """Everything else: pipelined ring reduce-scatter (in the accumulate dtype), then all-gather (ring.py)."""

    name = "ring"

    def run(self, link, setup, flat, op, accumulate):
        n = setup.world_size
        segments = ring.split_bounds(flat.size, n)
        work = flat if accumulate == flat.dtype else flat.astype(accumulate)
        ring.reduce_scatter(link, work, segments, REDUCE_UFUNCS[op])
        low, high = segments[setup.rank]
        if op == "mean":
            np.divide(work[low:high], n, out=work[low:high])
        if work is not flat:
            flat[low:high] = work[low:high]
        ring.allgather_segments(link, flat, segments)


# -- barrier: run(link, setup) returns once every rank has entered it ---------------------------------------------
class MailboxBarrier(Algorithm):
    """One synchronisation point in the mailboxes, waited for by a short spin, then a futex."""

    name = "mailbox"

    def applies(self, setup, op, nbytes, dtype):
        return setup.mailboxes is not None

    def run(self, link, setup):
        setup.mailboxes.barrier()


class RingBarrier(Algorithm):
    """An empty piece from every rank around the ring (each rank has heard from all once it has all n)."""

    name = "ring"

    def run(self, link, setup):
        ring.allgather_pieces(link, np.empty(0, np.uint8), (0,))


# -- broadcast: run(link, setup, flat, root) copies the root's flat contiguous `flat` into everyone's -----------
class ChainBroadcast(Algorithm):
    """Chunks along the ring from the root, each rank forwarding to the next but the last (ring.py)."""

    name = "chain"

    def run(self, link, setup, flat, root):
        ring.broadcast_chain(link, flat, root)


# -- allgather: run(link, setup, flat, shape) returns every rank's piece (same dtype, any shape), rank order ----
class RingAllgather(Algorithm):
    """Each rank's piece travels the ring, its shape in the frame header (ring.py)."""

    name = "ring"

    def run(self, link, setup, flat, shape):
        return ring.allgather_pieces(link, flat, shape)


# -- reduce_scatter: run(link, setup, a, op, accumulate) returns this rank's rows of the reduction of `a` -------
class RingReduceScatter(Algorithm):
    """Ring reduce-scatter of a flat copy in the accumulate dtype, rows split as np.array_split does."""

    name = "ring"

    def run(self, link, setup, a, op, accumulate):
        n = setup.world_size
        work = np.array(a, dtype=accumulate, order="C").reshape(-1)
        row = math.prod(a.shape[1:])
        rows = ring.split_bounds(a.shape[0], n)
        segments = [(low * row, high * row) for low, high in rows]
        ring.reduce_scatter(link, work, segments, REDUCE_UFUNCS[op])
        low, high = segments[setup.rank]
        part = work[low:high]
        if op == "mean":
            part /= n
        first, last = rows[setup.rank]
        return part.astype(a.dtype, copy=True).reshape((last - first,) + a.shape[1:])


# -- broadcast_object: run(link, setup, flat, root, dtype) returns the root's piece (flat is None elsewhere) -----
class ChainBroadcastObject(Algorithm):
    """The root's bytes along the broadcast chain, their size in the frame header (ring.py)."""

    name = "chain"

    def run(self, link, setup, flat, root, dtype):
        return ring.broadcast_piece(link, flat, root, dtype)


ALLREDUCE = Registry("allreduce", [MailboxAllreduce(), GatherAllreduce(), SharedMemoryAllreduce(), RingAllreduce()])
BARRIER = Registry("barrier", [MailboxBarrier(), RingBarrier()])
BROADCAST = Registry("broadcast", [ChainBroadcast()])
ALLGATHER = Registry("allgather", [RingAllgather()])
REDUCE_SCATTER = Registry("reduce_scatter", [RingReduceScatter()])
BROADCAST_OBJECT = Registry("broadcast_object", [ChainBroadcastObject()])
REGISTRIES = {
    registry.collective: registry
    for registry in (ALLREDUCE, BARRIER, BROADCAST, ALLGATHER, REDUCE_SCATTER, BROADCAST_OBJECT)
}


def accumulate_dtype(dtype, op):
    """The dtype partial results are kept in: float32 for float16 sums and means (rounded once at the end)."""
    return np.float32 if dtype == np.float16 and op != "max" else dtype
