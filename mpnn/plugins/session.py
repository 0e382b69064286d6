"""A worker's plugins for one run: built by mpnn.init() from MPNN_PLUGINS (';'-joined specs, set by the launcher)
and the plugin objects passed in code, and wired to the run: run start, each step's telemetry record, epoch
changes, the gradients after backward, checkpoints, an uncaught error, and the exit.

Nothing here runs per step unless some plugin implements a per-step hook: with no plugin there is no session.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mpnn.plugins import registry
from mpnn.plugins.errors import PluginError
from mpnn.plugins.info import RunInfo
from mpnn.plugins.manager import PluginManager
from mpnn.telemetry.recorder import _rss_reader
from mpnn.worldspec import current_world

SPEC_SEPARATOR = ";"
_current: PluginSession | None = None
_wired = False  # the process-wide listeners below are registered once and forward to the current session
_seed_source = "mpnn.manual_seed"  # what the next seed record names as its origin (mpnn.init(seed=) sets it)


def current() -> PluginSession | None:
    """This process's plugin session, or None when the run names no plugin."""
    return _current


def active_codec():
    """The run's gradient codec (DataParallel's default), or None."""
    return _current.codec if _current is not None else None


def start(comm, recorder, specs_text: str = "", objects=None) -> PluginSession | None:
    """Load the specs and objects, call mpnn_run_start and wire the other hooks; None when there is no plugin.

    A second call without objects keeps the running session; with objects it ends it ("ok") and starts anew."""
    global _current
    if _current is not None:
        if not objects:
            return _current
        _current.end("ok")
    specs = [s.strip() for s in specs_text.split(SPEC_SEPARATOR) if s.strip()]
    plugins = [r.create() for r in registry.resolve_all(specs)]
    plugins += [registry.resolve(obj).create() if isinstance(obj, str) else obj for obj in objects or ()]
    if not plugins:
        return None
    manager = PluginManager(plugins)
    world = current_world()
    run = RunInfo(
        rank=comm.rank,
        world_size=comm.world_size,
        local_rank=comm.local_rank,
        run_id=comm.run_id,
        run_dir=Path(world.run_dir) if world.run_dir else None,
        comm=comm,
        recorder=recorder,
        config=_config(specs, plugins),
    )
    _current = PluginSession(manager, run)
    _current.begin()
    warning = codec_on_one_host(_current.codec, comm)
    if warning is not None and comm.rank == 0:
        print(warning, file=sys.stderr, flush=True)
    return _current


def codec_on_one_host(codec, comm) -> str | None:
    """The start-up warning for a gradient codec in a world whose ranks all share this host's memory (the
    communicator uses its /dev/shm slots or mailboxes): nothing crosses a network there, so compression only adds
    work. Measured on the MNIST-1D CNN, 2 ranks on the 2-core machine (loaded): comm 0.13-0.19 ms a step
    uncompressed, 1.4-2.0 ms with topk:ratio=0.01 (step 1.3-3.1 ms vs 3.6-3.9 ms); fp16 0.25-0.28 ms."""
    if codec is None or comm.world_size < 2:
        return None
    shared = [name for name in ("mailbox", "shm") if name in comm.bytes_by_transport]
    if not shared:
        return None
    name = getattr(codec, "name", type(codec).__name__)
    return (
        f"mpnn: warning: the {name} codec compresses gradients, but all {comm.world_size} ranks are on this host and "
        f"the all-reduce goes through shared memory ({' and '.join(shared)}), which carries it uncompressed faster "
        f"(MNIST-1D CNN: 10x the comm time with topk); {name} pays off across hosts"
    )


@contextlib.contextmanager
def seed_source(source: str):
    """Seeds set inside this block are reported as coming from `source` (e.g. "mpnn.init")."""
    global _seed_source
    previous, _seed_source = _seed_source, source
    try:
        yield
    finally:
        _seed_source = previous


def _config(specs, plugins) -> dict:
    """What RunInfo.config holds: argv, the plugins, and the launcher's run.json "config" when there is one."""
    config = {
        "argv": list(sys.argv),
        "plugin_specs": specs,
        "plugins": [
            {"name": getattr(p, "name", type(p).__name__), "version": getattr(p, "version", None)} for p in plugins
        ],
    }
    world = current_world()
    if world.run_dir:
        from mpnn.telemetry.reader import record_name

        record = Path(world.run_dir) / record_name(world.node_rank)
        try:
            config["launch"] = json.loads(record.read_text()).get("config", {})
        except (OSError, ValueError):
            pass  # started by another launcher (torchrun, mpirun): no run.json
    return config


class PluginSession:
    """The plugins of this worker and the run they watch; the runtime and DataParallel call in here."""

    def __init__(self, manager: PluginManager, run: RunInfo):
        self.manager = manager
        self.run = run
        self.codec = manager.codec
        self.hook = manager.hook
        self.status = "ok"
        self._epoch = None  # the epoch DistributedSampler.set_epoch last announced
        self._steps_epoch = None  # the epoch of the steps counted below
        self._epoch_steps = 0
        self._epoch_loss = 0.0
        self._epoch_losses = 0
        self._ended = False
        self._previous_excepthook = None
        self._bare_steps = None  # without a recorder: [step count, perf_counter, bytes sent, bytes received]
        self._rss = None  # and its RSS reader

    def implements(self, hook_name: str) -> bool:
        """True when some plugin implements `hook_name`."""
        return self.manager.implements(hook_name)

    def begin(self) -> None:
        """mpnn_run_start, then the per-step wiring (only for hooks someone implements), the error hook, the exit."""
        self.hook.mpnn_run_start(run=self.run)
        if self.implements("mpnn_step_end") or self.implements("mpnn_epoch_end"):
            if self.run.recorder is not None:
                self.run.recorder.on_step = self.step_end
            else:
                comm = self.run.comm
                self._bare_steps = [0, time.perf_counter(), comm.bytes_sent, comm.bytes_recv]
                self._rss = _rss_reader()[0]
        _wire_once()
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        self._wrap_exit()
        atexit.register(self._at_exit)
        from mpnn.core.random import last_seed

        if last_seed() is not None:  # seeded before mpnn.init()
            self.seeded(last_seed())

    def _wrap_exit(self) -> None:
        """Have sys.exit(code) note its code, so that run end reports a script that exits non-zero as an error
        with that code (an atexit handler cannot see the code otherwise)."""
        original = getattr(sys.exit, "__wrapped__", sys.exit)

        def exit(status=None):
            code = status if isinstance(status, int) else (0 if status is None else 1)
            if code:
                self.status = "error"
                self.run.exit_code = code
            original(status)

        exit.__wrapped__ = original
        sys.exit = exit

    def seeded(self, seed: int) -> None:
        """The script seeded mpnn's generator: mpnn_seed."""
        self.hook.mpnn_seed(run=self.run, seed=int(seed), source=_seed_source)

    # ----- what the run reports ----------------------------------------------------------------------
    def step_end(self, record: dict) -> None:
        """After each optimizer step: close the epoch if it changed, then mpnn_step_end with the record."""
        if record.get("epoch") is None:
            record["epoch"] = self._epoch
        if self._epoch_steps and record["epoch"] != self._steps_epoch:
            self._close_epoch()
        self._steps_epoch = record["epoch"]
        self._epoch_steps += 1
        if record.get("loss") is not None:
            self._epoch_loss += record["loss"]
            self._epoch_losses += 1
        self.hook.mpnn_step_end(run=self.run, record=record)

    def set_epoch(self, sampler, epoch: int) -> None:
        """DistributedSampler.set_epoch was called: the steps from now on belong to `epoch`."""
        self._epoch = int(epoch)

    def first_pass(self, sampler, indices) -> None:
        """A DistributedSampler handed out its shard for the first time: mpnn_data_fingerprint with the
        SHA-256 of this rank's indices and of the dataset's arrays (only when some plugin wants it)."""
        if not self.implements("mpnn_data_fingerprint"):
            return
        dataset = sampler.dataset
        data_hash = hashlib.sha256()
        for array in getattr(dataset, "_arrays", None) or ():
            data_hash.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
        self.hook.mpnn_data_fingerprint(
            run=self.run,
            name=type(dataset).__name__,
            indices_sha256=hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest(),
            data_sha256=data_hash.hexdigest(),
            size=len(dataset),
        )

    def after_backward(self, named_grads: dict) -> None:
        """DataParallel averaged the gradients: mpnn_after_backward with {parameter name: gradient array}."""
        self.hook.mpnn_after_backward(run=self.run, named_grads=named_grads)

    def checkpoint_saved(self, path, sha256: str) -> None:
        """mpnn.save wrote a file: mpnn_checkpoint_saved with its digest and the optimizer step count."""
        step = self.run.recorder.step if self.run.recorder is not None else None
        self.hook.mpnn_checkpoint_saved(run=self.run, path=str(path), sha256=sha256, step=step)

    def error(self, error: BaseException) -> None:
        """An uncaught exception is ending this worker: mpnn_error."""
        self.status = "error"
        self.hook.mpnn_error(run=self.run, error=error)

    def end(self, status: str) -> None:
        """The last epoch's mpnn_epoch_end, then mpnn_run_end (once)."""
        if self._ended:
            return
        self._ended = True
        try:
            if self._epoch_steps:
                self._close_epoch()
        finally:
            self.hook.mpnn_run_end(run=self.run, status=status)
            if self.run.recorder is not None and self.run.recorder.on_step == self.step_end:
                self.run.recorder.on_step = None
            if sys.excepthook == self._excepthook:
                sys.excepthook = self._previous_excepthook
            if getattr(sys.exit, "__wrapped__", None) is not None:
                sys.exit = sys.exit.__wrapped__
            atexit.unregister(self._at_exit)

    def bare_step_end(self) -> None:
        """After an optimizer step when there is no recorder (no run directory): a smaller record, same hooks."""
        if self._bare_steps is None:
            return
        comm, (step, start, sent, recv) = self.run.comm, self._bare_steps
        now, sent_now, recv_now = time.perf_counter(), comm.bytes_sent, comm.bytes_recv
        self._bare_steps = [step + 1, now, sent_now, recv_now]
        self.step_end(
            {
                "t": time.time(),
                "rank": comm.rank,
                "step": step + 1,
                "epoch": None,
                "loss": None,
                "batch": None,
                "step_s": now - start,
                "compute_s": None,
                "comm_s": None,
                "opt_s": None,
                "bytes_sent": sent_now - sent,
                "bytes_recv": recv_now - recv,
                "rss_bytes": self._rss(),
            }
        )

    def _close_epoch(self) -> None:
        metrics = {
            "steps": self._epoch_steps,
            "loss_mean": self._epoch_loss / self._epoch_losses if self._epoch_losses else None,
        }
        epoch = self._steps_epoch if self._steps_epoch is not None else 0
        self._epoch_steps, self._epoch_loss, self._epoch_losses = 0, 0.0, 0
        self.hook.mpnn_epoch_end(run=self.run, epoch=epoch, metrics=metrics)

    def _excepthook(self, exc_type, exc, tb):
        try:
            self.error(exc)
        except PluginError as failure:
            sys.stderr.write(f"mpnn: {failure}\n")
        finally:
            self._previous_excepthook(exc_type, exc, tb)

    def _at_exit(self) -> None:
        """At interpreter exit: end the session; a plugin failing there still fails the process (exit 1)."""
        try:
            self.end(self.status)
        except PluginError as failure:
            sys.stderr.write(f"mpnn: rank {self.run.rank}: {failure}\n")
            sys.stderr.flush()
            if self.run.recorder is not None:
                self.run.recorder.record_error(failure)
                self.run.recorder.close()
            os._exit(1)


def _wire_once() -> None:
    """Register this process's listeners once, through mpnn.hooks: optimizer steps (for runs without a recorder),
    the sampler's set_epoch and first pass, and mpnn.save; each forwards to the current session."""
    global _wired
    if _wired:
        return
    _wired = True
    from mpnn import hooks

    hooks.register_optimizer_step_hooks(post=lambda optimizer, args, kwargs: _current and _current.bare_step_end())
    hooks.register_sampler_hooks(
        set_epoch=lambda s, epoch: _current and _current.set_epoch(s, epoch),
        first_pass=lambda s, indices: _current and _current.first_pass(s, indices),
    )
    hooks.register_save_hook(lambda path, sha256: _current and _current.checkpoint_saved(path, sha256))
    hooks.register_seed_hook(lambda seed: _current and _current.seeded(seed))
