"""One attempt of a launch (every local worker started, watched and stopped) and the end of a launch (the failure
report, run.json closed, the LaunchResult): the pieces that one-node restarts (launcher._supervise) and multi-node
ones (elastic.py) share."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mpnn.launch.aftermath import aftermath_argv
from mpnn.launch.env import RunContext, World, worker_env
from mpnn.launch.guardian import Guardian
from mpnn.launch.output import tail_lines
from mpnn.launch.profiling import open_samplers
from mpnn.launch.report import TAIL_LINES, WorkerFailure, console_shows_worker_output, failure_block
from mpnn.launch.rundir import RunRecord, utc_now
from mpnn.launch.scratch import Scratch
from mpnn.launch.signals import StopSignals
from mpnn.launch.supervise import Worker, describe_returncode, exit_status, spawn_worker, stop_all, watch

if TYPE_CHECKING:
    from mpnn.launch.launcher import LaunchConfig

READER_JOIN_S = 2.0


@dataclass(frozen=True)
class LaunchResult:
    """How a launch ended: status ok / failed / interrupted, the exit code for the shell, and the failure if any."""

    run_id: str
    run_dir: Path
    status: str
    exit_code: int
    failure: WorkerFailure | None = None
    signal: int | None = None
    restarts: int = 0


def run_attempt(
    config: LaunchConfig,
    world: World,
    run: RunContext,
    cpus: Sequence[int],
    record: RunRecord,
    stop: StopSignals,
    view,
    interrupted: Callable[[], bool] = lambda: False,
    on_failed: Callable[[Worker], None] | None = None,
) -> tuple[list[Worker], Worker | None, int, list[int]]:
    """Start every local worker, watch them until they all exit 0, one fails, a stop signal comes or interrupted()
    turns true, then stop them all: (workers, the failed worker or None, how many were still running, the ranks
    that needed SIGKILL). on_failed(worker) is told of a failure before the others are stopped."""
    base_env = {**os.environ, **config.extra_env}
    argv = [sys.executable, *config.command]
    workers = []
    failed = None
    samplers = open_samplers(run.run_dir, run.restart_count) if config.profile else None
    with Guardian({**base_env, "MPNN_RUN_ID": run.run_id}) as guardian, Scratch() as scratch:
        if config.owns_secret():
            guardian.remove_on_death(run.secret_file.parent)  # the private dir fresh_secret_file made
        guardian.run_on_death(aftermath_argv(run.run_dir, record.path.name, world.node_rank))
        for directory in scratch.directories:
            guardian.remove_at_end(directory)
        try:
            for local_rank, core in enumerate(cpus):
                if stop.received is not None:
                    break
                rank = world.global_rank(local_rank)
                env = {**worker_env(base_env, world, local_rank, run), **scratch.env}
                workers.append(
                    spawn_worker(argv, env, rank, local_rank, core, run.run_dir / f"worker-{rank}.log", view.line)
                )
                guardian.watch(workers[-1].pid)
                if samplers is not None:
                    samplers.attach(workers[-1].pid, rank)
            record.update(
                status="running",
                workers=[{"rank": w.rank, "local_rank": w.local_rank, "core": w.core, "pid": w.pid} for w in workers],
            )
            if stop.received is None:
                failed = watch(workers, stop, view.refresh, interrupted)
            if failed is not None and on_failed is not None:
                on_failed(failed)
        finally:
            still_running = sum(w.proc.poll() is None for w in workers)
            sigkilled = stop_all(workers, config.kill_grace_s, hurry=lambda: stop.count >= (2 if failed is None else 1))
            deadline = time.monotonic() + READER_JOIN_S
            for w in workers:
                w.reader.join(timeout=max(0.0, deadline - time.monotonic()))
            if samplers is not None:
                samplers.finish()
    return workers, failed, still_running, sigkilled


def _failure_fields(failure: WorkerFailure | None, remote: str | None) -> dict | None:
    """run.json's "failure": the local rank that failed and how, else why another node ended the run, else None."""
    if failure is not None:
        return {"rank": failure.rank, "how": failure.how}
    return None if remote is None else {"remote": remote}


def finish(
    workers,
    failed,
    stop: StopSignals,
    still_running: int,
    sigkilled: list[int],
    record: RunRecord,
    run: RunContext,
    restarts: int,
    max_restarts: int,
    remote: str | None = None,
) -> LaunchResult:
    """Print how the run ended, close run.json and say so. `remote`: the line saying why another node ended the run
    (multi-node restarts), when no local worker failed."""
    failure = None
    if failed is None and remote is not None and stop.received is None:
        line = f"mpnn launch: {remote}; stopped {still_running} running worker(s) of this node"
        print(line, file=sys.stderr, flush=True)
        status, exit_code, sig = "failed", 1, None
    elif failed is not None:
        failure = WorkerFailure(
            failed.rank,
            failed.pid,
            failed.proc.returncode,
            describe_returncode(failed.proc.returncode),
            failed.log_path,
            tuple(tail_lines(failed.log_path, TAIL_LINES)),
        )
        note = ""
        if max_restarts and restarts == max_restarts:
            note = f"; no restart left ({restarts}/{max_restarts} used)"
        elif max_restarts and stop.received is not None:
            note = f"; not restarted: got {signal.Signals(stop.received).name}"
        shown = console_shows_worker_output()
        print(failure_block(failure, still_running, len(sigkilled), note, shown), file=sys.stderr, flush=True)
        status, exit_code, sig = "failed", exit_status(failed.proc.returncode), None
    elif stop.received is not None:
        sig = stop.received
        print(
            f"mpnn launch: got {signal.Signals(sig).name}; stopped {still_running} running worker(s)",
            file=sys.stderr,
            flush=True,
        )
        status, exit_code = "interrupted", 128 + sig
    else:
        status, exit_code, sig = "ok", 0, None
    record.update(
        status=status,
        exit_code=exit_code,
        end_time=utc_now(),
        failure=_failure_fields(failure, remote if status == "failed" else None),
        signal=None if sig is None else signal.Signals(sig).name,
        workers=[
            {
                "rank": w.rank,
                "local_rank": w.local_rank,
                "core": w.core,
                "pid": w.pid,
                "returncode": w.proc.returncode,
                "how": None if w.proc.returncode is None else describe_returncode(w.proc.returncode),
                "sigkilled": w.rank in sigkilled,
            }
            for w in workers
        ],
    )
    return LaunchResult(run.run_id, run.run_dir, status, exit_code, failure, sig, restarts)
