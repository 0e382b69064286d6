"""The TensorBoard plugin: a run's per-step figures as TensorBoard scalars, one TensorBoard run per rank.

    mpnn launch -n 2 --plugin tensorboard train.py                  # rank 0, every 10th step
    mpnn launch -n 2 --plugin tensorboard:every=1,ranks=all train.py
    tensorboard --logdir runs/<run-id>/tensorboard                  # rank0, rank1 side by side

It measures nothing itself: it writes the telemetry step record that every mpnn_step_end hook gets (the
recorder's loss, step time, compute/comm/optimizer/data times, bytes and RSS), the learning rate of the optimizer
that made the step, and every other number a plugin put into the record (the codec's codec_ratio and codec_bytes,
a watchdog's trend). Its step hook is a pluggy wrapper, so it runs after every other plugin's mpnn_step_end and
sees what they added. Tags:

    loss/train, lr, time/step_s, time/{compute,comm,optimizer,data}_s, share/{compute,comm,optimizer,data}
    (each time over step_s), bytes/{sent,recv}, memory/rss_bytes, memory/rss_slope_bytes_per_step (the watchdog's
    newest trend), codec/{ratio,bytes}, plugins/<key> (any other
    number in the record), and loss/epoch_mean at each epoch's end (its step is the epoch).

Event files go into <run_dir>/tensorboard/rank<r>/ (tensorboardX, pip install 'mpnn[tensorboard]'). Cost: about
50 us per scalar on the dev machine, so ~0.7 ms per written step; with the default every=10 that is ~70 us a step.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from mpnn._version import __version__
from mpnn.plugins.errors import PluginError
from mpnn.plugins.hookspec import hookimpl
from mpnn.plugins.options import Option

FOLDER = "tensorboard"
_TIMES = {"compute_s": "compute", "comm_s": "comm", "opt_s": "optimizer", "data_s": "data"}
_NAMED = {
    "loss": "loss/train",
    "step_s": "time/step_s",
    "bytes_sent": "bytes/sent",
    "bytes_recv": "bytes/recv",
    "rss_bytes": "memory/rss_bytes",
    "codec_ratio": "codec/ratio",
    "codec_bytes": "codec/bytes",
    "watchdog_rss_slope": "memory/rss_slope_bytes_per_step",
}
_NOT_FIGURES = {"t", "rank", "step", "epoch", "batch", "spans"}


def tag_of(key: str) -> str:
    """The scalar tag a step record's key is written under."""
    if key in _NAMED:
        return _NAMED[key]
    if key in _TIMES:
        return f"time/{_TIMES[key]}_s"
    return f"plugins/{key}"


class TensorBoard:
    """Write loss, learning rate, step time and shares, bytes, RSS and the plugins' figures as TensorBoard scalars."""

    name, version = "tensorboard", __version__
    options = {
        "every": Option(int, 10, "steps between writes (every step's scalars cost ~0.7 ms)"),
        "ranks": Option(("0", "all"), "0", "which ranks write: rank 0, or every rank (a TensorBoard run each)"),
    }

    def __init__(self, every: int = 10, ranks: str = "0", logdir=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise PluginError(f"tensorboard: option every={every!r} must be an integer >= 1", plugin=self.name)
        if ranks not in ("0", "all"):
            raise PluginError(f"tensorboard: option ranks={ranks!r} must be '0' or 'all'", plugin=self.name)
        self.every, self.ranks, self.logdir = every, ranks, logdir
        self.writer = None
        self.path: Path | None = None
        self._optimizer = None
        self._handle = None

    # ----- hooks -----
    @hookimpl
    def mpnn_run_start(self, run):
        if self.ranks == "0" and run.rank != 0:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise PluginError(
                "tensorboard: the tensorboard plugin needs tensorboardX: pip install 'mpnn[tensorboard]'",
                plugin=self.name,
            ) from None
        from mpnn import hooks

        base = Path(self.logdir) if self.logdir is not None else _base_dir(run)
        self.path = base / f"rank{run.rank}"
        self.path.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(logdir=str(self.path), flush_secs=10)
        self._handle = hooks.register_optimizer_step_hooks(pre=self._stepping)

    @hookimpl(wrapper=True)
    def mpnn_step_end(self, run, record):
        result = yield  # every other plugin's mpnn_step_end first: their figures are in the record now
        if self.writer is not None and record.get("step") is not None and record["step"] % self.every == 0:
            try:
                self._write(record)
            except Exception as error:  # a wrapper's errors are not named by the manager: name the plugin here
                raise PluginError(
                    f"plugin 'tensorboard' failed in mpnn_step_end: {type(error).__name__}: {error}", plugin=self.name
                ) from error
        return result

    @hookimpl
    def mpnn_epoch_end(self, run, epoch, metrics):
        if self.writer is not None and metrics.get("loss_mean") is not None:
            self.writer.add_scalar("loss/epoch_mean", float(metrics["loss_mean"]), int(epoch))

    @hookimpl
    def mpnn_run_end(self, run, status):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ----- writing -----
    def _stepping(self, optimizer, args, kwargs):
        self._optimizer = optimizer  # its learning rate is read at step end, before a schedule moves it

    def _write(self, record: dict) -> None:
        step, add = int(record["step"]), self.writer.add_scalar
        if self._optimizer is not None and self._optimizer.param_groups:
            add("lr", float(self._optimizer.param_groups[0]["lr"]), step)
        step_s = record.get("step_s")
        for key, value in record.items():
            if key in _NOT_FIGURES or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            add(tag_of(key), float(value), step)
            if key in _TIMES and step_s:
                add(f"share/{_TIMES[key]}", float(value) / step_s, step)


def _base_dir(run) -> Path:
    """<run_dir>/tensorboard, or runs/<run id>/tensorboard for a run without a run directory."""
    if run.run_dir is not None:
        return Path(run.run_dir) / FOLDER
    return Path("runs") / (run.run_id or "local") / FOLDER
