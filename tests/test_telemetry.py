"""mpnn.telemetry: a fake run recorded through the Recorder with a fake clock, checked against figures computed
here; straggler detection; the CLI (show, --json, trace, plot); the trace's no-overlap-per-lane property;
flushing within a second of a SIGKILL; the error event of an uncaught exception; thread safety."""

import errno
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mpnn import telemetry
from mpnn.telemetry import Recorder
from mpnn.telemetry import recorder as recorder_module
from mpnn.telemetry.cli import telemetry as telemetry_cli
from mpnn.telemetry.reader import load_run
from mpnn.telemetry.summary import find_straggler, format_text, print_rich, summarize
from mpnn.telemetry.trace import NUDGE_NS, _lay_out, build_trace

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 23
# Each step's spans as (lane, name, start, end) in fractions of the step; the two comm buckets overlap.
SPAN_PLAN = [
    ("data", "next batch", 0.0, 0.1),
    ("compute", "forward", 0.1, 0.4),
    ("compute", "backward", 0.4, 0.7),
    ("comm", "allreduce bucket 0", 0.45, 0.6),
    ("comm", "allreduce bucket 1", 0.55, 0.75),
    ("comm_wait", "wait bucket 1", 0.7, 0.8),
    ("optimizer", "step", 0.8, 1.0),
]
COMPUTE_SHARE, COMM_SHARE = 0.6, 0.1  # forward + backward; comm_wait


class FakeClock:
    """Stands in for time.perf_counter inside the recorder so step times are exactly what the test says."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def step_times(base):
    return [base * (1 + 0.01 * ((k * 7) % 11)) for k in range(STEPS)]


def rss_values(rank):
    return [50_000_000 + rank * 8192 + ((k * 37) % 23) * 4096 for k in range(STEPS)]


def record_rank(run_dir, rank, world, base, monkeypatch):
    """Drive a Recorder through STEPS synthetic steps of SPAN_PLAN; returns the step times used."""
    clock = FakeClock()
    monkeypatch.setattr(recorder_module, "perf_counter", clock)
    rec = Recorder(run_dir, rank, world, flush_interval=3600.0)
    rss = iter(rss_values(rank))
    rec._rss = lambda: next(rss)
    times = step_times(base)
    for k, step_s in enumerate(times):
        start = clock.now
        for lane, name, a, b in SPAN_PLAN:
            rec.add_span(lane, name, start + a * step_s, start + b * step_s)
        rec.add_bytes(1000 * (k + 1), 900 * (k + 1))
        rec.set_loss(np.float64(1.0 / (k + 1)) if k % 2 else np.array(1.0 / (k + 1)))
        clock.now = start + step_s
        rec.step_end(batch=32, epoch=k // 5)
    if rank == 1:
        rec.event("plugin", name="watchdog", window=50)
    if rank == 2:
        rec.record_error(ValueError("boom"))
    rec.close()
    return times


def make_run(run_dir, bases, monkeypatch):
    """A fake run dir: run.json plus one worker-<rank>.jsonl per base step time; rank 0's file ends torn."""
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "fake-run", "world": {"world_size": len(bases)}}))
    times = {rank: record_rank(run_dir, rank, len(bases), base, monkeypatch) for rank, base in enumerate(bases)}
    with open(run_dir / "worker-0.jsonl", "a") as f:
        f.write('{"t": 1, "rank": 0, "step": 99, "st')
    return times


def percentile95(values):
    """The 95th percentile by linear interpolation between closest ranks, written out here."""
    ordered = sorted(values)
    position = 0.95 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@pytest.fixture
def straggler_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    return run_dir, make_run(run_dir, [0.002, 0.002, 0.003], monkeypatch)


# ----- recorder, reader and summary -------------------------------------------------------------------


def test_step_lines_hold_the_contract_keys_and_the_spans(straggler_run):
    run_dir, times = straggler_run
    lines = [json.loads(line) for line in (run_dir / "worker-1.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "step" in line and "event" not in line]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for k, (record, step_s) in enumerate(zip(steps, times[1])):
        assert {
            "t",
            "rank",
            "step",
            "epoch",
            "loss",
            "batch",
            "step_s",
            "compute_s",
            "comm_s",
            "opt_s",
            "bytes_sent",
            "bytes_recv",
            "rss_bytes",
            "spans",
        } <= record.keys()
        assert record["rank"] == 1 and record["epoch"] == k // 5 and record["batch"] == 32
        assert record["loss"] == pytest.approx(1.0 / (k + 1))
        assert record["step_s"] == pytest.approx(step_s, rel=1e-6)
        assert record["compute_s"] == pytest.approx(COMPUTE_SHARE * step_s, rel=1e-5)
        assert record["comm_s"] == pytest.approx(COMM_SHARE * step_s, rel=1e-5)
        assert record["opt_s"] == pytest.approx(0.2 * step_s, rel=1e-5)
        assert (record["bytes_sent"], record["bytes_recv"]) == (1000 * (k + 1), 900 * (k + 1))
        assert record["rss_bytes"] == rss_values(1)[k]
        assert len(record["spans"]) == len(SPAN_PLAN)
        for (lane, name, offset, duration), (p_lane, p_name, a, b) in zip(record["spans"], SPAN_PLAN):
            assert (lane, name) == (p_lane, p_name)
            assert offset == pytest.approx(a * step_s, abs=2e-7)
            assert duration == pytest.approx((b - a) * step_s, abs=2e-7)
    assert steps[1]["t"] - steps[0]["t"] == pytest.approx(times[1][1], abs=2e-6)
    events = [line["event"] for line in lines if "event" in line]
    assert events == ["start", "plugin", "end"]
    assert lines[-1]["steps"] == STEPS and lines[-1]["status"] == "ok"


def test_summary_matches_figures_computed_here(straggler_run):
    run_dir, times = straggler_run
    run = load_run(run_dir)
    assert list(run.ranks) == [0, 1, 2] and run.meta["run_id"] == "fake-run"
    assert run.ranks[0].bad_lines == 1  # the torn last line
    summary = summarize(run)
    assert summary["run_id"] == "fake-run" and summary["world_size"] == 3
    for rank, r in enumerate(summary["ranks"]):
        assert r["rank"] == rank and r["steps"] == STEPS
        assert r["median_step_s"] == pytest.approx(statistics.median(times[rank]), rel=1e-6)
        assert r["p95_step_s"] == pytest.approx(percentile95(times[rank]), rel=1e-6)
        assert r["compute_share"] == pytest.approx(COMPUTE_SHARE, rel=1e-5)
        assert r["comm_share"] == pytest.approx(COMM_SHARE, rel=1e-5)
        assert r["bytes_sent"] == sum(1000 * (k + 1) for k in range(STEPS))
        assert r["bytes_recv"] == sum(900 * (k + 1) for k in range(STEPS))
        assert r["peak_rss_bytes"] == max(rss_values(rank))
    assert [r["events"] for r in summary["ranks"]] == [2, 3, 3]
    assert [r["errors"] for r in summary["ranks"]] == [0, 0, 1]
    assert summary["ranks"][2]["last_error"] == "ValueError: boom"
    assert [r["bad_lines"] for r in summary["ranks"]] == [1, 0, 0]


def test_straggler_named_when_one_rank_is_over_20_percent_slower(straggler_run):
    run_dir, times = straggler_run
    summary = summarize(load_run(run_dir))
    slow, others = statistics.median(times[2]), statistics.median([statistics.median(times[r]) for r in (0, 1)])
    straggler = summary["straggler"]
    assert straggler["rank"] == 2
    assert straggler["median_step_s"] == pytest.approx(slow, rel=1e-6)
    assert straggler["others_median_step_s"] == pytest.approx(others, rel=1e-6)
    assert straggler["excess"] == pytest.approx(slow / others - 1, rel=1e-5)
    expected = (
        f"straggler: rank 2 (median {slow * 1e3:.2f} ms, others {others * 1e3:.2f} ms, "
        f"+{(slow / others - 1) * 100:.0f}%)"
    )
    assert expected in format_text(summary).splitlines()


def test_no_straggler_within_20_percent(tmp_path, monkeypatch):
    run_dir = tmp_path / "even"
    make_run(run_dir, [0.002, 0.0021, 0.0023], monkeypatch)
    summary = summarize(load_run(run_dir))
    assert summary["straggler"] is None
    assert "straggler: none" in format_text(summary).splitlines()


@pytest.mark.parametrize("slow, named", [(2.39, False), (2.41, True)])
def test_straggler_threshold_is_20_percent_over_the_others_median(slow, named):
    ranks = [{"rank": i, "median_step_s": m} for i, m in enumerate([2.0, 1.9, 2.1, slow])]
    straggler = find_straggler(ranks)
    assert (straggler is not None) == named
    if named:
        assert straggler["rank"] == 3 and straggler["others_median_step_s"] == 2.0


def test_a_single_rank_is_never_a_straggler():
    assert find_straggler([{"rank": 0, "median_step_s": 5.0}]) is None


def test_loss_must_be_a_scalar(tmp_path):
    rec = Recorder(tmp_path, 0, 1, flush_interval=3600.0)
    try:
        rec.set_loss(np.ones(3))
        with pytest.raises(TypeError, match=r"set_loss.*ndarray of shape \(3,\)"):
            rec.step_end()
        with pytest.raises(ValueError, match="'rank' is reserved"):
            rec.event("plugin", rank=3)
    finally:
        rec.close()


def test_restart_after_a_torn_line_starts_on_a_fresh_line(tmp_path):
    path = tmp_path / "worker-0.jsonl"
    path.write_text('{"t": 1, "rank": 0, "event": "start"}\n{"t": 2, "ra')
    rec = Recorder(tmp_path, 0, 1)
    rec.step_end()
    rec.close()
    log = load_run(tmp_path).ranks[0]
    assert log.bad_lines == 1
    assert [e["event"] for e in log.events] == ["start", "start", "end"]
    assert len(log.steps) == 1


def test_a_file_that_cannot_be_written_costs_one_warning_not_the_run(tmp_path, monkeypatch, capsys):
    rec = Recorder(tmp_path, 3, 4, flush_interval=3600.0)

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(recorder_module, "_write_all", disk_full)
    for _ in range(2):
        rec.step_end()
        rec.flush()
    rec.close()
    assert capsys.readouterr().err.splitlines() == [
        f"mpnn telemetry: rank 3: cannot write {rec.path}: {os.strerror(errno.ENOSPC)}; telemetry lines dropped"
    ]


def test_spans_and_bytes_from_other_threads_are_all_counted(tmp_path):
    rec = Recorder(tmp_path, 0, 1, flush_interval=0.01)
    threads_n, per_thread = 4, 2000

    def communicate():
        for i in range(per_thread):
            t = time.perf_counter()
            rec.add_span("comm", f"bucket {i}", t, t)
            rec.add_bytes(3, 5)

    threads = [threading.Thread(target=communicate) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        rec.step_end()
    for thread in threads:
        thread.join()
    rec.step_end()
    rec.close()
    steps = load_run(tmp_path).ranks[0].steps
    assert sum(len(s["spans"]) for s in steps) == threads_n * per_thread
    assert sum(s["bytes_sent"] for s in steps) == 3 * threads_n * per_thread
    assert sum(s["bytes_recv"] for s in steps) == 5 * threads_n * per_thread


def test_start_is_idempotent_and_stop_closes(tmp_path):
    previous_hook = sys.excepthook
    rec = telemetry.start(tmp_path, 0, 2)
    try:
        assert telemetry.get_recorder() is rec
        assert telemetry.start(tmp_path, 0, 2) is rec
        with rec.span("compute", "forward"):
            pass
        rec.step_end()
    finally:
        telemetry.stop()
    assert telemetry.get_recorder() is None
    assert sys.excepthook is previous_hook
    log = load_run(tmp_path).ranks[0]
    assert [s["spans"][0][:2] for s in log.steps] == [["compute", "forward"]]
    assert [e["event"] for e in log.events] == ["start", "end"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_writes_nothing_of_its_parent(tmp_path):
    rec = Recorder(tmp_path, 0, 1, flush_interval=3600.0)
    rec.event("before-fork")
    pid = os.fork()
    if pid == 0:
        rec.flush()
        rec.close()
        os._exit(0)
    os.waitpid(pid, 0)
    rec.close()
    events = [e["event"] for e in load_run(tmp_path).ranks[0].events]
    assert events == ["start", "before-fork", "end"]


# ----- CLI --------------------------------------------------------------------------------------------


def test_show_prints_one_row_per_rank_and_the_straggler(straggler_run):
    run_dir, _ = straggler_run
    result = CliRunner().invoke(telemetry_cli, ["show", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [line.split() for line in lines[2:5]]
    assert [(row[0], row[1]) for row in rows] == [("0", str(STEPS)), ("1", str(STEPS)), ("2", str(STEPS))]
    assert any(line.startswith("straggler: rank 2 ") for line in lines)
    assert "rank 2 error: ValueError: boom" in lines
    assert "rank 0: 1 unreadable line(s) skipped" in lines


def test_show_json_is_the_summary(straggler_run):
    run_dir, _ = straggler_run
    result = CliRunner().invoke(telemetry_cli, ["show", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document == json.loads(json.dumps(summarize(load_run(run_dir))))
    assert document["straggler"]["rank"] == 2 and len(document["ranks"]) == 3


def test_rich_table_names_every_rank(straggler_run):
    from rich.console import Console

    run_dir, _ = straggler_run
    out = io.StringIO()
    print_rich(summarize(load_run(run_dir)), Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    lines = text.splitlines()
    assert any(line.split()[:2] == ["rank", "steps"] for line in lines)
    assert [line.split()[:2] for line in lines if line.split()[:1] in (["0"], ["1"], ["2"])] == [
        [str(rank), str(STEPS)] for rank in range(3)
    ]
    assert any(line.startswith("straggler: rank 2 ") for line in lines)


@pytest.mark.parametrize("command", ["show", "trace", "plot"])
def test_missing_or_empty_run_dir_is_one_error_line(tmp_path, command):
    for run_dir, message in [
        (tmp_path / "nope", "no such run directory"),
        (tmp_path, "no telemetry in this run directory (no worker-<rank>.jsonl files)"),
    ]:
        result = CliRunner().invoke(telemetry_cli, [command, str(run_dir)])
        assert result.exit_code != 0
        assert result.output.splitlines() == [f"Error: {run_dir}: {message}"]


# ----- trace ------------------------------------------------------------------------------------------


def _ns(microseconds):
    return round(microseconds * 1000)


def test_trace_is_valid_and_lanes_never_overlap(straggler_run, tmp_path):
    run_dir, times = straggler_run
    out = tmp_path / "trace.json"
    result = CliRunner().invoke(telemetry_cli, ["trace", str(run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    events = json.loads(out.read_text())["traceEvents"]
    assert all({"ph", "name", "pid"} <= e.keys() for e in events)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert processes == {0: "rank 0", 1: "rank 1", 2: "rank 2"}
    slices = [e for e in events if e["ph"] == "X"]
    lanes = {}
    for e in slices:
        assert e["dur"] >= 0 and (e["pid"], e["tid"]) in names
        lanes.setdefault((e["pid"], e["tid"]), []).append((_ns(e["ts"]), _ns(e["ts"]) + _ns(e["dur"])))
    for key, intervals in lanes.items():
        intervals.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:])), names[key]
    for pid in range(3):
        assert sum(1 for e in slices if e["pid"] == pid) == STEPS * (len(SPAN_PLAN) + 1)  # nothing dropped
        assert {name for (p, _), name in names.items() if p == pid} == {
            "step",
            "data",
            "compute",
            "comm",
            "comm #2",
            "comm_wait",
            "optimizer",
        }
    # Spans sit at their offsets in their step (step slices may be nudged by the timestamps' rounding).
    data = [e for e in slices if e["pid"] == 2 and e["name"] == "next batch"][3]
    forward = [e for e in slices if e["pid"] == 2 and e["name"] == "forward"][3]
    step = next(e for e in slices if e["pid"] == 2 and e["name"] == "step 4")
    assert forward["ts"] - data["ts"] == pytest.approx(0.1 * times[2][3] * 1e6, abs=0.002)
    assert forward["dur"] == pytest.approx(0.3 * times[2][3] * 1e6, abs=0.002)
    assert step["ts"] == pytest.approx(data["ts"], abs=NUDGE_NS / 1000)
    assert step["dur"] == pytest.approx(times[2][3] * 1e6, abs=NUDGE_NS / 1000)


def test_trace_has_counters_and_instant_events(straggler_run):
    run_dir, _ = straggler_run
    events = build_trace(load_run(run_dir))["traceEvents"]
    for pid in range(3):
        rss = [e["args"]["rss"] for e in events if e["ph"] == "C" and e["pid"] == pid and e["name"] == "rss_bytes"]
        sent = [
            e["args"]["sent"] for e in events if e["ph"] == "C" and e["pid"] == pid and e["name"] == "bytes per step"
        ]
        assert rss == rss_values(pid)
        assert sent == [1000 * (k + 1) for k in range(STEPS)]
    instants = {(e["pid"], e["name"]) for e in events if e["ph"] == "i"}
    assert instants == {
        (0, "start"),
        (0, "end"),
        (1, "start"),
        (1, "plugin"),
        (1, "end"),
        (2, "start"),
        (2, "error"),
        (2, "end"),
    }


def test_trace_is_strict_json_when_the_loss_diverges(tmp_path):
    rec = Recorder(tmp_path, 0, 1)
    rec.set_loss(float("nan"))
    rec.step_end()
    rec.event("plugin", growth=float("inf"))
    rec.close()
    out = tmp_path / "trace.json"
    result = CliRunner().invoke(telemetry_cli, ["trace", str(tmp_path), "-o", str(out)])
    assert result.exit_code == 0, result.output

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    events = json.loads(out.read_text(), parse_constant=reject)["traceEvents"]
    step = next(e for e in events if e["ph"] == "X" and e["name"] == "step 1")
    assert step["args"]["loss"] == "nan"
    assert next(e for e in events if e["name"] == "plugin")["args"]["growth"] == "inf"
    assert summarize(load_run(tmp_path))["ranks"][0]["steps"] == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 20_000)), max_size=40))
def test_lay_out_never_overlaps_and_moves_slices_at_most_the_nudge(intervals):
    slices = [(start, start + dur, f"s{i}", None) for i, (start, dur) in enumerate(intervals)]
    sublanes = _lay_out(slices)
    placed = {name: (start, end) for lane in sublanes for start, end, name, _ in lane}
    assert len(placed) == len(slices)
    for lane in sublanes:
        assert all(a[1] <= b[0] for a, b in zip(lane, lane[1:]))
    for i, (start, dur) in enumerate(intervals):
        new_start, new_end = placed[f"s{i}"]
        assert 0 <= new_start - start <= NUDGE_NS
        assert new_end - new_start <= dur and new_end >= start + dur


# ----- plot -------------------------------------------------------------------------------------------


def test_plot_writes_a_png(straggler_run, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (optional: pip install matplotlib)")
    run_dir, _ = straggler_run
    out = tmp_path / "run.png"
    result = CliRunner().invoke(telemetry_cli, ["plot", str(run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_install_it(straggler_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    run_dir, _ = straggler_run
    result = CliRunner().invoke(telemetry_cli, ["plot", str(run_dir), "-o", str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert result.output.strip() == "Error: plotting needs matplotlib: pip install matplotlib"


# ----- subprocesses: flush within a second, error event ----------------------------------------------


def _worker(script: str, run_dir: Path) -> subprocess.Popen:
    """Run `script` in a fresh Python (from a file, so tracebacks show source lines) with run_dir defined."""
    run_dir.mkdir(exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}-worker.py"
    path.write_text("import sys, time\nfrom mpnn import telemetry\nrun_dir = sys.argv[1]\n" + textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, str(path), str(run_dir)], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_sigkill_loses_at_most_about_a_second(tmp_path):
    busy = _worker(
        """
        rec = telemetry.start(run_dir, 0, 1)
        print("recording", flush=True)
        while True:
            rec.step_end()
            time.sleep(0.005)
    """,
        tmp_path / "busy",
    )
    idle = _worker(
        """
        rec = telemetry.start(run_dir, 0, 1)
        for _ in range(7):
            rec.step_end()
        print("idle", flush=True)
        time.sleep(60)
    """,
        tmp_path / "idle",
    )
    try:
        assert busy.stdout.readline() == "recording\n"
        assert idle.stdout.readline() == "idle\n"
        time.sleep(2.5)
        killed_at = time.time()
        busy.send_signal(signal.SIGKILL)
        idle.send_signal(signal.SIGKILL)
    finally:
        busy.kill()
        idle.kill()
        busy.communicate()
        idle.communicate()
    busy_steps = load_run(tmp_path / "busy").ranks[0].steps
    assert len(busy_steps) > 50
    assert busy_steps[-1]["t"] > killed_at - 1.5  # flushed within about a second
    assert len(load_run(tmp_path / "idle").ranks[0].steps) == 7  # the timer thread flushed the idle worker


def test_uncaught_exception_becomes_an_error_event(tmp_path):
    worker = _worker(
        """
        rec = telemetry.start(run_dir, 0, 1)
        rec.step_end()
        def train():
            raise RuntimeError("boom at step 2")
        train()
    """,
        tmp_path / "run",
    )
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode != 0
    assert "RuntimeError: boom at step 2" in stderr  # the previous excepthook still printed it
    events = load_run(tmp_path / "run").ranks[0].events
    assert [e["event"] for e in events] == ["start", "error", "end"]
    error = events[1]
    assert (error["type"], error["message"]) == ("RuntimeError", "boom at step 2")
    assert 'raise RuntimeError("boom at step 2")' in error["traceback"]
    assert "in train" in error["traceback"]
    assert events[2]["status"] == "error" and events[2]["steps"] == 1
