"""`mpnn bench allreduce`: time the ring all-reduce on n workers started by mpnn's launcher and print rank 0's
latency and bandwidth per size as a table or JSON; bad sizes and flags end in one line naming the value."""

from __future__ import annotations

import json

import click

from mpnn.bench import DTYPES, OPS, WARMUP, bench_allreduce, format_table, parse_sizes, timings_record
from mpnn.launch import LaunchError, WorkerError
from mpnn.launch.pinning import usable_cores

DEFAULT_SIZES = "4KB,1MB,16MB,64MB"


class SizeList(click.ParamType):
    """A comma-separated list of byte sizes such as 4KB,1MB (B, KB, MB, GB are powers of 1024)."""

    name = "sizes"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return parse_sizes(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


@click.group("bench")
def bench():
    """Measure mpnn's distributed runtime: collective latency and bandwidth."""


@bench.command("allreduce")
@click.option(
    "-n",
    "--nproc-per-node",
    "nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Workers to start [default: usable cores, as mpnn launch].",
)
@click.option(
    "--sizes",
    type=SizeList(),
    default=DEFAULT_SIZES,
    show_default=True,
    help="Comma-separated buffer sizes in B, KB, MB or GB; the units are powers of 1024 (1KB = 1024 B); "
    "a bare number is bytes.",
)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--op", type=click.Choice(OPS), default="sum", show_default=True)
@click.option(
    "--iters",
    type=click.IntRange(min=1),
    default=None,
    help="Timed iterations per size [default: about 1 GB moved per size, 10 to 200].",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=WARMUP,
    show_default=True,
    help="Untimed all-reduces per size before timing.",
)
@click.option(
    "--transport",
    type=click.Choice(("auto", "tcp")),
    default="auto",
    show_default=True,
    help="auto: ipc within a host; tcp: loopback tcp.",
)
@click.option(
    "--shm/--no-shm",
    "shared_memory",
    default=True,
    show_default=True,
    help="Arrays above 32 KB through shared memory on one host, or always over the socket ring.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Collective timeout in seconds handed to the workers.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the table.")
def allreduce(nproc, sizes, dtype, op, iters, warmup, transport, shared_memory, timeout, as_json):
    """Time comm.allreduce per size: warm-up, then the median of timed iterations, each after a barrier.

    Prints rank 0's median time, algorithm bandwidth (bytes / time) and bus bandwidth
    (2(n-1)/n * bytes / time), in GB/s of 1e9 bytes per second.
    """
    n = nproc or len(usable_cores())
    try:
        timings = bench_allreduce(n, sizes, dtype, op, iters, warmup, transport, shared_memory, timeout)
    except (LaunchError, WorkerError) as error:  # LaunchError is a ValueError: catch it first
        raise click.ClickException(str(error)) from None
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    setup = {
        "collective": "allreduce",
        "world_size": n,
        "dtype": dtype,
        "op": op,
        "warmup": warmup,
        "transport": transport,
        "shared_memory": shared_memory,
    }
    if as_json:
        click.echo(json.dumps(timings_record(timings, **setup), indent=2))
        return
    click.echo(
        f"all-reduce: {n} rank{'s' if n > 1 else ''}, {dtype} {op}, transport {transport}, shared memory "
        f"{'on' if shared_memory else 'off'}; rank 0's median after {warmup} warm-up, a barrier before each"
    )
    click.echo(format_table(timings))
