"""The trust chain from checkpoint to audit (issue 17): signed checkpoint manifests checked on resume and cross-checked
against the source run's trail, the policy and script hash checked again before every restart with each attempt's
real exit status, a trail bound to its run directory, the seed the script really used, and a trail closed by the
guardian after the launcher was killed."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mpnn.checkpoint.layout import MANIFEST
from mpnn.plugins.audit.cli import audit
from mpnn.plugins.audit.keys import create_key, load_key
from mpnn.plugins.audit.provenance import file_sha256
from mpnn.plugins.audit.trail import AUDIT_FILE, HEAD_FILE, verify
from test_audit import full_run
from test_launch import (
    launch_env,
    reap_leftovers,  # noqa: F401  (autouse: kills what a failed test left running)
    start_launcher,
    wait_for,
    write_script,
)

LEAKY = Path(__file__).resolve().parents[1] / "launch" / "leaky.py"


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "keys" / "audit.key"
    create_key(path)
    return path


def launch(tmp_path, args, run_id, timeout=90):
    proc, run_id = start_launcher(tmp_path, args, run_id=run_id)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, tmp_path / "runs" / run_id


def check(run_dir, key):
    return verify(run_dir, load_key(key, create=False))


def kinds(verdict):
    return [r["kind"] for r in verdict.records]


# ----- 4. the seed recorded is the one the script trained with ---------------------------------------------------
def test_seed_recorded_is_the_one_argparse_gave_the_script(tmp_path, key):
    """`--seed 1 --seed 7`: argparse trains with 7; the trail used to record 1 (the first --seed of argv)."""
    code, _, err, run_dir = launch(
        tmp_path,
        ["-n", "1", "--plugin", f"audit:key={key}", str(LEAKY), "--steps", "3", "--leak-bytes", "0"]
        + ["--seed", "1", "--seed", "7"],
        "seed",
    )
    assert code == 0, err
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    seeds = [r["data"] for r in verdict.records if r["kind"] == "seed"]
    assert seeds == [{"seed": 7, "from": "mpnn.manual_seed", "rank": 0}]
    assert verdict.records[0]["data"]["seed"] is None  # nothing guessed from argv at launch


SEEDED_BY_INIT = """
import sys
import mpnn
from mpnn.plugins.audit.plugin import AuditTrail
mpnn.init(plugins=[AuditTrail(key=sys.argv[1])], seed=11)
print(float(mpnn.randn(1).item()))
"""


def test_seed_given_to_init_is_recorded_and_used(tmp_path, key):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SEEDED_BY_INIT, str(key), "--seed", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**launch_env(), "MPNN_RUN_DIR": str(run_dir)},
    )
    assert done.returncode == 0, done.stderr
    import mpnn

    mpnn.manual_seed(11)
    assert float(done.stdout.split()[-1]) == pytest.approx(float(mpnn.randn(1).item()))
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    assert [r["data"] for r in verdict.records if r["kind"] == "seed"] == [{"seed": 11, "from": "mpnn.init", "rank": 0}]


# ----- 3. a trail is bound to its run ------------------------------------------------------------------------
def make_run(tmp_path, run_id):
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "config": {"nproc_per_node": 2}}))
    return run_dir


def test_trail_copied_from_another_run_fails_verify_naming_the_mismatch(tmp_path, key):
    first, second = make_run(tmp_path, "run-1"), make_run(tmp_path, "run-2")
    full_run(first, key)
    full_run(second, key)
    head = json.loads((first / HEAD_FILE).read_text())
    assert head["run_id"] == "run-1" and head["run_dir"] == str(first)
    for name in (AUDIT_FILE, HEAD_FILE, "run.json"):
        shutil.copy(first / name, second / name)
    verdict = check(second, key)
    assert not verdict.ok
    assert "run-1" in verdict.message and str(second) in verdict.message, verdict.message
    assert check(first, key).ok
    moved = tmp_path / "archive" / "run-1"
    shutil.copytree(first, moved)  # the same run kept elsewhere (an archive): still its own trail
    assert check(moved, key).ok, check(moved, key).message


# ----- 2. the policy and the script hash are checked again before every restart ---------------------------------
CHANGES_ITSELF = """
import os, sys, time
import mpnn
comm = mpnn.init()
attempt = int(os.environ.get("MPNN_RESTART_COUNT", "0"))
print("attempt", attempt, "running", flush=True)
if attempt == 0:
    if EDIT:
        with open(__file__, "a") as f:
            f.write("print('UNAPPROVED CODE RAN')\\n")
    sys.exit(3)
"""


def restart_run(tmp_path, key, edit):
    script = write_script(tmp_path, CHANGES_ITSELF.replace("EDIT", str(edit)), "train.py")
    approved = file_sha256(script)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'allowed_scripts = ["{approved}"]\n')
    code, out, err, run_dir = launch(
        tmp_path,
        ["-n", "1", "--max-restarts", "1", "--plugin", f"audit:key={key},policy={policy}", str(script)],
        "restart-edit" if edit else "restart-same",
    )
    return code, out + err, run_dir, approved, file_sha256(script)


def test_script_changed_before_a_restart_is_refused_by_the_policy(tmp_path, key):
    code, output, run_dir, approved, changed = restart_run(tmp_path, key, edit=True)
    assert approved != changed
    assert code != 0
    assert "UNAPPROVED CODE RAN" not in output and "attempt 1 running" not in output
    assert f"allowed_scripts: script {tmp_path / 'train.py'} (sha256 {changed}) is not allowed" in output
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    policies = [r["data"] for r in verdict.records if r["kind"] == "policy"]
    assert [(p["stage"], p["verdict"]) for p in policies] == [("launch", "passed"), ("restart 1", "refused")]
    attempt = next(r["data"] for r in verdict.records if r["kind"] == "attempt_end")
    assert attempt["attempt"] == 0 and attempt["exit_codes"] == {"0": 3} and attempt["script_sha256"] == approved
    assert next(r["data"] for r in verdict.records if r["kind"] == "workers_end") == {"status": "error", "exit_code": 3}


def test_each_attempt_is_recorded_with_its_hash_and_real_exit_status(tmp_path, key):
    code, output, run_dir, approved, now = restart_run(tmp_path, key, edit=False)
    assert code == 0 and approved == now and "attempt 1 running" in output, output
    verdict = check(run_dir, key)
    assert verdict.ok, verdict.message
    attempts = [r["data"] for r in verdict.records if r["kind"] == "attempt_end"]
    assert [(a["attempt"], a["exit_codes"], a["script_sha256"]) for a in attempts] == [
        (0, {"0": 3}, approved),
        (1, {"0": 0}, approved),
    ]
    ends = [r["data"]["status"] for r in verdict.records if r["kind"] == "workers_end"]
    assert ends == ["error", "ok"]
    restart = next(r["data"] for r in verdict.records if r["kind"] == "restart")
    assert restart["script_sha256"] == approved


# ----- 1. checkpoints: signed manifests checked on resume, cross-checked against the source trail -----------------
CHECKPOINTED = """
import sys
import numpy as np
import mpnn
from mpnn import nn
mpnn.init(seed=0)
model = nn.Linear(4, 2)
opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
ckpt = mpnn.Checkpointer(model, opt)
start = ckpt.restore()
print(f"start {start.step} {start.path}", flush=True)
x, y = mpnn.from_numpy(np.ones((8, 4), np.float32)), mpnn.from_numpy(np.zeros(8, np.int64))
for step in range(start.step + 1, 5):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    ckpt.step(step)
"""


def checkpointed_run(tmp_path, key, run_id, *flags):
    script = write_script(tmp_path, CHECKPOINTED, "ckpt.py")
    return launch(
        tmp_path,
        ["-n", "1", "--checkpoint-every", "2", "--plugin", f"audit:key={key}", *flags, str(script)],
        run_id,
    )


def tamper_weights(checkpoint, keep_signature):
    """What an adversary with write access does: edit the weights, then recompute every SHA-256 of the manifest
    (keeping the old signature, or dropping it)."""
    from mpnn.checkpoint.layout import _body_digest, file_sha256
    from mpnn.checkpoint.weights import load_safetensors, save_safetensors

    weights = load_safetensors(checkpoint / "model.safetensors")
    save_safetensors({k: np.asarray(v) + 1.0 for k, v in weights.items()}, checkpoint / "model.safetensors")
    body = json.loads((checkpoint / MANIFEST).read_text())
    del body["manifest_sha256"]
    if not keep_signature:
        del body["signature"]
    for name, entry in body["files"].items():
        entry.update(bytes=(checkpoint / name).stat().st_size, sha256=file_sha256(checkpoint / name))
    (checkpoint / MANIFEST).write_text(json.dumps({**body, "manifest_sha256": _body_digest(body)}, indent=1) + "\n")


@pytest.mark.parametrize(
    "keep_signature, why",
    [(True, "its manifest's signature does not verify"), (False, "its manifest is not signed")],
)
def test_checkpoint_with_edited_weights_and_recomputed_hashes_is_refused(tmp_path, key, keep_signature, why):
    code, _, err, source = checkpointed_run(tmp_path, key, "source")
    assert code == 0, err
    checkpoint = source / "checkpoints" / "step-00000004"
    tamper_weights(checkpoint, keep_signature)
    code, out, err, _ = checkpointed_run(tmp_path, key, "resumed", "--resume", str(source))
    assert code != 0 and "start 4" not in out
    assert f"ResumeError: Checkpointer.restore: {checkpoint}: {why}" in out + err, out + err


def test_resume_is_recorded_and_cross_checked_against_the_source_trail(tmp_path, key):
    code, _, err, source = checkpointed_run(tmp_path, key, "source")
    assert code == 0, err
    saved = [r["data"] for r in check(source, key).records if r["kind"] == "checkpoint"]
    code, out, err, resumed = checkpointed_run(tmp_path, key, "resumed", "--resume", str(source))
    assert code == 0 and "start 4" in out, err
    verdict = check(resumed, key)
    assert verdict.ok, verdict.message
    (resume,) = [r["data"] for r in verdict.records if r["kind"] == "resume"]
    assert resume["path"] == saved[-1]["path"] and resume["sha256"] == saved[-1]["sha256"]
    assert resume["source_run_id"] == "source" and resume["step"] == 4
    assert "resumed from" in verdict.message and "source" in verdict.message
    # the source run's trail no longer verifies: the resumed run's verify says so
    rows = (source / AUDIT_FILE).read_bytes().splitlines()
    index = next(i for i, line in enumerate(rows) if b'"kind":"checkpoint"' in line)
    rows[index] = rows[index].replace(b'"step":', b'"step":9')
    (source / AUDIT_FILE).write_bytes(b"".join(line + b"\n" for line in rows))
    verdict = check(resumed, key)
    assert not verdict.ok and "source run" in verdict.message and str(source) in verdict.message, verdict.message


def test_resume_at_another_world_size_checks_the_signature_and_records_the_source_world(tmp_path, key):
    code, _, err, source = checkpointed_run(tmp_path, key, "source")
    assert code == 0, err
    code, out, err, resumed = launch(
        tmp_path,
        ["-n", "2", "--checkpoint-every", "2", "--plugin", f"audit:key={key}", "--resume", str(source)]
        + [str(write_script(tmp_path, CHECKPOINTED, "ckpt.py"))],
        "resumed",
    )
    assert code == 0 and out.count("start 4") == 2, out + err
    verdict = check(resumed, key)
    assert verdict.ok, verdict.message
    records = [r["data"] for r in verdict.records if r["kind"] == "resume"]
    assert records and all(r["source_world_size"] == 1 and r["step"] == 4 and r["signed"] for r in records)
    checkpoint = source / "checkpoints" / "step-00000004"
    tamper_weights(checkpoint, keep_signature=True)  # and a forged one is refused at another world size too
    code, out, err, _ = launch(
        tmp_path,
        ["-n", "2", "--plugin", f"audit:key={key}", "--resume", str(source), str(tmp_path / "ckpt.py")],
        "forged",
    )
    assert code != 0 and "its manifest's signature does not verify" in out + err, out + err


def test_resume_that_the_source_trail_never_recorded_fails_verify(tmp_path, key):
    code, _, err, source = checkpointed_run(tmp_path, key, "source")
    assert code == 0, err
    code, _, err, resumed = checkpointed_run(tmp_path, key, "resumed", "--resume", str(source))
    assert code == 0, err
    (resume,) = [r for r in check(resumed, key).records if r["kind"] == "resume"]
    # A source trail of the same run id that never saved that checkpoint (e.g. a trail swapped in from elsewhere)
    other = tmp_path / "other"
    other.mkdir()
    code, _, err, elsewhere = launch(
        other, ["-n", "1", "--plugin", f"audit:key={key}", str(LEAKY), "--steps", "2", "--leak-bytes", "0"], "source"
    )
    assert code == 0, err
    for name in (AUDIT_FILE, HEAD_FILE, "run.json"):
        shutil.copy(elsewhere / name, source / name)
    verdict = check(resumed, key)
    assert not verdict.ok and f"record {resume['seq']}" in verdict.message, verdict.message
    assert "does not record" in verdict.message


# ----- 5. a killed launcher: the guardian closes the trail -----------------------------------------------------
SLEEPS = """
import time
import mpnn
mpnn.init()
print("ready", flush=True)
time.sleep(120)
"""


def test_sigkilled_launcher_leaves_a_trail_closed_as_incomplete_not_as_tampered(tmp_path, key):
    script = write_script(tmp_path, SLEEPS)
    proc, run_id = start_launcher(tmp_path, ["-n", "1", "--plugin", f"audit:key={key}", str(script)])
    run_dir = tmp_path / "runs" / run_id
    wait_for(lambda: (run_dir / "worker-0.log").exists() and "ready" in (run_dir / "worker-0.log").read_text(), 60)
    wait_for(lambda: b"workers_start" in (run_dir / AUDIT_FILE).read_bytes(), 20, "workers_start")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    wait_for(lambda: (run_dir / HEAD_FILE).exists(), 30, "the guardian's head")
    wait_for(lambda: json.loads((run_dir / "run.json").read_text())["status"] != "running", 10, "run.json closed")
    verdict = check(run_dir, key)
    assert not verdict.ok
    last = verdict.records[-1]
    assert last["kind"] == "run_end" and last["data"]["status"] == "abnormal"
    assert verdict.message.startswith(f"incomplete: launcher killed at record {last['seq']}"), verdict.message
    assert "no signed head" not in verdict.message
    result = CliRunner().invoke(audit, ["verify", str(run_dir), "--key", str(key)])
    assert result.exit_code == 2 and "incomplete: launcher killed" in result.output
    assert json.loads((run_dir / "run.json").read_text())["status"] == "killed"


def test_trail_without_a_head_and_without_an_abnormal_end_still_says_so(tmp_path, key):
    run_dir = make_run(tmp_path, "run-1")
    full_run(run_dir, key)
    (run_dir / HEAD_FILE).unlink()
    fields = json.loads((run_dir / "run.json").read_text())
    del fields["audit_head"]
    (run_dir / "run.json").write_text(json.dumps(fields))
    assert "no signed head" in check(run_dir, key).message


def test_require_seed_is_judged_by_the_seed_the_script_set(tmp_path, key):
    from mpnn.plugins.audit.plugin import AuditTrail
    from mpnn.plugins.errors import PluginRefusal
    from test_audit import launch_info, run_info

    run_dir = make_run(tmp_path, "run-1")
    policy = tmp_path / "policy.toml"
    policy.write_text("require_seed = true\n")
    # argv says --seed 7, which used to satisfy the rule at launch; the script never seeds mpnn
    AuditTrail(key=str(key), policy=str(policy)).mpnn_launch_start(launch_info(run_dir, key))
    worker, run = AuditTrail(key=str(key), policy=str(policy)), run_info(run_dir)
    worker.mpnn_run_start(run)
    with pytest.raises(PluginRefusal, match="require_seed: the script set no seed before its first batch"):
        worker.mpnn_data_fingerprint(run, "TensorDataset", "a" * 64, "c" * 64, 100)
    seeded = AuditTrail(key=str(key), policy=str(policy))
    seeded.mpnn_run_start(run)
    seeded.mpnn_seed(run, 7, "mpnn.manual_seed")
    seeded.mpnn_data_fingerprint(run, "TensorDataset", "a" * 64, "c" * 64, 100)
