"""The `mpnn` command line: a thin dispatcher; each command lives beside the code it drives."""
import click

from mpnn.launch.command import launch_command
from mpnn.telemetry.cli import telemetry


@click.group()
def main():
    """mpnn: data-parallel neural-network training on plain CPUs."""


main.add_command(launch_command, name="launch")
main.add_command(telemetry)
