"""The memory-leak watchdog: its robust trend, a real leak caught and named by file:line, clean runs left alone,
warn/abort, the telemetry event, and launch/leaky.py end to end."""

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from statistics import median

import numpy as np
import pytest

from mpnn.plugins.errors import PluginError
from mpnn.plugins.watchdog import FIT_POINTS, TrendFit, Watchdog, _rss_now
from mpnn.telemetry.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]
LEAKY = ROOT / "launch" / "leaky.py"
SMALL = dict(warmup=20, window=60, interval=20)  # quick detection: confirmed by step 20 + 2 * 60 + 20


def _run(recorder=None):
    return types.SimpleNamespace(rank=0, recorder=recorder)


def _line_of(path: Path, marker: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if marker in line)


def _reference_slope(x, y):
    return median((y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x)))


# ----- the trend ---------------------------------------------------------------------------------
def test_trend_is_the_brute_force_median_of_pairwise_slopes():
    rng = np.random.default_rng(0)
    for n in (40, 41):  # an even and an odd number of pairs
        x = np.sort(rng.choice(500, n, replace=False)).astype(np.float64)
        y = 3.5 * x + rng.normal(0, 5, n)
        y[[3, 17, 30]] += 500.0  # outliers: least squares would tilt, Theil-Sen must not
        slope = TrendFit(x).slope(y)
        assert slope == pytest.approx(_reference_slope(x.tolist(), y.tolist()), rel=1e-12)
        assert slope == pytest.approx(3.5, abs=0.5)


def test_trend_ignores_a_single_step_off_centre_and_follows_a_line():
    positions = np.linspace(0, 199, FIT_POINTS).astype(np.intp)
    fit = TrendFit(positions)
    x = np.arange(200, dtype=np.float64)
    plateau = np.where(x < 60, 100e6, 101e6)  # one 1 MB arena jump at 30% of the window
    assert fit.slope(plateau[positions]) == 0.0
    assert fit.slope((7.0 * x + 1e6)[positions]) == pytest.approx(7.0)


def test_threshold_in_percent_of_rss_per_window():
    dog = Watchdog(threshold_bytes_per_step=0, threshold_pct=2.0, window=100)
    assert dog.trend_threshold(50e6) == pytest.approx(0.02 * 50e6 / 100)
    both = Watchdog(threshold_bytes_per_step=4096, threshold_pct=2.0, window=100)
    assert both.trend_threshold(50e6) == 4096  # the lower of the two limits decides


@pytest.mark.parametrize(
    "options",
    [
        dict(threshold_bytes_per_step=0, threshold_pct=0.0),
        dict(window=4),
        dict(interval=1),
        dict(warmup=-1),
        dict(action="explode"),
    ],
)
def test_bad_options_are_refused_naming_the_plugin(options):
    with pytest.raises(PluginError, match="watchdog"):
        Watchdog(**options)


# ----- synthetic RSS: no Python growth -----------------------------------------------------------
def test_one_off_rss_jump_mid_window_raises_no_alarm():
    dog = Watchdog(**SMALL)
    for step in range(1, 600):
        rss = 100_000_000 + (1 << 20) * (step >= 110)  # the jump lands mid-window of the check at step 140
        dog.mpnn_step_end(_run(), {"step": step, "rss_bytes": rss})
    assert dog._stats["trends"] >= 1  # the jump did look like a trend once ...
    assert dog._stats["suspicions"] == 0 and dog.leaks == []  # ... but not in the next window


def test_step_record_carries_the_newest_window_slope_once_a_window_is_fitted():
    dog = Watchdog(threshold_bytes_per_step=1 << 30, **SMALL)  # never a suspect: only the figure is under test
    records = []
    for step in range(1, 200):
        record = {"step": step, "rss_bytes": 100_000_000 + 4096 * step}
        dog.mpnn_step_end(_run(), record)
        records.append(record)
    first_check = SMALL["warmup"] + SMALL["window"]
    assert all("watchdog_rss_slope" not in r for r in records[: first_check - 1])
    assert [r["watchdog_rss_slope"] for r in records[first_check:]] == pytest.approx([4096.0] * (199 - first_check))


def test_growth_no_python_line_explains_is_noted_in_telemetry_but_never_alarmed(tmp_path, capsys):
    rec = Recorder(tmp_path, 0, 1, flush_interval=3600)
    dog = Watchdog(action="abort", **SMALL)
    for step in range(1, 400):  # native-looking growth: RSS climbs, no Python object is kept
        dog.mpnn_step_end(_run(rec), {"step": step, "rss_bytes": 100_000_000 + 20_000 * step})
    rec.close()
    assert dog.leaks == [] and "memory leak" not in capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "worker-0.jsonl").read_text().splitlines()]
    trends = [e for e in events if e.get("event") == "memory_trend"]
    assert len(trends) == dog._stats["suspicions"] >= 2 and not any(e.get("event") == "leak" for e in events)
    assert all(t["rate_bytes_per_step"] == pytest.approx(20_000, rel=0.01) and t["confirmed"] is False for t in trends)


# ----- a real leak in this process ---------------------------------------------------------------
def _release_free_heap():
    """Hand the heap's free memory back to the kernel (glibc's malloc_trim), so that RSS grows with a leak from
    here on: earlier tests in this long-lived process (the attention and GPT ones free hundreds of MB) leave
    glibc's dynamic trim threshold high and tens of MB free in the heap, which a 7 MB test leak would fill
    without RSS moving."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to release this way
        pass


def _leak_steps(dog, steps, kept, recorder=None):
    """Steps that keep 10 KB each, fed to the watchdog with this process's real RSS; the step it alarmed at."""
    for step in range(1, steps + 1):
        kept.append(b"x" * 10_000)  # LEAK-SITE
        dog.mpnn_step_end(_run(recorder), {"step": step, "rss_bytes": _rss_now()})
        if dog.leaks:
            return step
    return None


def test_real_leak_aborts_naming_the_leaking_line_within_bounded_steps():
    site = f"{os.path.relpath(__file__)}:{_line_of(Path(__file__), '# LEAK-' + 'SITE')}"
    dog, kept = Watchdog(action="abort", **SMALL), []
    _release_free_heap()
    with pytest.raises(PluginError) as caught:
        _leak_steps(dog, 1000, kept)
    detected = len(kept)
    kept.clear()
    assert caught.value.plugin == "watchdog" and site in str(caught.value)
    # Caught within the 1000 steps; not sooner in a fixed count, because in this long-lived process the heap may
    # hold memory freed by earlier code, which soaks up the leak's first windows without growing RSS (a fresh
    # process gets a tight bound: launch/leaky.py below).
    assert detected < 1000
    top = dog.leaks[0]["top"][0]
    traced = 2 * (SMALL["interval"] // 4)  # steps between the first and the last snapshot
    assert top["site"] == site and top["count_delta"] >= traced
    assert top["size_delta"] >= 10_000 * traced
    assert dog.leaks[0]["rate_bytes_per_step"] > Watchdog.options["threshold_bytes_per_step"].default


def test_warn_mode_alarms_once_per_site_logs_it_and_records_a_leak_event(tmp_path, capsys):
    rec = Recorder(tmp_path, 0, 1, flush_interval=3600)
    dog, kept = Watchdog(**SMALL), []
    _release_free_heap()
    for step in range(1, 700):  # several windows: the same leak is confirmed again, but alarmed once
        kept.append(b"x" * 10_000)  # LEAK-SITE-2
        dog.mpnn_step_end(_run(rec), {"step": step, "rss_bytes": _rss_now()})
    kept.clear()
    dog.mpnn_run_end(_run(rec), "ok")
    rec.close()
    site = f"{os.path.relpath(__file__)}:{_line_of(Path(__file__), '# LEAK-' + 'SITE-2')}"
    assert len(dog.leaks) == 1 and dog._stats["suspicions"] >= 2
    err = capsys.readouterr().err
    assert err.count("memory leak") == 1 and site in err
    events = [json.loads(line) for line in (tmp_path / "worker-0.jsonl").read_text().splitlines()]
    leak = [e for e in events if e.get("event") == "leak"]
    assert len(leak) == 1 and leak[0]["top"][0]["site"] == site and leak[0]["rate_bytes_per_step"] > 4096
    summary = next(e for e in events if e.get("event") == "watchdog")
    assert summary["leaks"] == 1 and summary["steps"] == 699 and "garbage" in summary["gc"]
    import tracemalloc

    assert not tracemalloc.is_tracing()  # the watchdog stopped what it started


# ----- launch/leaky.py end to end through `mpnn launch` ----------------------------------------------
def _launch(tmp_path, *args, plugin="watchdog:action=abort", n=2):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpnn",
            "launch",
            "-n",
            str(n),
            "--log-dir",
            str(tmp_path),
            "--run-id",
            "run",
            "--plugin",
            plugin,
            str(LEAKY.relative_to(ROOT)),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    events = {}
    for file in sorted((tmp_path / "run").glob("worker-*.jsonl")):
        lines = [json.loads(line) for line in file.read_text().splitlines()]
        events[file.name] = [e for e in lines if e.get("event") in ("leak", "watchdog")]
    return done, events


def test_leaky_script_is_caught_naming_its_append_line(tmp_path):
    done, events = _launch(tmp_path, "--steps", "2000")
    site = f"launch/leaky.py:{_line_of(LEAKY, 'KEPT.append')}"
    assert done.returncode != 0
    assert "plugin 'watchdog'" in done.stderr or "watchdog:" in done.stderr
    assert site in done.stderr and "memory leak" in done.stderr
    for rank_events in events.values():  # every rank found it, in a bounded number of steps
        leak = next(e for e in rank_events if e["event"] == "leak")
        assert leak["top"][0]["site"] == site and leak["rate_bytes_per_step"] > 5_000
        assert leak["step"] <= 100 + 2 * 200 + 2 * 50  # default warmup + two windows + confirmation and alignment


def test_clean_two_thousand_step_run_raises_nothing(tmp_path):
    done, events = _launch(tmp_path, "--steps", "2000", "--leak-bytes", "0", plugin="watchdog")
    assert done.returncode == 0, done.stderr
    assert "memory leak" not in done.stderr
    for rank_events in events.values():
        assert [e["event"] for e in rank_events] == ["watchdog"]
        summary = rank_events[0]
        assert summary["steps"] == 2000 and summary["checks"] >= 15 and summary["leaks"] == summary["alarms"] == 0
