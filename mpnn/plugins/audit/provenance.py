"""What the trail records about where a run came from: who started it, where and how, the code (script SHA-256,
git commit with a dirty flag and a hash of `git diff HEAD`), mpnn's and its dependencies' versions, the seed,
and every plugin with its options, version and source file's SHA-256."""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

from mpnn._version import __version__

DEPENDENCIES = ("numpy", "numba", "llvmlite", "pyzmq", "cloudpickle", "click", "pluggy", "psutil", "rich")
GIT_TIMEOUT_S = 10.0
_SEED_ARG = re.compile(r"--seed(?:=(.*))?")
SEED_FROM_SCRIPT = "the script: see the seed records (mpnn.init(seed=N), mpnn.manual_seed(N))"


def file_sha256(path) -> str | None:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def who() -> dict:
    """The user, uid, host and platform of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    return {
        "user": user,
        "uid": os.getuid() if hasattr(os, "getuid") else None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def versions() -> dict:
    """Python's, mpnn's and each installed dependency's version (None for one that is not installed)."""
    found = {"python": platform.python_version(), "mpnn": __version__}
    for name in DEPENDENCIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def script_file(script) -> Path | None:
    """The train script's file: the path itself, or the origin of a module run with -m; None when not found."""
    path = Path(script)
    if path.is_file():
        return path.resolve()
    try:
        spec = importlib.util.find_spec(str(script))
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def seed_from_args(args) -> int | None:
    """The first `--seed N` or `--seed=N` of a command line. Not what the trail records: argparse takes the last
    one, and accepts abbreviations; the trail records the seed the script gives mpnn (a "seed" record)."""
    args = [str(a) for a in args]
    for i, arg in enumerate(args):
        match = _SEED_ARG.fullmatch(arg)
        if match:
            value = match.group(1) if match.group(1) is not None else (args[i + 1] if i + 1 < len(args) else None)
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, check=True, timeout=GIT_TIMEOUT_S
    ).stdout.decode(errors="replace")


def git_state(path: Path | None) -> dict:
    """The git commit of the repository holding `path`, whether its tree is dirty (changed or untracked files),
    and the SHA-256 of `git diff HEAD` (the uncommitted changes to tracked files); commit None outside git."""
    if path is None:
        return {"commit": None, "reason": "no script file"}
    folder = path if path.is_dir() else path.parent
    try:
        commit = _git(folder, "rev-parse", "HEAD").strip()
        root = _git(folder, "rev-parse", "--show-toplevel").strip()
        status = _git(folder, "status", "--porcelain").splitlines()
        diff = subprocess.run(
            ["git", "-C", str(folder), "diff", "HEAD", "--no-ext-diff", "--binary"],
            capture_output=True,
            check=True,
            timeout=GIT_TIMEOUT_S,
        ).stdout
    except FileNotFoundError:
        return {"commit": None, "reason": "git is not installed"}
    except subprocess.TimeoutExpired:
        return {"commit": None, "reason": f"git took over {GIT_TIMEOUT_S:.0f} s"}
    except subprocess.CalledProcessError as error:
        reason = error.stderr.decode(errors="replace").strip().splitlines()
        return {"commit": None, "reason": reason[-1] if reason else "not a git repository"}
    return {
        "commit": commit,
        "root": root,
        "dirty": bool(status),
        "changed_files": len(status),
        "untracked_files": sum(line.startswith("??") for line in status),
        "diff_sha256": hashlib.sha256(diff).hexdigest(),
    }


def code_facts(script) -> dict:
    """The train script's path and SHA-256 and its repository's git state."""
    path = script_file(script)
    return {
        "script": str(script),
        "path": str(path) if path else None,
        "sha256": file_sha256(path) if path else None,
        "git": git_state(path),
    }


def plugin_inventory(specs) -> list[dict]:
    """Each plugin a run names: spec, name, version, where it comes from, every option's value (defaults
    included), and its source file's SHA-256."""
    from mpnn.plugins.registry import resolve

    inventory = []
    for spec in specs:
        resolved = resolve(spec)
        cls = resolved.cls
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:
            source = None
        options = {key: option.default for key, option in getattr(cls, "options", {}).items()}
        options.update(resolved.options)
        inventory.append(
            {
                "spec": spec,
                "name": resolved.name,
                "version": getattr(cls, "version", None),
                "origin": resolved.source,
                "class": f"{cls.__module__}:{cls.__qualname__}",
                "file": source,
                "sha256": file_sha256(source) if source else None,
                "options": options,
            }
        )
    return inventory


def launch_facts(launch, config: dict | None) -> dict:
    """The run-start record the launcher writes: who, where, when, how, which code, which versions."""
    return {
        "run_id": launch.run_id,
        "run_dir": str(launch.run_dir),
        **who(),
        "pid": os.getpid(),
        "command_line": list(launch.argv),
        "python_executable": sys.executable,
        "world_size": launch.world_size,
        "nnodes": launch.nnodes,
        "nprocs": launch.nprocs,
        "node_rank": launch.node_rank,
        "script_args": list(launch.script_args),
        "seed": launch.seed,  # None: the script's seed is recorded when it sets it ("seed" records)
        "seed_from": "launcher --seed" if launch.seed is not None else SEED_FROM_SCRIPT,
        "config": config,
        "env": dict(launch.env),
        "code": code_facts(launch.script),
        "versions": versions(),
    }


def worker_facts(run) -> dict:
    """The run-start record rank 0 writes when no launcher-side audit began the trail (e.g. mpnn.init(plugins=...)
    under torchrun or a plain `python train.py`)."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else None
    return {
        "run_id": run.run_id,
        "run_dir": str(run.run_dir),
        **who(),
        "pid": os.getpid(),
        "command_line": [sys.executable, *sys.argv],
        "world_size": run.world_size,
        "seed": None,
        "seed_from": SEED_FROM_SCRIPT,
        "config": run.config,
        "code": code_facts(script) if script else None,
        "versions": versions(),
        "started_by": "rank 0",
    }
