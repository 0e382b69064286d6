"""The `mpnn launch` click command: parse the flags into a LaunchConfig, run it, exit with its code."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mpnn.launch.agents import DEFAULT_RDZV_TIMEOUT_S
from mpnn.launch.errors import LaunchError
from mpnn.launch.launcher import DEFAULT_TIMEOUT_S, LaunchConfig, launch
from mpnn.launch.layout import read_layout
from mpnn.launch.pinning import layout_report


class NodeCount(click.ParamType):
    """--nnodes: N, or MIN:MAX (1 <= MIN <= MAX) for elastic membership; gives (MIN, MAX)."""

    name = "N|MIN:MAX"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        try:
            low, _, high = text.partition(":")
            counts = (int(low), int(high or low))
        except ValueError:
            self.fail(f"{text!r} is not a node count N or a range MIN:MAX", param, ctx)
        if not 1 <= counts[0] <= counts[1]:
            self.fail(f"{text!r}: need 1 <= MIN <= MAX", param, ctx)
        return counts


@click.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "-n",
    "--nproc-per-node",
    "nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Workers on this node [default: usable physical cores of the biggest size].",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Parent of the run directory <log-dir>/<run-id>/.",
)
@click.option("--run-id", help="Name of the run directory [default: start time + random].")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Collective timeout in seconds, passed to workers (not a wall limit).",
)
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="SPEC",
    help="Plugin spec name[:key=value,...] or package.module:Class; repeatable.",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Sample every worker with py-spy (the `profile` extra): per-rank flame graphs (profile-<rank>.svg) and "
    "speedscope files in the run dir.",
)
@click.option(
    "--nnodes",
    type=NodeCount(),
    default="1",
    show_default=True,
    metavar="N|MIN:MAX",
    help="Number of nodes; MIN:MAX for an elastic run: each round starts once MIN nodes (node 0 among them) have "
    "joined and no other came for a few seconds, and a node joining later makes the world grow at the next round.",
)
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="This node's rank.")
@click.option("--master-addr", help="Host of node 0 (its rank 0 serves the rendezvous).")
@click.option(
    "--master-port",
    type=click.IntRange(1, 65535),
    help="Rendezvous port on the master [default: 29500 with --nnodes > 1, else a free port]; the "
    "workers' MASTER_PORT (torchrun's, for the script) is never it: this + 1 with --nnodes > 1, "
    "else another free port.",
)
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Shared 0600 secret file (multi-node; else MPNN_SECRET_FILE) [default on one node: a fresh one].",
)
@click.option(
    "--encrypt/--no-encrypt",
    default=None,
    help="CURVE-encrypt the workers' data sockets [default: on with --nnodes > 1, off on one node].",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    metavar="N",
    help="Steps between checkpoints, for the script's mpnn.Checkpointer (MPNN_CHECKPOINT_EVERY) "
    "[default: the script's own setting].",
)
@click.option(
    "--checkpoint-keep",
    type=click.IntRange(min=1),
    metavar="K",
    help="How many checkpoints to keep (MPNN_CHECKPOINT_KEEP) [default: 3].",
)
@click.option(
    "--resume",
    type=click.Path(path_type=Path),
    metavar="RUN_DIR",
    help="Resume from the newest complete checkpoint of an earlier run; this run gets a fresh run dir.",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="R",
    help="When a worker fails, stop the others and start them all again from the newest checkpoint, up to R times.",
)
@click.option(
    "--rdzv-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_RDZV_TIMEOUT_S,
    show_default=True,
    metavar="SECONDS",
    help="With --max-restarts and --nnodes > 1, or --nnodes MIN:MAX: how long the nodes' launchers have to join "
    "each round (the first, and after each restart) before the run fails naming the missing node(s).",
)
@click.option(
    "--group-readable",
    is_flag=True,
    help="Make the run directory 0750 (its group may read the logs) instead of 0700.",
)
@click.option("-m", "--module", is_flag=True, help="SCRIPT is a module name, run as `python -m SCRIPT`.")
@click.option(
    "--print-layout",
    is_flag=True,
    help="Print the cpu layout and the pinning plan for -n, then exit without starting anything.",
)
@click.argument("script", required=False)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def launch_command(
    ctx,
    nproc,
    log_dir,
    run_id,
    timeout,
    plugins,
    profile,
    nnodes,
    node_rank,
    master_addr,
    master_port,
    secret_file,
    encrypt,
    checkpoint_every,
    checkpoint_keep,
    resume,
    max_restarts,
    rdzv_timeout,
    group_readable,
    module,
    print_layout,
    script,
    script_args,
):
    """Start one pinned worker process per core running SCRIPT [SCRIPT_ARGS]..., watch them, stop all on failure
    (and, with --max-restarts, start them all again from the newest checkpoint)."""
    if print_layout:
        click.echo(layout_report(read_layout(), nproc))
        ctx.exit(0)
    if script is None:
        raise click.UsageError("Missing argument 'SCRIPT'.")
    if not module and not Path(script).is_file():
        raise click.BadParameter(f"no such file: {script}", param_hint="SCRIPT")
    config = LaunchConfig(
        command=(["-m", script] if module else [script]) + list(script_args),
        nproc_per_node=nproc,
        log_dir=log_dir,
        run_id=run_id,
        timeout=timeout,
        plugins=plugins,
        profile=profile,
        nnodes=nnodes[1],
        min_nodes=nnodes[0] if nnodes[0] != nnodes[1] else None,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        secret_file=secret_file,
        encrypt=encrypt,
        checkpoint_every=checkpoint_every,
        checkpoint_keep=checkpoint_keep,
        resume=resume,
        max_restarts=max_restarts,
        rdzv_timeout=rdzv_timeout,
        group_readable=group_readable,
        command_line=sys.orig_argv,
    )
    try:
        result = launch(config)
    except LaunchError as e:
        raise click.ClickException(str(e)) from None
    ctx.exit(result.exit_code)
