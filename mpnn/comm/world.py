"""Joining the world from the environment: init_from_env() builds this process's Communicator, get_comm() returns it."""

import dataclasses
import os

from .communicator import Communicator
from .env import current_world
from .errors import AuthError, CommError
from .secret import read_secret, temp_secret_path, wait_for_secret, write_secret

_current = None


def init_from_env(timeout=None, encrypt=None):
    """Join the world the launcher describes (mpnn, torchrun, mpirun, srun; else a world of one) and return the
    Communicator; calling it again returns the same live one. `timeout` overrides MPNN_TIMEOUT (seconds);
    `encrypt` overrides MPNN_ENCRYPT ("1"/"0"; default on only across hosts). MPNN_TRANSPORT=tcp forces tcp
    on one host; MPNN_SHM=0 turns the same-host shared-memory all-reduce off."""
    global _current
    if _current is not None and not _current._closed:
        return _current
    spec = current_world().check_rendezvous()  # the one parse of the world (mpnn.worldspec)
    if timeout is not None:
        if not timeout > 0:
            raise ValueError(f"init_from_env: timeout must be a positive number of seconds, got {timeout!r}")
        spec = dataclasses.replace(spec, timeout=float(timeout))
    if encrypt is None and os.environ.get("MPNN_ENCRYPT", "") != "":
        encrypt = os.environ["MPNN_ENCRYPT"] not in ("0", "false", "no")
    transport = os.environ.get("MPNN_TRANSPORT", "auto")
    shared_memory = os.environ.get("MPNN_SHM", "1") not in ("0", "false", "no")
    secret = None if spec.world_size == 1 else _secret_for(spec)
    _current = Communicator(spec, secret, encrypt=encrypt, transport=transport, shared_memory=shared_memory)
    if spec.world_size > 1 and not spec.secret_file and spec.rank == 0:
        os.unlink(temp_secret_path(spec.run_id))  # every rank has proven it by now: leave nothing behind
    return _current


def get_comm():
    """The Communicator of init_from_env() (mpnn.init()); raises if this process has not joined a world."""
    if _current is None or _current._closed:
        raise CommError("no communicator: call mpnn.init() (mpnn.comm.init_from_env()) first")
    return _current


def _secret_for(spec):
    """The run's secret: MPNN_SECRET_FILE; else, on one host, a temp file rank 0 creates (others re-read it until
    it matches rank 0's); across hosts without a file, a one-line refusal saying what to set."""
    if spec.secret_file:
        return read_secret(spec.secret_file)
    if spec.multi_host:
        raise AuthError(
            f"MPNN_SECRET_FILE is not set: a world across {spec.nnodes} hosts needs a shared secret; create one with "
            "`python -c 'import secrets; print(secrets.token_hex(32))' > ~/.mpnn-secret && chmod 600 ~/.mpnn-secret` "
            "and pass MPNN_SECRET_FILE=~/.mpnn-secret to every rank (mpirun -x MPNN_SECRET_FILE, "
            "srun --export=ALL, or export it before torchrun)"
        )
    path = temp_secret_path(spec.run_id)
    if spec.rank == 0:
        return write_secret(path)
    return lambda: wait_for_secret(path, spec.timeout, spec.rank)
