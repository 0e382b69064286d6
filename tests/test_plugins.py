"""The plugin architecture: spec strings, option conversion and the messages that list what is accepted, entry
point discovery and `mpnn plugins list`, hook dispatch that names a failing plugin, the launcher refusing bad
specs before any worker starts, launch hooks, and every worker-side hook seen from a real 2-worker run."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mpnn
from mpnn import nn
from mpnn.launch import WorkerError, run
from mpnn.plugins import Codec, Option, PluginError, PluginRefusal, hookimpl
from mpnn.plugins.cli import plugins as plugins_cli
from mpnn.plugins.manager import PluginManager
from mpnn.plugins.registry import convert_value, parse_spec, resolve, resolve_all

REPO = Path(__file__).resolve().parents[1]


# ----- plugins the tests use (importable by workers as test_plugins:<Class>) --------------------------------
class Journal:
    """Write every worker-side hook call to journal-<rank>.json in the run dir at run end."""

    name = "journal"
    version = "0.1"
    options = {"tag": Option(str, "", "a label")}

    def __init__(self, tag=""):
        self.calls = []

    @hookimpl
    def mpnn_run_start(self, run):
        self.calls.append(
            [
                "run_start",
                run.rank,
                run.world_size,
                str(run.run_dir),
                run.recorder is not None,
                run.config["plugin_specs"],
            ]
        )

    @hookimpl
    def mpnn_step_end(self, run, record):
        self.calls.append(
            [
                "step_end",
                {
                    k: record.get(k)
                    for k in ("rank", "step", "loss", "bytes_sent", "rss_bytes", "codec_bytes", "codec_ratio")
                },
            ]
        )

    @hookimpl
    def mpnn_epoch_end(self, run, epoch, metrics):
        self.calls.append(["epoch_end", epoch, metrics])

    @hookimpl
    def mpnn_run_end(self, run, status):
        self.calls.append(["run_end", status])
        (run.run_dir / f"journal-{run.rank}.json").write_text(json.dumps(self.calls))


class Boom:
    """Raise in mpnn_step_end at step `at` on rank `rank`."""

    name = "boom"
    version = "0.1"
    options = {"at": Option(int, 3, "step"), "rank": Option(int, 1, "rank that raises")}

    def __init__(self, at=3, rank=1):
        self.at, self.rank = at, rank

    @hookimpl
    def mpnn_step_end(self, run, record):
        if run.rank == self.rank and record["step"] == self.at:
            raise RuntimeError(f"boom at step {self.at}")


class Gatekeeper:
    """Refuse runs wider than `max_world`; write what the launch hooks saw to launch.json in the run dir."""

    name = "gatekeeper"
    version = "0.1"
    options = {"max_world": Option(int, 8, "largest world allowed")}

    def __init__(self, max_world=8):
        self.max_world = max_world

    @hookimpl
    def mpnn_launch_start(self, launch):
        if launch.world_size > self.max_world:
            raise PluginRefusal(f"world size {launch.world_size} is over {self.max_world}")
        (launch.run_dir / "launch.json").write_text(
            json.dumps(
                {
                    "world_size": launch.world_size,
                    "script": launch.script.name,
                    "args": launch.script_args,
                    "specs": launch.plugin_specs,
                    "env_run_dir": launch.env["MPNN_RUN_DIR"],
                    "rank_in_env": "MPNN_RANK" in launch.env,
                }
            )
        )

    @hookimpl
    def mpnn_launch_end(self, launch, status, exit_codes, error):
        with open(launch.run_dir / "launch.json") as f:
            seen = json.load(f)
        seen.update(status=status, exit_codes={str(k): v for k, v in exit_codes.items()}, error=error)
        (launch.run_dir / "launch.json").write_text(json.dumps(seen))


class Observer:
    """Record the order of calls."""

    version = "0.1"
    options = {}

    def __init__(self, name, log, fail=None):
        self.name, self.log, self.fail = name, log, fail

    @hookimpl
    def mpnn_step_end(self, run, record):
        self.log.append(self.name)
        if self.fail is not None:
            raise self.fail


class TwoCodec(Codec):
    """A second codec class, to be refused next to topk."""

    name = "twocodec"


# ----- spec strings and options ------------------------------------------------------------------------
def test_parse_spec_forms():
    assert parse_spec("topk").target == "topk"
    spec = parse_spec(" topk:ratio=0.05,error_feedback=no ")
    assert (spec.target, spec.options) == ("topk", (("ratio", "0.05"), ("error_feedback", "no")))
    spec = parse_spec("pkg.mod:MyPlugin:path=/a:b,eq=x=y")
    assert spec.target == "pkg.mod:MyPlugin"
    assert spec.options == (("path", "/a:b"), ("eq", "x=y"))
    assert parse_spec("plainmod:Thing").target == "plainmod:Thing"


@pytest.mark.parametrize(
    "spec,needles",
    [
        ("topkk:ratio=0.1", ["no plugin named 'topkk'", "did you mean 'topk'", "fp16", "powersgd", "signsgd"]),
        (
            "topk:ratoi=0.1",
            ["no option 'ratoi'", "did you mean 'ratio'", "ratio=<float> (default 0.01)", "error_feedback=<bool>"],
        ),
        ("topk:ratio=lots", ["ratio='lots'", "must be a float", "accepted options"]),
        ("powersgd:rank=1.5", ["rank='1.5'", "must be an int"]),
        ("signsgd:error_feedback=maybe", ["must be a bool"]),
        ("topk:ratio", ["option 'ratio' is not key=value"]),
        ("topk:ratio=0.1,ratio=0.2", ["'ratio' is given twice"]),
        ("topk:ratio=3", ["topk refused its options", "ratio must be in (0, 1]"]),
        ("fp16:scale=2", ["no option 'scale'", "fp16 takes no options"]),
        ("no_such_module_xyz:Plugin", ["no_such_module_xyz:Plugin cannot be loaded", "ModuleNotFoundError"]),
        ("test_plugins:Observer", ["is not an mpnn plugin", "name"]),
    ],
)
def test_bad_specs_name_the_problem_and_what_is_accepted(spec, needles):
    with pytest.raises(PluginError) as info:
        resolve(spec).create()
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_option_values_convert_to_their_declared_types():
    assert (
        resolve("topk:ratio=0.25,error_feedback=off").create().__dict__.items()
        >= {"ratio": 0.25, "error_feedback": False}.items()
    )
    assert resolve("powersgd:rank=4").options == {"rank": 4}
    words = ("1", "True", "yes", "on", "0", "FALSE", "no", "off")
    assert [convert_value(bool, v) for v in words] == [True] * 4 + [False] * 4
    assert convert_value(("warn", "abort"), "abort") == "abort"
    with pytest.raises(ValueError, match="one of 'warn', 'abort'"):
        convert_value(("warn", "abort"), "stop")
    with pytest.raises(ValueError, match="an int"):
        convert_value(int, "1e3")


def test_two_codecs_and_a_repeated_plugin_are_refused():
    with pytest.raises(PluginError, match=r"two gradient codecs named \('topk', 'powersgd'\)"):
        resolve_all(["topk", "powersgd:rank=1"])
    with pytest.raises(PluginError, match="'journal' is named twice"):
        resolve_all(["test_plugins:Journal", "test_plugins:Journal:tag=b"])
    with pytest.raises(PluginError, match="two gradient codecs"):
        PluginManager([resolve("topk").create(), TwoCodec()])


# ----- entry points and `mpnn plugins list` ------------------------------------------------------------
@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution 'acme-plugins 2.5' on sys.path whose entry point 'acme' is acme_plugin:Acme."""
    (tmp_path / "acme_plugin.py").write_text(
        textwrap.dedent('''
        from mpnn.plugins import Option, hookimpl
        class Acme:
            """Count steps, loudly."""
            name, version = "acme", "2.5"
            options = {"level": Option(int, 1, "how loud"), "mode": Option(("a", "b"), "a", "which")}
            def __init__(self, level=1, mode="a"):
                self.level, self.mode = level, mode
    ''')
    )
    dist = tmp_path / "acme_plugins-2.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugins\nVersion: 2.5\n")
    (dist / "entry_points.txt").write_text("[mpnn.plugins]\nacme = acme_plugin:Acme\nbroken = acme_missing:Nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_point_plugins_are_found_by_name(installed_plugin):
    plugin = resolve("acme:level=3,mode=b").create()
    assert (plugin.level, plugin.mode) == (3, "b")
    assert "acme-plugins 2.5" in resolve("acme").source
    with pytest.raises(PluginError, match="mode='c'.*must be one of 'a', 'b'"):
        resolve("acme:mode=c")
    with pytest.raises(PluginError, match="entry point acme_missing:Nope cannot be loaded"):
        resolve("broken")


def test_plugins_list_shows_every_plugin_with_options_and_help(installed_plugin):
    result = CliRunner().invoke(plugins_cli, ["list", "--json"])
    assert result.exit_code == 0, result.output
    found = {p["name"]: p for p in json.loads(result.output)}
    assert {"fp16", "topk", "powersgd", "signsgd", "acme", "broken"} <= set(found)
    assert found["topk"]["help"].startswith("Send only the largest")
    assert {
        "name": "ratio",
        "type": "float",
        "default": 0.01,
        "help": "fraction of each bucket's entries sent per step, in (0, 1]",
    } in found["topk"]["options"]
    assert found["acme"]["version"] == "2.5" and found["acme"]["help"] == "Count steps, loudly."
    assert [o["type"] for o in found["acme"]["options"]] == ["int", "a|b"]
    assert "ModuleNotFoundError" in found["broken"]["error"]
    text = CliRunner().invoke(plugins_cli, ["list"]).output
    assert "acme 2.5" in text and "level=<int>  default 1  how loud" in text
    assert "broken  (entry point acme_missing:Nope" in text and "cannot be loaded" in text


# ----- hook dispatch ------------------------------------------------------------------------------------
def test_hooks_run_last_registered_first_and_a_raise_names_the_plugin():
    log = []
    manager = PluginManager([Observer("first", log), Observer("second", log)])
    manager.hook.mpnn_step_end(run=None, record={})
    assert log == ["second", "first"]  # pluggy's order: last registered first
    assert manager.implements("mpnn_step_end") and not manager.implements("mpnn_run_start")
    failing = PluginManager([Observer("quiet", []), Observer("loud", [], fail=KeyError("rss_bytes"))])
    with pytest.raises(PluginError, match=r"plugin 'loud' failed in mpnn_step_end: KeyError: 'rss_bytes'") as info:
        failing.hook.mpnn_step_end(run=None, record={})
    assert info.value.plugin == "loud"
    refusing = PluginManager([Observer("policy", [], fail=PluginRefusal("no seed"))])
    with pytest.raises(PluginRefusal, match="plugin 'policy' refused the run: no seed"):
        refusing.hook.mpnn_step_end(run=None, record={})


def test_unmarked_or_unknown_hook_methods_are_refused():
    class Unmarked:
        """Forgot @hookimpl."""

        name, version, options = "unmarked", "1", {}

        def mpnn_step_end(self, run, record):
            pass

    class Typo:
        """Misspelt hook."""

        name, version, options = "typo", "1", {}

        @hookimpl
        def mpnn_step_ends(self, run, record):
            pass

    class WrongArgs:
        """Asks for an argument the hook does not have."""

        name, version, options = "wrongargs", "1", {}

        @hookimpl
        def mpnn_step_end(self, run, record, model):
            pass

    with pytest.raises(PluginError, match="unmarked.*mpnn_step_end is not marked @hookimpl"):
        PluginManager([Unmarked()])
    with pytest.raises(PluginError, match="'typo' cannot be registered.*mpnn_step_ends"):
        PluginManager([Typo()])
    with pytest.raises(PluginError, match="'wrongargs' cannot be registered.*model"):
        PluginManager([WrongArgs()])


# ----- the launcher refuses before any worker starts ----------------------------------------------------
def _launch(tmp_path, *args, pythonpath=()):
    script = tmp_path / "train.py"
    script.write_text("import pathlib, mpnn\nmpnn.init()\npathlib.Path(__file__).with_name('started').touch()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *map(str, pythonpath), env.get("PYTHONPATH", "")])
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mpnn.cli import main; main()",
            "launch",
            "-n",
            "2",
            "--log-dir",
            str(tmp_path / "runs"),
            *args,
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return proc, time.monotonic() - t0


@pytest.mark.parametrize(
    "specs,needles",
    [
        (["topk:ratoi=0.1"], ["'ratoi'", "ratio=<float>", "error_feedback=<bool>"]),
        (["fp17"], ["no plugin named 'fp17'", "fp16"]),
        (["powersgd:rank=two"], ["rank='two'", "must be an int"]),
        (["topk", "signsgd"], ["two gradient codecs"]),
    ],
)
def test_bad_plugin_specs_stop_the_launch_before_any_worker(tmp_path, specs, needles):
    proc, elapsed = _launch(tmp_path, *[arg for spec in specs for arg in ("--plugin", spec)])
    assert proc.returncode != 0
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "started").exists() and not (tmp_path / "runs").exists()
    assert elapsed < 10


def test_a_launch_start_refusal_stops_the_run_and_launch_hooks_see_the_launch(tmp_path):
    tests_dir = Path(__file__).parent
    proc, _ = _launch(tmp_path, "--plugin", "test_plugins:Gatekeeper:max_world=1", pythonpath=[tests_dir])
    assert proc.returncode != 0
    assert "plugin 'gatekeeper' refused the run: world size 2 is over 1" in proc.stderr
    assert not (tmp_path / "started").exists()

    proc, _ = _launch(tmp_path, "--run-id", "ok", "--plugin", "test_plugins:Gatekeeper", pythonpath=[tests_dir])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "started").exists()
    seen = json.loads((tmp_path / "runs" / "ok" / "launch.json").read_text())
    assert seen == {
        "world_size": 2,
        "script": "train.py",
        "args": [],
        "specs": ["test_plugins:Gatekeeper"],
        "env_run_dir": str((tmp_path / "runs" / "ok").resolve()),
        "rank_in_env": False,
        "status": "ok",
        "exit_codes": {"0": 0, "1": 0},
        "error": None,
    }


# ----- worker side: a real 2-worker run ------------------------------------------------------------------
def _train(steps, extra_plugins=()):
    comm = mpnn.init(plugins=list(extra_plugins))
    mpnn.manual_seed(0)
    model = mpnn.DataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(comm.rank)
    for _ in range(steps):
        x = rng.standard_normal((8, 4)).astype(np.float32)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(mpnn.from_numpy(x)), mpnn.from_numpy((x[:, 0] > 0).astype(np.int64)))
        loss.backward()
        opt.step()
    return comm.rank


def test_worker_hooks_see_run_start_each_step_epoch_and_run_end(tmp_path):
    run(_train, n=2, args=(5,), log_dir=tmp_path, plugins=["test_plugins:Journal:tag=x", "topk:ratio=0.5"])
    run_dir = next(tmp_path.iterdir())
    for rank in (0, 1):
        calls = json.loads((run_dir / f"journal-{rank}.json").read_text())
        assert calls[0] == ["run_start", rank, 2, str(run_dir), True, ["test_plugins:Journal:tag=x", "topk:ratio=0.5"]]
        steps = [c[1] for c in calls if c[0] == "step_end"]
        assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
        assert all(s["rank"] == rank and s["loss"] > 0 and s["rss_bytes"] > 0 and s["bytes_sent"] > 0 for s in steps)
        # the topk codec's wire bytes: 8 bytes per sent entry, half of the 58 gradients
        assert all(s["codec_bytes"] == 8 * 29 and s["codec_ratio"] == round(4 * 58 / (8 * 29), 3) for s in steps)
        epoch_end = [c for c in calls if c[0] == "epoch_end"]
        assert len(epoch_end) == 1 and epoch_end[0][2]["steps"] == 5
        assert epoch_end[0][2]["loss_mean"] == pytest.approx(np.mean([s["loss"] for s in steps]))
        assert calls[-1] == ["run_end", "ok"]
        lines = [json.loads(line) for line in (run_dir / f"worker-{rank}.jsonl").read_text().splitlines()]
        assert [line["codec_bytes"] for line in lines if "step" in line] == [8 * 29] * 5


def test_a_plugin_raising_in_a_hook_fails_the_run_naming_it(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run(_train, n=2, args=(20,), log_dir=tmp_path, plugins=["test_plugins:Boom:at=3,rank=1"])
    assert info.value.rank == 1
    assert "PluginError: plugin 'boom' failed in mpnn_step_end: RuntimeError: boom at step 3" in str(info.value)
    assert time.monotonic() - t0 < 30
    run_dir = next(tmp_path.iterdir())
    error_events = [
        json.loads(line) for line in (run_dir / "worker-1.jsonl").read_text().splitlines() if '"event":"error"' in line
    ]
    assert error_events and "plugin 'boom'" in error_events[0]["message"]


def test_plugin_objects_passed_in_code_join_the_launchers_and_are_checked():
    with pytest.raises(WorkerError, match="two gradient codecs named"):
        run(_train, n=1, args=(1, [TwoCodec()]), plugins=["topk"])


def test_epoch_end_fires_when_the_epoch_changes_between_steps_and_at_run_end():
    from mpnn.plugins.info import RunInfo
    from mpnn.plugins.session import PluginSession

    class EpochLog:
        """Log epoch ends and the run end."""

        name, version, options = "epochlog", "1", {}

        def __init__(self):
            self.calls = []

        @hookimpl
        def mpnn_epoch_end(self, run, epoch, metrics):
            self.calls.append(("epoch_end", epoch, metrics))

        @hookimpl
        def mpnn_run_end(self, run, status):
            self.calls.append(("run_end", status))

    log = EpochLog()
    session = PluginSession(PluginManager([log]), RunInfo(0, 1, 0, "r", None, None, None))
    records = []
    for epoch, losses in [(0, [3.0, 2.0, 1.0]), (1, [0.5, 0.25])]:
        session.set_epoch(None, epoch)  # what DistributedSampler.set_epoch reports
        for loss in losses:
            records.append({"step": len(records) + 1, "epoch": None, "loss": loss})
            session.step_end(records[-1])
    assert [r["epoch"] for r in records] == [0, 0, 0, 1, 1]
    assert log.calls == [("epoch_end", 0, {"steps": 3, "loss_mean": 2.0})]
    session.end("ok")
    session.end("ok")  # once only
    assert log.calls[1:] == [("epoch_end", 1, {"steps": 2, "loss_mean": 0.375}), ("run_end", "ok")]


def test_without_a_run_directory_plugins_still_see_each_step(tmp_path):
    """A plain `python train.py` (no launcher, no telemetry): mpnn_step_end gets a smaller record."""
    script = tmp_path / "plain.py"
    script.write_text(
        textwrap.dedent('''
        import json, sys
        import mpnn
        from mpnn.plugins import hookimpl

        class Steps:
            """Print what each step record holds."""
            name, version, options = "steps", "1", {}

            @hookimpl
            def mpnn_step_end(self, run, record):
                print(json.dumps([record["step"], record["rank"], record["rss_bytes"] > 0, record["step_s"] > 0]))

            @hookimpl
            def mpnn_run_end(self, run, status):
                print("run_end", status, run.run_dir, run.recorder)

        mpnn.init(plugins=[Steps()])
        w = mpnn.zeros(3, requires_grad=True)
        opt = mpnn.optim.SGD([w], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            (w * w).sum().backward()
            opt.step()
    ''')
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[1, 0, true, true]", "[2, 0, true, true]", "run_end ok None None"]


def test_a_plugin_raising_at_run_end_still_fails_the_process(tmp_path):
    script = tmp_path / "end.py"
    script.write_text(
        textwrap.dedent('''
        import mpnn
        from mpnn.plugins import hookimpl

        class Closer:
            """Fail while closing."""
            name, version, options = "closer", "1", {}

            @hookimpl
            def mpnn_run_end(self, run, status):
                raise OSError("disk full")

        mpnn.init(plugins=[Closer()])
        print("trained")
    ''')
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "trained\n"
    assert "plugin 'closer' failed in mpnn_run_end: OSError: disk full" in proc.stderr
