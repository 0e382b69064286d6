"""The per-worker telemetry recorder: one JSON line per training step (times, loss, bytes, RSS, spans) and event
lines, buffered in memory and appended to <run_dir>/worker-<rank>.jsonl at least every flush_interval seconds.

Cost, measured on the 2-core dev machine with
`python -c "from mpnn.telemetry.recorder import measure_overhead; measure_overhead()"`: span() 0.7 us,
add_span() 0.25 us, step_end() after 6 spans 2.3 us (one pread of /proc/self/statm included) on the training
thread; turning a step into its JSON line costs about 14 us more (float formatting dominates), paid once per step
at flush time, not on the step path; no syscall per span, one write per flush.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path
from time import perf_counter

from mpnn import safefs

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_live_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _rss_reader():
    """(read, fd): read() cheaply returns this process's resident set size in bytes (None where unknown).

    Linux: one pread of /proc/self/statm on a kept-open descriptor fd (~0.5 us, vs ~4 us for open+read);
    elsewhere psutil when it is installed (fd None).
    """
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        try:
            import psutil
        except ImportError:
            return lambda: None, None
        process = psutil.Process()
        return lambda: process.memory_info().rss, None
    page = os.sysconf("SC_PAGE_SIZE")
    return lambda: int(os.pread(fd, 128, 0).split()[1]) * page, fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _to_float(loss):
    try:
        return float(loss)
    except (TypeError, ValueError):
        shape = getattr(loss, "shape", None)
        raise TypeError(
            f"telemetry set_loss: expected a float or a 0-d array, got {type(loss).__name__}"
            + (f" of shape {tuple(shape)}" if shape is not None else "")
        ) from None


class _Span:
    """Times the body of a `with` block on the perf_counter clock and hands it to the recorder as one span."""

    __slots__ = ("_recorder", "_lane", "_name", "_t0")

    def __init__(self, recorder: Recorder, lane: str, name: str):
        self._recorder, self._lane, self._name = recorder, lane, name

    def __enter__(self):
        self._t0 = perf_counter()
        return self

    def __exit__(self, *exc):
        self._recorder.add_span(self._lane, self._name, self._t0, perf_counter())
        return False


class Recorder:
    """Records one worker's steps and events into <run_dir>/worker-<rank>.jsonl.

    Spans, bytes and the loss accumulate until step_end() closes the step; spans are kept as perf_counter times
    and written as [lane, name, start offset from the step's start in s, duration in s]. A step's compute_s,
    comm_s, opt_s and data_s add up its "compute", "comm_wait" (training thread blocked on communication),
    "optimizer" and "data" spans; "comm" spans (work overlapped on a communication thread) are drawn in the
    trace but counted in no total. bytes_sent/bytes_recv are per step.

    Lines are buffered and written with one append per flush: at the first step_end after flush_interval
    seconds, by a daemon timer thread (so an idle or hung worker still flushes), on close() and at exit. An
    uncaught exception becomes an "error" event, flushed before the previous sys.excepthook runs. A file that
    cannot be written costs one warning on stderr and the lines, never the training run.
    """

    def __init__(self, run_dir, rank: int, world_size: int, flush_interval: float = 1.0):
        self.path = self.path_for(run_dir, rank)
        self.rank, self.world_size = int(rank), int(world_size)
        self.flush_interval = float(flush_interval)
        self.step = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = safefs.open_append(self.path, read=True)  # never through a symlink or into a foreign file
        self._end_torn_line()
        self._rss, self._rss_fd = _rss_reader()
        self._lock = threading.Lock()  # guards _spans, _sent, _recv, _metrics, _pending: from any thread
        self._write_lock = threading.Lock()  # keeps flushes in order
        self._unix0, self._perf0 = time.time(), perf_counter()
        self._step_start = self._perf0
        self._next_flush = self._perf0 + self.flush_interval
        self._spans: list = []
        self._sent = self._recv = 0
        self._metrics = None  # extra keys of the current step's line (add_metrics)
        self._loss = None
        self.on_step = None  # on_step(record dict) after each step_end: the plugins' mpnn_step_end
        self._pending: list = []
        self._failed = False
        self._warned = False
        self._closed = False
        self._stop = threading.Event()
        self._previous_hook = sys.excepthook
        self._hook = self._excepthook
        sys.excepthook = self._hook
        atexit.register(self.close)
        _live_recorders.add(self)
        self.event("start", world_size=self.world_size, pid=os.getpid(), host=socket.gethostname())
        self.flush()
        self._timer = threading.Thread(target=self._flush_periodically, name=f"mpnn-telemetry-{self.rank}", daemon=True)
        self._timer.start()

    @staticmethod
    def path_for(run_dir, rank: int) -> Path:
        """The telemetry file of `rank` in `run_dir`: worker-<rank>.jsonl."""
        return Path(run_dir) / f"worker-{int(rank)}.jsonl"

    @property
    def closed(self) -> bool:
        """True once close() ran (or in a forked child): nothing more is recorded."""
        return self._closed

    # ---- recording (training thread, communication threads) ----
    def span(self, lane: str, name: str) -> _Span:
        """Context manager timing its body as a span on `lane` (compute, comm, comm_wait, optimizer, data)."""
        return _Span(self, lane, name)

    def add_span(self, lane: str, name: str, t0: float, t1: float) -> None:
        """Record a span timed elsewhere with time.perf_counter() (thread-safe); it belongs to the next step_end."""
        with self._lock:
            self._spans.append((lane, name, t0, t1))

    def add_bytes(self, sent: int, recv: int) -> None:
        """Count bytes sent and received over the wire in this step (thread-safe)."""
        with self._lock:
            self._sent += sent
            self._recv += recv

    def add_metrics(self, **values) -> None:
        """Extra keys for the current step's line, e.g. a codec's codec_bytes (thread-safe; last value wins)."""
        with self._lock:
            self._metrics = {**(self._metrics or {}), **values}

    def set_loss(self, value) -> None:
        """This step's loss: a float, a 0-d array or a scalar Tensor, turned into a float at step_end."""
        self._loss = value

    def step_end(self, batch=None, epoch=None) -> None:
        """Close the step: its time since the previous step_end (or the start), its spans, bytes, loss and RSS."""
        if self._closed:
            return
        now = perf_counter()
        loss, self._loss = self._loss, None
        if loss is not None:
            loss = _to_float(loss)
        self.step += 1
        rss = self._rss()
        on_step = self.on_step
        with self._lock:
            spans, self._spans = self._spans, []
            sent, recv = self._sent, self._recv
            metrics, self._metrics = self._metrics, None
            self._sent = self._recv = 0
            entry = (self._step_start, now, self.step, epoch, loss, batch, sent, recv, rss, spans, metrics)
            if on_step is None:
                self._pending.append(entry)
        self._step_start = now
        if on_step is not None:  # the plugins see (and may add keys to) the dict that becomes the line
            record = self._record(entry)
            try:
                on_step(record)
            finally:
                with self._lock:
                    self._pending.append(record)
        if now >= self._next_flush:
            self.flush()

    def event(self, name: str, /, **details) -> None:
        """Record an event line {"t", "rank", "event": name, **details} (start, end, error, restart, plugin, ...)."""
        if self._closed:
            return
        for key in ("t", "rank"):
            if key in details:
                raise ValueError(f"telemetry event {name!r}: detail key {key!r} is reserved")
        record = {"t": self._unix(perf_counter()), "rank": self.rank, "event": name, **details}
        with self._lock:
            self._pending.append(record)

    def record_error(self, exc: BaseException) -> None:
        """Record an "error" event with the exception's type, message and traceback text, and flush at once."""
        self._failed = True
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.event("error", type=type(exc).__name__, message=str(exc), traceback=text)
        self.flush()

    # ---- writing ----
    def flush(self) -> None:
        """Write every buffered line with one append; safe from any thread."""
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, []
                self._next_flush = perf_counter() + self.flush_interval
            if pending and self._fd is not None:
                try:
                    _write_all(self._fd, "".join(self._line(r) + "\n" for r in pending).encode())
                except OSError as error:
                    self._warn_once(f"cannot write {self.path}: {error.strerror}; telemetry lines dropped")

    def close(self) -> None:
        """Write the "end" event and everything buffered, stop the timer, restore sys.excepthook. Idempotent."""
        if self._closed:
            return
        self.event("end", steps=self.step, status="error" if self._failed else "ok")
        self._closed = True
        self._stop.set()
        if self._timer is not threading.current_thread():
            self._timer.join()
        self.flush()
        with self._write_lock:
            os.close(self._fd)
            self._fd = None
        if self._rss_fd is not None:
            os.close(self._rss_fd)
            self._rss_fd = None
        if sys.excepthook is self._hook:
            sys.excepthook = self._previous_hook
        atexit.unregister(self.close)

    def _line(self, record) -> str:
        return _encode(record if isinstance(record, dict) else self._record(record))

    def _record(self, entry) -> dict:
        """A step entry as the dict of its telemetry line."""
        step_start, step_end, step, epoch, loss, batch, sent, recv, rss, spans, metrics = entry
        compute = comm_wait = optimizer = data = 0.0
        out = []
        for lane, name, t0, t1 in spans:
            duration = t1 - t0
            if lane == "compute":
                compute += duration
            elif lane == "comm_wait":
                comm_wait += duration
            elif lane == "optimizer":
                optimizer += duration
            elif lane == "data":
                data += duration
            out.append([lane, name, round(t0 - step_start, 7), round(duration, 7)])
        record = {
            "t": self._unix(step_end),
            "rank": self.rank,
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "batch": batch,
            "step_s": round(step_end - step_start, 7),
            "compute_s": round(compute, 7),
            "comm_s": round(comm_wait, 7),
            "opt_s": round(optimizer, 7),
            "data_s": round(data, 7),
            "bytes_sent": sent,
            "bytes_recv": recv,
            "rss_bytes": rss,
            "spans": out,
        }
        if metrics:
            record.update(metrics)
        return record

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            sys.stderr.write(f"mpnn telemetry: rank {self.rank}: {message}\n")

    def _unix(self, perf: float) -> float:
        return round(self._unix0 + (perf - self._perf0), 6)

    def _end_torn_line(self) -> None:
        """If an earlier process died mid-line in this file, end that line so ours start on a fresh one."""
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            _write_all(self._fd, b"\n")

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush()

    def _excepthook(self, exc_type, exc, tb):
        try:
            if not self._closed:
                self.record_error(exc)
        finally:
            self._previous_hook(exc_type, exc, tb)

    def _disown(self) -> None:
        """In a forked child: drop the parent's buffer and file, so nothing is written twice or under its rank."""
        self._pending, self._spans, self._fd, self._closed = [], [], None, True
        atexit.unregister(self.close)


def _disown_all_in_child() -> None:
    for recorder in list(_live_recorders):
        recorder._disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_all_in_child)


def measure_overhead(steps: int = 20000) -> None:
    """Print the cost of span(), add_span(), step_end() after 6 spans, and of turning one step into its line."""
    import tempfile

    names = [
        ("data", "next batch"),
        ("compute", "forward"),
        ("compute", "backward"),
        ("comm", "allreduce bucket 0"),
        ("comm_wait", "wait bucket 0"),
        ("optimizer", "step"),
    ]
    with tempfile.TemporaryDirectory() as run_dir:
        rec = Recorder(run_dir, 0, 1, flush_interval=3600.0)
        t0 = perf_counter()
        for _ in range(steps):
            for lane, name in names:
                with rec.span(lane, name):
                    pass
        span_s = (perf_counter() - t0) / steps / len(names)
        rec._spans.clear()
        t0 = perf_counter()
        for _ in range(steps):
            for lane, name in names:
                rec.add_span(lane, name, 1.0, 2.0)
        add_span_s = (perf_counter() - t0) / steps / len(names)
        rec._spans.clear()
        t0 = perf_counter()
        for _ in range(steps):
            for lane, name in names:
                rec.add_span(lane, name, 1.0, 2.0)
            rec.set_loss(0.5)
            rec.step_end(batch=64, epoch=0)
        step_end_s = (perf_counter() - t0) / steps - add_span_s * len(names)
        t0 = perf_counter()
        rec.flush()
        line_s = (perf_counter() - t0) / steps
        rec.close()
    print(
        f"span(): {span_s * 1e6:.2f} us, add_span(): {add_span_s * 1e6:.2f} us, "
        f"step_end() after {len(names)} spans: {step_end_s * 1e6:.2f} us, flush: {line_s * 1e6:.2f} us per step"
    )
