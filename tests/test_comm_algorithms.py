"""The collective algorithms as strategies (mpnn/comm/algorithms.py): each registry's selection order, the
size bounds its cache relies on, and, in real 2-rank worlds, which algorithm each collective ran per setting."""

import itertools

import numpy as np
import pytest

from commworld import run_world, values
from mpnn.comm import algorithms
from mpnn.comm.algorithms import ALLREDUCE, BARRIER, REGISTRIES, SMALL_BYTES, Setup

SETUPS = {  # what a world may offer: (slots, mailboxes); stand-ins, selection only looks at presence
    "ring only": Setup(0, 2),
    "slots": Setup(0, 2, True, slots=object()),
    "slots + mailboxes": Setup(0, 2, True, slots=object(), mailboxes=object()),
}


F32 = np.dtype(np.float32)


def names(registry, setup, op="sum", nbytes=0, dtype=F32):
    return [a.name for a in registry.applicable(setup, op, nbytes, dtype)]


@pytest.mark.parametrize(
    "setup,small,large",
    [
        ("ring only", "gather", "ring"),
        ("slots", "gather", "shared-memory"),
        ("slots + mailboxes", "mailbox", "shared-memory"),
    ],
)
def test_allreduce_selection_order(setup, small, large):
    """<= 32 KB: mailboxes where the world has them, else gather; above: shared memory, else the ring."""
    s = SETUPS[setup]
    assert [a.name for a in ALLREDUCE.algorithms] == ["mailbox", "gather", "shared-memory", "ring"]
    for nbytes in (0, 4, SMALL_BYTES):
        assert ALLREDUCE.select(s, "sum", nbytes, F32).name == small
    for nbytes in (SMALL_BYTES + 1, 1 << 20, 64 << 20):
        assert ALLREDUCE.select(s, "mean", nbytes, np.dtype(np.float16)).name == large
    assert names(ALLREDUCE, s, nbytes=1 << 20)[-1] == "ring"


def test_barrier_and_ring_only_collectives():
    assert BARRIER.select(SETUPS["slots + mailboxes"]).name == "mailbox"
    assert BARRIER.select(SETUPS["slots"]).name == "ring"
    for collective in ("broadcast", "allgather", "reduce_scatter", "broadcast_object"):
        for setup in SETUPS.values():
            assert len(REGISTRIES[collective].applicable(setup)) == 1


def test_last_algorithm_always_applies():
    """Selection never comes up empty: every registry ends with an algorithm that takes anything."""
    for registry, setup, nbytes in itertools.product(REGISTRIES.values(), SETUPS.values(), (0, 1 << 30)):
        assert registry.algorithms[-1].applies(setup, None, nbytes, None)


def test_applies_changes_only_at_declared_size_bounds():
    """The cache keys on the size class cut at the bounds the algorithms declare: within a class, every
    algorithm's answer must be the same (probed at 0, each bound, each bound + 1 and far beyond)."""
    for registry in REGISTRIES.values():
        edges = [0, *registry.bounds]
        probes = sorted({p for b in registry.bounds for p in (b - 1, b, b + 1)} | {0, 1, 1 << 31})
        for setup, algorithm in itertools.product(SETUPS.values(), registry.algorithms):
            by_class = {}
            for nbytes in probes:
                size_class = sum(nbytes > b for b in edges[1:])
                answer = algorithm.applies(setup, "sum", nbytes, F32)
                assert by_class.setdefault(size_class, answer) == answer, (registry, algorithm, nbytes)


def test_choice_is_cached_per_setup():
    setup = Setup(0, 2, True, slots=object(), mailboxes=object())
    first = ALLREDUCE.select(setup, "sum", 100, F32)
    assert ALLREDUCE.select(setup, "sum", 200, F32) is first
    assert len(setup.choices) == 1
    ALLREDUCE.select(setup, "sum", 1 << 20, F32)
    ALLREDUCE.select(setup, "max", 100, F32)
    assert len(setup.choices) == 3
    assert Setup(0, 2).choices == {}  # a new Setup (the world's paths changed) starts with no choices


def which_worker(comm):
    """Run every collective once (a small and a large all-reduce) and report which algorithm ran each."""
    ran = []
    for registry in algorithms.REGISTRIES.values():
        for algorithm in registry.algorithms:

            def spy(*args, _run=algorithm.run, _name=f"{registry.collective}:{algorithm.name}"):
                ran.append(_name)
                return _run(*args)

            algorithm.run = spy  # this process only: the strategies are module-level singletons
    small, large = np.ones(16, np.float32), np.ones(100_000, np.float32)
    comm.allreduce(small)
    comm.allreduce(large, "mean")
    comm.barrier()
    comm.broadcast(small, root=1)
    comm.allgather(np.arange(comm.rank + 1))
    comm.reduce_scatter(np.ones((5, 3)))
    comm.allgather_object(comm.rank)
    comm.broadcast_object("x", root=1)
    return ran, float(small[0]), float(large[0])


@pytest.mark.parametrize(
    "env,small,large,barrier",
    [
        ({"MPNN_MAILBOX": "1"}, "mailbox", "shared-memory", "mailbox"),
        ({"MPNN_MAILBOX": "0"}, "gather", "shared-memory", "ring"),
        ({"MPNN_SHM": "0", "MPNN_MAILBOX": "1"}, "gather", "ring", "ring"),  # mailboxes live in the shm files
    ],
)
def test_each_setting_runs_its_algorithms(env, small, large, barrier):
    for ran, small_value, large_value in values(run_world(which_worker, 2, env=env, deadline=60)):
        assert ran == [
            f"allreduce:{small}",
            f"allreduce:{large}",
            f"barrier:{barrier}",
            "broadcast:chain",
            "allgather:ring",
            "reduce_scatter:ring",
            "allgather:ring",
            "broadcast_object:chain",
        ]
        assert (small_value, large_value) == (2.0, 1.0)
