"""Who am I in which world: rank, world size and rendezvous from mpnn's, torchrun's, Open MPI's or Slurm's env.

This is THE one parse of the world: the communicator, DistributedSampler, the Checkpointer, the plugins, the
runtime and the launcher's worker all read it through ``current_world()`` (cached; parsed again only when a
variable it reads changes), never from os.environ themselves. The module imports nothing from mpnn, so any
layer may use it (mpnn.data without the communicator and ZeroMQ, mpnn.comm without the engine).

Detection order: MPNN_RANK (the mpnn launcher, which also sets torchrun's names: MPNN_* wins, so its rendezvous
is MPNN_RENDEZVOUS and MASTER_PORT is left to the script), OMPI_COMM_WORLD_RANK (mpirun), RANK + WORLD_SIZE
(torchrun), SLURM_PROCID inside an srun step; with none of them the process is a world of one. Across hosts
srun needs no address (the step's first node, port derived from the job id); mpirun needs MPNN_RENDEZVOUS or
MASTER_ADDR/PORT. A missing or malformed rendezvous address is an error only for joining the world
(``WorldSpec.check_rendezvous()``; ``spec_from_env`` checks it), not for reading rank and world size.
"""

import hashlib
import math
import os
import re
import threading
from dataclasses import dataclass, field

DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class WorldSpec:
    """This process's place in the world, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    run_id: str = "local"
    run_dir: str | None = None
    rendezvous: str | None = None  # "tcp://HOST:PORT", served by rank 0
    secret_file: str | None = None  # None under a foreign launcher on one host: rank 0 creates a temp secret
    timeout: float = DEFAULT_TIMEOUT
    launcher: str = "none"
    # The variables rank and world size came from, for messages ("RANK", "WORLD_SIZE" under torchrun).
    rank_var: str = field(default="", compare=False, repr=False)
    world_size_var: str = field(default="", compare=False, repr=False)
    # Why there is no rendezvous address (raised by check_rendezvous, i.e. only when joining the world).
    rendezvous_error: str | None = field(default=None, compare=False, repr=False)

    @property
    def multi_host(self):
        """True when the world spans several hosts (binds beyond loopback, needs a shared secret file)."""
        return self.nnodes > 1

    def describe(self, what):
        """'3 (RANK=3)' for "rank", '2 (WORLD_SIZE=2)' for "world_size": the value and the variable it came from."""
        value, var = (self.rank, self.rank_var) if what == "rank" else (self.world_size, self.world_size_var)
        return f"{value} ({var}={value})" if var else str(value)

    def check_rendezvous(self):
        """Raise ValueError, naming the variable to set, unless a world of several has a usable rendezvous address."""
        if self.world_size > 1:
            self.rendezvous_host_port()
        return self

    def rendezvous_host_port(self):
        """Split MPNN_RENDEZVOUS-style "tcp://HOST:PORT" into (host, port)."""
        if self.rendezvous is None and self.rendezvous_error:
            raise ValueError(self.rendezvous_error)
        if self.rendezvous is None:
            raise ValueError(
                f"{self.launcher}: no rendezvous address for a world of {self.world_size}: set "
                "MPNN_RENDEZVOUS=tcp://<rank 0's host>:<free port> for every rank"
            )
        match = re.fullmatch(r"tcp://(\[[0-9a-fA-F:]+\]|[^:/\s]+):(\d+)", self.rendezvous or "")
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"rendezvous address must look like tcp://HOST:PORT, got {self.rendezvous!r}")
        return match.group(1).strip("[]"), int(match.group(2))


# Every variable the parse reads has one of these names or prefixes: current_world() keys its cache on them.
WORLD_VARIABLES = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
)
WORLD_PREFIXES = ("MPNN_", "OMPI_", "SLURM_", "PMIX_", "TORCHELASTIC_")

_cache_lock = threading.Lock()
_cached = (None, None)  # (the world variables' (name, value) pairs, the WorldSpec parsed from them)


def world_variables(environ=None):
    """The (name, value) pairs of `environ` (default os.environ) that the parse reads, sorted by name."""
    env = os.environ if environ is None else environ
    return tuple(sorted((k, v) for k, v in env.items() if k in WORLD_VARIABLES or k.startswith(WORLD_PREFIXES)))


def current_world():
    """This process's WorldSpec, from os.environ: every reader of rank, world size, run dir... calls this.

    Parsed once and cached; parsed again only when one of the variables it reads has changed (tests that
    monkeypatch the environment, a tool that sets MPNN_RUN_DIR before mpnn.init()). Raises ValueError naming
    the variable and its value when the launcher's variables are malformed; the rendezvous address is checked
    only by check_rendezvous() (joining), so a sampler works wherever rank and world size are readable."""
    global _cached
    key = world_variables()
    cached_key, spec = _cached
    if cached_key == key:
        return spec
    spec = _parse(dict(key))
    with _cache_lock:
        _cached = (key, spec)
    return spec


def spec_from_env(environ=None):
    """Build the WorldSpec from the environment of whichever launcher started this process, and check that a
    world of several has a usable rendezvous address (what joining it needs)."""
    return _parse(os.environ if environ is None else environ).check_rendezvous()


def _parse(env):
    if "MPNN_RANK" in env:
        spec = _from_mpnn(env)
    elif "OMPI_COMM_WORLD_RANK" in env:
        spec = _from_openmpi(env)
    elif "RANK" in env and "WORLD_SIZE" in env:
        spec = _from_torchrun(env)
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env):
        spec = _from_slurm(env)
    else:
        spec = WorldSpec(
            run_dir=env.get("MPNN_RUN_DIR") or None,
            secret_file=env.get("MPNN_SECRET_FILE") or None,
            timeout=_timeout(env),
        )
    _check(spec)
    return spec


def _int(env, name, default=None):
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is required by this launcher but is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _timeout(env):
    value = env.get("MPNN_TIMEOUT", "")
    if value == "":
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"MPNN_TIMEOUT must be a positive number of seconds, got {value!r}")
    return seconds


def _nnodes(env, world_size, local_world_size, fallback_var=None):
    if env.get("MPNN_NNODES"):
        return _int(env, "MPNN_NNODES")
    if fallback_var and env.get(fallback_var):
        return _int(env, fallback_var)
    return max(1, math.ceil(world_size / max(local_world_size, 1)))


def _derived_port(run_id):
    """A port in 20000-39999 that every rank of one run computes alike (rendezvous without MASTER_PORT)."""
    return 20000 + int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "little") % 20000


def _address(env, launcher, run_id, multi_host, master_port_offset, first_host=None):
    """The rendezvous address: MPNN_RENDEZVOUS, else MASTER_ADDR/MASTER_PORT(+offset), else (many hosts) the
    job's first host, else loopback; without MASTER_PORT the port is derived from the run id."""
    if env.get("MPNN_RENDEZVOUS"):
        return env["MPNN_RENDEZVOUS"]
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"tcp://{env['MASTER_ADDR']}:{_int(env, 'MASTER_PORT') + master_port_offset}"
    if multi_host and first_host:
        return f"tcp://{first_host}:{_derived_port(run_id)}"
    if multi_host:
        return None
    return f"tcp://127.0.0.1:{_derived_port(run_id)}"


def _no_address(launcher):
    return (
        f"{launcher}: a world across several hosts needs the rendezvous address: set MPNN_RENDEZVOUS="
        "tcp://<first host>:<free port> (or MASTER_ADDR and MASTER_PORT) and pass it to every rank"
    )


def _from_mpnn(env):
    world_size = _int(env, "MPNN_WORLD_SIZE")
    local_world_size = _int(env, "MPNN_LOCAL_WORLD_SIZE", world_size)
    return WorldSpec(
        rank=_int(env, "MPNN_RANK"),
        world_size=world_size,
        local_rank=_int(env, "MPNN_LOCAL_RANK", _int(env, "MPNN_RANK")),
        local_world_size=local_world_size,
        node_rank=_int(env, "MPNN_NODE_RANK", 0),
        nnodes=_int(env, "MPNN_NNODES", 1),
        run_id=env.get("MPNN_RUN_ID") or "mpnn",
        run_dir=env.get("MPNN_RUN_DIR") or None,
        rendezvous=env.get("MPNN_RENDEZVOUS") or None,
        secret_file=env.get("MPNN_SECRET_FILE") or None,
        timeout=_timeout(env),
        launcher="mpnn",
        rank_var="MPNN_RANK",
        world_size_var="MPNN_WORLD_SIZE",
        rendezvous_error=None
        if env.get("MPNN_RENDEZVOUS")
        else (
            "mpnn: MPNN_RENDEZVOUS is not set: the launcher gives every worker rank 0's rendezvous address "
            "(tcp://HOST:PORT); set it for a world started by hand"
        ),
    )


def _from_torchrun(env):
    world_size = _int(env, "WORLD_SIZE")
    local_world_size = _int(env, "LOCAL_WORLD_SIZE", world_size)
    nnodes = _nnodes(env, world_size, local_world_size, "GROUP_WORLD_SIZE")
    # torchrun's own store holds MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE): mpnn rendezvouses on MASTER_PORT + 1.
    run_id = f"torchrun-{env.get('TORCHELASTIC_RUN_ID', 'none')}-{env.get('MASTER_PORT', '')}"
    return WorldSpec(
        rank=_int(env, "RANK"),
        world_size=world_size,
        local_rank=_int(env, "LOCAL_RANK", 0),
        local_world_size=local_world_size,
        node_rank=_int(env, "GROUP_RANK", 0),
        nnodes=nnodes,
        run_id=run_id,
        run_dir=env.get("MPNN_RUN_DIR") or None,
        rendezvous=_address(env, "torchrun", run_id, nnodes > 1, master_port_offset=1),
        secret_file=env.get("MPNN_SECRET_FILE") or None,
        timeout=_timeout(env),
        launcher="torchrun",
        rank_var="RANK",
        world_size_var="WORLD_SIZE",
        rendezvous_error=_no_address("torchrun"),
    )


def _from_openmpi(env):
    world_size = _int(env, "OMPI_COMM_WORLD_SIZE")
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    local_world_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world_size)
    nnodes = _nnodes(env, world_size, local_world_size)
    job = env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_orte_ess_jobid") or "0"
    run_id = f"ompi-{job}"
    return WorldSpec(
        rank=rank,
        world_size=world_size,
        local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
        local_world_size=local_world_size,
        node_rank=_int(env, "MPNN_NODE_RANK", rank // max(local_world_size, 1)),
        nnodes=nnodes,
        run_id=run_id,
        run_dir=env.get("MPNN_RUN_DIR") or None,
        rendezvous=_address(env, "mpirun", run_id, nnodes > 1, master_port_offset=0),
        secret_file=env.get("MPNN_SECRET_FILE") or None,
        timeout=_timeout(env),
        launcher="mpirun",
        rank_var="OMPI_COMM_WORLD_RANK",
        world_size_var="OMPI_COMM_WORLD_SIZE",
        rendezvous_error=_no_address("mpirun"),
    )


def _tasks_on_node(tasks_per_node, node):
    """Expand Slurm's "4(x2),3" task counts and pick this node's entry."""
    counts = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if node < len(counts) else None


def first_slurm_host(nodelist):
    """The first host of a Slurm hostlist: "gpu[07-09,12],login1" -> "gpu07", "r[1-2]-n[3-4]" -> "r1-n3"."""
    entry = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist.strip()).group(0)
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry) or None


def _from_slurm(env):
    world_size = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    node_rank = _int(env, "SLURM_NODEID", 0)
    nnodes = _int(env, "MPNN_NNODES", _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1)))
    local_world_size = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), node_rank) or max(
        1, world_size // max(nnodes, 1)
    )
    run_id = f"slurm-{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}"
    return WorldSpec(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world_size,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=local_world_size,
        node_rank=node_rank,
        nnodes=nnodes,
        run_id=run_id,
        run_dir=env.get("MPNN_RUN_DIR") or None,
        rendezvous=_address(
            env,
            "srun",
            run_id,
            nnodes > 1,
            master_port_offset=0,
            first_host=first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""),
        ),
        secret_file=env.get("MPNN_SECRET_FILE") or None,
        timeout=_timeout(env),
        launcher="srun",
        rank_var="SLURM_PROCID",
        world_size_var="SLURM_STEP_NUM_TASKS"
        if env.get("SLURM_STEP_NUM_TASKS")
        else "SLURM_NTASKS"
        if env.get("SLURM_NTASKS")
        else "",
        rendezvous_error=_no_address("srun"),
    )


def _check(spec):
    if spec.world_size < 1:
        raise ValueError(f"{spec.launcher}: world size must be >= 1, got {spec.describe('world_size')}")
    if not 0 <= spec.rank < spec.world_size:
        raise ValueError(
            f"{spec.launcher}: rank {spec.describe('rank')} is outside the world of size "
            f"{spec.describe('world_size')}: a rank must be in [0, {spec.world_size})"
        )
    if spec.world_size > 1 and spec.rendezvous is not None:
        spec.rendezvous_host_port()  # a malformed address given is an error now, with its value in the message
