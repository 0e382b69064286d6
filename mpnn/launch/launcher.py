"""launch(config): the one code path behind `mpnn launch` and mpnn.launch.run. It checks the flags, warms the
kernel cache, makes the run dir and per-run secret, starts one pinned worker per local rank, supervises them,
starts them all again after a failure while --max-restarts allows, prints the failure report, and closes run.json
with the status and exit codes."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mpnn.launch.aftermath import close_abnormally
from mpnn.launch.agents import DEFAULT_RDZV_TIMEOUT_S, store_port
from mpnn.launch.attempt import LaunchResult, finish, run_attempt
from mpnn.launch.elastic import supervise_elastic
from mpnn.launch.env import RunContext, World, rendezvous_address, script_master_port
from mpnn.launch.errors import LaunchError
from mpnn.launch.layout import Layout, read_layout
from mpnn.launch.liveview import make_view
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
from mpnn.launch.report import plugins_never_loaded, run_dir_line
from mpnn.launch.restart import Restart, append_restart_event, resume_after_failure
from mpnn.launch.resume import check_resume
from mpnn.launch.rundir import RunRecord, check_run_id, create_run_dir, mpnn_version, new_run_id, record_name, utc_now
from mpnn.launch.secret import check_secret_file, fresh_secret_file
from mpnn.launch.signals import StopSignals
from mpnn.launch.supervise import describe_returncode
from mpnn.launch.warmup import warm_numba_cache

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MASTER_PORT = 29500  # torchrun's default; every node of a multi-node run computes the same
KILL_GRACE_S = 2.0


@dataclass
class LaunchConfig:
    """Everything one launcher needs; the fields mirror `mpnn launch`'s flags."""

    command: Sequence[str]  # what follows sys.executable: [script, *args] or ["-m", module, ...]
    nproc_per_node: int | None = None  # None: one worker per usable core
    log_dir: Path = Path("runs")
    run_id: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S  # collective timeout handed to workers (MPNN_TIMEOUT), not a wall limit
    plugins: Sequence[str] = ()
    nnodes: int = 1  # with min_nodes: the most nodes (--nnodes MIN:MAX's MAX)
    min_nodes: int | None = None  # --nnodes MIN:MAX's MIN: rounds start with at least this many; None: nnodes
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
    rdzv_timeout: float = DEFAULT_RDZV_TIMEOUT_S  # multi-node restarts: how long every node has to (re)join
    group_readable: bool = False  # the run dir 0750 instead of 0700

    def elastic(self) -> bool:
        """Whether the nodes' launchers run as agents (elastic.py): restarts across nodes, or --nnodes MIN:MAX."""
        return self.nnodes > 1 and (self.max_restarts > 0 or (self.min_nodes or self.nnodes) < self.nnodes)

    def owns_secret(self) -> bool:
        """Whether this launcher makes (and must remove) the run's secret: one node and no secret file given."""
        return not self.secret_file and self.nnodes == 1


def _check(config: LaunchConfig, layout: Layout) -> tuple[World, str]:
    if config.nnodes < 1:
        raise LaunchError(f"--nnodes {config.nnodes}: must be at least 1")
    if config.min_nodes is not None and not 1 <= config.min_nodes <= config.nnodes:
        raise LaunchError(f"--nnodes {config.min_nodes}:{config.nnodes}: MIN must be in 1..MAX")
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
    if config.rdzv_timeout <= 0:
        raise LaunchError(f"--rdzv-timeout {config.rdzv_timeout:g}: must be positive (seconds)")
    if config.elastic():
        store_port(config.master_port or DEFAULT_MASTER_PORT)  # the agents' port must exist
    return None if config.resume is None else check_resume(config.resume)


def _secret(config: LaunchConfig, stack: contextlib.ExitStack) -> Path:
    if not config.owns_secret():
        return _shared_secret(config)
    return stack.enter_context(fresh_secret_file())


def _shared_secret(config: LaunchConfig) -> Path:
    if config.secret_file:
        return check_secret_file(config.secret_file)
    assert config.nnodes > 1, "one node without --secret-file makes its own secret (LaunchConfig.owns_secret)"
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
            "min_nodes": config.min_nodes,
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
        fields = _record_fields(config, world, run_id, rendezvous, layout, plan)
        record = RunRecord(run_dir / record_file, fields, rejoin=config.elastic() and world.node_rank > 0)
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
            supervise = supervise_elastic if config.elastic() else _supervise
            if plugins is None:
                result = supervise(config, world, run, plan.cpus, record, stack)
                _closing_lines(config, world, run_dir)
                return result
            info = launch_info(config.command, config.command_line, world, run, {**os.environ, **config.extra_env})
            launch_start(plugins, info)
            result = supervise(
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
            workers, failed, still_running, sigkilled = run_attempt(config, world, run, cpus, record, stop, view)
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
    return finish(workers, failed, stop, still_running, sigkilled, record, run, len(restarts), config.max_restarts)
