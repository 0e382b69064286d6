"""What the launcher prints for a new user: the run dir at start and end, a failed worker's traceback once (not live
and again as the log tail when both reach one screen), and a warning when --plugin met a script that never called
mpnn.init()."""

import dataclasses
import io
import os
import subprocess
import sys
import uuid

import pytest

from mpnn.launch.report import WorkerFailure, console_shows_worker_output, failure_block, plugins_never_loaded
from mpnn.plugins.session import codec_on_one_host
from test_launch import STARTED_RUNS, launch_env, leftover_processes, reap_leftovers, write_script  # noqa: F401

FAILS_ON_RANK_1 = """
    import os, time
    if os.environ["MPNN_RANK"] == "1":
        raise ValueError("boom on rank 1")
    time.sleep(30)
"""


def launch(tmp_path, args, merged: bool):
    """Run `mpnn launch` in tmp_path (so runs/ is relative); merged puts stderr into stdout as `2>&1` does."""
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    STARTED_RUNS.append(run_id)
    proc = subprocess.run(
        [sys.executable, "-m", "mpnn", "launch", "--run-id", run_id, *args],
        cwd=tmp_path,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert leftover_processes(run_id) == []
    return proc, run_id


def test_the_run_dir_is_printed_at_start_and_at_the_end(tmp_path):
    script = write_script(tmp_path, "print('working')\n")
    proc, run_id = launch(tmp_path, ["-n", "2", str(script)], merged=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    expected = f"mpnn launch: run dir: runs/{run_id}"  # relative to where the user stands: paste it as is
    assert lines.count(expected) == 2 and lines[-1] == expected, proc.stderr
    assert (tmp_path / "runs" / run_id / "run.json").is_file()


def test_a_failed_workers_traceback_is_printed_once_on_one_screen(tmp_path):
    script = write_script(tmp_path, FAILS_ON_RANK_1)
    proc, run_id = launch(tmp_path, ["-n", "2", str(script)], merged=True)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert out.count("Traceback (most recent call last)") == 1, out
    assert out.count('raise ValueError("boom on rank 1")') == 1, out
    headline = [line for line in out.splitlines() if line.startswith("mpnn launch: rank 1")]
    assert len(headline) == 1 and headline[0].endswith("its last line: ValueError: boom on rank 1"), out
    assert f"whole log: {tmp_path / 'runs' / run_id / 'worker-1.log'}" in out
    assert out.splitlines()[-1] == f"mpnn launch: run dir: runs/{run_id}"


def test_the_log_tail_is_kept_when_stderr_goes_elsewhere(tmp_path):
    """With stdout and stderr apart (a log file for one, the screen for the other) stderr alone must explain."""
    script = write_script(tmp_path, FAILS_ON_RANK_1)
    proc, _ = launch(tmp_path, ["-n", "2", str(script)], merged=False)
    assert proc.returncode == 1
    assert "[1] Traceback (most recent call last)" in proc.stdout
    assert "---- last 4 lines of" in proc.stderr and '  raise ValueError("boom on rank 1")' in proc.stderr


@pytest.mark.parametrize("calls_init", [False, True])
def test_plugins_given_to_a_script_without_init_are_named_at_the_end(tmp_path, calls_init):
    body = "import mpnn\nmpnn.init()\nprint('done')\n" if calls_init else "print('done')\n"
    script = write_script(tmp_path, body, name="train.py")
    proc, _ = launch(tmp_path, ["-n", "2", "--plugin", "watchdog", str(script)], merged=False)
    assert proc.returncode == 0, proc.stderr
    warning = (
        f"mpnn launch: warning: {script} never called mpnn.init(), so --plugin watchdog did nothing "
        "(call mpnn.init() at the top of the script to load the plugins)"
    )
    assert (warning in proc.stderr.splitlines()) is not calls_init, proc.stderr


def test_plugins_never_loaded_looks_at_every_local_rank(tmp_path):
    assert plugins_never_loaded(tmp_path, [0, 1], [], "t.py") is None  # no plugin, nothing to say
    assert "t.py never called mpnn.init(), so --plugin a, b did nothing" in plugins_never_loaded(
        tmp_path, [0, 1], ["a", "b"], "t.py"
    )
    (tmp_path / "worker-1.jsonl").write_text("")
    assert plugins_never_loaded(tmp_path, [0, 1], ["a"], "t.py") is None


def test_console_shows_worker_output_compares_the_two_destinations(tmp_path):
    read_end, write_end = os.pipe()
    with open(write_end, "w") as pipe, open(tmp_path / "log", "w") as log, open(tmp_path / "log", "a") as again:
        assert console_shows_worker_output(pipe, pipe)  # 2>&1
        assert not console_shows_worker_output(pipe, log)  # > log, stderr on screen
        assert console_shows_worker_output(log, again)  # > log 2>&1 through two opens of one file
        assert not console_shows_worker_output(io.StringIO(), pipe)  # no file behind it: keep the tail
    os.close(read_end)


def test_failure_block_without_output_still_names_the_log(tmp_path):
    failure = WorkerFailure(3, 42, -9, "was killed by SIGKILL", tmp_path / "worker-3.log", ())
    block = failure_block(failure, 1, 0, shown_above=True)
    assert block.splitlines() == [
        "mpnn launch: rank 3 (pid 42) was killed by SIGKILL; stopped the 1 other running worker(s)",
        f"(rank 3 wrote nothing to {tmp_path / 'worker-3.log'})",
    ]


TRAINS_WITH_A_CODEC = """
    import numpy as np
    import mpnn
    from mpnn import nn
    mpnn.init()
    model = mpnn.DataParallel(nn.Linear(64, 4))
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(mpnn.tensor(np.ones((2, 64), np.float32))).sum().backward()
        opt.step()
    print("trained")
"""


@pytest.mark.parametrize("shared_memory", [True, False])
def test_a_codec_on_one_host_is_warned_once_by_rank_0(tmp_path, shared_memory):
    script = write_script(tmp_path, TRAINS_WITH_A_CODEC)
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    STARTED_RUNS.append(run_id)
    env = launch_env() if shared_memory else launch_env(MPNN_SHM="0", MPNN_MAILBOX="0")  # sockets, as across hosts
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpnn",
            "launch",
            "--run-id",
            run_id,
            "-n",
            "2",
            "--plugin",
            "topk:ratio=0.1",
            str(script),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if "codec compresses gradients" in line]
    if shared_memory:
        assert len(warnings) == 1 and warnings[0].startswith("[0] mpnn: warning: the topk codec"), proc.stdout
        assert "all 2 ranks are on this host" in warnings[0]
    else:
        assert warnings == [], proc.stdout


def test_codec_on_one_host_names_the_shared_paths():
    class Comm:
        def __init__(self, world_size, transports):
            self.world_size, self.bytes_by_transport = world_size, dict.fromkeys(transports, (0, 0))

    class Topk:
        name = "topk"

    assert codec_on_one_host(None, Comm(2, ["shm"])) is None
    assert codec_on_one_host(Topk(), Comm(1, ["shm"])) is None  # a world of one all-reduces nothing
    assert codec_on_one_host(Topk(), Comm(4, ["tcp"])) is None  # sockets only: the codec's bytes matter
    assert "shared memory (shm)" in codec_on_one_host(Topk(), Comm(2, ["ipc", "shm"]))


def test_an_unusable_log_dir_fails_before_the_kernel_warm_up(tmp_path, monkeypatch):
    """A cold Numba cache costs ~25 s of compiling: a launch that cannot make its run dir says so first."""
    from mpnn.launch import launcher

    warmed = []
    monkeypatch.setattr(launcher, "warm_numba_cache", lambda: warmed.append(True))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    config = launcher.LaunchConfig(command=[str(write_script(tmp_path, "print(1)\n"))], nproc_per_node=1)
    with pytest.raises(launcher.LaunchError, match="cannot use the log directory"):
        launcher.launch(dataclasses.replace(config, log_dir=not_a_dir))
    assert warmed == []
