"""mpnn.launch.run: a function (module-level, lambda or closure) runs on n workers through the same launcher;
rank 0's return value comes back; a failed rank raises WorkerError with its rank and traceback."""

import os
import signal
import threading
import time

import pytest

from mpnn.launch import LaunchError, WorkerError, run
from test_launch import leftover_processes


def whoami(scale, offset=0):
    rank = int(os.environ["MPNN_RANK"])
    return {
        "rank": rank,
        "world": int(os.environ["MPNN_WORLD_SIZE"]),
        "value": rank * scale + offset,
        "affinity": sorted(os.sched_getaffinity(0)),
        "threads": os.environ["OPENBLAS_NUM_THREADS"],
    }


def fail_on_rank_one():
    if os.environ["MPNN_RANK"] == "1":
        raise ValueError("boom from rank 1")
    time.sleep(60)


def only_run_dir(log_dir):
    (run_dir,) = log_dir.iterdir()
    return run_dir


def test_returns_rank_zeros_value(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    handler_before = signal.getsignal(signal.SIGTERM)
    got = run(whoami, n=3, args=(10,), kwargs={"offset": 7}, log_dir=tmp_path)
    assert got == {"rank": 0, "world": 3, "value": 7, "affinity": [cores[0]], "threads": "1"}
    assert signal.getsignal(signal.SIGTERM) is handler_before
    run_dir = only_run_dir(tmp_path)
    assert {"run.json", "payload.pkl", "result-0.pkl", "worker-0.log", "worker-1.log", "worker-2.log"} == {
        p.name for p in run_dir.iterdir()
    }
    assert oct((run_dir / "payload.pkl").stat().st_mode & 0o777) == oct(0o600)


def test_lambda_and_closure_travel_by_value():
    base = [1, 2, 3]
    assert run(lambda k: sum(base) * k + int(os.environ["MPNN_RANK"]), 2, args=(5,)) == 30


def test_defaults_one_worker_per_core_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(lambda: os.environ["MPNN_WORLD_SIZE"]) == str(len(os.sched_getaffinity(0)))
    assert list(tmp_path.iterdir()) == []


def test_bad_worker_count_is_refused(tmp_path):
    with pytest.raises(LaunchError, match="-n 0: must be at least 1"):
        run(int, 0, log_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_kernel_warmup_hook_runs_before_workers(tmp_path, monkeypatch):
    """The launcher calls mpnn.core.warmup() when it exists, so workers find a warm Numba cache."""
    import mpnn.core

    calls = []
    monkeypatch.setattr(
        mpnn.core,
        "warmup",
        lambda progress=None: calls.append(sorted(p.name for p in tmp_path.rglob("*"))),
        raising=False,
    )
    assert run(int, 1, args=("5",), log_dir=tmp_path) == 5
    assert len(calls) == 1  # called once, after the run dir was made, before any worker started (or wrote a file)
    assert "run.json" in calls[0] and not [name for name in calls[0] if name.startswith("worker-")], calls


def test_failing_warmup_is_a_warning(tmp_path, monkeypatch, capsys):
    import mpnn.core

    def broken(progress=None):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(mpnn.core, "warmup", broken, raising=False)
    assert run(int, 1, args=("6",), log_dir=tmp_path) == 6
    assert "kernel warm-up failed (RuntimeError: no compiler); workers will compile their own kernels" in (
        capsys.readouterr().err
    )


def test_exception_names_rank_and_carries_traceback(tmp_path):
    started = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run(fail_on_rank_one, n=2, log_dir=tmp_path)
    assert time.monotonic() - started < 10.0  # rank 0 sleeps 60 s: it was stopped
    err = info.value
    assert err.rank == 1 and err.how == "exited with code 1"
    assert str(err).startswith("rank 1 exited with code 1\nTraceback (most recent call last):")
    assert "in fail_on_rank_one" in err.details and err.details.rstrip().endswith("ValueError: boom from rank 1")
    assert leftover_processes(only_run_dir(tmp_path).name) == []


def test_signal_death_is_reported(tmp_path):
    def die():
        if os.environ["MPNN_RANK"] == "1":
            print("about to die", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

    with pytest.raises(WorkerError, match="rank 1 killed by SIGKILL\nabout to die") as info:
        run(die, n=2, log_dir=tmp_path)
    assert info.value.rank == 1
    assert leftover_processes(only_run_dir(tmp_path).name) == []


def test_unpicklable_argument_is_refused_before_launch(tmp_path):
    with pytest.raises(TypeError, match="mpnn.launch.run: cannot pickle 'whoami' with its arguments"):
        run(whoami, n=2, args=(threading.Lock(),), log_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
