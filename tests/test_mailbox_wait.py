"""The mailboxes' adaptive wait (mpnn/comm/mailbox.py): spin briefly, then block, and still wake at once.

A waiter whose peer is half a second late must spend well under that half second of CPU (it blocks on the futex,
or without one sleeps with a back-off, instead of spinning or yielding), and must return within a bounded time of
the peer's publish; an abort wakes it too, and a silent peer still ends in CommTimeout. The in-process tests pair
two Mailboxes over ordinary memory, the peer driven by a thread; the last one runs a real 2-process world.
"""

import threading
import time

import numpy as np
import pytest

from commworld import run_world, values
from mpnn.comm import frames, mailbox
from mpnn.comm.errors import CommError, CommTimeout

LATE_S = 0.5  # how late the peer is
CPU_SHARE = 0.1  # the waiter may burn at most this share of the wait (measured: futex <0.01, sleep 0.03-0.04;
# before the adaptive wait, 0.17 of a 0.5 s wait and 0.27 of a 50 ms one)
WAKE_BOUND_S = 0.1  # from the peer's publish to the waiter's return (measured: 0.15-0.6 ms, load 5-10)


class FakeSlots:
    """Every rank's mailbox region in this process's memory (shm.SharedSlots.region's interface)."""

    def __init__(self, world_size):
        self.memory = [np.zeros(mailbox.MAILBOX_BYTES, np.uint8) for _ in range(world_size)]

    def region(self, rank, offset, nbytes):
        return self.memory[rank][offset : offset + nbytes]


def pair(futex, timeout=10.0):
    """Two ranks' Mailboxes over shared memory of this process, both in barrier #1."""
    slots = FakeSlots(2)
    boxes = [mailbox.Mailboxes(slots, 2, rank, tag=frames.run_tag("test"), timeout=timeout) for rank in range(2)]
    for box in boxes:
        box.futex = mailbox.FUTEX if futex else None
        box.announce(frames.Call(frames.BARRIER), 1)
    return boxes


def wait_in(where, fn):
    """Run fn() on the main thread or on a new thread; (its result or exception, its thread CPU s, wall s)."""
    out = {}

    def body():
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            out["result"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            out["result"] = error
        out["cpu"], out["wall"], out["end"] = time.thread_time() - cpu, time.perf_counter() - wall, time.perf_counter()

    if where == "main":
        body()
    else:
        thread = threading.Thread(target=body)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
    return out


def late_peer(fn):
    """Call fn() on a thread LATE_S from now; returns the thread and a dict that gets the time just before."""
    stamp = {}

    def body():
        time.sleep(LATE_S)
        stamp["posted"] = time.perf_counter()
        fn()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, stamp


needs_futex = pytest.mark.skipif(mailbox.FUTEX is None, reason="no futex(2) here")


@pytest.mark.parametrize("futex", [pytest.param(True, marks=needs_futex), False], ids=["futex", "sleep"])
@pytest.mark.parametrize("where", ["main", "thread"])  # the main thread spins, others yield first
def test_a_waiter_past_its_spin_blocks_and_wakes_when_the_peer_posts(futex, where):
    waiter, peer = pair(futex)
    thread, stamp = late_peer(peer.sync)
    out = wait_in(where, waiter.sync)
    thread.join(timeout=10)
    assert out["result"] is None
    assert out["wall"] >= LATE_S * 0.9
    assert out["cpu"] < CPU_SHARE * out["wall"], f"burned {out['cpu']:.3f} s of CPU in a {out['wall']:.3f} s wait"
    assert out["end"] - stamp["posted"] < WAKE_BOUND_S
    assert waiter.waits == {"spun": 0, "blocked": 1}


@pytest.mark.parametrize("futex", [pytest.param(True, marks=needs_futex), False], ids=["futex", "sleep"])
def test_a_blocked_waiter_sees_its_peer_abort_at_once(futex):
    waiter, peer = pair(futex)
    thread, stamp = late_peer(lambda: peer.mark_aborted(CommError("rank 1 gave up: disk full")))
    out = wait_in("main", waiter.sync)
    thread.join(timeout=10)
    assert isinstance(out["result"], CommError) and "disk full" in str(out["result"])
    assert out["end"] - stamp["posted"] < WAKE_BOUND_S
    assert out["cpu"] < CPU_SHARE * out["wall"]


def test_a_blocked_waiter_still_times_out_on_a_silent_peer():
    waiter, _ = pair(mailbox.FUTEX is not None, timeout=LATE_S)
    out = wait_in("main", waiter.sync)
    assert isinstance(out["result"], CommTimeout) and "rank 1 is silent" in str(out["result"])
    assert LATE_S * 0.9 <= out["wall"] < LATE_S + 0.5
    assert out["cpu"] < CPU_SHARE * out["wall"]


def test_an_uncontended_wait_spins_and_makes_no_system_call():
    """A peer that is already there: no blocking and no FUTEX_WAKE (nobody said it sleeps)."""
    waiter, peer = pair(True)
    calls = []
    for box in (waiter, peer):
        box.futex = type("Counting", (), {"wake": lambda self, address: calls.append(address)})()
    peer._mark += 1
    peer._words[peer.rank][mailbox._PUBLISHED] = peer._mark  # published, as sync() would, without waiting
    waiter.sync()
    assert waiter.waits == {"spun": 0, "blocked": 0} and calls == []


def late_barrier_worker(comm):
    """Rank 1 reaches the barrier LATE_S after rank 0; rank 0 reports its CPU and wall time in it."""
    comm.barrier()
    comm.barrier()  # both start together
    if comm.rank == 1:
        time.sleep(LATE_S)
        posted = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
        comm.barrier()
        return posted
    cpu, wall = time.process_time(), time.monotonic()
    comm.barrier()
    end = time.monotonic()
    return time.process_time() - cpu, end - wall, end, comm._mailboxes is not None


def test_a_rank_waiting_for_a_late_peer_blocks_in_a_real_world():
    (cpu, wall, end, mailboxes), posted = values(
        run_world(late_barrier_worker, 2, env={"MPNN_MAILBOX": "1"}, deadline=60)
    )
    assert mailboxes
    assert wall >= LATE_S * 0.9
    assert cpu < CPU_SHARE * wall, f"rank 0 burned {cpu:.3f} s of CPU in a {wall:.3f} s barrier"
    assert end - posted < WAKE_BOUND_S
