"""What --encrypt costs across hosts: 2-node all-reduce bandwidth over a veth link, plain vs ZeroMQ CURVE.

    python benchmarks/multihost.py [--sizes 1MB,16MB,64MB] [--rounds 3] [--iters N]     # as root

Builds two "hosts" on this machine (network namespaces with their own hostnames, joined by a veth pair), then
runs `mpnn launch --nnodes 2 -n 1` in each, once with --no-encrypt and once with --encrypt per round,
alternating. Each run times float32 sum all-reduces (mpnn.bench.time_allreduce: warm-up, then a barrier before
each timed call); the figure per size is the median over rounds of rank 0's per-run median. Prints algorithm
bandwidth (bytes / time) for both and the ratio plain / CURVE. Needs root and iproute2; removes everything.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 600


class VethHosts:
    """Two namespaces joined by one veth pair (10.231.S.1 and .2), named after this process; removed on exit."""

    def __init__(self):
        tag = os.getpid()
        self.names = [f"mpnnb{tag}n{i}" for i in range(2)]
        self.links = [f"mb{tag}v{i}" for i in range(2)]
        self.addrs = [f"10.231.{tag % 250}.{i + 1}" for i in range(2)]

    def __enter__(self):
        try:
            for name in self.names:
                _ip("netns", "add", name)
            _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
            for name, link, addr in zip(self.names, self.links, self.addrs):
                _ip("link", "set", link, "netns", name)
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", link)
                _ip("-n", name, "link", "set", link, "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        present = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for name in self.names:
            if name in present:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.links[0]], capture_output=True)  # if it never left the root ns

    def popen(self, node, argv, **kwargs):
        """Start argv in node's namespace, in its own UTS namespace with hostname node<i>."""
        return subprocess.Popen(
            [
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
            ],
            **kwargs,
        )


def _ip(*args):
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"multihost benchmark: `ip {' '.join(args)}` failed: {result.stderr.strip()}")


def run_pair(hosts, workdir, run_id, port, encrypt, sizes, iters):
    """One two-node launch; returns rank 0's [(iters, median seconds)] per size."""
    secret = workdir / "secret"
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
            str(port),
            "--run-id",
            run_id,
            "--secret-file",
            str(secret),
            "--log-dir",
            str(workdir / "runs"),
            "--timeout",
            "120",
            "-n",
            "1",
            "--encrypt" if encrypt else "--no-encrypt",
            __file__,
            "--worker",
            "--sizes",
            sizes,
        ]
        if iters:
            argv += ["--iters", str(iters)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        procs.append(
            hosts.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        )
    outputs = [proc.communicate(timeout=RUN_LIMIT_S)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"multihost benchmark: run {run_id} failed:\n" + "\n".join(outputs))
    line = next(line for line in outputs[0].splitlines() if "RESULT " in line)
    return json.loads(line.split("RESULT ", 1)[1])


def worker(args):
    """Inside `mpnn launch`: join, time the all-reduces, rank 0 prints them as one RESULT line."""
    from mpnn.bench import parse_sizes, time_allreduce
    from mpnn.comm import init_from_env

    comm = init_from_env()
    timings = time_allreduce(comm, parse_sizes(args.sizes), iters=args.iters)
    if comm.rank == 0:
        print("RESULT " + json.dumps({"encrypt": comm.encrypt, "timings": timings}), flush=True)
    comm.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1MB,16MB,64MB", help="comma-separated sizes (B, KB, MB, GB)")
    p.add_argument("--rounds", type=int, default=3, help="plain/CURVE pairs of runs, alternating")
    p.add_argument("--iters", type=int, default=None, help="timed all-reduces per size [default: ~1 GB moved]")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        raise SystemExit("multihost benchmark: needs root (ip netns, veth)")
    from mpnn.bench import format_size, parse_sizes

    sizes = parse_sizes(args.sizes)
    seconds = {False: [], True: []}  # per encrypt flag: one list of per-size medians per round
    with tempfile.TemporaryDirectory(prefix="mpnn-multihost-") as tmp, VethHosts() as hosts:
        workdir = Path(tmp)
        (workdir / "secret").write_text(secrets.token_hex(32))
        (workdir / "secret").chmod(0o600)
        for round_ in range(args.rounds):
            for encrypt in (False, True):
                run_id = f"bench-{round_}-{'curve' if encrypt else 'plain'}"
                result = run_pair(hosts, workdir, run_id, 29500 + 2 * round_ + encrypt, encrypt, args.sizes, args.iters)
                if result["encrypt"] is not encrypt:
                    raise SystemExit(f"multihost benchmark: run {run_id} had encrypt={result['encrypt']}")
                seconds[encrypt].append([median for _, median in result["timings"]])
                print(
                    f"round {round_ + 1}/{args.rounds} {'CURVE' if encrypt else 'plain'}: "
                    + ", ".join(
                        f"{format_size(n)} {n / s / 1e9:.3f} GB/s" for n, s in zip(sizes, seconds[encrypt][-1])
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    print(f"2-node all-reduce over veth (float32 sum, algbw = bytes / time, median of {args.rounds} rounds)")
    print(f"{'size':>8} {'plain GB/s':>11} {'CURVE GB/s':>11} {'plain/CURVE':>12}")
    for i, nbytes in enumerate(sizes):
        plain = statistics.median(r[i] for r in seconds[False])
        curve = statistics.median(r[i] for r in seconds[True])
        print(
            f"{format_size(nbytes):>8} {nbytes / plain / 1e9:>11.3f} {nbytes / curve / 1e9:>11.3f} "
            f"{curve / plain:>11.2f}x"
        )


if __name__ == "__main__":
    main()
