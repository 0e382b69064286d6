"""A run's curves as one PNG: loss, step time and where the time went, per rank; matplotlib is optional and
imported only here, on use."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpnn.telemetry.reader import Run, TelemetryError, number

# The shares panel: each lane's time over the summed step time, stacked per rank; "other" is what no lane
# claims (Python between ops, the data loader when it is not instrumented).
SHARES = (("compute_s", "compute"), ("comm_s", "comm wait"), ("opt_s", "optimizer"), ("data_s", "data"))


def rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """The median of each value's centred window (shrunk at the ends), so a slow step or two does not move it."""
    if window <= 1 or values.size <= 2:
        return values.copy()
    half = window // 2
    padded = np.pad(values.astype(float), half, constant_values=np.nan)  # NaN ends: the window shrinks there
    return np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1), axis=1)


def smoothing_window(steps: int) -> int:
    """About 2% of the run, odd, between 1 and 101 steps."""
    return min(101, max(1, steps // 50) | 1)


def rank_series(log, key: str, scale: float = 1.0):
    """(step positions, values) of a rank's finite `key` values; the position is the step's place in the file
    (1, 2, ...), so a restarted worker's steps continue the curve."""
    pairs = [(i, number(r, key)) for i, r in enumerate(log.steps, 1)]
    pairs = [(i, v * scale) for i, v in pairs if v is not None]
    if not pairs:
        return np.empty(0), np.empty(0)
    x, y = zip(*pairs)
    return np.asarray(x, float), np.asarray(y, float)


def run_shares(log) -> dict[str, float]:
    """A rank's whole-run share of step time per lane, plus "other"; {} without timed steps."""
    total = sum(number(r, "step_s") or 0.0 for r in log.steps)
    if total <= 0:
        return {}
    shares = {label: sum(number(r, key) or 0.0 for r in log.steps) / total for key, label in SHARES}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def plot_run(run: Run, path) -> Path:
    """draw_run(run), saved as a PNG to `path`."""
    path = Path(path)
    draw_run(run).savefig(path, dpi=110)
    return path


def draw_run(run: Run):
    """Draw loss and step time (rolling medians over the faint raw values, log axes) against step for every rank
    in its own colour, and each rank's compute/comm/optimizer/data shares as a stacked bar; returns the Figure."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # the Agg canvas via Figure.savefig: no pyplot, no global backend
        from matplotlib.ticker import LogFormatter, MaxNLocator
    except ImportError:
        raise TelemetryError("plotting needs matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(11, 9), layout="constrained")
    grid = figure.add_gridspec(3, 1, height_ratios=(3, 3, 1.2 + 0.25 * len(run.ranks)))
    ax_loss = figure.add_subplot(grid[0])
    ax_time = figure.add_subplot(grid[1], sharex=ax_loss)
    ax_share = figure.add_subplot(grid[2])
    palette = colormaps["tab10" if len(run.ranks) <= 10 else "tab20"]
    colours = {rank: palette(i % palette.N) for i, rank in enumerate(sorted(run.ranks))}
    window = 1
    for rank, log in sorted(run.ranks.items()):
        colour = colours[rank]
        x, loss = rank_series(log, "loss")
        if x.size:
            ax_loss.plot(x, loss, color=colour, linewidth=0.5, alpha=0.25)  # per-batch losses, faint
            ax_loss.plot(
                x, rolling_median(loss, smoothing_window(x.size)), color=colour, linewidth=1.5, label=f"rank {rank}"
            )
        x, step_ms = rank_series(log, "step_s", 1e3)
        keep = step_ms > 0
        x, step_ms = x[keep], step_ms[keep]
        if x.size:
            window = smoothing_window(x.size)
            ax_time.plot(x, step_ms, color=colour, linewidth=0.5, alpha=0.25)  # the raw steps, faint
            ax_time.plot(x, rolling_median(step_ms, window), color=colour, linewidth=1.5, label=f"rank {rank}")
    if ax_loss.has_data():
        positive = all(line.get_ydata().min() > 0 for line in ax_loss.get_lines())
        if positive:
            ax_loss.set_yscale("log")  # losses fall by orders of magnitude: a linear axis flattens the end
        ax_loss.legend(loc="upper right", ncols=min(4, len(run.ranks)), title="rolling median")
    else:
        ax_loss.text(0.5, 0.5, "no loss recorded", transform=ax_loss.transAxes, ha="center", va="center")
    if ax_time.has_data():
        ax_time.set_yscale("log")  # the first steps (compilation, warm-up) can be 100x the rest
        ax_time.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax_time.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax_time.legend(loc="upper right", ncols=min(4, len(run.ranks)), title=f"median of {window} steps")
    else:
        ax_time.text(0.5, 0.5, "no step times recorded", transform=ax_time.transAxes, ha="center", va="center")
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("loss")
    ax_time.set_ylabel("step time (ms)")
    ax_time.set_xlabel("step")
    _draw_shares(ax_share, run)
    figure.suptitle(f"run {run.meta.get('run_id', run.path.name)}")
    return figure


def _draw_shares(ax, run: Run) -> None:
    """One horizontal stacked bar per rank: the run's share of step time in each lane."""
    lanes = [label for _, label in SHARES] + ["other"]
    lane_colours = dict(zip(lanes, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#b0b0b0")))
    ranks = sorted(run.ranks)
    shares = {rank: run_shares(run.ranks[rank]) for rank in ranks}
    if not any(shares.values()):
        ax.text(0.5, 0.5, "no step times recorded", transform=ax.transAxes, ha="center", va="center")
        ax.set_axis_off()
        return
    left = np.zeros(len(ranks))
    for lane in lanes:
        widths = np.array([shares[rank].get(lane, 0.0) * 100 for rank in ranks])
        ax.barh(range(len(ranks)), widths, left=left, color=lane_colours[lane], label=lane, height=0.6)
        for y, (x0, width) in enumerate(zip(left, widths)):
            if width >= 6:
                ax.text(x0 + width / 2, y, f"{width:.0f}%", ha="center", va="center", fontsize=8)
        left += widths
    ax.set_yticks(range(len(ranks)), [f"rank {rank}" for rank in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of step time (%)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
