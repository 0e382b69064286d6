"""A run's telemetry as a Chrome trace (JSON trace event format) that Perfetto and chrome://tracing open:
pid = rank, tid = lane, "X" slices that never overlap within one lane, "C" counters, "i" instant events; and
mpnn.profiler's op traces merged in, one thread "ops ..." per profiled thread (tid 1000 and up), whose slices nest
(an op inside the op or backward that called it) but never cross."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mpnn.telemetry.profiles import PROFILER_FORMAT
from mpnn.telemetry.reader import RankLog, Run, TelemetryError, number

# Lanes in display order; any other lane name found in the data follows them alphabetically.
LANE_ORDER = ("step", "data", "compute", "comm_wait", "comm", "optimizer")
# Slices in one lane that overlap by at most this much are nudged apart (timestamps carry ~1 us of rounding);
# larger overlaps are real (e.g. two communication threads) and go to a sub-lane "comm #2".
NUDGE_NS = 5_000


def _earliest(log: RankLog) -> float | None:
    """The earliest time (unix s) in one rank's log: a step's start, a span before it, or an event."""
    times = [number(e, "t") for e in log.events]
    for record in log.steps:
        end, step_s = number(record, "t"), number(record, "step_s")
        if end is not None and step_s is not None:
            offsets = [
                span[2]
                for span in record.get("spans") or ()
                if isinstance(span, list) and len(span) == 4 and isinstance(span[2], (int, float))
            ]
            times.append(end - step_s + min(offsets + [0.0]))
    return min((t for t in times if t is not None), default=None)


def _slices(log: RankLog, origin: float) -> dict[str, list]:
    """Each lane's slices (start ns, end ns, name, args) from `origin` (unix s), from steps and their spans.

    The origin comes off the unix time first: a double near 1.7e9 s resolves only ~240 ns, the offsets far less."""
    lanes: dict[str, list] = {}
    for record in log.steps:
        end, step_s = number(record, "t"), number(record, "step_s")
        if end is None or step_s is None:
            continue
        start = (end - origin) - step_s
        args = {
            key: _json_safe(record[key]) for key in ("step", "epoch", "loss", "batch") if record.get(key) is not None
        }
        lanes.setdefault("step", []).append(
            (round(start * 1e9), round((end - origin) * 1e9), f"step {record['step']}", args)
        )
        for span in record.get("spans") or ():
            try:
                lane, name, offset, duration = span
                t0 = start + float(offset)
                t1 = t0 + max(float(duration), 0.0)
            except (TypeError, ValueError):
                continue
            lanes.setdefault(str(lane), []).append((round(t0 * 1e9), round(t1 * 1e9), str(name), None))
    return lanes


def _lay_out(slices: list) -> list[list]:
    """Place slices (start ns, end ns, name, args) on sub-lanes so that none overlaps another in its sub-lane.

    Integer nanoseconds make the check exact; a slice that overlaps the last one in a sub-lane by at most
    NUDGE_NS is moved to start where that one ends."""
    ends: list[int] = []  # end of the last slice placed in each sub-lane
    sublanes: list[list] = []
    for start, end, name, args in sorted(slices, key=lambda s: s[0]):
        for i, last_end in enumerate(ends):  # noqa: B007  (i, the sub-lane found, is used after the loop)
            if start >= last_end - NUDGE_NS:
                break
        else:
            i = len(ends)
            ends.append(start)
            sublanes.append([])
        start = max(start, ends[i])
        end = max(end, start)
        ends[i] = end
        sublanes[i].append((start, end, name, args))
    return sublanes


def _json_safe(value):
    """`value` with non-finite floats as strings ("nan", "inf"): Perfetto's JSON parser rejects NaN/Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _lane_key(lane: str):
    return (LANE_ORDER.index(lane), "") if lane in LANE_ORDER else (len(LANE_ORDER), lane)


def _us(ns: int) -> float:
    return ns / 1000


def _rank_events(log: RankLog, origin: float) -> list[dict]:
    pid = log.rank
    out = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"rank {pid}"}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}},
    ]
    lanes = _slices(log, origin)
    tid = 0
    for lane in sorted(lanes, key=_lane_key):
        for index, sublane in enumerate(_lay_out(lanes[lane])):
            tid += 1
            name = lane if index == 0 else f"{lane} #{index + 1}"
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
            for start, end, slice_name, args in sublane:
                event = {
                    "ph": "X",
                    "name": slice_name,
                    "cat": lane,
                    "pid": pid,
                    "tid": tid,
                    "ts": _us(start),
                    "dur": _us(end - start),
                }
                if args:
                    event["args"] = args
                out.append(event)
    for record in log.steps:
        t = number(record, "t")
        if t is None:
            continue
        ts = _us(round((t - origin) * 1e9))
        rss = number(record, "rss_bytes")
        if rss is not None:
            out.append({"ph": "C", "name": "rss_bytes", "pid": pid, "tid": 0, "ts": ts, "args": {"rss": rss}})
        out.append(
            {
                "ph": "C",
                "name": "bytes per step",
                "pid": pid,
                "tid": 0,
                "ts": ts,
                "args": {"sent": number(record, "bytes_sent") or 0, "recv": number(record, "bytes_recv") or 0},
            }
        )
        loss = number(record, "loss")
        if loss is not None:
            out.append({"ph": "C", "name": "loss", "pid": pid, "tid": 0, "ts": ts, "args": {"loss": loss}})
    for record in log.events:
        t = number(record, "t")
        if t is None:
            continue
        args = {k: _json_safe(v) for k, v in record.items() if k not in ("t", "rank", "event")}
        out.append(
            {
                "ph": "i",
                "s": "p",
                "name": str(record["event"]),
                "pid": pid,
                "tid": 0,
                "ts": _us(round((t - origin) * 1e9)),
                "args": args,
            }
        )
    return out


def _read_ops_trace(path) -> dict:
    """An mpnn.profiler Chrome trace (TelemetryError naming the path when it is not one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise TelemetryError(f"{path}: cannot read an op trace ({error})") from None
    other = data.get("otherData") if isinstance(data, dict) else None
    if not isinstance(other, dict) or other.get("mpnn_profiler") != PROFILER_FORMAT:
        raise TelemetryError(f"{path}: not an op trace written by mpnn.profiler (export_chrome_trace)")
    if not isinstance(other.get("origin_unix_ns"), int) or not isinstance(data.get("traceEvents"), list):
        raise TelemetryError(f"{path}: op trace without origin_unix_ns or traceEvents")
    return data


def _ops_events(data: dict, name: str, origin: float, first_tid: dict[int, int]) -> list[dict]:
    """One op trace's events moved onto the run's clock (origin, unix s) and onto thread ids after the rank's
    lanes; its threads named "ops ..." (with the file name when a rank has several op traces)."""
    other = data["otherData"]
    pid = int(other.get("rank", 0))
    shift_us = (other["origin_unix_ns"] - round(origin * 1e9)) / 1e3
    base = first_tid.get(pid, 1000)
    tids: dict[int, int] = {}
    out = []
    for event in data["traceEvents"]:
        if not isinstance(event, dict):
            continue
        tid = tids.setdefault(event.get("tid", 0), base + len(tids))
        if event.get("ph") == "M" and event.get("name") == "thread_name":
            label = str((event.get("args") or {}).get("name", "ops"))
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"{label} {name}"}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        elif event.get("ph") == "X" and isinstance(event.get("ts"), (int, float)):
            out.append({**event, "pid": pid, "tid": tid, "ts": round(event["ts"] + shift_us, 3)})
    first_tid[pid] = base + len(tids)
    return out


def build_trace(run: Run, ops_traces=()) -> dict:
    """The Chrome trace of a run as a dict: {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}.

    ``ops_traces``: paths of mpnn.profiler Chrome traces (``prof.export_chrome_trace``) to merge: their op and
    backward slices go to each rank's process as threads "ops ..." below the lanes, on the same clock.
    Timestamps count from the earliest step, span, event or op trace start (otherData.origin_unix_s)."""
    loaded = [(Path(p), _read_ops_trace(p)) for p in ops_traces]
    starts = [d["otherData"]["origin_unix_ns"] / 1e9 for _, d in loaded]
    origin = min(
        (t for t in [*map(_earliest, run.ranks.values()), *starts] if t is not None),
        default=0.0,
    )
    events = [e for log in run.ranks.values() for e in _rank_events(log, origin)]
    first_tid = {pid: 1000 for pid in run.ranks}
    for path, data in loaded:
        events.extend(_ops_events(data, f"({path.name})", origin, first_tid))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "run_id": run.meta.get("run_id", run.path.name),
            "origin_unix_s": origin,
            "ops_traces": [str(p) for p, _ in loaded],
        },
    }


def write_trace(run: Run, path, ops_traces=()) -> Path:
    """Write the run's Chrome trace (with any op traces merged) to `path` (open it in https://ui.perfetto.dev or
    chrome://tracing)."""
    path = Path(path)
    path.write_text(json.dumps(build_trace(run, ops_traces), separators=(",", ":"), allow_nan=False))
    return path
