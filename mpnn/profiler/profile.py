"""``mpnn.profiler.profile``: records op calls and backward nodes through the core's switch
(``mpnn.core.optrace``), then answers as torch.profiler does: a key-averages table and a Chrome trace.

Times are wall-clock ``perf_counter_ns`` readings around each call. A row's *total* is the time inside its calls;
its *self* time is the total less the time of the recorded calls nested in them (``var`` calling ``mean``, a
backward calling ops, a Tensor method calling its op), so self times add up to the time spent in recorded ops.
The timing wrappers cost about a microsecond per call while recording; that lands in the caller's self time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mpnn.core import optrace
from mpnn.telemetry.profiles import PROFILER_FORMAT, ops_trace_path
from mpnn.worldspec import current_world

BACKWARD_SUFFIX = "_backward"

# sort_by: torch.profiler's names and mpnn's short ones -> EventAverage attribute (sorted descending).
SORT_KEYS = {
    "self_time": "self_ns",
    "self_cpu_time_total": "self_ns",
    "total_time": "total_ns",
    "cpu_time_total": "total_ns",
    "avg": "avg_ns",
    "cpu_time": "avg_ns",
    "calls": "count",
    "count": "count",
}


@dataclass
class OpEvent:
    """One recorded call: an op's forward (kind "op") or a node's backward (kind "backward")."""

    name: str
    kind: str
    start_ns: int  # perf_counter_ns
    end_ns: int
    thread: int  # threading.get_ident() of the thread that ran it
    shapes: list | None
    self_ns: int = 0
    depth: int = 0  # how many recorded calls enclose it

    @property
    def total_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass
class EventAverage:
    """One row of the table: every call of one name (and input shapes, when grouped by them)."""

    key: str
    count: int = 0
    self_ns: int = 0
    total_ns: int = 0
    input_shapes: str = ""

    @property
    def avg_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    # torch.profiler's FunctionEventAvg names, in microseconds
    @property
    def self_cpu_time_total(self) -> float:
        return self.self_ns / 1e3

    @property
    def cpu_time_total(self) -> float:
        return self.total_ns / 1e3

    @property
    def cpu_time(self) -> float:
        return self.avg_ns / 1e3


def _format_time(us: float) -> str:
    """torch.profiler's time format: 3 decimals in us, ms or s."""
    if us >= 1e6:
        return f"{us / 1e6:.3f}s"
    if us >= 1e3:
        return f"{us / 1e3:.3f}ms"
    return f"{us:.3f}us"


class KeyAverages(list):
    """The rows of ``profile.key_averages()``: a list of EventAverage with torch's ``table()``."""

    def __init__(self, rows, grouped_by_shape: bool):
        super().__init__(rows)
        self.grouped_by_shape = grouped_by_shape

    def table(self, sort_by: str | None = "self_time", row_limit: int = 100, max_name_column_width: int = 55) -> str:
        """torch.profiler's ``key_averages().table()``: Name, Self CPU %, Self CPU, CPU total %, CPU total, CPU time
        avg, # of Calls (and Input Shapes when grouped by input shape); "Self CPU time total" under it.

        sort_by: "self_time" (torch: "self_cpu_time_total"), "total_time" ("cpu_time_total"), "avg"
        ("cpu_time"), "calls" ("count"), or None for first-call order."""
        rows = list(self)
        if sort_by is not None:
            try:
                attr = SORT_KEYS[sort_by]
            except KeyError:
                raise ValueError(f"sort_by={sort_by!r}: use one of {sorted(SORT_KEYS)}") from None
            rows.sort(key=lambda r: getattr(r, attr), reverse=True)
        if row_limit is not None and row_limit >= 0:
            rows = rows[:row_limit]
        total_self = sum(r.self_ns for r in self) / 1e3
        name_width = min(max([len(r.key) for r in rows] + [4]) + 4, max_name_column_width)
        headers = ["Name", "Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "# of Calls"]
        widths = [name_width] + [12] * 6
        if self.grouped_by_shape:
            headers.append("Input Shapes")
            widths.append(min(max([len(r.input_shapes) for r in rows] + [12]) + 4, 80))

        def line(cells):
            return "".join(cell.rjust(width) + "  " for cell, width in zip(cells, widths))

        rule = "".join("-" * width + "  " for width in widths)
        out = [rule, line(headers), rule]
        for r in rows:
            name = r.key if len(r.key) <= name_width else r.key[: name_width - 3] + "..."
            cells = [
                name,
                f"{100 * r.self_ns / 1e3 / total_self:.2f}%" if total_self else "-",
                _format_time(r.self_ns / 1e3),
                f"{100 * r.total_ns / 1e3 / total_self:.2f}%" if total_self else "-",
                _format_time(r.total_ns / 1e3),
                _format_time(r.avg_ns / 1e3),
                str(r.count),
            ]
            if self.grouped_by_shape:
                shapes = r.input_shapes
                cells.append(shapes if len(shapes) <= widths[-1] else shapes[: widths[-1] - 3] + "...")
            out.append(line(cells))
        out.append(rule)
        out.append(f"Self CPU time total: {_format_time(total_self)}")
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        return self.table()


def _nest(raw: list[tuple]) -> list[OpEvent]:
    """OpEvents from the switch's tuples, with depth and self time from how they nest on each thread."""
    events = [
        OpEvent(name if kind == "op" else name + BACKWARD_SUFFIX, kind, t0, t1, thread, shapes)
        for kind, name, t0, t1, thread, shapes in raw
    ]
    # A call is recorded when it returns, so an enclosing call comes after the calls inside it: among calls that
    # start at the same reading, the later-recorded (enclosing) one sorts first.
    order = sorted(range(len(events)), key=lambda i: (events[i].thread, events[i].start_ns, -events[i].end_ns, -i))
    stack: list[OpEvent] = []
    thread = None
    for i in order:
        event = events[i]
        if event.thread != thread:
            stack, thread = [], event.thread
        while stack and stack[-1].end_ns <= event.start_ns:
            stack.pop()
        event.self_ns = event.total_ns
        if stack:
            stack[-1].self_ns -= event.total_ns
        event.depth = len(stack)
        stack.append(event)
    return events


class profile:
    """Record every op's forward and every backward node while the block runs (see the module docstring).

    ``record_shapes``: keep each call's input shapes (torch.profiler's name); ``activities`` is accepted for
    torch's signature and ignored (mpnn runs on the CPU only)."""

    def __init__(self, *, record_shapes: bool = False, activities=None):
        self.record_shapes = record_shapes
        self._raw: list[tuple] = []
        self._uninstall = None
        self._events: list[OpEvent] | None = None
        self._origin_ns = 0  # perf_counter_ns at start
        self._origin_unix_ns = 0  # time.time_ns() at that same moment
        self._thread = threading.get_ident()

    def start(self) -> profile:
        if self._uninstall is not None:
            raise RuntimeError("mpnn.profiler.profile: already recording")
        self._raw = []
        self._events = None
        self._thread = threading.get_ident()
        self._origin_unix_ns, self._origin_ns = _clock_pair()
        self._uninstall = optrace.install(self._raw.append, self.record_shapes)
        return self

    def stop(self) -> None:
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None

    def __enter__(self) -> profile:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def events(self) -> list[OpEvent]:
        """Every recorded call, in the order they returned, with self time and nesting depth."""
        if self._events is None or len(self._events) != len(self._raw):
            self._events = _nest(list(self._raw))
        return self._events

    def key_averages(self, group_by_input_shape: bool = False) -> KeyAverages:
        """One EventAverage per op name (per name and input shapes with group_by_input_shape), in first-call
        order; .table() prints them."""
        if group_by_input_shape and not self.record_shapes:
            raise ValueError("group_by_input_shape=True needs profile(record_shapes=True)")
        rows: dict[tuple, EventAverage] = {}
        first = sorted(self.events(), key=lambda e: e.start_ns)
        for event in first:
            shapes = str(event.shapes) if group_by_input_shape else ""
            row = rows.get((event.name, shapes))
            if row is None:
                row = rows[(event.name, shapes)] = EventAverage(event.name, input_shapes=shapes)
            row.count += 1
            row.self_ns += event.self_ns
            row.total_ns += event.total_ns
        return KeyAverages(rows.values(), group_by_input_shape)

    def table(self, sort_by: str | None = "self_time", row_limit: int = 100, group_by_input_shape: bool = False) -> str:
        """``key_averages(group_by_input_shape).table(sort_by, row_limit)``."""
        return self.key_averages(group_by_input_shape).table(sort_by=sort_by, row_limit=row_limit)

    def chrome_trace(self, rank: int | None = None) -> dict:
        """The recorded calls as a Chrome trace dict: pid = rank, one thread per Python thread ("ops" for the one
        that started recording), nested "X" events, ts in microseconds from the start of recording;
        otherData.origin_unix_s dates that start, so `mpnn telemetry trace` can place them beside the run's lanes."""
        rank = current_world().rank if rank is None else rank
        events = sorted(self.events(), key=lambda e: (e.start_ns, -e.end_ns))
        threads = {self._thread: 1}
        for event in events:
            threads.setdefault(event.thread, len(threads) + 1)
        out: list[dict] = [
            {"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}},
        ]
        for ident, tid in threads.items():
            name = "ops" if ident == self._thread else f"ops: thread {tid}"
            out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": name}})
        for event in events:
            record = {
                "ph": "X",
                "name": event.name,
                "cat": "cpu_op" if event.kind == "op" else "backward",
                "pid": rank,
                "tid": threads[event.thread],
                "ts": (event.start_ns - self._origin_ns) / 1e3,
                "dur": event.total_ns / 1e3,
            }
            if event.shapes is not None:
                record["args"] = {"Input Dims": event.shapes}
            out.append(record)
        return {
            "traceEvents": out,
            "displayTimeUnit": "ms",
            "otherData": {
                "mpnn_profiler": PROFILER_FORMAT,
                "rank": rank,
                "origin_unix_s": self._origin_unix_ns / 1e9,
                "origin_unix_ns": self._origin_unix_ns,
            },
        }

    def export_chrome_trace(self, path=None) -> Path:
        """Write the Chrome trace to `path`; by default to <run dir>/ops-<rank>.trace.json in a launched worker
        (``mpnn telemetry trace`` merges it), else ./ops-<rank>.trace.json. Returns the path."""
        world = current_world()
        if path is None:
            path = ops_trace_path(world.run_dir or os.getcwd(), world.rank)
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace(world.rank), separators=(",", ":")))
        return path


def _clock_pair() -> tuple[int, int]:
    """(time.time_ns(), perf_counter_ns()) read as close together as three tries allow."""
    best = None
    for _ in range(3):
        a = time.perf_counter_ns()
        unix = time.time_ns()
        b = time.perf_counter_ns()
        if best is None or b - a < best[0]:
            best = (b - a, unix, (a + b) // 2)
    assert best is not None
    return best[1], best[2]


__all__ = ["profile", "KeyAverages", "EventAverage", "OpEvent"]
