"""The launcher's side of plugins: every --plugin spec is resolved and built before anything starts (a bad spec
is one LaunchError listing what is accepted), then mpnn_launch_start may refuse the run before any worker
starts, mpnn_launch_restart hears of each restart, and mpnn_launch_end hears how it ended."""

from __future__ import annotations

from pathlib import Path

from mpnn.launch.env import RunContext, World, worker_env
from mpnn.launch.errors import LaunchError
from mpnn.plugins.errors import PluginError
from mpnn.plugins.info import LaunchInfo
from mpnn.plugins.manager import PluginManager
from mpnn.plugins.registry import resolve_all

RANK_SPECIFIC = ("MPNN_RANK", "MPNN_LOCAL_RANK")


def load_plugins(specs) -> PluginManager | None:
    """Resolve, check and build the run's plugins here, in the launcher; None when the run names none."""
    if not specs:
        return None
    try:
        return PluginManager([resolved.create() for resolved in resolve_all(specs)])
    except PluginError as error:
        raise LaunchError(str(error)) from None


def launch_info(command, command_line, world: World, run: RunContext, base_env) -> LaunchInfo:
    """What the launch hooks are told about this launch."""
    module = command[0] == "-m"
    env = {
        k: v for k, v in worker_env(base_env, world, 0, run).items() if k.startswith("MPNN_") and k not in RANK_SPECIFIC
    }
    return LaunchInfo(
        run_id=run.run_id,
        run_dir=run.run_dir,
        nprocs=world.nproc_per_node,
        nnodes=world.nnodes,
        node_rank=world.node_rank,
        world_size=world.world_size,
        script=Path(command[1] if module else command[0]),
        script_args=list(command[2 if module else 1 :]),
        argv=list(command_line),
        plugin_specs=list(run.plugins),
        env=env,
    )


def launch_start(manager: PluginManager, info: LaunchInfo) -> None:
    """mpnn_launch_start; a refusal (or any plugin error) is a LaunchError: no worker starts."""
    _or_end_launch(manager, info, lambda: manager.hook.mpnn_launch_start(launch=info))


def launch_restart(manager: PluginManager, info: LaunchInfo, restart: int, failed_rank: int, how: str) -> None:
    """mpnn_launch_restart; a plugin failing there ends the launch (mpnn_launch_end is told) with a LaunchError."""
    _or_end_launch(
        manager,
        info,
        lambda: manager.hook.mpnn_launch_restart(launch=info, restart=restart, failed_rank=failed_rank, how=how),
    )


def launch_attempt_end(manager: PluginManager, info: LaunchInfo, attempt: int, status: str, exit_codes: dict) -> None:
    """mpnn_launch_attempt_end; a plugin failing there ends the launch (mpnn_launch_end is told) with a LaunchError."""
    _or_end_launch(
        manager,
        info,
        lambda: manager.hook.mpnn_launch_attempt_end(
            launch=info, attempt=attempt, status=status, exit_codes=exit_codes
        ),
    )


def _or_end_launch(manager: PluginManager, info: LaunchInfo, call) -> None:
    """Run a launch hook; when a plugin fails there, tell mpnn_launch_end the launch failed and raise LaunchError."""
    try:
        call()
    except PluginError as error:
        message = str(error)
        try:
            launch_end(manager, info, "failed", {}, message)
        except LaunchError as also:
            message += f"; and then {also}"
        raise LaunchError(message) from None


def launch_end(manager: PluginManager, info: LaunchInfo, status: str, exit_codes: dict, error: str | None) -> None:
    """mpnn_launch_end; a plugin failing there is a LaunchError (the workers are gone already)."""
    try:
        manager.hook.mpnn_launch_end(launch=info, status=status, exit_codes=exit_codes, error=error)
    except PluginError as failure:
        raise LaunchError(str(failure)) from None
