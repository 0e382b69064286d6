"""The `audit` plugin: who writes which record of a run's trail, and when.

One writer at a time: node 0's launcher writes run_start, plugins and the policy verdict before any worker starts,
rank 0 writes workers_start, dataset, epoch, checkpoint and error records while the run goes on, and the launcher
writes run_end and the signed head after every worker is gone. Without a launcher-side audit (mpnn.init(plugins=
[...]) under torchrun, srun or plain python) rank 0 begins and ends the trail itself. Checkpoints saved by ranks
other than 0 are not recorded (only rank 0 writes during the run). Between the attempts of a run launched with
--max-restarts, node 0's launcher appends a "restart" record (mpnn_launch_restart) while no worker runs.

The seed recorded is the one the script gives mpnn: a "seed" record (rank 0's) for mpnn.init(seed=N) and every
mpnn.manual_seed(N), never a value guessed from the command line (argparse takes the last of `--seed 1 --seed 7`,
and abbreviations). A policy's require_seed is checked when the data is fingerprinted and again at run end.
Before every restart (--max-restarts) the launcher's audit hashes the script again and re-checks the policy (read
again): a script changed since the last attempt that the policy does not allow ends the run before it restarts;
each attempt ends with an "attempt_end" record of its exit codes and the script hash it started with.
The signed head (run id and run directory included) goes into audit.head.json and into run.json's "audit_head"
(run.json is read and rewritten once the launcher is done with it); the launcher's error path after a refused start
rewrites run.json from memory, so a refused run's head is in audit.head.json only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import sys
import traceback
from pathlib import Path

from mpnn._version import __version__
from mpnn.plugins.audit import AuditError
from mpnn.plugins.audit.keys import key_path, load_key
from mpnn.plugins.audit.policy import Policy, check_datasets, check_launch, load_policy
from mpnn.plugins.audit.provenance import code_facts, launch_facts, plugin_inventory, worker_facts
from mpnn.plugins.audit.trail import RUN_RECORD, TrailWriter, read_records, signed
from mpnn.plugins.errors import PluginRefusal
from mpnn.plugins.hookspec import hookimpl
from mpnn.plugins.options import Option


class AuditTrail:
    """Compliance audit trail: a chained, HMAC-signed audit.jsonl per run, a signed head, a policy checked at start."""

    name = "audit"
    version = __version__  # a built-in plugin is versioned with mpnn
    options = {
        "key": Option(
            str,
            "",
            "HMAC key file, kept outside the run dir [default: ~/.config/mpnn/audit.key, "
            "created 0600 with 32 random bytes when missing]",
        ),
        "policy": Option(
            str,
            "",
            "TOML policy checked before any worker starts (seed, plugins, world size, key "
            "length, script, git, datasets); a run that breaks it does not start",
        ),
    }

    def __init__(self, key: str = "", policy: str = ""):
        self.key_path = key_path(key)
        self.policy_path = policy
        self._writer: TrailWriter | None = None  # while this process writes: rank 0 during the run
        self._policy: Policy | None = None
        self._owner = False  # rank 0 began the trail, so rank 0 also ends it
        self._began = False  # this launcher wrote run_start, so it writes run_end
        self._refused = False
        self._script_sha256 = None  # launcher side: the script hash the current attempt started with
        self._seed = None  # worker side: the last seed the script set

    # ----- launcher side ---------------------------------------------------------------------------
    @hookimpl(tryfirst=True)
    def mpnn_launch_start(self, launch):
        if launch.node_rank != 0:
            return  # node 0 keeps the trail
        key = load_key(self.key_path, launch.run_dir)
        writer = TrailWriter(launch.run_dir, key)
        print(
            f"mpnn audit: key {self.key_path} fingerprint {writer.fingerprint}; trail {writer.path}",
            file=sys.stderr,
            flush=True,
        )
        facts = launch_facts(launch, _run_config(launch.run_dir))
        facts.update(key_path=str(self.key_path), key_bytes=len(key))
        writer.append("run_start", facts)
        self._began = True
        self._script_sha256 = (facts.get("code") or {}).get("sha256")
        plugins = plugin_inventory(launch.plugin_specs)
        writer.append("plugins", {"plugins": plugins})
        if self.policy_path:
            self._check_policy(writer, launch.run_id, facts, [p["name"] for p in plugins])

    def _check_policy(
        self, writer: TrailWriter, run_id, facts: dict, plugin_names: list, stage: str = "launch"
    ) -> Policy:
        """Record the policy and its verdict; on a violation end the trail and refuse the run, listing them all."""
        try:
            policy = load_policy(self.policy_path)
        except AuditError as error:
            writer.append(
                "policy",
                {"path": str(self.policy_path), "stage": stage, "verdict": "invalid", "violations": [str(error)]},
            )
            self._refuse(writer, run_id, [str(error)], f"audit: {error}")
        code = facts.get("code") or {}
        git = code.get("git") or {}
        violations = check_launch(
            policy,
            {
                "seed": facts.get("seed"),
                "plugins": plugin_names,
                "world_size": facts["world_size"],
                "key_bytes": facts["key_bytes"],
                "script_path": code.get("path"),
                "script_sha256": code.get("sha256"),
                "git_dirty": git.get("dirty") if git.get("commit") else None,
            },
        )
        writer.append(
            "policy",
            {
                **policy.record(),
                "stage": stage,
                "verdict": "refused" if violations else "passed",
                "violations": violations,
            },
        )
        if violations:
            what = "run" if stage == "launch" else f"{stage} (the script or its repository changed)"
            self._refuse(writer, run_id, violations, policy_message(policy, violations, what))
        return policy

    def _refuse(self, writer: TrailWriter, run_id, violations: list, message: str) -> None:
        writer.append("run_end", {"status": "refused", "reason": "policy", "violations": violations})
        writer.write_head(run_id)
        self._refused = True
        raise PluginRefusal(message, plugin=self.name)

    @hookimpl(tryfirst=True)  # first: a plugin that raises here would stop the later ones, and the trail must close
    def mpnn_launch_end(self, launch, status, exit_codes, error):
        if not self._began or self._refused:
            return  # not node 0, or the trail never began (bad key), or a refusal already closed it
        writer = TrailWriter(launch.run_dir, load_key(self.key_path, launch.run_dir))
        writer.append(
            "run_end", {"status": status, "exit_codes": {str(k): v for k, v in exit_codes.items()}, "error": error}
        )
        head = writer.write_head(launch.run_id)
        print(
            f"mpnn audit: trail closed at record {head['seq']}; check it with `mpnn audit verify {launch.run_dir}`",
            file=sys.stderr,
            flush=True,
        )

    @hookimpl
    def mpnn_launch_attempt_end(self, launch, attempt, status, exit_codes):
        if not self._began or self._refused:
            return
        writer = TrailWriter(launch.run_dir, load_key(self.key_path, launch.run_dir))
        writer.append(
            "attempt_end",
            {
                "attempt": attempt,
                "status": status,
                "exit_codes": {str(k): v for k, v in exit_codes.items()},
                "script_sha256": self._script_sha256,
            },
        )

    @hookimpl
    def mpnn_launch_restart(self, launch, restart, failed_rank, how):
        self.record_restart(launch, attempt=restart, reason=f"rank {failed_rank} {how}", ranks=[failed_rank])

    def record_restart(self, launch, attempt: int, reason: str, ranks=()) -> None:
        """Append a "restart" record between attempts, while no worker runs, with the script's hash as it is now;
        with a policy, check it again (the file read anew) against the script and repository as they are now,
        and refuse the restart on a violation."""
        if launch.node_rank != 0:
            return
        writer = TrailWriter(launch.run_dir, load_key(self.key_path, launch.run_dir))
        code = code_facts(launch.script)
        self._script_sha256 = code.get("sha256")
        writer.append(
            "restart",
            {
                "attempt": attempt,
                "reason": reason,
                "ranks": list(ranks),
                "script_path": code.get("path"),
                "script_sha256": code.get("sha256"),
            },
        )
        if self.policy_path:
            start = _launch_start_facts(launch.run_dir)
            facts = {**start, "code": code}
            self._check_policy(writer, launch.run_id, facts, start.get("plugin_names", []), f"restart {attempt}")

    # ----- worker side (rank 0 writes) --------------------------------------------------------------
    @hookimpl(tryfirst=True)
    def mpnn_run_start(self, run):
        if run.rank != 0 or run.run_dir is None:
            return
        key = load_key(self.key_path, run.run_dir)
        writer = TrailWriter(run.run_dir, key)
        if writer.empty:
            self._begin(writer, run, key)
        else:
            self._policy = _recorded_policy(run.run_dir, key)
        writer.append(
            "workers_start",
            {"world_size": run.world_size, "host": socket.gethostname(), "pid": os.getpid(), "run_id": run.run_id},
        )
        self._writer = writer

    def _begin(self, writer: TrailWriter, run, key: bytes) -> None:
        """No launcher-side audit began this trail: rank 0 writes run_start and checks the policy itself."""
        self._owner = True
        print(
            f"mpnn audit: key {self.key_path} fingerprint {writer.fingerprint}; trail {writer.path}",
            file=sys.stderr,
            flush=True,
        )
        facts = worker_facts(run)
        facts.update(key_path=str(self.key_path), key_bytes=len(key))
        writer.append("run_start", facts)
        plugins = plugin_inventory(run.config.get("plugin_specs") or [])
        named = {p["name"] for p in plugins}
        plugins += [
            {**p, "origin": "passed to mpnn.init"} for p in run.config.get("plugins", []) if p.get("name") not in named
        ]
        writer.append("plugins", {"plugins": plugins})
        if self.policy_path:
            self._policy = self._check_policy(writer, run.run_id, facts, [p["name"] for p in plugins])

    @hookimpl
    def mpnn_data_fingerprint(self, run, name, indices_sha256, data_sha256, size):
        shards = run.comm.allgather_object(
            {"rank": run.rank, "name": name, "indices_sha256": indices_sha256, "data_sha256": data_sha256, "size": size}
        )
        violations = None
        if self._writer is not None:
            self._writer.append(
                "dataset",
                {
                    "name": name,
                    "size": size,
                    "data_sha256": data_sha256,
                    "consistent": len({s["data_sha256"] for s in shards}) == 1,
                    "shards": shards,
                },
            )
            violations = check_datasets(self._policy, shards) if self._policy is not None else []
            violations += self._seed_violations("before its first batch")
            if self._policy is not None and ("allowed_datasets" in self._policy.rules or violations):
                self._writer.append(
                    "policy",
                    {
                        "path": self._policy.path,
                        "sha256": self._policy.sha256,
                        "stage": "data",
                        "dataset": name,
                        "verdict": "refused" if violations else "passed",
                        "violations": violations,
                    },
                )
        violations = run.comm.broadcast_object(violations, root=0)
        if violations:
            raise PluginRefusal(
                policy_message(self._policy, violations, "data")
                if self._policy is not None
                else "audit: the run's policy refuses the data:\n  - " + "\n  - ".join(violations),
                plugin=self.name,
            )

    @hookimpl
    def mpnn_seed(self, run, seed, source):
        self._seed = seed
        if self._writer is not None:
            self._writer.append("seed", {"seed": seed, "from": source, "rank": run.rank})

    @hookimpl
    def mpnn_epoch_end(self, run, epoch, metrics):
        if self._writer is not None:
            self._writer.append("epoch", {"epoch": epoch, "metrics": metrics})

    @hookimpl
    def mpnn_checkpoint_saved(self, run, path, sha256, step):
        if self._writer is not None:
            self._writer.append("checkpoint", {"path": str(path), "sha256": sha256, "step": step})

    @hookimpl
    def mpnn_checkpoint_key(self, run, run_id):
        """The per-run key that signs run `run_id`'s checkpoint manifests (derived from the audit key; never
        created here: a rank whose key file is missing gets None)."""
        try:
            key = load_key(self.key_path, run.run_dir, create=run.rank == 0)
        except AuditError:
            if run.rank == 0:
                raise
            return None
        return checkpoint_key(key, run_id or "")

    @hookimpl
    def mpnn_checkpoint_loaded(self, run, path, sha256, step, signature, world_size):
        if self._writer is None:
            return
        path = Path(path)
        source = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        self._writer.append(
            "resume",
            {
                "path": str(path),
                "sha256": sha256,
                "step": step,
                "source_run_dir": str(source),
                "source_run_id": signature.get("run_id") if isinstance(signature, dict) else None,
                "signed": isinstance(signature, dict),
                "source_world_size": world_size,
            },
        )

    @hookimpl
    def mpnn_error(self, run, error):
        if self._writer is not None:
            frames = traceback.extract_tb(error.__traceback__)
            self._writer.append(
                "error",
                {
                    "rank": run.rank,
                    "type": type(error).__name__,
                    "message": str(error),
                    "where": f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None,
                },
            )

    @hookimpl(trylast=True)
    def mpnn_run_end(self, run, status):
        if self._writer is None:
            return
        self._check_seed_at_end()
        end = {"status": status}
        if getattr(run, "exit_code", None):
            end.update(status="error", exit_code=run.exit_code)
        self._writer.append("workers_end", end)
        if self._owner:
            self._writer.append("run_end", {"status": status})
            self._writer.write_head(run.run_id)
        self._writer = None

    def _seed_violations(self, when: str) -> list:
        if self._policy is None or not self._policy.rules.get("require_seed") or self._seed is not None:
            return []
        return [f"require_seed: the script set no seed {when} (mpnn.init(seed=N) or mpnn.manual_seed(N))"]

    def _check_seed_at_end(self) -> None:
        """A run that never seeded under a policy requiring it: a refused verdict at the end (nothing to stop)."""
        violations = self._seed_violations("during the whole run")
        if violations:
            self._writer.append(
                "policy",
                {
                    "path": self._policy.path,
                    "sha256": self._policy.sha256,
                    "stage": "end",
                    "verdict": "refused",
                    "violations": violations,
                },
            )


def checkpoint_key(audit_key: bytes, run_id: str) -> bytes:
    """The key that signs one run's checkpoint manifests: HMAC-SHA256(audit key, "mpnn checkpoint manifest" NUL
    run id). Per run, so a manifest signed for one run does not verify as another's."""
    return hmac.new(audit_key, b"mpnn checkpoint manifest\0" + run_id.encode(), hashlib.sha256).digest()


def policy_message(policy: Policy, violations: list, what: str) -> str:
    """The refusal: the policy file, its hash, and every violation on its own line."""
    return (
        f"audit: policy {policy.path} (sha256 {policy.sha256[:16]}) refuses the {what}: {len(violations)} "
        "violation(s):\n  - " + "\n  - ".join(violations)
    )


def _run_config(run_dir: Path) -> dict | None:
    """The launcher's run.json "config", when it is already written."""
    try:
        return json.loads((Path(run_dir) / RUN_RECORD).read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _launch_start_facts(run_dir: Path) -> dict:
    """The launch facts a policy needs again before a restart: world size, key length and plugin names, as this
    launcher recorded them in run_start and plugins."""
    facts: dict = {"plugin_names": []}
    for record in read_records(run_dir):
        data = record.get("data") or {}
        if record.get("kind") == "run_start":
            facts.update(world_size=data.get("world_size"), key_bytes=data.get("key_bytes"), seed=None)
        elif record.get("kind") == "plugins":
            facts["plugin_names"] = [p.get("name") for p in data.get("plugins") or []]
    return facts


def _recorded_policy(run_dir: Path, key: bytes) -> Policy | None:
    """The policy the launcher recorded (HMAC-checked), so that workers judge data by the rules checked at start."""
    for record in reversed(read_records(run_dir)):
        if record.get("kind") == "policy" and record.get("data", {}).get("stage") == "launch":
            if not signed(key, record) or "rules" not in record["data"]:
                raise AuditError(
                    f"{run_dir}: the trail's policy record {record.get('seq')} does not verify; "
                    f"run `mpnn audit verify {run_dir}`"
                )
            return Policy.from_record(record["data"])
    return None
