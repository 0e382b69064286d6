"""The launcher's console: worker lines with a [rank] prefix; on a TTY, also a rich status line (step of total,
loss, steps/s, slowest rank) and telemetry events, fed by worker-<rank>.jsonl files read incrementally and
robust to files that are missing, half-written, truncated or hold bad lines."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REFRESH_S = 0.25


def _number(record: dict, key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class TelemetryFollower:
    """Follows worker-<rank>.jsonl from where the last poll stopped; keeps each rank's latest step record.

    A step record has a numeric "step" (docs/architecture.md's telemetry line); "event" lines are returned by poll();
    "total_steps" on any line (e.g. the start event) gives the total the status line shows.
    """

    def __init__(self, run_dir: Path, ranks: Sequence[int]):
        self._paths = {rank: Path(run_dir) / f"worker-{rank}.jsonl" for rank in ranks}
        self._offsets = dict.fromkeys(ranks, 0)
        self._partial = dict.fromkeys(ranks, b"")
        self.latest: dict[int, dict] = {}
        self.total_steps: int | None = None

    def poll(self) -> list[tuple[int, dict]]:
        """Read what was appended since the last poll; return the new event records as (rank, record)."""
        events = []
        for rank, path in self._paths.items():
            for record in self._new_records(rank, path):
                total = _number(record, "total_steps")
                if total is not None:
                    self.total_steps = int(total)
                if "event" in record:
                    events.append((rank, record))
                elif _number(record, "step") is not None:
                    self.latest[rank] = record
        return events

    def _new_records(self, rank: int, path: Path) -> list[dict]:
        try:
            with open(path, "rb") as f:
                if f.seek(0, 2) < self._offsets[rank]:  # truncated or replaced: start over
                    self._offsets[rank], self._partial[rank] = 0, b""
                f.seek(self._offsets[rank])
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offsets[rank] += len(chunk)
        *lines, self._partial[rank] = (self._partial[rank] + chunk).split(b"\n")
        return [r for r in map(_parse, lines) if r is not None]


def status_line(latest: dict[int, dict], total_steps: int | None, running: int, nproc: int) -> str:
    """One line: step (of total) every rank has reached, loss (lowest rank's), steps/s, slowest rank, running."""
    if not latest:
        return f"{running}/{nproc} workers running · waiting for telemetry"
    step = int(min(_number(record, "step") or 0.0 for record in latest.values()))  # numeric in every kept record
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    loss = _number(latest[min(latest)], "loss")
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    timed = {rank: s for rank, record in latest.items() if (s := _number(record, "step_s")) is not None and s > 0}
    if timed:
        slowest = max(timed, key=timed.__getitem__)
        parts.append(f"{1.0 / timed[slowest]:.3g} steps/s")
        parts.append(f"slowest rank {slowest} ({timed[slowest]:.3g} s/step)")
    parts.append(f"{running}/{nproc} running")
    return " · ".join(parts)


def describe_event(rank: int, record: dict) -> str:
    """A telemetry event as one console line, e.g. '[2] event restart attempt=1'."""
    extra = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("event", "t", "rank"))
    return f"[{rank}] event {record['event']} {extra}".rstrip()


class PlainView:
    """Console when stdout is not a TTY: worker lines with a [rank] prefix and nothing else."""

    def __init__(self):
        self._lock = threading.Lock()

    def line(self, rank: int, text: str) -> None:
        with self._lock:
            try:
                sys.stdout.write(f"[{rank}] {text}\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # stdout closed or a broken pipe (`| head`): the log still gets it
                pass

    def note(self, text: str) -> None:
        """A launcher message (e.g. a restart) on stderr."""
        print(text, file=sys.stderr, flush=True)

    def refresh(self, running: int) -> None:
        """Nothing to redraw without a TTY."""

    def close(self) -> None:
        """Nothing to tear down without a TTY."""


class RichView:
    """Console on a TTY: worker lines and telemetry events scroll above a rich status line."""

    def __init__(self, run_dir: Path, ranks: Sequence[int], console=None):
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._text = Text
        self._console = console or Console()
        self._follower = TelemetryFollower(run_dir, ranks)
        self._nproc = len(ranks)
        self._next_refresh = 0.0
        self._live = Live(
            Text("starting workers"),
            console=self._console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start()

    def line(self, rank: int, text: str) -> None:
        self._console.print(self._text.assemble((f"[{rank}] ", "cyan"), text), soft_wrap=True)

    def note(self, text: str) -> None:
        """A launcher message (e.g. a restart), scrolled above the status line."""
        self._console.print(self._text(text, style="bold"), soft_wrap=True)

    def refresh(self, running: int) -> None:
        """Read new telemetry and redraw the status line, at most every REFRESH_S seconds."""
        now = time.monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_S
        for rank, record in self._follower.poll():
            self._console.print(self._text(describe_event(rank, record), style="yellow"), soft_wrap=True)
        status = status_line(self._follower.latest, self._follower.total_steps, running, self._nproc)
        self._live.update(self._text(status, style="bold", no_wrap=True, overflow="ellipsis"), refresh=True)

    def close(self) -> None:
        self._live.stop()


def make_view(run_dir: Path, ranks: Sequence[int], live: bool | None = None):
    """The rich view when `live` (default: stdout is a TTY), else plain prefixed lines."""
    if live is None:
        live = sys.stdout.isatty()
    return RichView(run_dir, ranks) if live else PlainView()
