"""`mpnn launch` end to end: the environment and core each worker gets, the run dir, [rank] output, failure
reports, signals to the launcher, multi-node flags, and that no process (grandchildren included) outlives a run."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from mpnn.launch.layout import read_layout
from mpnn.launch.pinning import pin_plan

REPO = Path(__file__).resolve().parents[1]
CORES = sorted(os.sched_getaffinity(0))


STARTED_RUNS = []


@pytest.fixture(autouse=True)
def reap_leftovers():
    """If a test failed with processes still up, kill them (by pid) so that they do not disturb the next test."""
    yield
    for run_id in STARTED_RUNS:
        for proc in leftover_processes(run_id):
            proc.kill()
    STARTED_RUNS.clear()


def leftover_processes(run_id):
    """Live (non-zombie) processes started for run_id: every worker and descendant carries MPNN_RUN_ID."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("MPNN_RUN_ID") == run_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def write_script(tmp_path, body, name="worker.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def launch_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start_launcher(tmp_path, args, env=None, run_id=None):
    """Start `python -m mpnn launch` with its run under tmp_path/runs; returns (Popen, run_id)."""
    run_id = run_id or f"t-{uuid.uuid4().hex[:8]}"
    STARTED_RUNS.append(run_id)
    cmd = [sys.executable, "-m", "mpnn", "launch", "--log-dir", str(tmp_path / "runs"), "--run-id", run_id, *args]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env or launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, run_id


def run_launcher(tmp_path, args, env=None, timeout=60):
    proc, run_id = start_launcher(tmp_path, args, env)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, run_id


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def read_record(tmp_path, run_id, name="run.json"):
    path = tmp_path / "runs" / run_id / name
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


ENV_REPORT = """
    import json, os, stat, sys
    keys = [k for k in os.environ if k.startswith("MPNN_") or k.endswith("_NUM_THREADS")
            or k in ("PYTHONUNBUFFERED",)]
    secret = os.environ["MPNN_SECRET_FILE"]
    report = {"env": {k: os.environ[k] for k in keys}, "affinity": sorted(os.sched_getaffinity(0)),
              "argv": sys.argv[1:], "secret": open(secret).read(), "secret_mode": stat.S_IMODE(os.stat(secret).st_mode),
              "pgid_is_pid": os.getpgid(0) == os.getpid()}
    print("REPORT " + json.dumps(report))
    print("stderr line of rank", os.environ["MPNN_RANK"], file=sys.stderr)
"""


def reports(stdout):
    """{rank: report} from the [rank]-prefixed REPORT lines of the launcher's stdout."""
    found = {}
    for line in stdout.splitlines():
        prefix, _, rest = line.partition(" ")
        if rest.startswith("REPORT "):
            found[int(prefix.strip("[]"))] = json.loads(rest[len("REPORT ") :])
    return found


def test_env_pinning_run_dir_and_prefixes(tmp_path):
    """Each worker gets the MPNN_* contract, one core, one thread per library; the run dir holds it all."""
    script = write_script(tmp_path, ENV_REPORT)
    n = len(CORES) + 1  # more workers than cpus: allowed, with a warning; the plan repeats past the usable cpus
    plan = pin_plan(n, read_layout())
    rc, out, err, run_id = run_launcher(
        tmp_path,
        [
            "-n",
            str(n),
            "--timeout",
            "12.5",
            "--plugin",
            "topk:ratio=0.01",
            "--plugin",
            "watchdog",
            str(script),
            "--epochs",
            "3",
            "-n",
            "9",
        ],
    )
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.startswith("mpnn launch:")] == [
        f"mpnn launch: warning: -n {n} is more than the {len(CORES)} usable cpus; workers will share cpus",
        f"mpnn launch: run dir: runs/{run_id}",
        # this script reads its environment only: the plugins named never load, and the launcher says so
        f"mpnn launch: warning: {script} never called mpnn.init(), so --plugin topk:ratio=0.01, watchdog did "
        "nothing (call mpnn.init() at the top of the script to load the plugins)",
        f"mpnn launch: run dir: runs/{run_id}",
    ]
    run_dir = (tmp_path / "runs" / run_id).resolve()
    got = reports(out)
    assert sorted(got) == list(range(n))
    secrets = {r["env"]["MPNN_SECRET_FILE"] for r in got.values()}
    assert len(secrets) == 1
    secret_file = Path(secrets.pop())
    assert run_dir not in secret_file.parents and not secret_file.exists()  # outside the run dir, removed at the end
    rendezvous = got[0]["env"]["MPNN_RENDEZVOUS"]
    assert rendezvous.startswith("tcp://127.0.0.1:") and 0 < int(rendezvous.rsplit(":", 1)[1]) < 65536
    for rank, report in got.items():
        env = report["env"]
        assert env["MPNN_RANK"] == env["MPNN_LOCAL_RANK"] == str(rank)
        assert env["MPNN_WORLD_SIZE"] == env["MPNN_LOCAL_WORLD_SIZE"] == str(n)
        assert (env["MPNN_NNODES"], env["MPNN_NODE_RANK"]) == ("1", "0")
        assert env["MPNN_RUN_ID"] == run_id and env["MPNN_RUN_DIR"] == str(run_dir)
        assert env["MPNN_RENDEZVOUS"] == rendezvous
        assert env["MPNN_TIMEOUT"] == "12.5"
        assert env["MPNN_PLUGINS"] == "topk:ratio=0.01;watchdog"
        assert env["PYTHONUNBUFFERED"] == "1"
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            assert env[var] == "1"
        assert report["affinity"] == [plan.cpus[rank]]
        assert report["argv"] == ["--epochs", "3", "-n", "9"]
        assert len(report["secret"]) == 64 and int(report["secret"], 16) >= 0
        assert report["secret_mode"] == 0o600
        assert report["pgid_is_pid"]
        log = (run_dir / f"worker-{rank}.log").read_text().splitlines()
        assert sorted(log) == sorted([f"REPORT {json.dumps(report)}", f"stderr line of rank {rank}"])
        assert f"[{rank}] stderr line of rank {rank}" in out.splitlines()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok" and record["exit_code"] == 0 and record["run_id"] == run_id
    assert record["world"] == {"world_size": n, "nnodes": 1, "nproc_per_node": n}
    assert record["script"] == str(script) and record["args"] == ["--epochs", "3", "-n", "9"]
    assert record["config"]["timeout"] == 12.5 and record["config"]["plugins"] == ["topk:ratio=0.01", "watchdog"]
    assert record["command_line"][-5:] == [str(script), "--epochs", "3", "-n", "9"]
    assert [w["returncode"] for w in record["workers"]] == [0] * n
    assert [w["core"] for w in record["workers"]] == list(plan.cpus)
    assert record["config"]["pinning"] == plan.record()
    assert record["start_time"] <= record["end_time"] and record["mpnn_version"] and record["host"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"] + [f"worker-{r}.log" for r in range(n)]
    assert leftover_processes(run_id) == []


def test_user_thread_settings_are_kept(tmp_path):
    script = write_script(tmp_path, ENV_REPORT)
    rc, out, err, _ = run_launcher(tmp_path, ["-n", "2", str(script)], env=launch_env(OMP_NUM_THREADS="2"))
    assert rc == 0, err
    for report in reports(out).values():
        assert report["env"]["OMP_NUM_THREADS"] == "2" and report["env"]["MKL_NUM_THREADS"] == "1"


TORCHRUN_STYLE = """
    import json, os, socket
    ddp = int(os.environ.get("RANK", -1)) != -1  # nanoGPT's test for a distributed run
    import mpnn
    from mpnn.worldspec import current_world
    comm = mpnn.init()
    if comm.rank == 0:  # the script may bind MASTER_PORT (torch.distributed's store does): mpnn holds it nowhere
        store = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        store.bind((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        store.listen()
    total = comm.allreduce(mpnn.tensor([float(os.environ["RANK"])]).data.copy(), op="sum")
    spec = current_world()
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MPNN_RENDEZVOUS")
    print("TORCHRUN " + json.dumps({"ddp": ddp, "env": {k: os.environ.get(k) for k in keys},
                                    "comm": [comm.rank, comm.world_size, comm.local_rank], "sum": float(total[0]),
                                    "parse": [spec.launcher, spec.rendezvous]}))
"""


def test_torchrun_style_script_runs_distributed(tmp_path):
    """`mpnn launch -n 2` gives every worker torchrun's names too: RANK, WORLD_SIZE, LOCAL_RANK, ... agree with
    mpnn's; MASTER_PORT is free for the script, never mpnn's rendezvous port, which the world parse (MPNN_*) uses."""
    script = write_script(tmp_path, TORCHRUN_STYLE)
    rc, out, err, _ = run_launcher(tmp_path, ["-n", "2", str(script)])
    assert rc == 0, err
    got = {}
    for line in out.splitlines():
        prefix, _, rest = line.partition(" ")
        if rest.startswith("TORCHRUN "):
            got[int(prefix.strip("[]"))] = json.loads(rest[len("TORCHRUN ") :])
    assert sorted(got) == [0, 1], out + err
    rendezvous = {r["env"]["MPNN_RENDEZVOUS"] for r in got.values()}
    master_port = {r["env"]["MASTER_PORT"] for r in got.values()}
    assert len(rendezvous) == len(master_port) == 1
    rendezvous, master_port = rendezvous.pop(), master_port.pop()
    assert rendezvous.rsplit(":", 1)[1] != master_port and 0 < int(master_port) < 65536
    for rank, report in got.items():
        assert report["ddp"] is True
        assert report["env"] | {"MASTER_PORT": None, "MPNN_RENDEZVOUS": None} == {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": None,
            "MPNN_RENDEZVOUS": None,
        }
        assert report["comm"] == [rank, 2, rank] and report["sum"] == 1.0
        assert report["parse"] == ["mpnn", rendezvous]


FAILING = """
    import os, signal, subprocess, sys, time
    rank = int(os.environ["MPNN_RANK"])
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a grandchild
    if rank == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker that only SIGKILL stops
    open(os.path.join(os.environ["MPNN_RUN_DIR"], f"ready-{rank}"), "w").close()
    if rank == BAD:
        while len([f for f in os.listdir(os.environ["MPNN_RUN_DIR"]) if f.startswith("ready-")]) < NPROC:
            time.sleep(0.01)
        for i in range(30):
            print(f"line {i} of rank {rank}")
        HOW
    time.sleep(60)
"""


@pytest.mark.parametrize(
    "how, expected, code",
    [
        ("sys.exit(3)", "exited with code 3", 3),
        ("os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL", 128 + signal.SIGKILL),
        ("raise RuntimeError('boom')", "exited with code 1", 1),
    ],
)
def test_failed_rank_stops_the_others_and_reports(tmp_path, how, expected, code):
    """One failing rank: the others (one ignores SIGTERM) and all grandchildren are gone within 5 s; one block."""
    n, bad = 4, 2
    script = write_script(tmp_path, FAILING.replace("BAD", str(bad)).replace("NPROC", str(n)).replace("HOW", how))
    proc, run_id = start_launcher(tmp_path, ["-n", str(n), str(script)])
    run_dir = tmp_path / "runs" / run_id
    bad_log = run_dir / f"worker-{bad}.log"
    wait_for(lambda: bad_log.exists() and "line 29" in bad_log.read_text(), what="the failing rank's output")
    failed_at = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - failed_at < 5.0
    assert proc.returncode == code
    assert leftover_processes(run_id) == []
    headline = [line for line in err.splitlines() if line.startswith("mpnn launch: rank")]
    assert len(headline) == 1
    assert f"rank {bad} (pid " in headline[0] and expected in headline[0]
    assert "stopped the 3 other running worker(s) (1 needed SIGKILL)" in headline[0]
    tail = err[err.index("last ") :]
    if how.startswith("raise"):
        assert "RuntimeError: boom" in tail and "line 29 of rank 2" in tail
    else:
        assert [f"line {i} of rank {bad}" in tail for i in (9, 10, 29)] == [False, True, True]
    assert f"[{bad}] line 29 of rank {bad}" in out.splitlines()
    record = read_record(tmp_path, run_id)
    assert record["status"] == "failed" and record["exit_code"] == code
    assert record["failure"] == {"rank": bad, "how": expected}
    assert [w["sigkilled"] for w in record["workers"]] == [True, False, False, False]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launcher_stops_everything(tmp_path, sig):
    n = 3
    script = write_script(
        tmp_path,
        """
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("ready", flush=True)
        time.sleep(60)
    """,
    )
    proc, run_id = start_launcher(tmp_path, ["-n", str(n), str(script)])
    run_dir = tmp_path / "runs" / run_id
    wait_for(
        lambda: all(
            (run_dir / f"worker-{r}.log").exists() and "ready" in (run_dir / f"worker-{r}.log").read_text()
            for r in range(n)
        ),
        what="workers ready",
    )
    wait_for(lambda: len(leftover_processes(run_id)) == 2 * n + 1, what="grandchildren started")  # + the guardian
    sent_at = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent_at < 5.0
    assert proc.returncode == 128 + sig
    assert f"mpnn launch: got {signal.Signals(sig).name}; stopped {n} running worker(s)" in err
    assert leftover_processes(run_id) == []
    record = read_record(tmp_path, run_id)
    assert record["status"] == "interrupted" and record["signal"] == signal.Signals(sig).name


def test_sigkilled_launcher_leaves_no_process(tmp_path):
    """The launcher cannot catch SIGKILL: its guardian process stops the workers and their children."""
    n = 2
    script = write_script(
        tmp_path,
        """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        time.sleep(60)
    """,
    )
    proc, run_id = start_launcher(tmp_path, ["-n", str(n), str(script)])
    wait_for(lambda: len(leftover_processes(run_id)) == 2 * n + 1, what="workers, grandchildren and guardian")
    secret = Path(
        next(p.environ()["MPNN_SECRET_FILE"] for p in leftover_processes(run_id) if "MPNN_SECRET_FILE" in p.environ())
    )
    assert secret.is_file()
    proc.kill()
    proc.wait()
    killed_at = time.monotonic()
    wait_for(lambda: leftover_processes(run_id) == [], timeout=10, what="the guardian to stop everything")
    assert time.monotonic() - killed_at < 5.0
    wait_for(lambda: not secret.parent.exists(), timeout=5, what="the guardian to remove the run's secret")


def test_random_kills_leave_no_process(tmp_path):
    """Seeded rounds: SIGKILL a random worker at a random moment (startup included); all gone, right report."""
    rng = random.Random(20240611)
    n = 4
    script = write_script(
        tmp_path,
        """
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("working", flush=True)
        time.sleep(60)
    """,
    )
    for _ in range(4):
        proc, run_id = start_launcher(tmp_path, ["-n", str(n), str(script)])
        wait_for(
            lambda run_id=run_id: (read_record(tmp_path, run_id) or {}).get("status") == "running",
            what="workers spawned",
        )
        pids = {w["rank"]: w["pid"] for w in read_record(tmp_path, run_id)["workers"]}
        time.sleep(rng.uniform(0.0, 0.6))
        victim = rng.randrange(n)
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - killed_at < 5.0
        assert proc.returncode == 128 + signal.SIGKILL
        assert f"mpnn launch: rank {victim} (pid {pids[victim]}) killed by SIGKILL" in err
        assert leftover_processes(run_id) == []


def test_module_flag_and_python_m_entry(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "job.py").write_text("import os, sys\nprint('job', os.environ['MPNN_RANK'], sys.argv[1:])\n")
    rc, out, err, _ = run_launcher(
        tmp_path, ["-n", "2", "-m", "pkg.job", "x", "--y"], env=launch_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    )
    assert rc == 0, err
    assert sorted(line for line in out.splitlines()) == ["[0] job 0 ['x', '--y']", "[1] job 1 ['x', '--y']"]


def test_missing_script_is_one_clear_error(tmp_path):
    rc, out, err, run_id = run_launcher(tmp_path, ["-n", "2", "no_such_script.py"])
    assert rc == 2 and "no such file: no_such_script.py" in err
    assert not (tmp_path / "runs" / run_id).exists()


def test_used_run_id_is_refused(tmp_path):
    script = write_script(tmp_path, "print('once')\n")
    proc, run_id = start_launcher(tmp_path, ["-n", "1", str(script)])
    assert proc.wait(timeout=30) == 0
    again, _ = start_launcher(tmp_path, ["-n", "1", str(script)], run_id=run_id)
    _, err = again.communicate(timeout=30)
    assert again.returncode == 1 and "is taken" in err and "pick another --run-id" in err


def test_two_nodes_on_one_host(tmp_path):
    """--nnodes 2: global ranks node_rank * n + local rank, world n * nnodes, the master's rendezvous and secret."""
    secret = tmp_path / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"ab" * 32)
    os.close(fd)
    script = write_script(tmp_path, ENV_REPORT)
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    common = [
        "-n",
        "2",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "29517",
        "--secret-file",
        str(secret),
    ]
    nodes = [
        start_launcher(tmp_path, [*common, "--node-rank", str(k), str(script)], run_id=run_id)[0] for k in range(2)
    ]
    outputs = [node.communicate(timeout=60) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    for k, (out, _) in enumerate(outputs):
        got = reports(out)
        assert sorted(got) == [2 * k, 2 * k + 1]
        for rank, report in got.items():
            env = report["env"]
            assert (env["MPNN_LOCAL_RANK"], env["MPNN_WORLD_SIZE"], env["MPNN_LOCAL_WORLD_SIZE"]) == (
                str(rank - 2 * k),
                "4",
                "2",
            )
            assert (env["MPNN_NNODES"], env["MPNN_NODE_RANK"]) == ("2", str(k))
            assert env["MPNN_RENDEZVOUS"] == "tcp://127.0.0.1:29517"
            assert env["MPNN_SECRET_FILE"] == str(secret) and report["secret"] == "ab" * 32
    run_dir = tmp_path / "runs" / run_id
    assert sorted(p.name for p in run_dir.iterdir()) == ["run-node1.json", "run.json"] + [
        f"worker-{r}.log" for r in range(4)
    ]
    assert read_record(tmp_path, run_id, "run-node1.json")["config"]["node_rank"] == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--master-addr", "127.0.0.1", "--run-id", "x"], "pass --secret-file or set MPNN_SECRET_FILE"),
        (["--run-id", "x", "--secret-file", "s"], "needs --master-addr"),
        (["--node-rank", "2", "--run-id", "x"], "--node-rank 2: must be in [0, 2)"),
    ],
)
def test_multi_node_refusals(tmp_path, flags, message):
    script = write_script(tmp_path, "print('never')\n")
    cmd = [
        sys.executable,
        "-m",
        "mpnn",
        "launch",
        "--log-dir",
        str(tmp_path / "runs"),
        "--nnodes",
        "2",
        *flags,
        str(script),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and message in proc.stderr and "never" not in proc.stdout


def test_loose_secret_file_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("cd" * 32)
    secret.chmod(0o644)
    script = write_script(tmp_path, "print('never')\n")
    rc, out, err, _ = run_launcher(tmp_path, ["-n", "1", "--secret-file", str(secret), str(script)])
    assert rc == 1 and "mode 0644 lets others read it" in err and "never" not in out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o644
