"""Telemetry counts what moves: every collective's payload is counted on the transport that carried it (the
ring's ipc or tcp sockets, the /dev/shm slots, the mailboxes), against what each algorithm must move; the
per-step split reaches the telemetry line and `mpnn telemetry show`."""

import json

import numpy as np
import pytest

from commworld import run_world, values
from mpnn.telemetry.reader import load_run
from mpnn.telemetry.summary import format_text, summarize


def moved_per_allreduce(comm, sizes):
    """For each size (float32 elements), the change of bytes_by_transport across one all-reduce of it."""
    out = []
    for size in sizes:
        before = comm.bytes_by_transport
        a = np.full(size, comm.rank + 1.0, np.float32)
        comm.allreduce(a, "sum")
        assert np.all(a == sum(range(1, comm.world_size + 1)))
        after = comm.bytes_by_transport
        out.append({k: (s - before.get(k, (0, 0))[0], r - before.get(k, (0, 0))[1]) for k, (s, r) in after.items()})
    assert comm.bytes_sent == sum(s for s, _ in comm.bytes_by_transport.values())
    return out


SMALL, LARGE = 1200, 3 * 2**20 // 4 * 4  # 4.8 KB (mailbox or gather) and 12 MB (shm: three 4 MB blocks, or ring)


@pytest.mark.parametrize(
    "world_size, env, small_on, large_on",
    [
        (2, {"MPNN_MAILBOX": "1"}, "mailbox", "shm"),
        (3, {"MPNN_MAILBOX": "1"}, "mailbox", "shm"),
        (2, {"MPNN_SHM": "0"}, "ipc", "ipc"),
        (3, {"MPNN_TRANSPORT": "tcp"}, "tcp", "tcp"),
    ],
    ids=["mailbox+shm-2", "mailbox+shm-3", "ipc-2", "tcp-3"],
)
def test_each_transport_counts_what_its_algorithm_moves(world_size, env, small_on, large_on):
    n = world_size
    for rank_moves in values(run_world(moved_per_allreduce, n, ([SMALL, LARGE],), env=env, deadline=120)):
        small, large = rank_moves
        assert {k for k, v in small.items() if v != (0, 0)} == {small_on}
        assert {k for k, v in large.items() if v != (0, 0)} == {large_on}
        if small_on == "mailbox":  # every rank reads every other rank's whole mailbox
            assert small["mailbox"] == (4 * SMALL * (n - 1),) * 2
        # reduce-scatter + all-gather, on the ring or through the slots: 2 (n-1)/n of the buffer each way
        expected = 2 * (n - 1) * 4 * LARGE // n
        sent, recv = large[large_on]
        assert abs(sent - expected) <= 64 * n and abs(recv - expected) <= 64 * n, (large, expected)


def test_the_step_split_reaches_the_line_and_show(tmp_path):
    rank_dir = tmp_path / "run"
    rank_dir.mkdir()
    lines = [
        {"t": 1.0, "rank": 0, "step": 1, "step_s": 0.01, "bytes_sent": 300, "bytes_recv": 300,
         "bytes_by_transport": {"ipc": {"sent": 100, "recv": 100}, "shm": {"sent": 200, "recv": 200}}},
        {"t": 2.0, "rank": 0, "step": 2, "step_s": 0.01, "bytes_sent": 2048, "bytes_recv": 2048,
         "bytes_by_transport": {"ipc": {"sent": 0, "recv": 0}, "shm": {"sent": 2048, "recv": 2048}}},
        {"t": 3.0, "rank": 0, "step": 3, "step_s": 0.01, "bytes_by_transport": {"shm": {"sent": [1], "recv": "x"}}},
    ]  # fmt: skip
    (rank_dir / "worker-0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = summarize(load_run(rank_dir))
    assert summary["ranks"][0]["bytes_by_transport"] == {
        "ipc": {"sent": 100, "recv": 100},
        "shm": {"sent": 2248, "recv": 2248},
    }
    assert "rank 0 bytes by transport: ipc 100 B sent / 100 B recv, shm 2.2 KiB sent / 2.2 KiB recv" in format_text(
        summary
    )


def late_peer_waits(comm):
    """Rank 1 comes 0.2 s late to one small all-reduce: rank 0's wait outlasts the spin and sleeps on a futex."""
    import time

    comm.allreduce(np.ones(8, np.float32))
    before = comm.mailbox_waits
    if comm.rank == 1:
        time.sleep(0.2)
    comm.allreduce(np.ones(8, np.float32))
    after = comm.mailbox_waits
    return {k: after[k] - before[k] for k in after}


def test_a_late_peer_shows_in_the_mailbox_wait_counts():
    waits = values(run_world(late_peer_waits, 2, (), env={"MPNN_MAILBOX": "1"}, deadline=60))
    assert waits[0] == {"spun": 0, "blocked": 1}, waits
    assert waits[1]["blocked"] == 0, waits  # rank 0 was there already


def test_mailbox_waits_reach_the_line_and_show(tmp_path):
    from mpnn.telemetry.instrument import _StepTimer

    class Comm:
        world_size = 2
        bytes_by_transport = {"mailbox": (64, 64)}
        mailbox_waits = {"spun": 3, "blocked": 1}

    class Recorder:
        def __init__(self):
            self.metrics = []

        def add_span(self, *args):
            pass

        def add_bytes(self, *args):
            pass

        def add_metrics(self, **metrics):
            self.metrics.append(metrics)

        def step_end(self):
            pass

    recorder, comm = Recorder(), Comm()
    timer = _StepTimer(recorder, comm)
    timer.opt_pre(None, (), {})
    timer.opt_post(None, (), {})
    comm.mailbox_waits = {"spun": 5, "blocked": 4}
    timer.opt_pre(None, (), {})
    timer.opt_post(None, (), {})
    assert [m["mailbox_waits"] for m in recorder.metrics if "mailbox_waits" in m] == [
        {"spun": 3, "blocked": 1},
        {"spun": 2, "blocked": 3},
    ]
    rank_dir = tmp_path / "run"
    rank_dir.mkdir()
    lines = [
        {"t": 1.0, "rank": 0, "step": 1, "step_s": 0.01, "mailbox_waits": {"spun": 3, "blocked": 1}},
        {"t": 2.0, "rank": 0, "step": 2, "step_s": 0.01, "mailbox_waits": {"spun": 2, "blocked": "x"}},
    ]
    (rank_dir / "worker-0.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = summarize(load_run(rank_dir))
    assert summary["ranks"][0]["mailbox_waits"] == {"spun": 5, "blocked": 1}
    assert "rank 0 mailbox waits for a late peer: 5 ended within the spin, 1 slept on a futex" in format_text(summary)
