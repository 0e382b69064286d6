"""The run policy: a TOML file of rules, checked in the launcher before any worker starts (seed, plugins, world
size, key length, script, git tree) and, for datasets, when the workers fingerprint their data. Every violation
is listed, not only the first.

    require_seed = true                 # the script must seed mpnn (mpnn.init(seed=N) or mpnn.manual_seed(N)) before
                                        # its first batch (checked in the workers, and again at run end)
    required_plugins = ["watchdog"]     # plugin names the run must name
    max_world_size = 8
    min_key_bytes = 32                  # length of the audit key
    allowed_scripts = ["launch/mnist1d.py", "<sha256 hex>"]   # a path (relative to this file) or a SHA-256
    require_clean_git = true            # no uncommitted change in the script's repository
    allowed_datasets = ["<sha256 hex>", "TensorDataset"]     # a data SHA-256 or a dataset name (weaker)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mpnn.plugins.audit import AuditError

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
RULES = {  # rule -> (type, what a value must be)
    "require_seed": (bool, "true or false"),
    "required_plugins": (list, "a list of plugin names"),
    "max_world_size": (int, "a positive integer"),
    "min_key_bytes": (int, "a positive integer"),
    "allowed_scripts": (list, "a list of script paths or SHA-256 hex digests"),
    "require_clean_git": (bool, "true or false"),
    "allowed_datasets": (list, "a list of data SHA-256 hex digests or dataset names"),
}


@dataclass(frozen=True)
class Policy:
    """A policy file read and checked: its path, SHA-256 and rules."""

    path: str
    sha256: str
    rules: dict

    def record(self) -> dict:
        """What the trail keeps of the policy: path, hash and rules (so that workers need not reread the file)."""
        return {"path": self.path, "sha256": self.sha256, "rules": self.rules}

    @classmethod
    def from_record(cls, record: dict) -> Policy:
        """The policy as the trail recorded it."""
        return cls(record["path"], record["sha256"], record["rules"])


def load_policy(path) -> Policy:
    """Read and check a policy file; AuditError listing every unknown rule and bad value at once."""
    path = Path(path).expanduser().resolve()
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise AuditError(f"policy {path} cannot be read: {error.strerror}") from None
    try:
        rules = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise AuditError(f"policy {path} is not valid TOML: {error}") from None
    problems = []
    for name, value in rules.items():
        if name not in RULES:
            problems.append(f"unknown rule {name!r} (known rules: {', '.join(RULES)})")
            continue
        kind, what = RULES[name]
        bad = (
            not isinstance(value, kind)
            or (kind is int and (isinstance(value, bool) or value < 1))
            or (kind is list and not all(isinstance(v, str) for v in value))
        )
        if bad:
            problems.append(f"{name} = {value!r}: must be {what}")
    if problems:
        raise AuditError(f"policy {path}: " + "; ".join(problems))
    if "allowed_scripts" in rules:
        rules["allowed_scripts"] = [
            s if _HEX64.fullmatch(s) else str((path.parent / s).resolve()) for s in rules["allowed_scripts"]
        ]
    return Policy(str(path), hashlib.sha256(raw).hexdigest(), rules)


def check_launch(policy: Policy, facts: dict) -> list[str]:
    """Every violation that can be known before the workers start. `facts`: seed, plugins (names), world_size,
    key_bytes, script_path, script_sha256, git_dirty (None outside git)."""
    rules, violations = policy.rules, []
    # require_seed is the workers' to check: the seed is what the script gives mpnn, known only once it runs
    for name in rules.get("required_plugins", []):
        if name not in facts["plugins"]:
            violations.append(f"required_plugins: plugin {name!r} is not in the run (add --plugin {name})")
    if "max_world_size" in rules and facts["world_size"] > rules["max_world_size"]:
        violations.append(f"max_world_size: world size {facts['world_size']} is over {rules['max_world_size']}")
    if "min_key_bytes" in rules and facts["key_bytes"] < rules["min_key_bytes"]:
        violations.append(
            f"min_key_bytes: the audit key has {facts['key_bytes']} bytes, fewer than {rules['min_key_bytes']}"
        )
    if "allowed_scripts" in rules:
        allowed = rules["allowed_scripts"]
        sha = facts["script_sha256"]
        if facts["script_path"] not in allowed and (sha is None or sha.lower() not in {a.lower() for a in allowed}):
            violations.append(f"allowed_scripts: script {facts['script_path']} (sha256 {sha}) is not allowed")
    if rules.get("require_clean_git"):
        if facts["git_dirty"] is None:
            violations.append("require_clean_git: the script is not in a git repository")
        elif facts["git_dirty"]:
            violations.append("require_clean_git: the script's repository has uncommitted changes")
    return violations


def check_datasets(policy: Policy, shards: list[dict]) -> list[str]:
    """Violations of allowed_datasets by the shards every rank fingerprinted (dicts with rank, name,
    data_sha256)."""
    if "allowed_datasets" not in policy.rules:
        return []
    allowed = {a.lower() for a in policy.rules["allowed_datasets"]}
    refused: dict = {}  # (name, data_sha256) -> ranks
    for shard in shards:
        if shard["data_sha256"].lower() not in allowed and shard["name"].lower() not in allowed:
            refused.setdefault((shard["name"], shard["data_sha256"]), []).append(shard["rank"])
    return [
        f"allowed_datasets: {name} (data sha256 {sha}) on rank{'s' if len(ranks) > 1 else ''} "
        f"{', '.join(map(str, ranks))} is not allowed"
        for (name, sha), ranks in refused.items()
    ]
