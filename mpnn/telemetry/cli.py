"""`mpnn telemetry show|trace|plot RUN_DIR`: read a run's worker-<rank>.jsonl files and answer in a table, a
Perfetto trace or a PNG; any problem ends in one line naming the path and a non-zero exit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mpnn.telemetry.reader import TelemetryError, load_run


def newest_run(log_dir: Path = Path("runs")) -> Path:
    """The run directory under `log_dir` (the launcher's default parent) whose run.json or telemetry changed last."""

    def touched(run: Path) -> float:
        files = [run / "run.json", *run.glob("worker-*.jsonl")]
        return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)

    runs = [p for p in log_dir.iterdir() if p.is_dir() and touched(p) > 0] if log_dir.is_dir() else []
    if not runs:
        raise click.ClickException(f"no run directory under {log_dir}/: name one (mpnn telemetry show RUN_DIR)")
    return max(runs, key=touched)


def _load(run_dir: Path):
    try:
        return load_run(run_dir)
    except TelemetryError as error:
        raise click.ClickException(str(error)) from None


@click.group("telemetry")
def telemetry():
    """Read a run's telemetry: per-rank table, Perfetto trace, plots."""


@telemetry.command("show")
@click.argument("run_dir", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
def show(run_dir: Path | None, as_json: bool):
    """Per-rank table: steps, median/p95 step time, compute/comm share, bytes, peak RSS, events; the straggler.
    Without RUN_DIR: the newest run under ./runs."""
    from mpnn.telemetry.summary import format_text, print_rich, summarize

    if run_dir is None:
        run_dir = newest_run()
    from mpnn.telemetry.profiles import find_profiles, profile_lines

    summary = summarize(_load(run_dir))
    if as_json:
        profiles = find_profiles(run_dir)
        if any(profiles.values()):
            summary["profiles"] = profiles
        click.echo(json.dumps(summary, indent=2))
        return
    if sys.stdout.isatty():
        print_rich(summary)
    else:
        click.echo(format_text(summary))
    for line in profile_lines(run_dir):
        click.echo(line)


@telemetry.command("trace")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Trace file to write [default: RUN_DIR/trace.json].",
)
@click.option(
    "--ops",
    "ops_traces",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="TRACE",
    help="An mpnn.profiler op trace (prof.export_chrome_trace) to merge; repeatable. Those in RUN_DIR "
    "(ops-<rank>.trace.json) are merged without it.",
)
def trace(run_dir: Path, output: Path | None, ops_traces: tuple[Path, ...]):
    """Write a Chrome trace (open it in https://ui.perfetto.dev): one process per rank, one thread per lane, and
    the op traces of mpnn.profiler found in RUN_DIR or given with --ops, one thread per profiled thread."""
    from mpnn.telemetry.profiles import find_profiles
    from mpnn.telemetry.trace import write_trace

    run = _load(run_dir)
    found = [run_dir / name for name in find_profiles(run_dir)["ops_trace"]]
    given = [p for p in ops_traces if p.resolve() not in {f.resolve() for f in found}]
    merged = found + given
    try:
        path = write_trace(run, output or run_dir / "trace.json", merged)
    except TelemetryError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"{error.filename}: {error.strerror}") from None
    click.echo(f"wrote {path}" + (f" (op traces merged: {', '.join(p.name for p in merged)})" if merged else ""))


@telemetry.command("plot")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG to write [default: RUN_DIR/run.png].",
)
def plot(run_dir: Path, output: Path | None):
    """Plot loss and step time per rank to a PNG (needs matplotlib)."""
    from mpnn.telemetry.plot import plot_run

    run = _load(run_dir)
    try:
        path = plot_run(run, output or run_dir / "run.png")
    except TelemetryError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"{error.filename}: {error.strerror}") from None
    click.echo(f"wrote {path}")
