"""Issue 16, local attacks: a second user on the host against a real 2-rank run started by root.

Each attack runs as uid 4242 (`setpriv`), as a person sharing the machine would: planting directories, symlinks
and files in a shared 1777 log dir, in /tmp and in /dev/shm at names it can compute. The run must refuse with one
clear line naming the path, or go on unharmed; either way no file outside the run is touched. Then the cleanup:
/dev/shm and the scratch root are listed before and after each fault (a rank dead before the rendezvous, the
launcher killed with SIGKILL, a worker killed with SIGKILL) and nothing of the run may be left.

These machines have fs.protected_symlinks=0 (docs/architecture.md), so the symlink attacks do work against code
that follows links. Network attacks on the rendezvous and data sockets are in tests/test_security_network.py.
"""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
ATTACKER = 4242
LAUNCH_TIMEOUT_S = 90

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the attacks need root to run a second uid (setpriv) against"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
]

WORKER = """
    import json, os, sys, time
    from pathlib import Path
    rank = int(os.environ["MPNN_RANK"])
    mode = sys.argv[1]
    print("scratch " + json.dumps({k: os.environ.get(k) for k in ("MPNN_SCRATCH_DIR", "MPNN_SHM_DIR")}), flush=True)
    if mode == "die-before-rendezvous" and rank == 1:
        time.sleep(2.0)  # rank 0 has made its socket and shared-memory file and waits at the rendezvous
        os._exit(3)
    import numpy as np
    import mpnn
    comm = mpnn.init()
    a = np.ones(300_000, np.float32)  # 1.2 MB: the shared-memory path when it is on
    comm.allreduce(a)
    print("result " + json.dumps({"sum": float(a[0]), "shm": comm._slots is not None}), flush=True)
    if mode == "hold":
        Path(os.environ["MPNN_RUN_DIR"], f"ready-{rank}").write_text(str(os.getpid()))
        time.sleep(60)
"""


# -- helpers -------------------------------------------------------------------------------------------------------
STARTED_RUNS = []


@pytest.fixture(autouse=True)
def reap_leftovers():
    """Kill (by pid) whatever a failed test left running of its runs."""
    yield
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("MPNN_RUN_ID") in STARTED_RUNS:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    STARTED_RUNS.clear()


@pytest.fixture
def shared_dir():
    """A 1777 directory in /tmp that the attacker can reach (pytest's tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix="mpnn-sec-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch_root():
    """A short private TMPDIR for the launcher, so that its scratch root can be listed exactly."""
    path = Path(tempfile.mkdtemp(prefix="mpnn-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_attacker(code):
    """Run Python `code` as the unprivileged uid ATTACKER; its stdout."""
    proc = subprocess.run(
        ["setpriv", f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def victim_file(directory, name="victim", text="root-only secret\n"):
    """A root-only 0600 file: what the attacks try to overwrite or append to."""
    path = Path(directory) / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(WORKER))
    return path


def launch_env(tmpdir=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_") and k != "XDG_RUNTIME_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def start(tmp_path, log_dir, args, run_id=None, tmpdir=None):
    run_id = run_id or f"s-{uuid.uuid4().hex[:8]}"
    STARTED_RUNS.append(run_id)
    cmd = [sys.executable, "-m", "mpnn", "launch", "--log-dir", str(log_dir), "--run-id", run_id, *args]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=launch_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, run_id


def run(tmp_path, log_dir, args, run_id=None, tmpdir=None):
    proc, run_id = start(tmp_path, log_dir, args, run_id, tmpdir)
    out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    return proc.returncode, out, err, run_id


def results(stdout):
    """{rank: the worker's "result" report} from the launcher's [rank]-prefixed output."""
    found = {}
    for line in stdout.splitlines():
        prefix, _, rest = line.partition(" ")
        if rest.startswith("result "):
            found[int(prefix.strip("[]"))] = json.loads(rest[len("result ") :])
    return found


def old_tag(run_id, rendezvous):
    """The name the ipc directory and /dev/shm files had before issue 16 (computable from run.json)."""
    return hashlib.sha256(f"{run_id}|{rendezvous}".encode()).hexdigest()[:12]


def snapshot(*directories):
    """{directory: its entries} (names only; the attacker-free listing the cleanup tests compare)."""
    return {str(d): sorted(os.listdir(d)) for d in directories}


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the run directory ---------------------------------------------------------------------------------------------
PLANT_RUN_DIR = """
import os
run_dir = {run_dir!r}
os.mkdir(run_dir)
os.chmod(run_dir, 0o777)
for name, target in {links!r}.items():
    os.symlink(target, os.path.join(run_dir, name))
"""


def test_symlinks_in_a_prepared_run_dir_are_refused(tmp_path, shared_dir):
    """The attacker knows the --run-id, makes the run dir in the shared log dir first and plants symlinks at
    run.json.tmp, the worker logs, telemetry and the audit trail to root-only files: the launch refuses, naming
    the run dir, and every victim file is unchanged."""
    victims = {
        name: victim_file(tmp_path, f"victim-{i}")
        for i, name in enumerate(
            ["run.json.tmp", "worker-0.log", "worker-1.log", "worker-0.jsonl", "worker-1.jsonl", "audit.jsonl"]
        )
    }
    before = {name: (path.read_bytes(), path.stat().st_mtime_ns) for name, path in victims.items()}
    run_id = f"s-{uuid.uuid4().hex[:8]}"
    run_dir = shared_dir / run_id
    as_attacker(PLANT_RUN_DIR.format(run_dir=str(run_dir), links={k: str(v) for k, v in victims.items()}))
    rc, out, err, _ = run(tmp_path, shared_dir, ["-n", "2", str(script(tmp_path)), "plain"], run_id=run_id)
    assert rc == 1, (out, err)
    assert f"the run id {run_id!r} is taken: {run_dir} already exists" in err
    assert "result" not in out  # no worker ran
    for name, path in victims.items():
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before[name], f"{name} -> {path} was written"


def test_run_dir_planted_as_a_symlink_is_refused(tmp_path, shared_dir):
    """<log-dir>/<run-id> is a symlink to a directory of root's: nothing is written into that directory."""
    target = tmp_path / "root-private"
    target.mkdir(mode=0o700)
    victim = victim_file(target, "notes")
    run_id = f"s-{uuid.uuid4().hex[:8]}"
    as_attacker(f"import os; os.symlink({str(target)!r}, {str(shared_dir / run_id)!r})")
    rc, out, err, _ = run(tmp_path, shared_dir, ["-n", "2", str(script(tmp_path)), "plain"], run_id=run_id)
    assert rc == 1 and "is taken" in err and str(shared_dir / run_id) in err, err
    assert sorted(os.listdir(target)) == ["notes"] and victim.read_text() == "root-only secret\n"


def test_multi_node_run_dir_owned_by_another_user_is_refused(tmp_path, shared_dir):
    """A multi-node run may find its run dir already made (by another node's launcher on a shared file system),
    but only if it is this user's and nobody else may write into it: the attacker's is refused, by path and
    owner, before anything is written."""
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32)
    secret.chmod(0o600)
    run_id = f"s-{uuid.uuid4().hex[:8]}"
    run_dir = shared_dir / run_id
    victim = victim_file(tmp_path)
    links = {name: str(victim) for name in ("run-node1.json.tmp", "worker-1.log", "worker-1.jsonl")}
    as_attacker(PLANT_RUN_DIR.format(run_dir=str(run_dir), links=links))
    args = ["-n", "1", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--secret-file", str(secret)]
    args += ["--master-port", str(free_port()), "--timeout", "5", str(script(tmp_path)), "plain"]
    rc, out, err, _ = run(tmp_path, shared_dir, args, run_id=run_id)
    assert rc == 1, (out, err)
    assert f"refusing the run directory {run_dir}: is owned by" in err and f"uid {ATTACKER}" in err, err
    assert sorted(os.listdir(run_dir)) == sorted(links) and victim.read_text() == "root-only secret\n"


def test_run_dir_is_private_unless_group_readable(tmp_path, shared_dir):
    """The launcher makes the run dir itself, 0700 (0750 with --group-readable): the attacker can neither read
    run.json (the rendezvous address, the run's command line) nor plant anything in it."""
    modes = {}
    for flag in ([], ["--group-readable"]):
        rc, out, err, run_id = run(tmp_path, shared_dir, ["-n", "2", *flag, str(script(tmp_path)), "plain"])
        assert rc == 0, err
        modes[bool(flag)] = stat.S_IMODE((shared_dir / run_id).stat().st_mode)
        probe = f"open({str(shared_dir / run_id / 'run.json')!r})"
        denied = subprocess.run(
            [
                "setpriv",
                f"--reuid={ATTACKER}",
                f"--regid={ATTACKER}",
                "--clear-groups",
                sys.executable,
                "-I",
                "-c",
                probe,
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert modes == {False: 0o700, True: 0o750}


def test_the_same_run_id_twice_at_once_runs_once(tmp_path, shared_dir):
    """Two launches with one --run-id started together: exactly one runs, the other says the run id is taken."""
    run_id = f"s-{uuid.uuid4().hex[:8]}"
    body = script(tmp_path)
    procs = [start(tmp_path, shared_dir, ["-n", "2", str(body), "plain"], run_id=run_id)[0] for _ in range(2)]
    outputs = [proc.communicate(timeout=LAUNCH_TIMEOUT_S) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 1], outputs
    loser = outputs[[proc.returncode for proc in procs].index(1)]
    assert f"the run id {run_id!r} is taken" in loser[1] and "result" not in loser[0]


def test_claiming_a_run_record_is_atomic(tmp_path):
    """Where a run dir may exist already (a multi-node run on a shared file system), run.json's exclusive creation
    is the claim: of two launchers racing for one record exactly one wins, however they interleave."""
    from mpnn.launch.errors import LaunchError
    from mpnn.launch.rundir import RunRecord, create_run_dir

    run_dirs = [create_run_dir(tmp_path / "runs", "r", shared=True) for _ in range(2)]
    assert run_dirs[0] == run_dirs[1]
    outcomes, start_line = [], threading.Barrier(8)

    def claim(k):
        start_line.wait()
        try:
            RunRecord(run_dirs[0] / "run.json", {"run_id": "r", "claimant": k})
            outcomes.append(("won", k))
        except LaunchError as error:
            outcomes.append(("lost", str(error)))

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [k for what, k in outcomes if what == "won"]
    assert len(won) == 1 and all("is taken" in why for what, why in outcomes if what == "lost")
    assert json.loads((run_dirs[0] / "run.json").read_text())["claimant"] == won[0]
    assert sorted(os.listdir(run_dirs[0])) == ["run.json"]  # no temp file left


# -- scratch: ipc sockets and /dev/shm -----------------------------------------------------------------------------
PLANT_SCRATCH = """
import os
os.symlink({victim_dir!r}, {ipc_dir!r})
for rank in (0, 1):
    path = "/dev/shm/mpnn-{tag}-r%d" % rank
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.write(fd, b"planted")
    os.close(fd)
"""


def test_planted_scratch_and_shm_names_change_nothing(tmp_path, shared_dir, scratch_root):
    """The attacker computes the old scratch names from the run id and rendezvous (both in run.json): a symlink
    at <tmp>/mpnn-<tag> to a directory holding root's files r0 and r1, and files at /dev/shm/mpnn-<tag>-r*. The
    run uses random names in private directories instead: it runs with shared memory on, and the victim's files
    and the planted ones are untouched."""
    victim_dir = Path(tempfile.mkdtemp(prefix="victim-", dir=scratch_root))
    victims = [victim_file(victim_dir, f"r{rank}", f"victim {rank}\n") for rank in (0, 1)]
    scratch_root.chmod(0o1777)  # a shared temp dir, as /tmp is
    port = free_port()
    run_id = f"s-{uuid.uuid4().hex[:8]}"
    tag = old_tag(run_id, f"tcp://127.0.0.1:{port}")
    planted_shm = [Path(f"/dev/shm/mpnn-{tag}-r{rank}") for rank in (0, 1)]
    as_attacker(PLANT_SCRATCH.format(victim_dir=str(victim_dir), ipc_dir=str(scratch_root / f"mpnn-{tag}"), tag=tag))
    try:
        args = ["-n", "2", "--master-port", str(port), str(script(tmp_path)), "plain"]
        rc, out, err, _ = run(tmp_path, shared_dir, args, run_id=run_id, tmpdir=scratch_root)
        assert rc == 0, err
        assert results(out) == {0: {"sum": 2.0, "shm": True}, 1: {"sum": 2.0, "shm": True}}
        assert [v.read_text() for v in victims] == ["victim 0\n", "victim 1\n"]
        assert sorted(os.listdir(victim_dir)) == ["r0", "r1"]
        for path in planted_shm:
            assert path.read_bytes() == b"planted" and path.stat().st_uid == ATTACKER
    finally:
        for path in planted_shm:
            path.unlink(missing_ok=True)


def test_a_taken_shared_memory_name_is_an_error(tmp_path, monkeypatch):
    """Names are random, so a collision means someone is in the way: an error naming the path, not a quiet
    fallback to sockets."""
    from mpnn.comm import shm

    monkeypatch.setattr(shm.secrets, "token_hex", lambda n: "f" * (2 * n))
    directory = tmp_path / "shm"
    directory.mkdir(mode=0o700)
    planted = directory / f"r0-{'f' * 32}"
    planted.write_bytes(b"planted")
    with pytest.raises(FileExistsError, match=f"rank 0: the shared-memory name {planted} is taken"):
        shm.SharedSlots(0, str(directory))
    assert planted.read_bytes() == b"planted"


# -- cleanup after faults ------------------------------------------------------------------------------------------
def ours(stdout, run_id, port):
    """The scratch paths this run had: those its workers reported, and the old computable names."""
    paths = set()
    for line in stdout.splitlines():
        _, _, rest = line.partition(" ")
        if rest.startswith("scratch "):
            paths.update(p for p in json.loads(rest[len("scratch ") :]).values() if p)
    tag = old_tag(run_id, f"tcp://127.0.0.1:{port}")
    return paths | {f"/dev/shm/mpnn-{tag}-r0", f"/dev/shm/mpnn-{tag}-r1"}


def assert_clean(before, scratch_root, paths):
    after = snapshot("/dev/shm", scratch_root)
    assert after[str(scratch_root)] == before[str(scratch_root)], "left in the scratch root"
    left = [p for p in paths if os.path.exists(p)]
    new_in_shm = set(after["/dev/shm"]) - set(before["/dev/shm"])
    assert not left, f"left behind: {left}"
    assert not {f"/dev/shm/{name}" for name in new_in_shm} & paths


def test_nothing_left_when_a_rank_dies_before_the_rendezvous(tmp_path, scratch_root):
    """Rank 1 exits before joining; rank 0 had made its ipc socket and its 8 MB shared-memory file and is stopped
    by the launcher: its scratch is gone all the same."""
    before = snapshot("/dev/shm", scratch_root)
    port = free_port()
    args = ["-n", "2", "--master-port", str(port), "--timeout", "30", str(script(tmp_path)), "die-before-rendezvous"]
    rc, out, err, run_id = run(tmp_path, tmp_path / "runs", args, tmpdir=scratch_root)
    assert rc == 3 and "rank 1" in err, err
    assert_clean(before, scratch_root, ours(out, run_id, port))


def _hold(tmp_path, scratch_root):
    """Start a 2-rank run that joins, all-reduces and holds; (launcher, run_id, port, worker pids, stdout lines)."""
    port = free_port()
    proc, run_id = start(
        tmp_path,
        tmp_path / "runs",
        ["-n", "2", "--master-port", str(port), str(script(tmp_path)), "hold"],
        tmpdir=scratch_root,
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    run_dir = tmp_path / "runs" / run_id
    wait_for(lambda: all((run_dir / f"ready-{r}").exists() for r in (0, 1)), 60, "both ranks ready")
    time.sleep(0.1)
    pids = [int((run_dir / f"ready-{r}").read_text()) for r in (0, 1)]
    return proc, run_id, port, pids, lines


def test_nothing_left_when_the_launcher_is_killed(tmp_path, scratch_root):
    """SIGKILL to the launcher: its guardian stops the workers and removes the attempt's scratch directories."""
    before = snapshot("/dev/shm", scratch_root)
    proc, run_id, port, pids, lines = _hold(tmp_path, scratch_root)
    proc.kill()
    proc.wait(timeout=10)
    wait_for(
        lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids),
        15,
        "workers stopped",
    )
    paths = ours("".join(lines), run_id, port)
    wait_for(
        lambda: (
            not any(os.path.exists(p) for p in paths)
            and snapshot(scratch_root) == {str(scratch_root): before[str(scratch_root)]}
        ),
        10,
        "the guardian's cleanup",
    )
    assert_clean(before, scratch_root, paths)


def test_nothing_left_when_a_worker_is_killed(tmp_path, scratch_root):
    """SIGKILL to rank 1 mid-run: the launcher stops rank 0 and removes every scratch name of the run."""
    before = snapshot("/dev/shm", scratch_root)
    proc, run_id, port, pids, lines = _hold(tmp_path, scratch_root)
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    err = proc.stderr.read()
    assert "rank 1" in err and "killed by SIGKILL" in err, err
    assert_clean(before, scratch_root, ours("".join(lines), run_id, port))
