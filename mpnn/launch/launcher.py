"""launch(config): the one code path behind `mpnn launch` and mpnn.launch.run. It checks the flags, warms the
kernel cache, makes the run dir and per-run secret, starts one pinned worker per local rank, supervises them,
starts them all again after a failure while --max-restarts allows, prints the failure report, and closes run.json
with the status and exit codes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mpnn.launch.aftermath import aftermath_argv, close_abnormally
from mpnn.launch.env import RunContext, World, rendezvous_address, script_master_port, worker_env
from mpnn.launch.errors import LaunchError
from mpnn.launch.guardian import Guardian
from mpnn.launch.layout import Layout, read_layout
from mpnn.launch.liveview import make_view
from mpnn.launch.output import tail_lines
from mpnn.launch.payload import write_private
from mpnn.launch.pinning import Plan, default_nproc, pin_plan
from mpnn.launch.plugins import (
    launch_attempt_end,
    launch_end,
    launch_info,
    launch_restart,
    launch_start,
    load_plugins,
)
from mpnn.launch.profiling import open_samplers
from mpnn.launch.report import (
    TAIL_LINES,
    WorkerFailure,
    console_shows_worker_output,
    failure_block,
    plugins_never_loaded,
    run_dir_line,
)
from mpnn.launch.restart import Restart, append_restart_event, resume_after_failure
from mpnn.launch.resume import check_resume
from mpnn.launch.rundir import RunRecord, check_run_id, create_run_dir, mpnn_version, new_run_id, record_name, utc_now
from mpnn.launch.scratch import Scratch
from mpnn.launch.secret import check_secret_file, fresh_secret_file
from mpnn.launch.signals import StopSignals
from mpnn.launch.supervise import Worker, describe_returncode, exit_status, spawn_worker, stop_all, watch
from mpnn.launch.warmup import warm_numba_cache

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MASTER_PORT = 29500  # torchrun's default; every node of a multi-node run computes the same
KILL_GRACE_S = 2.0
READER_JOIN_S = 2.0


@dataclass
class LaunchConfig:
    """Everything one launcher needs; the fields mirror `mpnn launch`'s flags."""

    command: Sequence[str]  # what follows sys.executable: [script, *args] or ["-m", module, ...]
    nproc_per_node: int | None = None  # None: one worker per usable core
    log_dir: Path = Path("runs")
    run_id: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S  # collective timeout handed to workers (MPNN_TIMEOUT), not a wall limit
    plugins: Sequence[str] = ()
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    secret_file: Path | None = None
    encrypt: bool | None = None  # CURVE on the data sockets (MPNN_ENCRYPT); None: only across nodes
    extra_env: Mapping[str, str] = field(default_factory=dict)
    run_files: Mapping[str, bytes] = field(default_factory=dict)  # written (0600) into the run dir before spawning
    command_line: Sequence[str] = field(default_factory=lambda: list(sys.argv))
    profile: bool = False  # sample every worker with py-spy: flame graphs per rank in the run dir
    kill_grace_s: float = KILL_GRACE_S
    live: bool | None = None  # None: the rich status line when stdout is a TTY
    checkpoint_every: int | None = None  # MPNN_CHECKPOINT_EVERY for the workers; None or 0: the script's own
    checkpoint_keep: int | None = None  # MPNN_CHECKPOINT_KEEP; None: the Checkpointer's default (3)
    resume: Path | None = None  # a run dir to resume from (its newest complete checkpoint)
    max_restarts: int = 0  # restarts of the whole world after a worker fails
    group_readable: bool = False  # the run dir 0750 instead of 0700


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


def _check(config: LaunchConfig, layout: Layout) -> tuple[World, str]:
    if config.nnodes < 1:
        raise LaunchError(f"--nnodes {config.nnodes}: must be at least 1")
    if not 0 <= config.node_rank < config.nnodes:
        raise LaunchError(
            f"--node-rank {config.node_rank}: must be in [0, {config.nnodes}) for --nnodes {config.nnodes}"
        )
    if config.timeout <= 0:
        raise LaunchError(f"--timeout {config.timeout}: must be positive (seconds)")
    if not config.command:
        raise LaunchError("nothing to launch: give a script")
    nproc = default_nproc(layout) if config.nproc_per_node is None else config.nproc_per_node
    if nproc < 1:
        raise LaunchError(f"-n {nproc}: must be at least 1")
    if config.nnodes > 1:
        if not config.master_addr:
            raise LaunchError(f"--nnodes {config.nnodes} needs --master-addr (the host of node 0) on every node")
        if not config.run_id:
            raise LaunchError(f"--nnodes {config.nnodes} needs --run-id, the same on every node")
    run_id = check_run_id(config.run_id) if config.run_id else new_run_id()
    return World(nproc, config.nnodes, config.node_rank), run_id


def _check_restarts(config: LaunchConfig) -> Path | None:
    """Check the checkpoint and restart settings; the run dir to resume from, if any (LaunchError if it has none)."""
    if config.checkpoint_every is not None and config.checkpoint_every < 0:
        raise LaunchError(
            f"--checkpoint-every {config.checkpoint_every}: must be 0 (the script's own setting) "
            "or a positive number of steps"
        )
    if config.checkpoint_keep is not None and config.checkpoint_keep < 1:
        raise LaunchError(f"--checkpoint-keep {config.checkpoint_keep}: must be at least 1")
    if config.max_restarts < 0:
        raise LaunchError(f"--max-restarts {config.max_restarts}: must be 0 or more")
    if config.max_restarts and config.nnodes > 1:
        raise LaunchError(
            f"--max-restarts {config.max_restarts} needs --nnodes 1: restarting a multi-node world "
            "takes every node's launcher restarting together, which mpnn launch does not coordinate"
        )
    return None if config.resume is None else check_resume(config.resume)


def _owns_secret(config: LaunchConfig) -> bool:
    """Whether this launcher makes (and must remove) the run's secret: one node and no secret file given."""
    return not config.secret_file and config.nnodes == 1


def _secret(config: LaunchConfig, stack: contextlib.ExitStack) -> Path:
    if not _owns_secret(config):
        return _shared_secret(config)
    return stack.enter_context(fresh_secret_file())


def _shared_secret(config: LaunchConfig) -> Path:
    if config.secret_file:
        return check_secret_file(config.secret_file)
    assert config.nnodes > 1, "one node without --secret-file makes its own secret (_owns_secret)"
    shared = os.environ.get("MPNN_SECRET_FILE")
    if not shared:
        raise LaunchError(
            f"--nnodes {config.nnodes} needs a secret shared by every node: pass --secret-file "
            "or set MPNN_SECRET_FILE (a 0600 file, e.g. `openssl rand -hex 32 > secret`)"
        )
    return check_secret_file(Path(shared))


def _record_fields(
    config: LaunchConfig, world: World, run_id: str, rendezvous: str, layout: Layout, plan: Plan
) -> dict:
    return {
        "run_id": run_id,
        "status": "starting",
        "command_line": list(config.command_line),
        "script": config.command[0] if config.command[0] != "-m" else " ".join(config.command[:2]),
        "args": list(config.command[2 if config.command[0] == "-m" else 1 :]),
        "config": {
            "nproc_per_node": world.nproc_per_node,
            "nnodes": world.nnodes,
            "node_rank": world.node_rank,
            "master_addr": config.master_addr,
            "master_port": config.master_port,
            "rendezvous": rendezvous,
            "timeout": config.timeout,
            "plugins": list(config.plugins),
            "log_dir": str(config.log_dir),
            "encrypt": world.nnodes > 1 if config.encrypt is None else config.encrypt,
            "pinning": plan.record(),
            "usable_cores": len(layout.cpus),
            "checkpoint_every": config.checkpoint_every,
            "checkpoint_keep": config.checkpoint_keep,
            "max_restarts": config.max_restarts,
            "group_readable": config.group_readable,
        },
        "resumed_from": None if config.resume is None else str(Path(config.resume).resolve()),
        "restarts": [],
        "world": {"world_size": world.world_size, "nnodes": world.nnodes, "nproc_per_node": world.nproc_per_node},
        "host": socket.gethostname(),
        "mpnn_version": mpnn_version(),
        "python": sys.version.split()[0],
        "start_time": utc_now(),
    }


def launch(config: LaunchConfig) -> LaunchResult:
    """Run the workers of one node to the end; never leaves a process behind. Raises LaunchError on bad config."""
    layout = read_layout()
    world, run_id = _check(config, layout)
    resume_from = _check_restarts(config)
    plugins = load_plugins(config.plugins)  # a bad spec stops here, before anything is made or started
    plan = pin_plan(world.nproc_per_node, layout)
    for warning in plan.warnings:
        print(f"mpnn launch: warning: {warning}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        secret_file = _secret(config, stack)
        record_file = record_name(world.node_rank)
        run_dir = create_run_dir(config.log_dir, run_id, group_readable=config.group_readable, shared=config.nnodes > 1)
        master_port = config.master_port or (DEFAULT_MASTER_PORT if config.nnodes > 1 else None)
        rendezvous = rendezvous_address(config.master_addr, master_port)
        record = RunRecord(run_dir / record_file, _record_fields(config, world, run_id, rendezvous, layout, plan))
        print(run_dir_line(run_dir), file=sys.stderr, flush=True)
        for name, data in config.run_files.items():
            write_private(run_dir / name, data)
        run = RunContext(
            run_id,
            run_dir,
            rendezvous,
            secret_file,
            config.timeout,
            tuple(config.plugins),
            config.encrypt,
            checkpoint_every=config.checkpoint_every,
            checkpoint_keep=config.checkpoint_keep,
            resume_from=resume_from,
            max_restarts=config.max_restarts,
            master_port=script_master_port(rendezvous, world.nnodes),
        )
        try:
            warm_numba_cache()  # after the run dir is made: an unusable log dir fails at once, not after a compile
            if plugins is None:
                result = _supervise(config, world, run, plan.cpus, record, stack)
                _closing_lines(config, world, run_dir)
                return result
            info = launch_info(config.command, config.command_line, world, run, {**os.environ, **config.extra_env})
            launch_start(plugins, info)
            result = _supervise(
                config,
                world,
                run,
                plan.cpus,
                record,
                stack,
                on_restart=lambda r: launch_restart(plugins, info, r.number, r.failed_rank, r.how),
                on_attempt_end=(lambda n, status, codes: launch_attempt_end(plugins, info, n, status, codes))
                if config.max_restarts
                else None,  # one attempt: run_end holds its exit codes
            )
            exit_codes = {w["rank"]: w.get("returncode") for w in record.fields.get("workers", [])}
            error = None if result.failure is None else f"rank {result.failure.rank} {result.failure.how}"
            launch_end(plugins, info, result.status, exit_codes, error)
            _closing_lines(config, world, run_dir)
            return result
        except BaseException as error:
            record.update(status="error", end_time=utc_now())
            if plugins is not None:  # a trail left open by a launcher crash is closed as ended abnormally
                close_abnormally(run_dir, record_file, world.node_rank, "error", f"the launcher failed: {error!r}")
            raise


def _closing_lines(config: LaunchConfig, world: World, run_dir: Path) -> None:
    """The run dir again at the end (the argument for `mpnn telemetry show`), after the warning, if any, that the
    plugins named never loaded."""
    script = " ".join(config.command[:2]) if config.command[:1] == ["-m"] else config.command[0]
    warning = plugins_never_loaded(run_dir, world.local_global_ranks(), config.plugins, script)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    print(run_dir_line(run_dir), file=sys.stderr, flush=True)


def _supervise(
    config: LaunchConfig,
    world: World,
    run: RunContext,
    cpus: Sequence[int],
    record: RunRecord,
    stack: contextlib.ExitStack,
    on_restart: Callable[[Restart], None] | None = None,
    on_attempt_end: Callable[[int, str, dict], None] | None = None,
) -> LaunchResult:
    """Run attempts until one ends without a failed worker, a stop signal comes, or no restart is left;
    on_attempt_end(attempt, status, {rank: exit code}) after each."""
    stop = stack.enter_context(StopSignals())
    view = make_view(run.run_dir, world.local_global_ranks(), config.live)
    restarts: list[Restart] = []
    try:
        while True:
            workers, failed, still_running, sigkilled = _attempt(config, world, run, cpus, record, stop, view)
            if on_attempt_end is not None:
                status = "failed" if failed is not None else "ok" if stop.received is None else "interrupted"
                on_attempt_end(len(restarts), status, {w.rank: w.proc.returncode for w in workers})
            if failed is None or stop.received is not None or len(restarts) == config.max_restarts:
                break
            restart = Restart(
                len(restarts) + 1,
                config.max_restarts,
                failed.rank,
                failed.pid,
                describe_returncode(failed.proc.returncode),
                still_running,
                resume_after_failure(run.run_dir, run.resume_from),
            )
            restarts.append(restart)
            view.note(restart.headline())
            record.update(restarts=[r.record() for r in restarts])
            append_restart_event(run.run_dir, world.local_global_ranks(), restart)
            if on_restart is not None:
                on_restart(restart)
            run = replace(run, restart_count=restart.number, resume_from=restart.resume_from)
    finally:
        view.close()
    return _finish(workers, failed, stop, still_running, sigkilled, record, run, len(restarts), config.max_restarts)


def _attempt(
    config: LaunchConfig, world: World, run: RunContext, cpus: Sequence[int], record: RunRecord, stop: StopSignals, view
) -> tuple[list[Worker], Worker | None, int, list[int]]:
    """Start every local worker, watch them until they all exit 0, one fails or a stop signal comes, then stop
    them all: (workers, the failed worker or None, how many were still running, the ranks that needed SIGKILL)."""
    base_env = {**os.environ, **config.extra_env}
    argv = [sys.executable, *config.command]
    workers = []
    failed = None
    samplers = open_samplers(run.run_dir, run.restart_count) if config.profile else None
    with Guardian({**base_env, "MPNN_RUN_ID": run.run_id}) as guardian, Scratch() as scratch:
        if _owns_secret(config):
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
                failed = watch(workers, stop, view.refresh)
        finally:
            still_running = sum(w.proc.poll() is None for w in workers)
            sigkilled = stop_all(workers, config.kill_grace_s, hurry=lambda: stop.count >= (2 if failed is None else 1))
            deadline = time.monotonic() + READER_JOIN_S
            for w in workers:
                w.reader.join(timeout=max(0.0, deadline - time.monotonic()))
            if samplers is not None:
                samplers.finish()
    return workers, failed, still_running, sigkilled


def _finish(
    workers,
    failed,
    stop: StopSignals,
    still_running: int,
    sigkilled: list[int],
    record: RunRecord,
    run: RunContext,
    restarts: int,
    max_restarts: int,
) -> LaunchResult:
    failure = None
    if failed is not None:
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
        failure=None if failure is None else {"rank": failure.rank, "how": failure.how},
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
