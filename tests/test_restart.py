"""`mpnn launch --checkpoint-every/--checkpoint-keep/--resume/--max-restarts`: flags checked before anything starts,
the checkpoint environment of each attempt, restarts recorded in run.json, telemetry and the audit trail, restarts
running out, a stop signal that stops instead of restarting, and MNIST-1D surviving two SIGKILLs and a resume."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from rich.console import Console

from mpnn.checkpoint.layout import write_manifest
from mpnn.launch import LaunchConfig, LaunchError, launch
from mpnn.launch.command import launch_command
from mpnn.launch.liveview import RichView
from mpnn.launch.restart import Restart, append_restart_event, resume_after_failure
from mpnn.launch.resume import check_resume
from mpnn.plugins.audit.cli import audit
from mpnn.telemetry.reader import load_run
from test_launch import (
    REPO,
    launch_env,
    leftover_processes,
    read_record,
    reap_leftovers,  # noqa: F401  (autouse: kills what a failed test left running)
    start_launcher,
    wait_for,
    write_script,
)

MNIST1D = str(REPO / "launch" / "mnist1d.py")


def restart_events(run_dir, rank):
    """The "restart" event lines of one rank's telemetry file."""
    return [e for e in load_run(run_dir).ranks[rank].events if e["event"] == "restart"]


def newest_checkpoint_step(run_dir):
    steps = [int(p.name[len("step-") :]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


@pytest.mark.parametrize(
    "flags, message, code",
    [
        (["--resume", "{tmp}/no-such-run"], "--resume {tmp}/no-such-run: no such run directory", 1),
        (["--resume", "{tmp}/plain"], "--resume {tmp}/plain: no checkpoints/ directory in it", 1),
        (
            ["--resume", "{tmp}/unfinished"],
            "--resume {tmp}/unfinished: {tmp}/unfinished/checkpoints holds no complete "
            "checkpoint (step-00000400: no manifest.json (an incomplete checkpoint))",
            1,
        ),
        (["--max-restarts", "-1"], "Invalid value for '--max-restarts'", 2),
        (["--checkpoint-every", "-5"], "Invalid value for '--checkpoint-every'", 2),
        (["--checkpoint-keep", "0"], "Invalid value for '--checkpoint-keep'", 2),
    ],
)
def test_bad_flags_are_one_clear_error_before_any_worker_starts(tmp_path, flags, message, code):
    tmp = tmp_path.resolve()
    (tmp / "plain").mkdir()
    (tmp / "unfinished" / "checkpoints" / "step-00000400").mkdir(parents=True)  # renamed, but no manifest in it
    (tmp / "unfinished" / "checkpoints" / ".tmp-step-00000500").mkdir()  # a save still being written
    script = write_script(tmp_path, "print('never')\n")
    flags = [f.format(tmp=tmp) for f in flags]
    result = CliRunner().invoke(
        launch_command, ["-n", "1", "--log-dir", str(tmp / "runs"), "--run-id", "r", *flags, str(script)]
    )
    assert result.exit_code == code and message.format(tmp=tmp) in result.output
    assert "never" not in result.output and not (tmp / "runs").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_restarts", -1, "--max-restarts -1: must be 0 or more"),
        ("checkpoint_every", -1, "--checkpoint-every -1: must be 0"),
        ("checkpoint_keep", 0, "--checkpoint-keep 0: must be at least 1"),
    ],
)
def test_launch_config_refuses_negative_values(tmp_path, field, value, message):
    script = write_script(tmp_path, "print('never')\n")
    with pytest.raises(LaunchError, match=re.escape(message)):
        launch(LaunchConfig(command=[str(script)], nproc_per_node=1, log_dir=tmp_path / "runs", **{field: value}))
    assert not (tmp_path / "runs").exists()


def make_checkpoint(run_dir, step):
    """A checkpoint laid out as mpnn.Checkpointer does it (no state files: the launcher reads only manifests)."""
    writing = run_dir / "checkpoints" / f".tmp-step-{step:08d}"
    writing.mkdir(parents=True)
    write_manifest(writing, step=step, epoch=0, world_size=2, files=[])
    writing.rename(run_dir / "checkpoints" / f"step-{step:08d}")


def test_a_restart_resumes_from_the_runs_own_checkpoint_else_from_where_the_run_resumed(tmp_path):
    run_dir, earlier = tmp_path / "run", tmp_path / "earlier"
    run_dir.mkdir()
    assert resume_after_failure(run_dir, None) is None
    assert resume_after_failure(run_dir, earlier) == earlier
    (run_dir / "checkpoints" / "step-00000300").mkdir(parents=True)  # no manifest: not a checkpoint to resume
    assert resume_after_failure(run_dir, earlier) == earlier
    make_checkpoint(run_dir, 200)
    assert resume_after_failure(run_dir, earlier) == run_dir
    assert check_resume(run_dir) == run_dir.resolve()
    assert check_resume(run_dir / "checkpoints") == (run_dir / "checkpoints").resolve()


def test_restart_event_starts_on_a_fresh_line_after_a_torn_one(tmp_path):
    """A worker SIGKILLed mid-write leaves half a line: the launcher's event must not be glued to it."""
    (tmp_path / "worker-0.jsonl").write_text('{"t": 1.0, "rank": 0, "event": "start"}\n{"t": 2.0, "rank": 0, "st')
    restart = Restart(1, 3, failed_rank=1, failed_pid=42, how="killed by SIGKILL", stopped=1, resume_from=tmp_path)
    append_restart_event(tmp_path, [0, 1], restart)
    run = load_run(tmp_path)
    assert run.ranks[0].bad_lines == 1 and run.ranks[1].bad_lines == 0
    for rank in (0, 1):
        (event,) = restart_events(tmp_path, rank)
        assert {k: v for k, v in event.items() if k != "t"} == {
            "rank": rank,
            "event": "restart",
            "restart": 1,
            "max_restarts": 3,
            "failed_rank": 1,
            "how": "killed by SIGKILL",
            "resume_from": str(tmp_path),
        }


def test_restart_line_scrolls_above_the_live_status_line(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    view = RichView(tmp_path, [0, 1], console=console)
    view.refresh(2)
    view.note("mpnn launch: rank 1 (pid 42) killed by SIGKILL; restart 1/2 begins, resuming from runs/x")
    view.refresh(2)
    view.close()
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())  # without the terminal's escapes
    shown = [line.split("\r")[-1] for line in plain.split("\n")]
    assert "mpnn launch: rank 1 (pid 42) killed by SIGKILL; restart 1/2 begins, resuming from runs/x" in shown


ATTEMPTS = """
    import json, os, sys, time
    from pathlib import Path
    rank, attempt = int(os.environ["MPNN_RANK"]), int(os.environ["MPNN_RESTART_COUNT"])
    run_dir = Path(os.environ["MPNN_RUN_DIR"])
    keys = ("MPNN_RESTART_COUNT", "MPNN_MAX_RESTARTS", "MPNN_CHECKPOINT_EVERY", "MPNN_CHECKPOINT_KEEP",
            "MPNN_RESUME_FROM")
    print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
    (run_dir / f"printed-{attempt}-{rank}").touch()
    checkpoint = run_dir / "checkpoints" / "step-00000007"
    if attempt == 1 and rank == 0:  # a checkpoint as mpnn.Checkpointer lays it out: renamed into place, manifest last
        from mpnn.checkpoint.layout import write_manifest
        writing = run_dir / "checkpoints" / ".tmp-step-00000007"
        writing.mkdir(parents=True)
        write_manifest(writing, step=7, epoch=0, world_size=2, files=[])
        writing.rename(checkpoint)
    if rank == 1 and attempt < 2:  # fails once rank 0 has printed (and, on attempt 1, saved the checkpoint)
        while not (run_dir / f"printed-{attempt}-0").exists() or (attempt == 1 and not checkpoint.exists()):
            time.sleep(0.01)
        sys.exit(3)
    if attempt < 2:
        time.sleep(60)  # still running when rank 1 fails: the launcher stops it
"""


def test_each_attempt_gets_its_restart_count_and_resumes_from_the_runs_own_checkpoint(tmp_path):
    """Attempt 0 fails before any checkpoint (restart 1 starts from scratch), attempt 1 after one (restart 2 resumes
    from the run dir); each restart is a console line, a run.json entry, a telemetry event and an audit record."""
    script = write_script(tmp_path, ATTEMPTS)
    key = tmp_path / "audit.key"
    stale = tmp_path / "stale"
    proc, run_id = start_launcher(
        tmp_path,
        [
            "-n",
            "2",
            "--checkpoint-every",
            "7",
            "--checkpoint-keep",
            "2",
            "--max-restarts",
            "2",
            "--plugin",
            f"audit:key={key}",
            str(script),
        ],
        env=launch_env(MPNN_RESUME_FROM=str(stale)),
    )  # the launcher's own: never passed on
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    run_dir = (tmp_path / "runs" / run_id).resolve()
    envs = [json.loads(line.split("ENV ", 1)[1]) for line in out.splitlines() if " ENV " in line]
    assert len(envs) == 6
    expected = [
        {
            "MPNN_RESTART_COUNT": str(k),
            "MPNN_MAX_RESTARTS": "2",
            "MPNN_CHECKPOINT_EVERY": "7",
            "MPNN_CHECKPOINT_KEEP": "2",
            "MPNN_RESUME_FROM": None if k < 2 else str(run_dir),
        }
        for k in range(3)
    ]
    assert sorted(envs, key=lambda e: e["MPNN_RESTART_COUNT"]) == [e for e in expected for _ in range(2)]
    pids = re.findall(r"rank 1 \(pid (\d+)\) exited with code 3; stopped", err)
    assert [line for line in err.splitlines() if "restart" in line] == [
        f"mpnn launch: rank 1 (pid {pids[0]}) exited with code 3; stopped the 1 other running worker(s); "
        "restart 1/2 begins, from scratch (no checkpoint saved yet)",
        f"mpnn launch: rank 1 (pid {pids[1]}) exited with code 3; stopped the 1 other running worker(s); "
        f"restart 2/2 begins, resuming from {run_dir}",
    ]
    record = read_record(tmp_path, run_id)
    assert record["status"] == "ok" and record["exit_code"] == 0 and record["resumed_from"] is None
    assert (
        record["config"]["checkpoint_every"],
        record["config"]["checkpoint_keep"],
        record["config"]["max_restarts"],
    ) == (7, 2, 2)
    assert [{k: r[k] for k in ("restart", "failed_rank", "pid", "how", "resume_from")} for r in record["restarts"]] == [
        {"restart": 1, "failed_rank": 1, "pid": int(pids[0]), "how": "exited with code 3", "resume_from": None},
        {"restart": 2, "failed_rank": 1, "pid": int(pids[1]), "how": "exited with code 3", "resume_from": str(run_dir)},
    ]
    assert [w["returncode"] for w in record["workers"]] == [0, 0]
    for rank in (0, 1):
        events = restart_events(run_dir, rank)
        assert [
            (e["rank"], e["restart"], e["max_restarts"], e["failed_rank"], e["how"], e["resume_from"]) for e in events
        ] == [(rank, 1, 2, 1, "exited with code 3", None), (rank, 2, 2, 1, "exited with code 3", str(run_dir))]
    report = CliRunner().invoke(audit, ["report", str(run_dir), "--key", str(key)])
    assert report.exit_code == 0, report.output
    assert "attempt 1: rank 1 exited with code 3 (ranks [1])" in report.output
    assert "attempt 2: rank 1 exited with code 3 (ranks [1])" in report.output
    assert leftover_processes(run_id) == []


def test_restarts_running_out_is_the_usual_failure_naming_the_rank(tmp_path):
    script = write_script(
        tmp_path,
        """
        import os, sys, time
        if os.environ["MPNN_RANK"] == "1":
            print("rank 1 gives up on attempt", os.environ["MPNN_RESTART_COUNT"], flush=True)
            sys.exit(3)
        time.sleep(60)
    """,
    )
    started = time.monotonic()
    proc, run_id = start_launcher(tmp_path, ["-n", "2", "--max-restarts", "2", str(script)])
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 3
    lines = err.splitlines()
    assert [line.split("; ")[-1] for line in lines if "begins" in line] == [
        "restart 1/2 begins, from scratch (no checkpoint saved yet)",
        "restart 2/2 begins, from scratch (no checkpoint saved yet)",
    ]
    headline = [line for line in lines if line.startswith("mpnn launch: rank 1") and "begins" not in line]
    assert len(headline) == 1
    assert headline[0].endswith("exited with code 3; stopped the 1 other running worker(s); no restart left (2/2 used)")
    assert "rank 1 gives up on attempt 2" in err[err.index("---- last") :]
    record = read_record(tmp_path, run_id)
    assert record["status"] == "failed" and record["exit_code"] == 3
    assert record["failure"] == {"rank": 1, "how": "exited with code 3"}
    assert [r["restart"] for r in record["restarts"]] == [1, 2]
    assert leftover_processes(run_id) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_instead_of_restarting(tmp_path, sig):
    script = write_script(
        tmp_path,
        """
        import time
        print("ready", flush=True)
        time.sleep(60)
    """,
    )
    proc, run_id = start_launcher(tmp_path, ["-n", "2", "--max-restarts", "3", str(script)])
    logs = [tmp_path / "runs" / run_id / f"worker-{r}.log" for r in (0, 1)]
    wait_for(lambda: all(log.exists() and "ready" in log.read_text() for log in logs), what="workers ready")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig
    assert "begins" not in err and f"got {signal.Signals(sig).name}; stopped 2 running worker(s)" in err
    record = read_record(tmp_path, run_id)
    assert record["status"] == "interrupted" and record["restarts"] == []
    assert leftover_processes(run_id) == []


def kill_worker_after_checkpoint(tmp_path, run_id, restarts_before, victim, after_step):
    """Once attempt `restarts_before` runs and has saved a checkpoint past `after_step`, SIGKILL rank `victim`."""
    run_dir = tmp_path / "runs" / run_id

    def ready():
        record = read_record(tmp_path, run_id) or {}
        return (
            record.get("status") == "running"
            and len(record.get("restarts", [])) == restarts_before
            and newest_checkpoint_step(run_dir) > after_step
        )

    wait_for(ready, timeout=60, what=f"attempt {restarts_before} to save a checkpoint past step {after_step}")
    pid = {w["rank"]: w["pid"] for w in read_record(tmp_path, run_id)["workers"]}[victim]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.slow
def test_mnist1d_survives_two_sigkills_and_still_reaches_its_accuracy(tmp_path):
    """The recipe (8000 steps, cnn, 2 workers) with a worker SIGKILLed twice: it resumes from its checkpoints each
    time and finishes with the recipe's test accuracy; telemetry files are appended to across attempts."""
    proc, run_id = start_launcher(
        tmp_path, ["-n", "2", "--checkpoint-every", "500", "--max-restarts", "2", MNIST1D, "--model", "cnn"]
    )
    run_dir = (tmp_path / "runs" / run_id).resolve()
    killed = [
        kill_worker_after_checkpoint(tmp_path, run_id, 0, victim=1, after_step=500),
        kill_worker_after_checkpoint(tmp_path, run_id, 1, victim=0, after_step=newest_checkpoint_step(run_dir)),
    ]
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err
    accuracy = float(re.search(r"final test accuracy (\d\.\d+)", out).group(1))
    assert accuracy >= 0.92
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", out)]
    assert len(resumed) == 2 and 500 < resumed[0] < resumed[1]
    record = read_record(tmp_path, run_id)
    assert record["status"] == "ok"
    assert [(r["failed_rank"], r["pid"], r["how"]) for r in record["restarts"]] == [
        (1, killed[0], "killed by SIGKILL"),
        (0, killed[1], "killed by SIGKILL"),
    ]
    run = load_run(run_dir)
    for rank in (0, 1):
        assert [(e["restart"], e["failed_rank"]) for e in restart_events(run_dir, rank)] == [(1, 1), (2, 0)]
        events = [e["event"] for e in run.ranks[rank].events]
        assert events.count("start") == 3 and events.count("resume") == 2 and events[-1] == "end"
        assert [e["step"] for e in run.ranks[rank].events if e["event"] == "resume"] == resumed
    show = subprocess.run(
        [sys.executable, "-m", "mpnn", "telemetry", "show", str(run_dir)],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0, show.stderr
    assert re.search(r"^\s+0\s+\d+", show.stdout, re.M) and re.search(r"^\s+1\s+\d+", show.stdout, re.M)
    assert leftover_processes(run_id) == []


@pytest.mark.slow
def test_resume_continues_a_stopped_run_from_its_newest_checkpoint(tmp_path):
    """SIGTERM a run after a checkpoint; --resume it: a fresh run dir whose run.json names the old one, and the
    workers start at the old run's newest checkpoint step and train to the end."""
    args = ["-n", "2", "--checkpoint-every", "100", MNIST1D, "--model", "mlp", "--steps", "600", "--eval-every", "100"]
    proc, first = start_launcher(tmp_path, args)
    first_dir = (tmp_path / "runs" / first).resolve()
    wait_for(lambda: newest_checkpoint_step(first_dir) >= 200, timeout=60, what="a checkpoint at step 200")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and read_record(tmp_path, first)["status"] == "interrupted"
    stopped_at = newest_checkpoint_step(first_dir)
    assert 200 <= stopped_at < 600
    proc, second = start_launcher(tmp_path, ["--resume", str(first_dir), *args])
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    second_dir = (tmp_path / "runs" / second).resolve()
    assert second_dir != first_dir and read_record(tmp_path, second)["resumed_from"] == str(first_dir)
    assert f"[0] resumed from {first_dir}/checkpoints/step-{stopped_at:08d} at step {stopped_at} " in out
    assert re.search(r"final test accuracy \d\.\d+ \(mlp, 600 steps, world 2\)", out)
    steps = [s["step"] for s in load_run(second_dir).ranks[0].steps]
    assert steps[0] == stopped_at + 1 and steps[-1] == 600
    assert leftover_processes(first) == [] and leftover_processes(second) == []
