"""Elastic restarts (`mpnn launch --max-restarts R`, like torchrun's): when a worker fails and the others are
stopped, the whole world starts again in the same run dir with the same run id, resuming from the run's newest
checkpoint. Each restart is told three ways: one line on the console, an entry of run.json's "restarts", and a
"restart" event line in every restarted rank's worker-<rank>.jsonl (appended by the launcher while no worker runs,
so it never interleaves with a worker's own lines)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpnn import safefs
from mpnn.launch.resume import newest_checkpoint
from mpnn.launch.rundir import utc_now
from mpnn.telemetry.recorder import Recorder


@dataclass(frozen=True)
class Restart:
    """Restart `number` of `max_restarts`: which rank failed and how, and where the next attempt resumes from."""

    number: int
    max_restarts: int
    failed_rank: int
    failed_pid: int | None  # None: the rank was lost with its node's launcher (multi-node, agents.py)
    how: str
    stopped: int  # other workers (of this node) that were still running and had to be stopped
    resume_from: Path | None  # MPNN_RESUME_FROM of the next attempt; None: it starts from scratch
    time: str = field(default_factory=utc_now)
    failed_node: int | None = None  # multi-node: the node whose rank failed (each node's launcher tells it)

    def headline(self) -> str:
        """The console line, e.g. 'mpnn launch: rank 1 (pid 4242) killed by SIGKILL; stopped the 1 other running
        worker(s); restart 1/2 begins, resuming from runs/x'."""
        return f"mpnn launch: {self.cause()}; {self.begins()}"

    def cause(self) -> str:
        """Which rank failed and how, and how many running workers that stopped."""
        stopped = f"; stopped the {self.stopped} other running worker(s)" if self.stopped else ""
        return f"{self.who()} {self.how}{stopped}"

    def begins(self) -> str:
        """'restart 1/2 begins, resuming from runs/x' (or 'from scratch ...')."""
        where = (
            f"resuming from {self.resume_from}"
            if self.resume_from is not None
            else "from scratch (no checkpoint saved yet)"
        )
        return f"restart {self.number}/{self.max_restarts} begins, {where}"

    def who(self) -> str:
        """'rank 1 (pid 4242)', and ' on node 1' in a multi-node run."""
        pid = "" if self.failed_pid is None else f" (pid {self.failed_pid})"
        node = "" if self.failed_node is None else f" on node {self.failed_node}"
        return f"rank {self.failed_rank}{pid}{node}"

    def record(self) -> dict:
        """The entry of run.json's "restarts" list."""
        return {
            "restart": self.number,
            "time": self.time,
            "failed_rank": self.failed_rank,
            "pid": self.failed_pid,
            "how": self.how,
            "resume_from": None if self.resume_from is None else str(self.resume_from),
            **({} if self.failed_node is None else {"failed_node": self.failed_node}),
        }

    def event(self) -> dict:
        """The telemetry event's details (docs/architecture.md's event line: "t", "rank" and "event" are added
        per rank)."""
        return {
            "restart": self.number,
            "max_restarts": self.max_restarts,
            "failed_rank": self.failed_rank,
            "how": self.how,
            "resume_from": None if self.resume_from is None else str(self.resume_from),
            **({} if self.failed_node is None else {"failed_node": self.failed_node}),
        }


def resume_after_failure(run_dir: Path, resumed_from: Path | None) -> Path | None:
    """Where a restart resumes: this run's own checkpoints once it saved one, else the run it was itself resumed
    from (--resume), else nowhere (from scratch)."""
    return run_dir if newest_checkpoint(run_dir)[0] is not None else resumed_from


def append_restart_event(run_dir: Path, ranks: Sequence[int], restart: Restart) -> None:
    """Append the restart event line to each rank's telemetry file, first ending a line torn by a killed worker.
    A file that cannot be written costs one warning line, never the run (as for the workers' own telemetry)."""
    for rank in ranks:
        path = Recorder.path_for(run_dir, rank)
        line = (
            json.dumps(
                {"t": round(time.time(), 6), "rank": rank, "event": "restart", **restart.event()}, separators=(",", ":")
            ).encode()
            + b"\n"
        )
        try:
            fd = safefs.open_append(path, read=True)  # never through a symlink or into a foreign file
            try:
                size = os.fstat(fd).st_size
                torn = size and os.pread(fd, 1, size - 1) != b"\n"
                os.write(fd, b"\n" + line if torn else line)
            finally:
                os.close(fd)
        except OSError as error:
            print(
                f"mpnn launch: warning: cannot write the restart event to {path}: {error.strerror or error}",
                file=sys.stderr,
                flush=True,
            )
