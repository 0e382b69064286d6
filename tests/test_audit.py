"""The audit trail: every kind of tampering named by verify, the signed head against truncation, the key file's
rules, the policy (all violations at once, before any worker), provenance facts, the report and the CLI."""

import hashlib
import hmac
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from mpnn.plugins.audit import AuditError
from mpnn.plugins.audit.cli import audit
from mpnn.plugins.audit.keys import create_key, fingerprint, load_key
from mpnn.plugins.audit.plugin import AuditTrail
from mpnn.plugins.audit.policy import load_policy
from mpnn.plugins.audit.provenance import git_state, seed_from_args
from mpnn.plugins.audit.trail import AUDIT_FILE, HEAD_FILE, TrailWriter, canonical, verify
from mpnn.plugins.errors import PluginRefusal

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "leaky.py"


class FakeComm:
    """allgather_object/broadcast_object of a world of two, rank 1's shard told apart by its indices hash."""

    def __init__(self, rank=0, verdict_from_rank0=None):
        self.rank, self.verdict = rank, verdict_from_rank0

    def allgather_object(self, obj):
        other = {**obj, "rank": 1 - obj["rank"], "indices_sha256": "b" * 64}
        return [obj, other] if obj["rank"] == 0 else [other, obj]

    def broadcast_object(self, obj, root=0):
        return obj if self.rank == root else self.verdict


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "audit.key"
    create_key(path)
    return path


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "runs" / "run-1"
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"run_id": "run-1", "config": {"nproc_per_node": 2}}))
    return path


def launch_info(run_dir, key, specs=None, args=("--steps", "10", "--seed", "7"), world_size=2):
    specs = specs if specs is not None else [f"audit:key={key}", "watchdog"]
    return types.SimpleNamespace(
        run_id=run_dir.name,
        run_dir=run_dir,
        nprocs=world_size,
        nnodes=1,
        node_rank=0,
        world_size=world_size,
        script=SCRIPT,
        script_args=list(args),
        argv=["mpnn", "launch", "-n", str(world_size), str(SCRIPT), *args],
        plugin_specs=specs,
        env={"MPNN_RUN_ID": run_dir.name},
        seed=None,
    )


def run_info(run_dir, rank=0, comm=None):
    return types.SimpleNamespace(
        rank=rank,
        world_size=2,
        local_rank=rank,
        run_id=run_dir.name,
        run_dir=run_dir,
        comm=comm or FakeComm(rank),
        recorder=None,
        config={},
    )


def full_run(run_dir, key, epochs=3):
    """A whole run through the hooks: launcher start, rank 0's records, launcher end. Returns the record count."""
    launcher = AuditTrail(key=str(key))
    launch = launch_info(run_dir, key)
    launcher.mpnn_launch_start(launch)
    worker, run = AuditTrail(key=str(key)), run_info(run_dir)
    worker.mpnn_run_start(run)
    worker.mpnn_data_fingerprint(run, "TensorDataset", "a" * 64, "c" * 64, 5000)
    for epoch in range(epochs):
        worker.mpnn_epoch_end(run, epoch, {"loss_mean": 1.0 / (epoch + 1), "steps": 40})
    worker.mpnn_checkpoint_saved(run, str(run_dir / "checkpoints" / "last.mpnn"), "d" * 64, 120)
    worker.mpnn_run_end(run, "ok")
    launcher.mpnn_launch_end(launch, "ok", {0: 0, 1: 0}, None)
    return len(lines(run_dir))


def lines(run_dir):
    return (run_dir / AUDIT_FILE).read_bytes().splitlines()


def write_lines(run_dir, new_lines):
    (run_dir / AUDIT_FILE).write_bytes(b"".join(line + b"\n" for line in new_lines))


def check(run_dir, key):
    return verify(run_dir, load_key(key, create=False))


# ----- an intact trail ---------------------------------------------------------------------------
def test_intact_trail_verifies_and_each_record_is_chained_and_signed(run_dir, key):
    n = full_run(run_dir, key)
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    assert verdict.message.startswith(f"intact: {n} records")
    secret = key.read_bytes()
    prev = "0" * 64
    kinds = []
    for seq, line in enumerate(lines(run_dir)):  # recomputed here with hashlib/hmac, not the module's helpers
        record = json.loads(line)
        body = {k: v for k, v in record.items() if k != "hmac"}
        mac = hmac.new(secret, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256)
        assert record["seq"] == seq and record["prev"] == prev and record["hmac"] == mac.hexdigest()
        assert record["key"] == hashlib.sha256(secret).hexdigest()[:16]
        prev = hashlib.sha256(line).hexdigest()
        kinds.append(record["kind"])
    assert kinds == [
        "run_start",
        "plugins",
        "workers_start",
        "dataset",
        "epoch",
        "epoch",
        "epoch",
        "checkpoint",
        "workers_end",
        "run_end",
    ]
    head = json.loads((run_dir / HEAD_FILE).read_text())
    assert head["seq"] == n - 1 and head["hash"] == prev
    assert json.loads((run_dir / "run.json").read_text())["audit_head"] == head


def test_run_start_records_provenance(run_dir, key):
    full_run(run_dir, key)
    start = json.loads(lines(run_dir)[0])["data"]
    assert start["seed"] is None and start["world_size"] == 2 and start["run_id"] == "run-1"  # not read from argv
    assert start["code"]["sha256"] == hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    assert start["versions"]["numpy"] == __import__("numpy").__version__
    assert start["config"] == {"nproc_per_node": 2} and start["key_bytes"] == 32
    plugins = json.loads(lines(run_dir)[1])["data"]["plugins"]
    watchdog = next(p for p in plugins if p["name"] == "watchdog")
    from mpnn.plugins import watchdog as module

    assert watchdog["sha256"] == hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()
    assert watchdog["options"]["action"] == "warn" and watchdog["version"] == module.Watchdog.version
    dataset = json.loads(lines(run_dir)[3])["data"]
    assert [s["rank"] for s in dataset["shards"]] == [0, 1] and dataset["consistent"] is True


# ----- tampering ---------------------------------------------------------------------------------
def _edit(line, **changes):
    record = json.loads(line)
    for path, value in changes.items():
        target = record
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return canonical(record).encode()


def test_edited_field_is_named(run_dir, key):
    full_run(run_dir, key)
    rows = lines(run_dir)
    rows[5] = _edit(rows[5], data__metrics__loss_mean=0.01)
    write_lines(run_dir, rows)
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message == "record 5 was edited (hmac mismatch)" and verdict.bad_seq == 5


def test_reformatted_line_breaks_the_chain_at_the_next_record(run_dir, key):
    full_run(run_dir, key)
    rows = lines(run_dir)
    rows[4] = json.dumps(json.loads(rows[4]), indent=None).encode()  # same content, spaces added: HMAC still fine
    write_lines(run_dir, rows)
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message.startswith("record 4 was edited (its line no longer hashes")


def test_removed_record_is_named(run_dir, key):
    full_run(run_dir, key)
    rows = lines(run_dir)
    del rows[3]
    write_lines(run_dir, rows)
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message == "record 3 was removed (record 4 follows record 2)"


def test_reordered_records_are_named(run_dir, key):
    full_run(run_dir, key)
    rows = lines(run_dir)
    rows[4], rows[5] = rows[5], rows[4]
    write_lines(run_dir, rows)
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message.startswith("records were reordered: record 5 comes before record 4")


def test_inserted_forged_record_is_named(run_dir, key, tmp_path):
    full_run(run_dir, key)
    rows = lines(run_dir)
    forged = json.loads(rows[7])  # a checkpoint record that never happened, chained to record 6, signed with
    forged["data"]["sha256"] = "e" * 64  # another key (the forger does not hold the real one)
    forged["prev"] = hashlib.sha256(rows[6]).hexdigest()
    body = {k: v for k, v in forged.items() if k != "hmac"}
    forged["hmac"] = hmac.new(b"not the key", canonical(body).encode(), hashlib.sha256).hexdigest()
    rows.insert(7, canonical(forged).encode())
    write_lines(run_dir, rows)
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message.startswith("a forged record was inserted before record 7")


def test_forged_record_with_a_new_seq_is_named(run_dir, key):
    full_run(run_dir, key)
    rows = lines(run_dir)
    rows.insert(2, _edit(rows[1], seq=99))
    write_lines(run_dir, rows)
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message.startswith("a forged record was inserted after record 1")


def test_truncated_tail_is_caught_by_the_signed_head(run_dir, key):
    n = full_run(run_dir, key)
    write_lines(run_dir, lines(run_dir)[:-2])
    verdict = check(run_dir, key)
    assert not verdict.ok
    assert verdict.message == f"truncated after record {n - 3}: the signed head ends at record {n - 1}"


def test_truncation_is_caught_through_run_json_when_the_head_file_is_removed_too(run_dir, key):
    n = full_run(run_dir, key)
    write_lines(run_dir, lines(run_dir)[:-1])
    (run_dir / HEAD_FILE).unlink()
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message.startswith(f"truncated after record {n - 2}")


def test_trail_without_any_head_is_not_intact(run_dir, key):
    full_run(run_dir, key)
    (run_dir / HEAD_FILE).unlink()
    record = json.loads((run_dir / "run.json").read_text())
    del record["audit_head"]
    (run_dir / "run.json").write_text(json.dumps(record))
    verdict = check(run_dir, key)
    assert not verdict.ok and "no signed head" in verdict.message


def test_record_cut_mid_line_is_named(run_dir, key):
    n = full_run(run_dir, key)
    data = (run_dir / AUDIT_FILE).read_bytes()
    (run_dir / AUDIT_FILE).write_bytes(data[:-40])
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message.startswith(f"truncated after record {n - 2}: the next record is cut off")


def test_edited_head_and_records_appended_after_it_are_named(run_dir, key):
    full_run(run_dir, key)
    head = json.loads((run_dir / HEAD_FILE).read_text())
    head["seq"] += 1
    (run_dir / HEAD_FILE).write_text(json.dumps(head))
    assert check(run_dir, key).message == f"the signed head in {HEAD_FILE} was edited (hmac mismatch)"


def test_records_appended_after_the_head_are_named(run_dir, key):
    n = full_run(run_dir, key)
    TrailWriter(run_dir, key.read_bytes()).append("epoch", {"epoch": 9})  # even with the key: after the end
    verdict = check(run_dir, key)
    assert not verdict.ok and verdict.message.startswith(f"records {n}..{n} were appended after the signed head")


def test_wrong_key_is_named(run_dir, key, tmp_path):
    full_run(run_dir, key)
    other = tmp_path / "other.key"
    create_key(other)
    verdict = verify(run_dir, load_key(other))
    assert not verdict.ok and verdict.message.startswith(
        f"wrong key: no record verifies under key {fingerprint(other.read_bytes())}"
    )
    assert fingerprint(key.read_bytes()) in verdict.message


def test_writer_refuses_to_extend_a_tampered_trail(run_dir, key):
    full_run(run_dir, key)
    rows = lines(run_dir)
    rows[-1] = _edit(rows[-1], data__status="failed")
    write_lines(run_dir, rows)
    with pytest.raises(AuditError, match="last record does not verify"):
        TrailWriter(run_dir, key.read_bytes())


def test_restart_record_is_chained_between_start_and_end(run_dir, key):
    launcher, launch = AuditTrail(key=str(key)), launch_info(run_dir, key)
    launcher.mpnn_launch_start(launch)
    launcher.record_restart(launch, attempt=1, reason="rank 1 exited with code 137", ranks=[1])
    launcher.mpnn_launch_end(launch, "ok", {0: 0, 1: 0}, None)
    verdict = check(run_dir, key)
    assert verdict.ok and [r["kind"] for r in verdict.records] == ["run_start", "plugins", "restart", "run_end"]
    assert verdict.records[2]["data"] == {
        "attempt": 1,
        "reason": "rank 1 exited with code 137",
        "ranks": [1],
        "script_path": str(SCRIPT),
        "script_sha256": hashlib.sha256(SCRIPT.read_bytes()).hexdigest(),
    }


WORKER_ONLY = """
import os, sys
import numpy as np
import mpnn
from mpnn import nn
from mpnn.plugins.audit.plugin import AuditTrail
mpnn.init(plugins=[AuditTrail(key=sys.argv[1])])
model = nn.Linear(4, 2)
opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
x, y = mpnn.from_numpy(np.ones((8, 4), np.float32)), mpnn.from_numpy(np.zeros(8, np.int64))
for _ in range(5):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_without_a_launcher_rank_0_begins_and_closes_the_trail(tmp_path, key):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", WORKER_ONLY, str(key), "--seed", "4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MPNN_RUN_DIR": str(run_dir)},
    )
    assert done.returncode == 0, done.stderr
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    kinds = [r["kind"] for r in verdict.records]
    assert kinds == ["run_start", "plugins", "workers_start", "epoch", "workers_end", "run_end"]
    # the script never seeds mpnn: no seed is recorded, whatever its argv says (--seed 4)
    assert verdict.records[0]["data"]["seed"] is None and verdict.records[0]["data"]["started_by"] == "rank 0"
    assert verdict.records[1]["data"]["plugins"][0]["name"] == "audit"


# ----- the CLI and the report --------------------------------------------------------------------
def test_cli_verify_exit_codes(run_dir, key):
    full_run(run_dir, key)
    runner = CliRunner()
    ok = runner.invoke(audit, ["verify", str(run_dir), "--key", str(key)])
    assert ok.exit_code == 0 and "intact" in ok.output
    rows = lines(run_dir)
    rows[2] = _edit(rows[2], data__pid=1)
    write_lines(run_dir, rows)
    bad = runner.invoke(audit, ["verify", str(run_dir), "--key", str(key)])
    assert bad.exit_code == 1 and "FAILED: record 2 was edited (hmac mismatch)" in bad.output
    missing = runner.invoke(audit, ["verify", str(run_dir), "--key", str(run_dir.parent / "nope.key")])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_report_renders_the_key_facts_in_markdown_and_html(run_dir, key, tmp_path):
    full_run(run_dir, key)
    start = json.loads(lines(run_dir)[0])["data"]
    runner = CliRunner()
    md = runner.invoke(audit, ["report", str(run_dir), "--key", str(key)])
    assert md.exit_code == 0
    text = md.output
    for fact in (
        "# Audit report: run run-1",
        "Trail verified: intact",
        start["user"],
        start["host"],
        start["code"]["sha256"],
        "c" * 64,
        "a" * 64,
        "| audit |",
        "| watchdog |",
        "d" * 64,
        "| 2 | 0.333333 | 40 |",
        "**Seed:** none set by the script",
        "**World size:** 2",
        "**Status:** ok",
    ):
        assert fact in text, fact
    if start["code"]["git"]["commit"]:
        assert start["code"]["git"]["commit"] in text
    out = tmp_path / "report.html"
    html = runner.invoke(audit, ["report", str(run_dir), "--key", str(key), "--format", "html", "-o", str(out)])
    assert html.exit_code == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "d" * 64 in page
    assert "<strong>Trail verified: intact.</strong>" in page


def test_report_of_a_tampered_trail_says_so(run_dir, key):
    full_run(run_dir, key)
    write_lines(run_dir, lines(run_dir)[:-1])
    md = CliRunner().invoke(audit, ["report", str(run_dir), "--key", str(key)])
    assert md.exit_code == 0 and "**Trail verification FAILED:** truncated after record" in md.output


# ----- the key file ------------------------------------------------------------------------------
def test_default_key_is_created_private_and_fingerprinted(tmp_path, monkeypatch, run_dir, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    AuditTrail().mpnn_launch_start(launch_info(run_dir, None, specs=[]))
    path = tmp_path / "home" / ".config" / "mpnn" / "audit.key"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert len(path.read_bytes()) == 32
    assert f"fingerprint {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}" in capsys.readouterr().err


def test_key_inside_the_run_dir_is_refused(run_dir):
    with pytest.raises(AuditError, match="inside the run directory"):
        load_key(run_dir / "audit.key", run_dir)
    assert not (run_dir / "audit.key").exists()


def test_key_readable_by_others_is_refused(key):
    key.chmod(0o644)
    with pytest.raises(AuditError, match="chmod 600"):
        load_key(key)
    key.chmod(0o640)
    with pytest.raises(AuditError, match="group or others"):
        load_key(key)


def test_launcher_with_a_bad_key_refuses_before_writing_anything(run_dir, key):
    key.chmod(0o644)
    launcher, launch = AuditTrail(key=str(key)), launch_info(run_dir, key)
    with pytest.raises(AuditError, match="chmod 600"):
        launcher.mpnn_launch_start(launch)
    launcher.mpnn_launch_end(launch, "failed", {}, "refused")  # the launcher still ends the launch: no-op
    assert not (run_dir / AUDIT_FILE).exists() and not (run_dir / HEAD_FILE).exists()


def test_missing_or_empty_key_is_refused(tmp_path):
    with pytest.raises(AuditError, match="does not exist"):
        load_key(tmp_path / "absent.key", create=False)
    empty = tmp_path / "empty.key"
    empty.touch(mode=0o600)
    with pytest.raises(AuditError, match="empty"):
        load_key(empty)


# ----- the policy --------------------------------------------------------------------------------
def test_policy_violations_are_listed_at_once_and_the_run_never_starts(run_dir, key, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'require_seed = true\nrequired_plugins = ["watchdog", "topk"]\nmax_world_size = 1\n'
        'min_key_bytes = 64\nallowed_scripts = ["launch/mnist1d.py"]\n'
    )
    plugin = AuditTrail(key=str(key), policy=str(policy))
    launch = launch_info(run_dir, key, specs=[f"audit:key={key}"], args=["--steps", "10"])
    with pytest.raises(PluginRefusal) as refused:
        plugin.mpnn_launch_start(launch)
    message = str(refused.value)
    assert refused.value.plugin == "audit" and "5 violation(s)" in message
    for expected in (  # require_seed is checked in the workers: the seed is what the script gives mpnn
        "plugin 'watchdog' is not in the run",
        "plugin 'topk' is not in the run",
        "world size 2 is over 1",
        "32 bytes, fewer than 64",
        f"script {SCRIPT}",
    ):
        assert expected in message, expected
    records = [json.loads(line) for line in lines(run_dir)]
    verdict = next(r for r in records if r["kind"] == "policy")["data"]
    assert verdict["verdict"] == "refused" and len(verdict["violations"]) == 5
    assert verdict["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
    assert records[-1]["kind"] == "run_end" and records[-1]["data"]["status"] == "refused"
    assert check(run_dir, key).ok  # the refused run's trail is closed and signed
    plugin.mpnn_launch_end(launch, "failed", {}, "refused")  # a launcher that still calls the end hook
    assert len(lines(run_dir)) == len(records)  # adds nothing after the refusal


def test_policy_that_passes_is_recorded_and_workers_judge_data_by_it(run_dir, key, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'require_seed = true\nmax_world_size = 8\nallowed_scripts = ["launch/leaky.py"]\n'
        f'allowed_datasets = ["{"c" * 64}"]\n'
    )
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "leaky.py").symlink_to(SCRIPT)
    AuditTrail(key=str(key), policy=str(policy)).mpnn_launch_start(launch_info(run_dir, key))
    worker, run = AuditTrail(key=str(key), policy=str(policy)), run_info(run_dir)
    worker.mpnn_run_start(run)
    worker.mpnn_seed(run, 7, "mpnn.manual_seed")  # require_seed: the script seeded before its first batch
    worker.mpnn_data_fingerprint(run, "TensorDataset", "a" * 64, "c" * 64, 100)
    with pytest.raises(PluginRefusal, match="allowed_datasets: TensorDataset \\(data sha256 f+\\) on ranks 0, 1"):
        worker.mpnn_data_fingerprint(run, "TensorDataset", "a" * 64, "f" * 64, 100)
    verdicts = [json.loads(line)["data"]["verdict"] for line in lines(run_dir) if json.loads(line)["kind"] == "policy"]
    assert verdicts == ["passed", "passed", "refused"]


def test_other_ranks_fail_on_rank_0s_data_verdict(run_dir, key):
    worker = AuditTrail(key=str(key))
    run = run_info(run_dir, rank=1, comm=FakeComm(rank=1, verdict_from_rank0=["allowed_datasets: nope"]))
    worker.mpnn_run_start(run)  # rank 1 writes nothing
    with pytest.raises(PluginRefusal, match="allowed_datasets: nope"):
        worker.mpnn_data_fingerprint(run, "TensorDataset", "a" * 64, "f" * 64, 100)
    assert not (run_dir / AUDIT_FILE).exists()


def test_bad_policy_file_lists_every_problem(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('max_world_size = "eight"\nrequire_seed = 1\nmax_worlds = 3\n')
    with pytest.raises(AuditError) as error:
        load_policy(policy)
    message = str(error.value)
    assert (
        "max_world_size = 'eight'" in message
        and "require_seed = 1" in message
        and "unknown rule 'max_worlds'" in message
    )


def test_example_policy_loads():
    policy = load_policy(ROOT / "launch" / "policy.example.toml")
    assert policy.rules["require_seed"] is True and "watchdog" in policy.rules["required_plugins"]


# ----- provenance --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, seed", [(["--seed", "3"], 3), (["--lr", "1", "--seed=5"], 5), (["--steps", "2"], None), (["--seed"], None)]
)
def test_seed_from_script_args(args, seed):
    assert seed_from_args(args) == seed


def test_git_state_commit_dirty_flag_and_diff_hash(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            capture_output=True,
            check=True,
        ).stdout

    git("init", "-q")
    script = tmp_path / "train.py"
    script.write_text("print(1)\n")
    git("add", "train.py")
    git("commit", "-q", "-m", "one")
    clean = git_state(script)
    assert clean["commit"] == git("rev-parse", "HEAD").decode().strip() and clean["dirty"] is False
    script.write_text("print(2)\n")
    dirty = git_state(script)
    assert dirty["dirty"] is True and dirty["changed_files"] == 1
    assert dirty["diff_sha256"] == hashlib.sha256(git("diff", "HEAD", "--no-ext-diff", "--binary")).hexdigest()
    assert dirty["diff_sha256"] != clean["diff_sha256"]
    assert git_state(Path(os.sep) / "nonexistent-dir" / "x.py")["commit"] is None


# ----- end to end through `mpnn launch` ----------------------------------------------------------
def _launch(tmp_path, specs, args):
    plugins = [arg for spec in specs for arg in ("--plugin", spec)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mpnn",
            "launch",
            "-n",
            "2",
            "--log-dir",
            str(tmp_path / "runs"),
            "--run-id",
            "e2e",
            *plugins,
            str(SCRIPT.relative_to(ROOT)),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


def test_launched_run_leaves_an_intact_trail(tmp_path, key):
    done = _launch(tmp_path, [f"audit:key={key}"], ["--steps", "30", "--leak-bytes", "0", "--seed", "3"])
    assert done.returncode == 0, done.stderr
    assert f"fingerprint {fingerprint(key.read_bytes())}" in done.stderr
    run_dir = tmp_path / "runs" / "e2e"
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    records = verdict.records
    assert [r["kind"] for r in records] == [
        "run_start",
        "plugins",
        "workers_start",
        "seed",
        "epoch",
        "workers_end",
        "run_end",
    ]
    assert records[3]["data"] == {"seed": 3, "from": "mpnn.manual_seed", "rank": 0}  # leaky.py's manual_seed
    assert records[0]["data"]["world_size"] == 2 and records[4]["data"]["metrics"]["steps"] == 30
    assert records[-1]["data"] == {"status": "ok", "exit_codes": {"0": 0, "1": 0}, "error": None}
    assert json.loads((run_dir / "run.json").read_text())["audit_head"] == json.loads((run_dir / HEAD_FILE).read_text())


def test_policy_violations_stop_a_launched_run_before_any_worker_starts(tmp_path, key):
    policy = tmp_path / "policy.toml"
    policy.write_text('require_seed = true\nrequired_plugins = ["watchdog"]\nmax_world_size = 1\n')
    done = _launch(tmp_path, [f"audit:key={key},policy={policy}"], ["--steps", "30"])
    assert done.returncode != 0
    for violation in (
        "2 violation(s)",  # require_seed is the workers' to check
        "plugin 'watchdog' is not in the run",
        "world size 2 is over 1",
    ):
        assert violation in done.stderr, violation
    run_dir = tmp_path / "runs" / "e2e"
    assert not list(run_dir.glob("worker-*"))  # no worker was started
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    assert [r["kind"] for r in verdict.records] == ["run_start", "plugins", "policy", "run_end"]
    assert verdict.records[2]["data"]["verdict"] == "refused"
