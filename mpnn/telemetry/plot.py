"""Loss and step-time curves per rank as one PNG; matplotlib is optional and imported only here, on use."""

from __future__ import annotations

from pathlib import Path

from mpnn.telemetry.reader import Run, TelemetryError, number


def plot_run(run: Run, path) -> Path:
    """Draw loss (top) and step time (bottom, log scale) against step for every rank, and save to `path`.

    x is the step's position in the rank's file (1, 2, ...), so a restarted worker's steps continue the curve."""
    try:
        from matplotlib.figure import Figure  # the Agg canvas via Figure.savefig: no pyplot, no global backend
        from matplotlib.ticker import LogFormatter, MaxNLocator
    except ImportError:
        raise TelemetryError("plotting needs matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(10, 7), layout="constrained")
    ax_loss, ax_time = figure.subplots(2, 1, sharex=True)
    for rank, log in run.ranks.items():
        losses = [(i, number(r, "loss")) for i, r in enumerate(log.steps, 1) if number(r, "loss") is not None]
        times = [(i, number(r, "step_s") * 1e3) for i, r in enumerate(log.steps, 1) if (number(r, "step_s") or 0) > 0]
        if losses:
            ax_loss.plot(*zip(*losses), label=f"rank {rank}", linewidth=1)
        if times:
            ax_time.plot(*zip(*times), label=f"rank {rank}", linewidth=1)
    if ax_loss.has_data():
        ax_loss.legend(loc="upper right")
    else:
        ax_loss.text(0.5, 0.5, "no loss recorded", transform=ax_loss.transAxes, ha="center", va="center")
    if ax_time.has_data():
        ax_time.set_yscale("log")  # the first steps (compilation, warm-up) can be 100x the rest
        ax_time.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax_time.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax_time.legend(loc="upper right")
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("loss")
    ax_time.set_ylabel("step time (ms)")
    ax_time.set_xlabel("step")
    figure.suptitle(f"run {run.meta.get('run_id', run.path.name)}")
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path
