"""Faults injected into real `mpnn launch` runs: a worker SIGKILLed inside an all-reduce or inside backward, a worker
frozen with SIGSTOP, an exception on one rank, a read-only or full disk. Each ends with one report naming the rank
or the file, a non-zero exit within seconds (never after waiting out --timeout where nothing needs to time out),
and no process left behind, the stopped one included."""

import errno
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from test_launch import (
    STARTED_RUNS,
    launch_env,
    leftover_processes,
    read_record,
    reap_leftovers,  # noqa: F401  (autouse fixture)
    start_launcher,
    wait_for,
    write_script,
)

FAULTS = """
    import os, sys, time
    import numpy as np
    import mpnn
    from mpnn import nn

    mode, victim = sys.argv[1], int(sys.argv[2])
    comm = mpnn.init()
    run_dir = os.environ["MPNN_RUN_DIR"]

    def mark(name):
        open(os.path.join(run_dir, f"{name}-{comm.rank}"), "w").close()

    if mode == "backward":
        model = mpnn.DataParallel(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                                nn.Linear(256, 10)), bucket_mb=0.05)
        optimizer = mpnn.optim.SGD(model.parameters(), lr=0.01)
        launch_bucket = comm.allreduce_async
        def marking_allreduce_async(a, op="sum"):  # DataParallel calls it from inside loss.backward()
            if step == 3 and comm.rank == victim:
                mark("in-backward")
                time.sleep(60)
            return launch_bucket(a, op)
        comm.allreduce_async = marking_allreduce_async
        rng = np.random.default_rng(comm.rank)
        x = mpnn.tensor(rng.standard_normal((32, 64)).astype(np.float32))
        y = mpnn.tensor(rng.integers(0, 10, 32))
        for step in range(10**6):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        a = np.ones(4_000_000, np.float32)
        for step in range(10**6):
            if step == 3 and comm.rank == victim:
                if mode == "raise":
                    mark("raising")
                    raise RuntimeError(f"injected failure on rank {comm.rank}")
                mark("in-allreduce")
            comm.allreduce(a, op="mean")
"""

TIMEOUT = 3.0


def start_faults(tmp_path, mode, n, victim, timeout=TIMEOUT, **env):
    """Start `mpnn launch -n n --timeout timeout` on FAULTS (env: extra variables); returns (launcher Popen, run id,
    run dir)."""
    script = write_script(tmp_path, FAULTS)
    proc, run_id = start_launcher(
        tmp_path, ["-n", str(n), "--timeout", str(timeout), str(script), mode, str(victim)], env=launch_env(**env)
    )
    return proc, run_id, tmp_path / "runs" / run_id


def victim_pid(tmp_path, run_id, rank):
    return next(w["pid"] for w in read_record(tmp_path, run_id)["workers"] if w["rank"] == rank)


def headline(err):
    lines = [line for line in err.splitlines() if line.startswith("mpnn launch: rank")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("mode, marker, n", [("allreduce", "in-allreduce", 3), ("backward", "in-backward", 2)])
def test_sigkill_of_a_worker_mid_step_names_it_and_stops_all(tmp_path, mode, marker, n):
    """SIGKILL while the victim is inside an all-reduce or inside backward (in a bucket's hand-off to the ring)."""
    victim = 1
    proc, run_id, run_dir = start_faults(tmp_path, mode, n, victim)
    wait_for(lambda: (run_dir / f"{marker}-{victim}").exists(), timeout=60, what=f"rank {victim} {marker}")
    pid = victim_pid(tmp_path, run_id, victim)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = proc.communicate(timeout=TIMEOUT + 30)
    elapsed = time.monotonic() - killed_at
    assert elapsed < TIMEOUT + 5, f"the launcher took {elapsed:.1f} s"
    assert proc.returncode == 128 + signal.SIGKILL, err
    assert headline(err).startswith(f"mpnn launch: rank {victim} (pid {pid}) killed by SIGKILL")
    assert leftover_processes(run_id) == []
    record = read_record(tmp_path, run_id)
    assert record["status"] == "failed" and record["failure"] == {"rank": victim, "how": "killed by SIGKILL"}


@pytest.mark.parametrize("n, mailbox", [(2, "1"), (3, "0")])  # waiting in shared-memory marks / on the sockets
def test_sigstopped_worker_is_named_by_the_others_and_killed(tmp_path, n, mailbox):
    """A frozen rank: its peers time out naming it, the launcher reports that and ends the stopped process too
    (SIGTERM reaches a stopped process only with a SIGCONT, so it must not need the SIGKILL grace)."""
    victim = 1
    proc, run_id, run_dir = start_faults(tmp_path, "stop", n, victim, MPNN_MAILBOX=mailbox)
    wait_for(lambda: (run_dir / f"in-allreduce-{victim}").exists(), timeout=60, what="the victim's marker")
    pid = victim_pid(tmp_path, run_id, victim)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    out, err = proc.communicate(timeout=TIMEOUT + 30)
    elapsed = time.monotonic() - stopped_at
    assert elapsed < 2 * TIMEOUT + 3, f"took {elapsed:.1f} s"  # the peer that heard it in this collective grants a
    # second timeout for a diagnosis from further up the ring (transport.py); then nothing may wait on the stopped one
    assert proc.returncode == 1, err
    first = headline(err)
    assert "exited with code 1" in first and f"mpnn launch: rank {victim} " not in first
    diagnosis = [line for line in err.splitlines() if "mpnn.comm.errors.CommTimeout: " in line]
    assert len(diagnosis) == 1, err  # in the failed rank's log tail: the stopped rank, not a waiting one, is named
    assert diagnosis[0].split("CommTimeout: ", 1)[1].startswith(f"rank {victim} "), diagnosis[0]
    assert leftover_processes(run_id) == []
    workers = {w["rank"]: w for w in read_record(tmp_path, run_id)["workers"]}
    assert workers[victim]["how"] == "killed by SIGTERM" and not workers[victim]["sigkilled"]


def test_exception_on_one_rank_stops_the_others_at_once(tmp_path):
    """The others are blocked in an all-reduce with a long --timeout: the launcher, not the timeout, ends them."""
    n, victim, timeout = 3, 2, 120.0
    proc, run_id, run_dir = start_faults(tmp_path, "raise", n, victim, timeout=timeout)
    wait_for(lambda: (run_dir / f"raising-{victim}").exists(), timeout=60, what="the exception")
    raised_at = time.monotonic()
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - raised_at
    assert elapsed < 10.0, f"took {elapsed:.1f} s"  # the others were stopped, not left to wait out --timeout
    assert proc.returncode == 1, err
    assert headline(err).startswith(f"mpnn launch: rank {victim} (pid ") and "exited with code 1" in err
    report = err[err.index("---- last ") :]
    assert "Traceback (most recent call last)" in report
    assert f"RuntimeError: injected failure on rank {victim}" in report
    assert leftover_processes(run_id) == []


# -- disks that refuse writes ---------------------------------------------------------------------------------
@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, size, read_only) -> path of a fresh tmpfs; every mount is undone after the test."""
    mounted = []

    def mount(name, size="256k", read_only=False):
        path = tmp_path / name
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
            )
            refusal = done.stderr.strip() if done.returncode else None
        except FileNotFoundError:
            refusal = "no mount command"
        if refusal is not None:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {refusal}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory):
    """Write into directory/filler until the disk is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError as error:
            assert error.errno == errno.ENOSPC


def launch_into(tmp_path, log_dir, args, timeout=60):
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    STARTED_RUNS.append(run_id)
    cmd = [sys.executable, "-m", "mpnn", "launch", "--log-dir", str(log_dir), "--run-id", run_id, *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert leftover_processes(run_id) == []
    return proc, log_dir.resolve() / run_id


@pytest.mark.parametrize("case", ["read-only", "full"])
def test_unwritable_log_dir_fails_before_any_worker_starts(tmp_path, mount_tmpfs, case):
    """Root ignores permission bits, so only a read-only mount or a full disk refuses the run directory: the launcher
    finds out with a probe write before starting anything and says so in one line."""
    script = write_script(tmp_path, "print('never')\n")
    disk = mount_tmpfs("disk", read_only=case == "read-only")
    if case == "full":
        fill(disk)
    proc, run_dir = launch_into(tmp_path, disk, ["-n", "2", str(script)])
    assert proc.returncode == 1 and "never" not in proc.stdout
    if case == "read-only":  # <log-dir>/<run-id> cannot even be made
        expected = f"Error: cannot create the run directory {run_dir}: {os.strerror(errno.EROFS)}"
    else:  # the directory is made (no data blocks needed), the probe's first page is not
        expected = f"Error: the run directory {run_dir} is not writable: {os.strerror(errno.ENOSPC)}"
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (run_dir / "run.json").exists()


FILLS_ITS_DISK = """
    import os
    from pathlib import Path
    import mpnn
    comm = mpnn.init()
    run_dir = Path(os.environ["MPNN_RUN_DIR"])
    with open(run_dir / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    recorder = mpnn.telemetry.get_recorder()
    for step in range(200):
        recorder.set_loss(0.5)
        recorder.step_end(batch=8)
    recorder.flush()
    for i in range(3000):  # far more than a pipe holds: a launcher that stopped reading would block this worker
        print(f"line {i} of a worker whose disk is full " + "." * 60)
    print("worker done")
"""


def test_disk_full_during_a_run_is_named_and_nothing_hangs(tmp_path, mount_tmpfs):
    """The worker's log, its telemetry and run.json meet ENOSPC mid-run: one line naming each file, the output still
    reaches the console, the run ends non-zero because run.json cannot be closed."""
    disk = mount_tmpfs("disk", size="512k")
    script = write_script(tmp_path, FILLS_ITS_DISK)
    proc, run_dir = launch_into(tmp_path, disk, ["-n", "1", str(script)])
    full = os.strerror(errno.ENOSPC)
    assert "[0] worker done" in proc.stdout and "[0] line 2999 of a worker" in proc.stdout
    assert (
        f"mpnn launch: cannot write {run_dir / 'worker-0.log'}: {full}; rank 0's output goes to the console only"
        in proc.stderr
    )
    assert f"mpnn telemetry: rank 0: cannot write {run_dir / 'worker-0.jsonl'}: {full}" in proc.stdout
    assert proc.returncode == 1 and f"Error: cannot write {run_dir / 'run.json'}: {full}" in proc.stderr


CHECKPOINTS_FILL_THE_DISK = """
    import numpy as np
    import mpnn
    from mpnn import nn
    comm = mpnn.init()
    model = mpnn.DataParallel(nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10)))
    optimizer = mpnn.optim.SGD(model.parameters(), lr=0.01)
    checkpointer = mpnn.Checkpointer(model, optimizer, every=1, keep=1000)
    x = mpnn.tensor(np.ones((8, 256), np.float32))
    y = mpnn.tensor(np.zeros(8, np.int64))
    for step in range(1, 1000):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        checkpointer.step(step)
"""


def test_checkpoint_hitting_a_full_disk_stops_the_run_naming_the_file(tmp_path, mount_tmpfs):
    disk = mount_tmpfs("disk", size="4m")
    script = write_script(tmp_path, CHECKPOINTS_FILL_THE_DISK)
    started = time.monotonic()
    proc, run_dir = launch_into(tmp_path, disk, ["-n", "2", "--timeout", "30", str(script)])
    assert time.monotonic() - started < 30  # every rank learns of the failed save at once: nobody times out
    assert proc.returncode == 1
    assert "exited with code 1" in headline(proc.stderr)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "CheckpointSaveError: " in line]
    assert errors, output[-3000:]
    assert all(f"{run_dir / 'checkpoints'}" in line and os.strerror(errno.ENOSPC) in line for line in errors), errors
