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


main.add_command(launch_command, name="launch")
main.add_command(telemetry)
main.add_command(plugins)
main.add_command(bench)
main.add_command(audit)
