"""Collectives against NumPy in real worlds of 1..8 processes: every dtype, odd sizes, empty and tiny arrays,
non-contiguous arrays, big arrays (chunked ring, multi-block shared memory), async ordering, and hypothesis cases."""

import hashlib
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commworld import run_world, values

FLOATS = ("float16", "float32", "float64")
INTS = ("int32", "int64")
TOLERANCE = {"float16": (1e-3, 1e-4), "float32": (1e-5, 1e-5), "float64": (1e-12, 1e-12)}


def rank_input(case, rank, shape, dtype):
    """Rank `rank`'s input of case `case`: the same on every rank that computes it."""
    rng = np.random.default_rng([case, rank])
    if np.dtype(dtype).kind == "f":
        return np.asarray(rng.standard_normal(shape) * 4).astype(dtype)
    return np.asarray(rng.integers(-1000, 1000, shape)).astype(dtype)


def reference(inputs, op):
    """The reduction in float64 / int64, computed independently of mpnn."""
    stack = np.stack([np.asarray(x, np.float64 if x.dtype.kind == "f" else np.int64) for x in inputs])
    if op == "max":
        return stack.max(axis=0)
    total = stack.sum(axis=0)
    return total / len(inputs) if op == "mean" else total


def mismatch(result, expected, dtype):
    """None if `result` matches `expected` for `dtype`, else a description."""
    if result.shape != expected.shape or result.dtype != np.dtype(dtype):
        return f"got {result.dtype}{result.shape}, expected {dtype}{expected.shape}"
    if np.dtype(dtype).kind == "f":
        rtol, atol = TOLERANCE[np.dtype(dtype).name]
        ok = np.allclose(result.astype(np.float64), expected, rtol=rtol, atol=atol)
    else:
        ok = np.array_equal(result.astype(np.int64), expected)
    return None if ok else f"max error {np.max(np.abs(result.astype(np.float64) - expected))}"


class Checker:
    """Runs cases on one rank, collecting failures and a digest of every result (ranks must agree bit for bit)."""

    def __init__(self, comm):
        self.comm, self.failures, self.checks, self.case = comm, [], 0, 0
        self.digest = hashlib.sha256()

    def record(self, name, result, expected, dtype, shared=True):
        self.checks += 1
        problem = mismatch(result, expected, dtype)
        if problem:
            self.failures.append(f"rank {self.comm.rank} case {self.case} {name}: {problem}")
        if shared:
            self.digest.update(np.ascontiguousarray(result).tobytes())

    def inputs(self, shape, dtype):
        return [rank_input(self.case, rank, shape, dtype) for rank in range(self.comm.world_size)]

    def allreduce(self, shape, dtype, op, layout="C"):
        self.case += 1
        inputs = self.inputs(shape, dtype)
        mine = inputs[self.comm.rank].copy()
        if layout == "strided":  # a view of every other column of a wider array
            wide = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
            wide[..., ::2] = mine
            mine = wide[..., ::2]
        elif layout == "F":
            mine = np.asfortranarray(mine)
        returned = self.comm.allreduce(mine, op)
        if returned is not mine:
            self.failures.append(f"rank {self.comm.rank} case {self.case}: allreduce did not return its argument")
        if layout == "strided" and not np.all(wide[..., 1::2] == 0):
            self.failures.append(f"rank {self.comm.rank} case {self.case}: strided allreduce wrote outside the view")
        self.record(f"allreduce({dtype}, {shape}, {op}, {layout})", mine, reference(inputs, op), dtype)

    def broadcast(self, shape, dtype, root, strided=False):
        self.case += 1
        source = rank_input(self.case, root, shape, dtype)
        mine = source.copy() if self.comm.rank == root else np.zeros(shape, dtype)
        if strided:
            wide = np.zeros(shape[:-1] + (3 * shape[-1],), dtype)
            wide[..., ::3] = mine
            mine = wide[..., ::3]
        self.comm.broadcast(mine, root=root)
        self.record(f"broadcast({dtype}, {shape}, root={root})", mine, reference([source], "sum"), dtype)

    def allgather(self, shapes, dtype):
        self.case += 1
        pieces = [rank_input(self.case, rank, shapes[rank], dtype) for rank in range(self.comm.world_size)]
        gathered = self.comm.allgather(pieces[self.comm.rank])
        if len(gathered) != self.comm.world_size:
            self.failures.append(f"rank {self.comm.rank} case {self.case}: allgather returned {len(gathered)} arrays")
            return
        for rank, (got, piece) in enumerate(zip(gathered, pieces)):
            self.record(f"allgather({dtype}) piece of rank {rank}", got, reference([piece], "sum"), dtype)

    def reduce_scatter(self, shape, dtype, op):
        self.case += 1
        inputs = self.inputs(shape, dtype)
        mine = inputs[self.comm.rank].copy()
        part = self.comm.reduce_scatter(mine, op)
        expected = np.array_split(reference(inputs, op), self.comm.world_size)[self.comm.rank]
        self.record(f"reduce_scatter({dtype}, {shape}, {op})", part, expected, dtype, shared=False)
        self.record(
            f"reduce_scatter({dtype}, {shape}) input untouched",
            mine,
            reference([inputs[self.comm.rank]], "sum"),
            dtype,
            shared=False,
        )

    def report(self):
        return {"failures": self.failures, "checks": self.checks, "digest": self.digest.hexdigest()}


def run_case(checker, case):
    """One hypothesis-drawn case: (collective, dtype, shape, op, root)."""
    collective, dtype, shape, op, root = case
    n = checker.comm.world_size
    if collective == "allreduce":
        checker.allreduce(shape, dtype, op if dtype in FLOATS or op != "mean" else "sum")
    elif collective == "broadcast":
        checker.broadcast(shape, dtype, root % n)
    elif collective == "allgather":
        checker.allgather([shape[:-1] + (shape[-1] + rank,) if shape else shape for rank in range(n)], dtype)
    elif shape:
        checker.reduce_scatter(shape, dtype, op if dtype in FLOATS or op != "mean" else "max")


def collectives_worker(comm, big):
    """Every collective on many shapes and dtypes in this world; returns the Checker report."""
    n, checker = comm.world_size, Checker(comm)
    small_shapes = [(), (0,), (1,), (max(n - 1, 1),), (7,), (13, 3), (2, 0, 3), (9000,)]
    for dtype in FLOATS + INTS:
        for op in ("sum", "mean", "max") if dtype in FLOATS else ("sum", "max"):
            for shape in small_shapes:
                checker.allreduce(shape, dtype, op)
        checker.allreduce((20, 6), dtype, "sum", layout="strided")
        checker.allreduce((5, 7), dtype, "max", layout="F")
    if big:  # beyond a 512 KB ring chunk and a 4 MB shared-memory block
        checker.allreduce((1_100_017,), "float32", "sum")
        checker.allreduce((300_001,), "float16", "mean")
        checker.allreduce((150_001,), "float64", "max", layout="strided")
    for root in sorted({0, n - 1, n // 2}):
        for dtype in ("float32", "int64", "uint8", "float16"):
            for shape in ((), (0,), (5, 3)):
                checker.broadcast(shape, dtype, root)
        checker.broadcast((4, 6), "float64", root, strided=True)
    if big:
        checker.broadcast((300_003,), "float32", n - 1)
    for dtype in ("float32", "int32", "uint8"):
        checker.allgather([(rank,) for rank in range(n)], dtype)
        checker.allgather([(rank + 1, 2) for rank in range(n)], dtype)
    if big:
        checker.allgather([(200_001,) if rank == 0 else (3,) for rank in range(n)], "float64")
    for dtype in FLOATS + INTS:
        for op in ("sum", "mean", "max") if dtype in FLOATS else ("sum", "max"):
            for shape in ((3 * n, 2), (max(n - 1, 1),), (2 * n + 1, 3), (1,), (0, 4)):
                checker.reduce_scatter(shape, dtype, op)
    if big:
        checker.reduce_scatter((50_000 * n + 3,), "float32", "sum")

    objects = comm.allgather_object({"rank": comm.rank, "blob": bytes(700_000 if comm.rank == 0 else comm.rank)})
    checker.checks += 1
    if [o["rank"] for o in objects] != list(range(n)) or [len(o["blob"]) for o in objects] != [
        700_000 if rank == 0 else rank for rank in range(n)
    ]:
        checker.failures.append(f"rank {comm.rank}: allgather_object returned {[o['rank'] for o in objects]}")
    for root in sorted({0, n - 1}):
        payload = {"root": root, "array": np.arange(250_000) * root}
        got = comm.broadcast_object(payload if comm.rank == root else None, root=root)
        checker.checks += 1
        if got["root"] != root or not np.array_equal(got["array"], payload["array"]):
            checker.failures.append(f"rank {comm.rank}: broadcast_object from root {root} returned {got['root']}")

    time.sleep(0.03 * comm.rank)
    entered = time.time()
    comm.barrier()
    left = time.time()
    stamps = comm.allgather_object((entered, left))
    checker.checks += 1
    if left < max(stamp[0] for stamp in stamps):
        checker.failures.append(f"rank {comm.rank} left the barrier before rank(s) entered it: {stamps}")
    return checker.report()


def async_worker(comm):
    """Queued all-reduces of different shapes run in call order, interleaved with a synchronous one."""
    n, rank = comm.world_size, comm.rank
    arrays = [np.full(size, float(rank + size), np.float32) for size in (3, 70_000, 1, 40_000, 5)]
    handles = [comm.allreduce_async(a, "sum") for a in arrays[:3]]
    sync = comm.allreduce(np.full(4, rank, np.int64), "max")  # waits for the queue first
    completed_before_sync_returned = [h.is_completed() for h in handles]
    handles += [comm.allreduce_async(a, "mean") for a in arrays[3:]]
    results = [h.wait() for h in handles]
    expected = [sum(r + a.size for r in range(n)) for a in arrays[:3]] + [
        sum(r + a.size for r in range(n)) / n for a in arrays[3:]
    ]
    from mpnn.comm import get_comm, init_from_env

    return {
        "singleton": get_comm() is comm and init_from_env() is comm,
        "same_objects": all(result is a for result, a in zip(results, arrays)),
        "values_ok": all(np.allclose(result, value) for result, value in zip(results, expected)),
        "sync_ok": np.array_equal(sync, np.full(4, n - 1)),
        "completed_before_sync": completed_before_sync_returned,
    }


def assert_world_ok(reports):
    failures = [failure for report in reports for failure in report["failures"]]
    assert not failures, "\n".join(failures[:30])
    assert all(report["checks"] > 10 for report in reports)
    assert len({report["digest"] for report in reports}) == 1, "ranks disagree on some result bit for bit"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 6, 7, 8])
def test_collectives_match_numpy(world_size):
    assert_world_ok(values(run_world(collectives_worker, world_size, (world_size <= 4,), deadline=150)))


@pytest.mark.parametrize(
    "world_size,env",
    [
        (2, {"MPNN_SHM": "0"}),
        (5, {"MPNN_SHM": "0"}),
        (3, {"MPNN_TRANSPORT": "tcp"}),  # tcp has no shm either
        (2, {"MPNN_MAILBOX": "0"}),
        (3, {"MPNN_MAILBOX": "1"}),
        (5, {"MPNN_MAILBOX": "1"}),
        (8, {"MPNN_MAILBOX": "1"}),
    ],
)
def test_collectives_match_numpy_over_each_path(world_size, env):
    """The socket ring, and small all-reduces through shared-memory mailboxes forced on in worlds with more
    ranks than this machine has cores (by default those use the sockets) or off where they would be on."""
    assert_world_ok(values(run_world(collectives_worker, world_size, (True,), env=env, deadline=150)))


@pytest.mark.parametrize("world_size", [1, 3])
def test_async_allreduce_runs_in_call_order(world_size):
    for report in values(run_world(async_worker, world_size)):
        assert report["singleton"] and report["same_objects"] and report["values_ok"] and report["sync_ok"]
        assert report["completed_before_sync"] == [True, True, True]


def multi_node_worker(comm):
    a = np.full(100_000, comm.rank + 1.0)
    comm.allreduce(a, "mean")
    return comm.encrypt, comm._link.bound, float(a[0]), comm.allgather_object(comm.rank)


def test_multi_node_settings_encrypt_and_bind_every_interface():
    for encrypt, bound, mean, ranks in values(run_world(multi_node_worker, 2, env={"MPNN_NNODES": "2"})):
        assert encrypt and any(endpoint.startswith("tcp://0.0.0.0:") for endpoint in bound)
        assert mean == 1.5 and ranks == [0, 1]


def hypothesis_worker(comm, cases):
    checker = Checker(comm)
    for case in cases:
        run_case(checker, case)
    return checker.report()


CASES = st.tuples(
    st.sampled_from(["allreduce", "broadcast", "allgather", "reduce_scatter"]),
    st.sampled_from(FLOATS + INTS),
    st.one_of(st.lists(st.integers(0, 9), max_size=3).map(tuple), st.integers(0, 120_000).map(lambda k: (k,))),
    st.sampled_from(["sum", "mean", "max"]),
    st.integers(0, 7),
)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world_size=st.integers(2, 5), cases=st.lists(CASES, min_size=10, max_size=25), shm=st.sampled_from(["0", "1"]))
def test_random_cases_match_numpy(world_size, cases, shm):
    env = {"MPNN_SHM": shm, "MPNN_MAILBOX": shm}
    reports = values(run_world(hypothesis_worker, world_size, (cases,), env=env))
    failures = [failure for report in reports for failure in report["failures"]]
    assert not failures, "\n".join(failures[:30])
    assert len({report["digest"] for report in reports}) == 1


def test_world_of_one_needs_no_sockets(monkeypatch):
    for name in ("MPNN_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    from mpnn.comm import Communicator

    comm = Communicator()
    a = np.arange(6.0).reshape(2, 3)
    assert comm.allreduce(a, "mean") is a and np.array_equal(a, np.arange(6.0).reshape(2, 3))
    assert comm.allgather_object({"x": 1}) == [{"x": 1}]
    assert np.array_equal(comm.reduce_scatter(a), a) and comm._link is None and comm._context is None
    assert comm.broadcast_object([1, 2]) == [1, 2]
    comm.close()
    comm.close()
