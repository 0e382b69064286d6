"""The environment each worker starts with: its place in the world, where the run lives, the rendezvous
address and secret, and one thread per math library (docs/architecture.md: set before NumPy is imported, as
torchrun does).

Besides the MPNN_* contract every worker gets torchrun's names (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, GROUP_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that torchrun-style scripts that test RANK run
distributed. MASTER_PORT is the script's (torch.distributed's store binds it there), never mpnn's rendezvous
port: on one node a port the OS reports free, on several the rendezvous port + 1, the same on every node. The
worker's world parse (mpnn.worldspec) reads MPNN_* first, so mpnn itself never binds MASTER_PORT. TORCHELASTIC_*
and ROLE_* are left out (and removed when inherited): they would tell torch that an elastic agent's store holds
MASTER_PORT, and none does."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@dataclass(frozen=True)
class World:
    """nnodes launchers each start nproc_per_node workers; this launcher is node node_rank."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.nproc_per_node + local_rank

    def local_global_ranks(self) -> list[int]:
        """The global ranks this node runs, in local-rank order."""
        return [self.global_rank(local) for local in range(self.nproc_per_node)]


@dataclass(frozen=True)
class RunContext:
    """What every worker of one run shares: its id and directory, rendezvous, secret, timeout, plugin specs,
    whether the data sockets are encrypted, and the checkpoint settings and restart count of this attempt."""

    run_id: str
    run_dir: Path
    rendezvous: str
    secret_file: Path
    timeout: float
    plugins: Sequence[str] = ()
    encrypt: bool | None = None  # None: the workers' default (CURVE only across nodes)
    checkpoint_every: int | None = None  # MPNN_CHECKPOINT_EVERY; None: the script's own setting
    checkpoint_keep: int | None = None  # MPNN_CHECKPOINT_KEEP; None: the Checkpointer's default
    resume_from: Path | None = None  # MPNN_RESUME_FROM: the run dir this attempt resumes from, if any
    restart_count: int = 0  # MPNN_RESTART_COUNT: 0 on the first attempt, k on the k-th restart
    max_restarts: int = 0  # MPNN_MAX_RESTARTS (torchrun's TORCHELASTIC_MAX_RESTARTS)
    master_port: int | None = None  # MASTER_PORT for the script (script_master_port); None: rendezvous port + 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_address(master_addr: str | None, master_port: int | None) -> str:
    """tcp://<addr>:<port> of rank 0's rendezvous; one node defaults to loopback and a free port."""
    addr = master_addr or "127.0.0.1"
    port = master_port or free_port()
    host = f"[{addr}]" if ":" in addr else addr
    return f"tcp://{host}:{port}"


def script_master_port(rendezvous: str, nnodes: int) -> int:
    """The MASTER_PORT a run's scripts get, chosen once per launch: never the rendezvous port. One node: a port
    free now on every interface (asked of the OS, again if it hands back the rendezvous's); several nodes: the
    port next to the rendezvous's, which every node computes alike."""
    _, port = host_port(rendezvous)
    if nnodes > 1:
        return _next_port(port)
    while True:
        candidate = free_port("0.0.0.0")
        if candidate != port:
            return candidate


def _next_port(port: int) -> int:
    return port + 1 if port < 65535 else port - 1


def host_port(rendezvous: str) -> tuple[str, int]:
    """("HOST", PORT) of "tcp://HOST:PORT" (IPv6 hosts lose their brackets, as MASTER_ADDR carries them)."""
    host, _, port = rendezvous.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_FOREIGN_AGENT_PREFIXES = ("TORCHELASTIC_", "ROLE_")  # an elastic agent's, describing another world


def worker_env(base: Mapping[str, str], world: World, local_rank: int, run: RunContext) -> dict[str, str]:
    """The full environment of one worker: `base` plus the MPNN_* contract; thread counts only where unset."""
    env = dict(base)
    for var in THREAD_VARS:
        env.setdefault(var, "1")
    env.update(
        PYTHONUNBUFFERED="1",
        MPNN_RANK=str(world.global_rank(local_rank)),
        MPNN_WORLD_SIZE=str(world.world_size),
        MPNN_LOCAL_RANK=str(local_rank),
        MPNN_LOCAL_WORLD_SIZE=str(world.nproc_per_node),
        MPNN_NNODES=str(world.nnodes),
        MPNN_NODE_RANK=str(world.node_rank),
        MPNN_RUN_ID=run.run_id,
        MPNN_RUN_DIR=str(run.run_dir),
        MPNN_RENDEZVOUS=run.rendezvous,
        MPNN_SECRET_FILE=str(run.secret_file),
        MPNN_TIMEOUT=f"{run.timeout:g}",
        MPNN_PLUGINS=";".join(run.plugins),
    )
    host, port = host_port(run.rendezvous)
    for name in [k for k in env if k.startswith(_FOREIGN_AGENT_PREFIXES)]:
        del env[name]
    # torchrun's names, for scripts written for torchrun (nanoGPT: ddp = int(os.environ.get('RANK', -1)) != -1)
    env.update(
        RANK=env["MPNN_RANK"],
        LOCAL_RANK=env["MPNN_LOCAL_RANK"],
        WORLD_SIZE=env["MPNN_WORLD_SIZE"],
        LOCAL_WORLD_SIZE=env["MPNN_LOCAL_WORLD_SIZE"],
        GROUP_RANK=env["MPNN_NODE_RANK"],
        GROUP_WORLD_SIZE=env["MPNN_NNODES"],
        MASTER_ADDR=host,
        MASTER_PORT=str(run.master_port if run.master_port is not None else _next_port(port)),
    )
    if run.encrypt is not None:
        env["MPNN_ENCRYPT"] = "1" if run.encrypt else "0"
    env.update(MPNN_RESTART_COUNT=str(run.restart_count), MPNN_MAX_RESTARTS=str(run.max_restarts))
    if run.checkpoint_every:
        env["MPNN_CHECKPOINT_EVERY"] = str(run.checkpoint_every)
    if run.checkpoint_keep is not None:
        env["MPNN_CHECKPOINT_KEEP"] = str(run.checkpoint_keep)
    env.pop("MPNN_RESUME_FROM", None)  # only the launcher says where to resume: never a stale value from outside
    if run.resume_from is not None:
        env["MPNN_RESUME_FROM"] = str(run.resume_from)
    return env
