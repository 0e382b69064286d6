"""The memory-leak watchdog: a worker's RSS trend after warm-up, confirmed line by line with tracemalloc.

Per step it only appends the step record's rss_bytes to a window (about 1-2 us). Every ``interval`` steps after
``warmup`` + ``window`` it fits the window's trend with Theil-Sen (the median of pairwise slopes, so a one-off jump
of an allocator arena off the window's middle does not read as a trend). A trend beyond the threshold in two fresh
windows in a row makes the worker a suspect: tracemalloc is started then, three snapshots ``interval // 4`` steps
apart are compared by line (compare_to "lineno"), only lines that grew between every two snapshots are blamed, and
tracemalloc is stopped again. A leak is thus confirmed by about step warmup + 2 * window + interval.

Why tracemalloc is not kept on from warm-up: measured on the 2-core dev machine, tracing every allocation slowed a
small-MLP step 3.3-6x (130 us -> 580 us), far over the 5% budget.

A trend that no Python line explains is not an alarm: it becomes a "memory_trend" telemetry event, and tracemalloc
waits ever longer (2, 4, ... 16 windows) before it is tried again. Measured: a clean 2-rank `mpnn launch` run grows
RSS in bursts of 0.3-2.7 MB per 1000 steps (about 9-11 MB over 12000 steps, with no plugin at all) while
tracemalloc's traced memory stays flat: allocator arenas and native buffers, which would otherwise make clean runs
raise alarms and pay for tracing again and again. The default threshold, 4 KiB per step, sits above that creep:
over 14 clean rank-runs of 3000-12000 steps, 200-step window slopes had median 0, p90 1.3 KiB, p99 4.8 KiB and
max 12 KiB per step, and two fresh windows in a row never both exceeded 2 KiB per step.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from time import perf_counter

import numpy as np

from mpnn._version import __version__
from mpnn.plugins.errors import PluginError
from mpnn.plugins.hookspec import hookimpl
from mpnn.plugins.options import Option

TOP_SITES = 5
MIN_SITE_BYTES_PER_STEP = 32  # a line growing slower than this is not blamed, whatever the trend
SITE_SHARE = 0.1  # ... nor one explaining less than this share of the RSS trend
FIT_POINTS = 64  # the trend is fitted on this many evenly spaced samples of the window (2016 pairs)
MAX_BACKOFF = 16  # after unexplained trends, wait up to this many windows before tracing again
_IGNORED_FILES = (
    tracemalloc.__file__,
    __file__,
    "<frozen importlib._bootstrap>",
    "<frozen importlib._bootstrap_external>",
    "<unknown>",
)


class TrendFit:
    """The Theil-Sen trend of samples taken at fixed positions: the median of the slopes between every two samples,
    robust to steps and outliers. The pairs and their distances are computed once, so a fit of 64 samples (2016
    pairs) costs about 25 us (np.partition, not np.median: half the time)."""

    def __init__(self, positions):
        positions = np.asarray(positions, dtype=np.float64)
        i, j = np.triu_indices(len(positions), k=1)
        apart = positions[j] != positions[i]
        self._i, self._j = i[apart], j[apart]
        self._dx = positions[self._j] - positions[self._i]
        n = len(self._dx)
        self._kth = [n // 2 - 1, n // 2] if n % 2 == 0 else [n // 2]

    def slope(self, y: np.ndarray) -> float:
        """The trend of y (one sample per position), in y units per position unit."""
        slopes = np.partition((y[self._j] - y[self._i]) / self._dx, self._kth)
        return float(slopes[self._kth].sum() / len(self._kth))


def human_bytes(n: float) -> str:
    """n bytes as a short human string: 512 B, 10.0 KiB, 3.2 MiB."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def site_name(frame) -> str:
    """file:line of a tracemalloc frame, the file relative to the working directory when it lies under it."""
    path = frame.filename
    if os.path.isabs(path):
        rel = os.path.relpath(path)
        if not rel.startswith(os.pardir):
            path = rel
    return f"{path}:{frame.lineno}"


def gc_state() -> dict:
    """The garbage collector's counts, collections per generation, uncollectable objects and len(gc.garbage)."""
    stats = gc.get_stats()
    return {
        "counts": list(gc.get_count()),
        "collections": [s["collections"] for s in stats],
        "uncollectable": sum(s["uncollectable"] for s in stats),
        "garbage": len(gc.garbage),
    }


def _rss_now() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().rss


class _Confirmation:
    """tracemalloc snapshots taken while a worker is suspected of leaking, compared line by line."""

    def __init__(self, step: int, slope: float, spacing: int, recorder):
        self.slope, self.spacing, self.recorder = slope, spacing, recorder
        self.started_tracing = not tracemalloc.is_tracing()
        if self.started_tracing:
            tracemalloc.start(1)
        self.snapshots: list = []
        self.take(step)

    def take(self, step: int) -> None:
        """Snapshot now; the telemetry buffer is flushed first so that buffered lines do not read as growth."""
        if self.recorder is not None:
            self.recorder.flush()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, name) for name in _IGNORED_FILES]
        )
        self.snapshots.append((step, snapshot))

    def due(self, step: int) -> bool:
        return step - self.snapshots[-1][0] >= self.spacing

    @property
    def done(self) -> bool:
        return len(self.snapshots) >= 3

    def growing_sites(self) -> list[dict]:
        """Lines that grew between every two consecutive snapshots, fast enough to matter, largest first."""
        rounds = [
            {stat.traceback[0]: (stat.size_diff, stat.count_diff) for stat in newer.compare_to(older, "lineno")}
            for (_, older), (_, newer) in zip(self.snapshots, self.snapshots[1:])
        ]
        steps = self.snapshots[-1][0] - self.snapshots[0][0]
        floor = max(MIN_SITE_BYTES_PER_STEP, SITE_SHARE * self.slope) * steps
        sites = []
        for key in set().union(*rounds):
            diffs = [diff.get(key, (0, 0)) for diff in rounds]
            size = sum(d[0] for d in diffs)
            if all(d[0] > 0 for d in diffs) and size >= floor:
                sites.append({"site": site_name(key), "size_delta": size, "count_delta": sum(d[1] for d in diffs)})
        sites.sort(key=lambda s: -s["size_delta"])
        return sites[:TOP_SITES]

    def close(self) -> None:
        self.snapshots.clear()
        if self.started_tracing:
            tracemalloc.stop()


class Watchdog:
    """Memory-leak watchdog: flags RSS growth after warm-up, confirmed with tracemalloc, naming the leaking lines."""

    name = "watchdog"
    version = __version__  # a built-in plugin is versioned with mpnn
    options = {
        "threshold_bytes_per_step": Option(
            int, 4096, "RSS growth per step (Theil-Sen trend over the window) that makes a leak; 0: off"
        ),
        "threshold_pct": Option(float, 0.0, "RSS growth over one window, in percent of RSS, that makes a leak; 0: off"),
        "warmup": Option(int, 100, "steps ignored at the start (kernel compilation, caches, allocator settling)"),
        "window": Option(int, 200, "steps of RSS over which the trend is fitted"),
        "interval": Option(int, 50, "steps between trend checks; tracemalloc confirms a trend over half as many"),
        "action": Option(
            ("warn", "abort"),
            "warn",
            "on a leak: warn (event + log line, the run goes on) or abort (the run fails naming the leaking line)",
        ),
    }

    def __init__(
        self,
        threshold_bytes_per_step: int = 4096,
        threshold_pct: float = 0.0,
        warmup: int = 100,
        window: int = 200,
        interval: int = 50,
        action: str = "warn",
    ):
        if threshold_bytes_per_step < 0 or threshold_pct < 0 or (threshold_bytes_per_step == 0 and threshold_pct == 0):
            raise PluginError(
                f"watchdog: threshold_bytes_per_step={threshold_bytes_per_step}, threshold_pct="
                f"{threshold_pct}: both must be >= 0 and at least one > 0"
            )
        if warmup < 0 or window < 8 or interval < 2:
            raise PluginError(
                f"watchdog: warmup={warmup}, window={window}, interval={interval}: need warmup >= 0, "
                "window >= 8 and interval >= 2"
            )
        if action not in ("warn", "abort"):
            raise PluginError(f"watchdog: action={action!r}: use 'warn' or 'abort'")
        self.threshold_bytes_per_step, self.threshold_pct = threshold_bytes_per_step, threshold_pct
        self.warmup, self.window, self.interval, self.action = warmup, window, interval, action
        self._rss = np.empty(window)  # ring buffer of the last `window` RSS samples (NaN where unknown)
        self._rss_at = 0  # where the next sample goes
        self._rss_count = 0  # samples since the window was last cleared
        self._fit_at = np.linspace(0, window - 1, min(window, FIT_POINTS)).astype(np.intp)  # the samples fitted
        self._fit = TrendFit(self._fit_at)
        self._steps = 0
        self._last_rss: int | None = None
        self._last_slope: float | None = None  # bytes per step of the newest full window's trend
        self._next_check = warmup + window
        self._backoff = 1  # windows to wait after a confirmation: doubles while trends stay unexplained
        self._trending = False  # the last full window trended: one more in a row makes a suspect
        self._confirmation: _Confirmation | None = None
        self._alarmed: set = set()
        self._stats = {"checks": 0, "trends": 0, "suspicions": 0, "alarms": 0, "traced_steps": 0, "check_s": 0.0}
        self.leaks: list[dict] = []
        self._fit.slope(np.zeros(len(self._fit_at)))  # load NumPy's lazy parts now, not at the first check in the
        # middle of the first window, where their memory would read as a trend

    # ---- hooks ----
    @hookimpl(trylast=True)
    def mpnn_step_end(self, run, record):
        self._steps += 1
        if self._steps <= self.warmup:
            return
        rss = record.get("rss_bytes")
        self._last_rss = rss if rss is not None else _rss_now()
        self._rss[self._rss_at] = np.nan if self._last_rss is None else self._last_rss
        self._rss_at = (self._rss_at + 1) % self.window
        self._rss_count += 1
        if self._confirmation is not None:
            self._stats["traced_steps"] += 1
            if self._confirmation.due(self._steps):
                self._confirm(run, record)
        elif self._steps >= self._next_check:
            self._next_check = self._steps + self.interval
            self._check(run)
        if self._last_slope is not None:  # the newest trend, for the plugins that read the record (tensorboard)
            record["watchdog_rss_slope"] = self._last_slope

    @hookimpl
    def mpnn_run_end(self, run, status):
        if self._confirmation is not None:
            self._confirmation.close()
            self._confirmation = None
        if run.recorder is not None:
            run.recorder.event(
                "watchdog",
                steps=self._steps,
                **self._stats,
                leaks=len(self.leaks),
                rss_last=self._last_rss,
                gc=gc_state(),
            )

    # ---- detection ----
    def trend_threshold(self, rss_start: float) -> float:
        """The RSS slope (bytes per step) beyond which the window is a leak suspect."""
        limits = []
        if self.threshold_bytes_per_step > 0:
            limits.append(float(self.threshold_bytes_per_step))
        if self.threshold_pct > 0:
            limits.append(self.threshold_pct / 100.0 * rss_start / self.window)
        return min(limits)

    def _check(self, run) -> None:
        if self._rss_count < self.window:
            return
        t0 = perf_counter()
        rss = self._rss[(self._rss_at + self._fit_at) % self.window]  # oldest first
        if np.isnan(rss).any():
            return
        slope = self._fit.slope(rss)
        self._last_slope = slope
        self._stats["checks"] += 1
        if slope <= self.trend_threshold(rss[0]):
            self._trending = False
        elif not self._trending:  # a first trend: judge a fresh window before paying for tracemalloc
            self._stats["trends"] += 1
            self._trending = True
            self._rss_count = 0
        else:
            self._stats["trends"] += 1
            self._stats["suspicions"] += 1
            self._trending = False
            self._confirmation = _Confirmation(self._steps, slope, max(1, self.interval // 4), run.recorder)
        self._stats["check_s"] += perf_counter() - t0

    def _confirm(self, run, record) -> None:
        confirmation = self._confirmation
        confirmation.take(self._steps)
        if not confirmation.done:
            return
        sites = confirmation.growing_sites()
        confirmation.close()
        self._confirmation = None
        self._rss_count = 0  # the next verdict rests on a fresh window
        self._next_check = self._steps + self._backoff * self.window
        if sites:
            self._backoff = 1
            self._alarm(run, record, confirmation.slope, sites)
            return
        # Growth no Python line explains (allocator arenas, native buffers): noted, never blamed, and traced again
        # ever later, so that a run whose RSS keeps creeping does not pay for tracemalloc again and again.
        self._backoff = min(2 * self._backoff, MAX_BACKOFF)
        if run.recorder is not None:
            run.recorder.event(
                "memory_trend",
                rate_bytes_per_step=int(confirmation.slope),
                confirmed=False,
                step=record.get("step", self._steps),
                rss_bytes=self._last_rss,
            )

    def _alarm(self, run, record, slope: float, sites: list[dict]) -> None:
        keys = {s["site"] for s in sites}
        if keys <= self._alarmed:
            return
        self._alarmed |= keys
        self._stats["alarms"] += 1
        rank = getattr(run, "rank", 0)
        leak = {
            "rate_bytes_per_step": int(slope),
            "step": record.get("step", self._steps),
            "rss_bytes": self._last_rss,
            "top": sites,
            "gc": gc_state(),
        }
        self.leaks.append(leak)
        if run.recorder is not None:
            run.recorder.event("leak", **leak)
        where = ", ".join(f"{s['site']} +{human_bytes(s['size_delta'])} ({s['count_delta']} blocks)" for s in sites)
        message = (
            f"rank {rank}: memory leak of {human_bytes(slope)}/step (RSS trend over {self.window} steps, "
            f"step {leak['step']}); top sites: {where}"
        )
        print(f"mpnn watchdog: {message}", file=sys.stderr, flush=True)
        if self.action == "abort":
            raise PluginError(f"watchdog: {message}", plugin=self.name)
