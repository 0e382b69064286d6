"""The `mpnn` command line: a thin dispatcher; each command lives beside the code it drives."""

import click

from mpnn.bench_cli import bench
from mpnn.launch.command import launch_command
from mpnn.plugins.audit.cli import audit
from mpnn.plugins.cli import plugins
from mpnn.telemetry.cli import telemetry


@click.group()
def main():
    """mpnn: data-parallel neural-network training on plain CPUs."""


@main.command("warmup")
def warmup_command():
    """Compile every Numba kernel into the on-disk cache now (the first launch after an install otherwise spends
    ~25 s on it), counting the pieces on the console."""
    import os
    import sys

    from mpnn.launch.warmup import ConsoleProgress, warm_numba_cache

    if not warm_numba_cache(progress=ConsoleProgress(force=True, stream=sys.stdout)):
        raise SystemExit(1)
    click.echo(
        f"cache: {os.environ.get('NUMBA_CACHE_DIR') or '__pycache__ beside the sources (NUMBA_CACHE_DIR unset)'}"
    )


main.add_command(launch_command, name="launch")
main.add_command(telemetry)
main.add_command(plugins)
main.add_command(bench)
main.add_command(audit)
