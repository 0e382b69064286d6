"""Many hosts on one machine: two network namespaces joined by a veth pair, each with its own hostname, run
`mpnn launch --nnodes 2` against each other over tcp; CURVE (--encrypt) is checked on the wire with a packet
sniffer, and faults come from iptables inside a namespace (random loss, a cut link) or from a router namespace
whose delaying proxy (tests/delay_proxy.py) every connection is redirected through. The two-host tests need
root and `ip netns` and skip without them."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST1D = ROOT / "launch" / "mnist1d.py"
RUN_ID = "multihost"
LAUNCH_TIMEOUT_S = 150  # wall limit for one two-node launch on a loaded 2-core machine


# Rank 0 broadcasts a plaintext marker, then every rank checks two all-reduces against NumPy and reports.
CHECK_SCRIPT = """
import json, os, socket
import numpy as np
import mpnn
comm = mpnn.init()
marker = os.environ["MARKER"].encode() * 2000
payload = np.frombuffer(marker, np.uint8).copy() if comm.rank == 0 else np.zeros(len(marker), np.uint8)
comm.broadcast(payload, root=0)
assert payload.tobytes() == marker
for n in (7, 100_000):
    a = np.arange(n, dtype=np.float32) * (comm.rank + 1)
    comm.allreduce(a)
    np.testing.assert_array_equal(a, np.arange(n, dtype=np.float32) * sum(range(1, comm.world_size + 1)))
print("REPORT " + json.dumps({"rank": comm.rank, "world_size": comm.world_size, "encrypt": comm.encrypt,
                              "host": socket.gethostname()}), flush=True)
"""

# Captures every frame on one interface (AF_PACKET, both directions) and counts the marker in them.
SNIFF_SCRIPT = """
import json, signal, socket, sys
iface, marker, out = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sock.bind((iface, 0))
sock.settimeout(0.1)
stats = {"frames": 0, "bytes": 0, "marker_hits": 0}
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
print("ready", flush=True)
while not stopping:
    try:
        frame = sock.recv(1 << 18)
    except (socket.timeout, InterruptedError):
        continue
    stats["frames"] += 1
    stats["bytes"] += len(frame)
    stats["marker_hits"] += frame.count(marker)
with open(out, "w") as f:
    json.dump(stats, f)
"""


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _namespaces():
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


def _remove_stale_namespaces():
    """Delete empty namespaces of this test whose pytest process is gone (killed before its cleanup could run)."""
    for name in _namespaces():
        match = re.fullmatch(r"mpnn(\d+)n[012]", name)
        if match and (int(match.group(1)) == os.getpid() or not os.path.exists(f"/proc/{match.group(1)}")):
            if not _ip("netns", "pids", name, check=False).stdout.split():
                _ip("netns", "del", name, check=False)


class Hosts:
    """Two namespaces "node0" (10.231.S.1) and "node1" (10.231.S.2) on one veth pair; names carry the pid."""

    def __init__(self):
        tag = os.getpid()
        self.names = [f"mpnn{tag}n{i}" for i in range(2)]
        self.links = [f"mp{tag}v{i}" for i in range(2)]
        self.addrs = [f"10.231.{tag % 250}.{i + 1}" for i in range(2)]

    def create(self):
        """Make both namespaces and the link, or skip the test where this machine cannot."""
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root")
        if not (shutil.which("ip") and shutil.which("unshare")):
            pytest.skip("`ip` (iproute2) and `unshare` (util-linux) are needed to build hosts")
        _remove_stale_namespaces()
        for name in self.names:
            result = _ip("netns", "add", name, check=False)
            if result.returncode:
                self.remove()
                pytest.skip(f"`ip netns add` refused here: {result.stderr.strip()}")
        self._wire()

    def _wire(self):
        _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        for name, link, addr in zip(self.names, self.links, self.addrs):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def pids(self, node):
        """Processes still running inside node's namespace."""
        return [int(p) for p in _ip("netns", "pids", self.names[node], check=False).stdout.split()]

    def remove(self):
        """Kill whatever is left inside, then delete the namespaces (which takes the veth and iptables rules)."""
        present = _namespaces()
        for node, name in enumerate(self.names):
            if name in present:
                for pid in self.pids(node):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                _ip("netns", "del", name, check=False)
        for link in self.links[::2]:
            _ip("link", "del", link, check=False)  # only if it never reached a namespace

    def exec(self, node, argv, **kwargs):
        """Popen argv inside node's namespace with its own UTS namespace and hostname node<i>."""
        wrapped = [
            "ip",
            "netns",
            "exec",
            self.names[node],
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            f"node{node}",
            *argv,
        ]
        return subprocess.Popen(wrapped, **kwargs)

    def iptables(self, node, *args):
        """Run iptables inside node's namespace (its rules go with the namespace); returns stdout."""
        return subprocess.run(
            ["ip", "netns", "exec", self.names[node], "iptables", *args],
            check=True,
            timeout=30,
            capture_output=True,
            text=True,
        ).stdout


class RoutedHosts(Hosts):
    """node0 (10.232.S.1) and node1 (10.233.S.1) on separate veth links to a third namespace, the router
    (10.23x.S.254 on each), which forwards between them: the place to put a delaying proxy."""

    def __init__(self):
        super().__init__()
        tag = os.getpid()
        self.names.append(f"mpnn{tag}n2")
        self.links = [f"mp{tag}v{i}" for i in range(4)]  # pairs: node0-router, node1-router
        self.addrs = [f"10.{232 + i}.{tag % 250}.1" for i in range(2)]
        self.gateways = [f"10.{232 + i}.{tag % 250}.254" for i in range(2)]

    def _wire(self):
        router = self.names[2]
        for node in range(2):
            inside, outside = self.links[2 * node], self.links[2 * node + 1]
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", self.names[node])
            _ip("link", "set", outside, "netns", router)
            _ip("-n", self.names[node], "addr", "add", f"{self.addrs[node]}/24", "dev", inside)
            _ip("-n", router, "addr", "add", f"{self.gateways[node]}/24", "dev", outside)
            for name, link in ((self.names[node], inside), (router, outside), (self.names[node], "lo")):
                _ip("-n", name, "link", "set", link, "up")
            _ip("-n", self.names[node], "route", "add", "default", "via", self.gateways[node])
        _ip("-n", router, "link", "set", "lo", "up")
        subprocess.run(
            ["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, timeout=30
        )


def _made_hosts(made):
    """Create `made`, hand it over; afterwards nothing may still run in it, and its namespaces and links are gone."""
    left = {}
    try:
        made.create()
        yield made
        left = {name: made.pids(node) for node, name in enumerate(made.names)}
    finally:
        made.remove()
    assert not _namespaces() & set(made.names)
    assert not any(left.values()), f"processes left behind: {left}"


@pytest.fixture
def hosts():
    """Two fresh hosts on one link."""
    yield from _made_hosts(Hosts())


@pytest.fixture
def routed_hosts():
    """Two fresh hosts joined through a router namespace."""
    yield from _made_hosts(RoutedHosts())


@pytest.fixture
def firewall(hosts):
    """iptables usable inside node1's namespace (the fault injector), else skip."""
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed (apt-get install iptables)")
    try:
        hosts.iptables(1, "-S")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"iptables does not work in a network namespace here: {e.stderr.strip()}")
    return hosts


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)
    return path


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPNN_", "OMPI_", "SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def start_nodes(hosts, tmp_path, secret_file, script_argv, flags=(), nproc=1, timeout=30, **env):
    """Start `mpnn launch --nnodes 2` on both hosts; returns the two Popen objects (output in node<i>.out)."""
    procs = []
    for node in range(2):
        argv = [
            sys.executable,
            "-m",
            "mpnn",
            "launch",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--master-addr",
            hosts.addrs[0],
            "--master-port",
            "29500",
            "--run-id",
            RUN_ID,
            "--secret-file",
            str(secret_file),
            "--log-dir",
            str(tmp_path / "runs"),
            "--timeout",
            str(timeout),
            "-n",
            str(nproc),
            *flags,
            *script_argv,
        ]
        out = open(tmp_path / f"node{node}.out", "w")
        procs.append(hosts.exec(node, argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(**env)))
        out.close()
    return procs


def wait_nodes(procs, tmp_path, limit=LAUNCH_TIMEOUT_S):
    """Wait for both launchers; returns [(exit code, output)] per node. Kills both past `limit` and fails."""
    deadline = time.monotonic() + limit
    try:
        codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"two-node launch still running after {limit} s:\n" + _outputs(tmp_path))
    return [(code, (tmp_path / f"node{node}.out").read_text()) for node, code in enumerate(codes)]


def _outputs(tmp_path):
    return "\n".join(f"--- node{i}:\n{(tmp_path / f'node{i}.out').read_text()}" for i in range(2))


def _reports(outputs):
    return sorted(
        (json.loads(line.split("REPORT ", 1)[1]) for out in outputs for line in out.splitlines() if "REPORT " in line),
        key=lambda r: r["rank"],
    )


@pytest.mark.parametrize("flag,encrypted,nproc", [("--no-encrypt", False, 2), ("--encrypt", True, 2), (None, True, 1)])
def test_two_hosts_collectives_and_curve_on_the_wire(hosts, tmp_path, secret_file, flag, encrypted, nproc):
    marker = f"MPNN-PLAINTEXT-MARKER-{os.getpid()}-{flag}"
    (tmp_path / "check.py").write_text(CHECK_SCRIPT)
    (tmp_path / "sniff.py").write_text(SNIFF_SCRIPT)
    sniffer = hosts.exec(
        1,
        [sys.executable, str(tmp_path / "sniff.py"), hosts.links[1], marker, str(tmp_path / "wire.json")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sniffer.stdout.readline().strip() == "ready"
        procs = start_nodes(
            hosts,
            tmp_path,
            secret_file,
            [str(tmp_path / "check.py")],
            flags=[flag] if flag else [],
            nproc=nproc,
            MARKER=marker,
        )
        results = wait_nodes(procs, tmp_path)
    finally:
        sniffer.send_signal(signal.SIGTERM)
        sniffer.wait(timeout=10)
    assert [code for code, _ in results] == [0, 0], _outputs(tmp_path)
    reports = _reports(out for _, out in results)
    world = 2 * nproc
    assert [(r["rank"], r["world_size"], r["encrypt"]) for r in reports] == [
        (k, world, encrypted) for k in range(world)
    ]
    assert [r["host"] for r in reports] == [f"node{k // nproc}" for k in range(world)]
    wire = json.loads((tmp_path / "wire.json").read_text())
    assert wire["bytes"] > len(marker) * 2000, wire  # the broadcast crossed the veth link
    if encrypted:
        assert wire["marker_hits"] == 0, wire
    else:
        assert wire["marker_hits"] > 100, wire  # the control: without CURVE the marker is readable on the wire
    record = json.loads((tmp_path / "runs" / RUN_ID / "run.json").read_text())
    assert record["config"]["encrypt"] is encrypted and record["world"]["world_size"] == world


@pytest.mark.parametrize("flag,encrypted", [(None, False), ("--encrypt", True)])
def test_encrypt_flag_on_one_node(tmp_path, flag, encrypted):
    (tmp_path / "check.py").write_text(CHECK_SCRIPT)
    argv = [
        sys.executable,
        "-m",
        "mpnn",
        "launch",
        "-n",
        "2",
        "--run-id",
        RUN_ID,
        "--log-dir",
        str(tmp_path),
        "--timeout",
        "60",
        *([flag] if flag else []),
        str(tmp_path / "check.py"),
    ]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(MARKER="m"),
        timeout=LAUNCH_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(r["rank"], r["encrypt"]) for r in _reports([result.stdout])] == [(0, encrypted), (1, encrypted)]
    assert json.loads((tmp_path / RUN_ID / "run.json").read_text())["config"]["encrypt"] is encrypted


def _final_accuracy(output):
    """Rank 0's final test accuracy from `[0] final test accuracy A (mlp, S steps, world 2)`."""
    found = re.findall(r"^\[0\] final test accuracy (\d\.\d+) \(mlp, \d+ steps, world 2\)$", output, re.MULTILINE)
    assert len(found) == 1, output
    return float(found[0])


def test_mnist1d_trains_across_hosts_despite_random_loss(firewall, tmp_path, secret_file):
    hosts = firewall  # default encryption across hosts: CURVE
    for chain in ("INPUT", "OUTPUT"):
        hosts.iptables(1, "-A", chain, "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP")
    procs = start_nodes(
        hosts, tmp_path, secret_file, [str(MNIST1D), "--model", "mlp", "--steps", "100", "--eval-every", "50"]
    )
    results = wait_nodes(procs, tmp_path)
    assert [code for code, _ in results] == [0, 0], _outputs(tmp_path)
    assert _final_accuracy(results[0][1]) > 0.3
    counters = hosts.iptables(1, "-L", "INPUT", "-v", "-x", "-n")
    dropped = int(next(line for line in counters.splitlines() if "statistic" in line).split()[0])
    assert dropped > 0, counters  # packets really were lost on the way in


def _steps_done(run_dir, rank):
    path = run_dir / f"worker-{rank}.jsonl"
    if not path.exists():
        return 0
    return sum('"step"' in line and '"event"' not in line for line in path.read_text().splitlines())


def test_cut_link_times_out_naming_the_silent_rank(firewall, tmp_path, secret_file):
    hosts = firewall
    procs = start_nodes(
        hosts,
        tmp_path,
        secret_file,
        [str(MNIST1D), "--model", "mlp", "--steps", "100000", "--eval-every", "100000"],
        timeout=4,
    )
    run_dir = tmp_path / "runs" / RUN_ID
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while _steps_done(run_dir, 0) < 10:
        if time.monotonic() > deadline or any(proc.poll() is not None for proc in procs):
            wait_nodes(procs, tmp_path, limit=5)
            pytest.fail("training did not get going before the cut:\n" + _outputs(tmp_path))
        time.sleep(0.2)
    for chain in ("INPUT", "OUTPUT"):
        hosts.iptables(1, "-I", chain, "-j", "DROP")
    cut = time.monotonic()
    results = wait_nodes(procs, tmp_path, limit=60)
    assert time.monotonic() - cut < 40, "the cut was noticed only after the launch limit"
    for node, (code, output) in enumerate(results):
        me, other = node, 1 - node  # one worker per node: rank == node
        assert code != 0 and f"mpnn launch: rank {me} (pid" in output, _outputs(tmp_path)
        assert re.search(rf"CommTimeout: rank {other} (is silent|stopped sending): rank {me} waited 4 s", output), (
            _outputs(tmp_path)
        )
        assert hosts.pids(node) == [], f"processes left on node{node}"


def _kill_worker_after_checkpoint(run_dir, rank, step, limit=LAUNCH_TIMEOUT_S):
    """SIGKILL the worker of `rank` (found by its MPNN_RANK and MPNN_RUN_DIR, in whichever namespace it runs) once
    the run has a checkpoint at `step` or later; returns (its pid, that checkpoint's step)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        steps = [int(p.name[len("step-") :]) for p in (run_dir / "checkpoints").glob("step-*")]
        if max(steps, default=0) >= step:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"no checkpoint at step {step} or later in {run_dir} within {limit} s")
    marks = (f"MPNN_RANK={rank}".encode(), f"MPNN_RUN_DIR={run_dir}".encode())
    for entry in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if all(mark in environ for mark in marks):
            os.kill(int(entry), signal.SIGKILL)
            return int(entry), max(steps)
    pytest.fail(f"no worker of rank {rank} found")


def test_a_sigkill_on_each_host_restarts_both_from_the_checkpoint_both_verify(hosts, tmp_path, secret_file):
    """--max-restarts across two hosts: rank 1 (node1) is SIGKILLed after the first checkpoint, rank 0 (node0)
    after a later one; both launchers stop their workers, rejoin and resume from the newest checkpoint, and the
    recipe still reaches its accuracy. Each node's run record lists both restarts with the node that failed."""
    procs = start_nodes(
        hosts,
        tmp_path,
        secret_file,
        [str(MNIST1D), "--model", "cnn"],
        flags=["--max-restarts", "2", "--checkpoint-every", "500", "--rdzv-timeout", "60"],
    )
    run_dir = tmp_path / "runs" / RUN_ID
    first, at_first = _kill_worker_after_checkpoint(run_dir, 1, 500)
    second, at_second = _kill_worker_after_checkpoint(run_dir, 0, at_first + 500)
    results = wait_nodes(procs, tmp_path)
    assert [code for code, _ in results] == [0, 0], _outputs(tmp_path)
    found = re.findall(r"^\[0\] final test accuracy (\d\.\d+) \(cnn, 8000 steps, world 2\)$", results[0][1], re.M)
    assert len(found) == 1 and float(found[0]) >= 0.92, results[0][1]
    resumed = [int(s) for s in re.findall(r"^\[0\] resumed from \S+ at step (\d+)", results[0][1], re.M)]
    assert len(resumed) == 2 and at_first <= resumed[0] < resumed[1] and resumed[1] >= at_second, resumed
    for node, (_, output) in enumerate(results):
        assert f"mpnn launch: rank 1 (pid {first}) on node 1 killed by SIGKILL" in output, output
        assert f"mpnn launch: rank 0 (pid {second}) on node 0 killed by SIGKILL" in output, output
        record = json.loads((run_dir / ("run.json" if node == 0 else "run-node1.json")).read_text())
        assert record["status"] == "ok"
        assert [(r["failed_rank"], r["failed_node"], r["pid"]) for r in record["restarts"]] == [
            (1, 1, first),
            (0, 0, second),
        ]
        assert [Path(r["resume_from"]).name for r in record["restarts"]] == [f"step-{s:08d}" for s in resumed]


# Every rank times ROUNDS all-reduces (after one that makes the connections), checks them against NumPy, reports.
TIMED_ALLREDUCE_SCRIPT = """
import json, os, time
import numpy as np
import mpnn
comm = mpnn.init()
comm.allreduce(np.ones(8, np.float32))
rounds = int(os.environ["ROUNDS"])
start = time.perf_counter()
for _ in range(rounds):
    a = np.arange(100_000, dtype=np.float32) * (comm.rank + 1)
    comm.allreduce(a)
    np.testing.assert_array_equal(a, np.arange(100_000, dtype=np.float32) * sum(range(1, comm.world_size + 1)))
print("REPORT " + json.dumps({"rank": comm.rank, "seconds": time.perf_counter() - start}), flush=True)
"""
PROXY_PORT = 15999
DELAY_S = 0.03  # each way, per chunk
ROUNDS = 20


def test_two_hosts_finish_through_a_delaying_lossy_router(routed_hosts, tmp_path, secret_file):
    hosts, router = routed_hosts, 2
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed (apt-get install iptables)")
    try:
        hosts.iptables(router, "-t", "nat", "-S")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"iptables nat does not work in a network namespace here: {e.stderr.strip()}")
    proxy = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            hosts.names[router],
            sys.executable,
            str(ROOT / "tests" / "delay_proxy.py"),
            str(PROXY_PORT),
            str(DELAY_S),
            str(tmp_path / "proxy.json"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout.readline().strip() == "ready"
        hosts.iptables(
            router, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(PROXY_PORT)
        )
        for chain in ("INPUT", "OUTPUT"):
            hosts.iptables(
                router, "-A", chain, "-m", "statistic", "--mode", "random", "--probability", "0.03", "-j", "DROP"
            )
        (tmp_path / "timed.py").write_text(TIMED_ALLREDUCE_SCRIPT)
        procs = start_nodes(hosts, tmp_path, secret_file, [str(tmp_path / "timed.py")], ROUNDS=str(ROUNDS))
        results = wait_nodes(procs, tmp_path, limit=60)
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=10)
        proxy.stdout.close()
    assert [code for code, _ in results] == [0, 0], _outputs(tmp_path)
    reports = _reports(out for _, out in results)
    assert [r["rank"] for r in reports] == [0, 1], _outputs(tmp_path)
    # with two ranks an all-reduce waits for two delayed hops in turn (reduce-scatter, then allgather); without
    # the delay these ROUNDS take under 0.1 s, with it about 2 * ROUNDS * DELAY_S
    assert all(r["seconds"] > 1.5 * ROUNDS * DELAY_S for r in reports), reports
    relayed = json.loads((tmp_path / "proxy.json").read_text())
    assert relayed["connections"] >= 3, relayed  # rank 1 joining the rendezvous and both ring edges crossed it
    # a ring all-reduce has every rank send as many bytes as it reduces: ROUNDS * 2 ranks * 400 kB at least
    assert relayed["bytes_up"] + relayed["bytes_down"] >= ROUNDS * 2 * 100_000 * 4, relayed
    counters = hosts.iptables(router, "-L", "INPUT", "-v", "-x", "-n")
    dropped = int(next(line for line in counters.splitlines() if "statistic" in line).split()[0])
    assert dropped > 0, counters
