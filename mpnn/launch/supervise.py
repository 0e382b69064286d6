"""Worker processes: start each pinned, in its own process group; watch them; stop them all (SIGTERM to every
group, SIGKILL after a grace period) so that no process, grandchildren included, outlives the run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mpnn import safefs
from mpnn.launch.errors import LaunchError
from mpnn.launch.output import PipeReader
from mpnn.launch.pinning import thread_pinned_to
from mpnn.launch.signals import StopSignals

POLL_S = 0.05


@dataclass
class Worker:
    """One worker process; its pid is also its process group id, which holds everything it starts."""

    rank: int
    local_rank: int
    core: int
    proc: subprocess.Popen
    reader: PipeReader
    log_path: Path
    group_gone: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finished(self, live_groups: set[int]) -> bool:
        """The worker was reaped and its group holds no live process (zombies waiting for init do not count)."""
        if self.proc.poll() is None:
            return False
        if not self.group_gone:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                self.group_gone = True  # from now on never signal this id again: it may be reused
            except PermissionError:  # a member changed its user: still there
                pass
        return self.group_gone or self.pid not in live_groups

    def signal_group(self, sig: int) -> None:
        """Send sig to every process in the worker's group (a no-op once the group is gone)."""
        if self.group_gone:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def spawn_worker(
    argv: Sequence[str],
    env: Mapping[str, str],
    rank: int,
    local_rank: int,
    core: int,
    log_path: Path,
    sink: Callable[[int, str], None],
) -> Worker:
    """Start `argv` pinned to `core` in a new session (its own process group), output teed to log_path and sink.
    A log path that is a symlink or someone else's file stops the launch here, before the worker starts."""
    try:
        os.close(safefs.open_append(log_path))
    except safefs.UnsafePathError as error:
        raise LaunchError(f"rank {rank}'s log: {error}") from None
    except OSError:
        pass  # disk full or the like: the reader says so once and the output goes to the console only
    with thread_pinned_to(core):
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    assert proc.stdout is not None  # stdout=PIPE
    reader = PipeReader(rank, proc.stdout, log_path, sink)
    reader.start()
    return Worker(rank, local_rank, core, proc, reader, log_path)


def live_process_groups() -> set[int]:
    """Ids of the process groups that hold a process that is not a zombie, read from /proc.

    Orphaned grandchildren are reaped by init, which on some machines takes more than a second; a zombie
    holds no resources, so waiting for it would only delay the stop.
    """
    groups = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited while we looked
            continue
        state, _ppid, pgrp = stat[stat.rindex(b")") + 2 :].split()[:3]
        if state not in (b"Z", b"X"):
            groups.add(int(pgrp))
    return groups


def describe_returncode(returncode: int) -> str:
    """'exited with code 3' or 'killed by SIGKILL' (Popen's negative return codes are signals)."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def exit_status(returncode: int) -> int:
    """The shell's exit status for a return code: the code itself, or 128 + signal number."""
    return returncode if returncode >= 0 else 128 - returncode


def watch(
    workers: Sequence[Worker],
    stop: StopSignals,
    on_tick: Callable[[int], None],
    interrupted: Callable[[], bool] = lambda: False,
) -> Worker | None:
    """Block until every worker exited 0 (None), one failed (that worker), a stop signal came or interrupted()
    turned true (None: another node's agent said stop).

    When several fail within one poll, a signal death is reported first: it is more often the cause than a
    consequence (peers then fail their collectives). on_tick(running) is called every poll.
    """
    while stop.received is None and not interrupted():
        codes = [w.proc.poll() for w in workers]
        failed = [w for w, code in zip(workers, codes) if code not in (None, 0)]
        if failed:
            return min(failed, key=lambda w: (w.proc.returncode >= 0, w.rank))
        running = codes.count(None)
        if running == 0:
            return None
        on_tick(running)
        time.sleep(POLL_S)
    return None


def stop_all(workers: Sequence[Worker], grace_s: float, hurry: Callable[[], bool]) -> list[int]:
    """SIGTERM every worker's group, wait up to grace_s (less if hurry()), then SIGKILL what is left and reap.
    A SIGCONT follows the SIGTERM: a stopped process (SIGSTOP, Ctrl-Z) would otherwise not see it until SIGKILL.

    Returns the ranks whose groups still had processes when SIGKILL was sent.
    """
    for w in workers:
        w.signal_group(signal.SIGTERM)
        w.signal_group(signal.SIGCONT)
    _wait_finished(workers, grace_s, hurry)
    killed = [w.rank for w in workers if not w.finished(live_process_groups())]
    for w in workers:
        w.signal_group(signal.SIGKILL)
    _wait_finished(workers, 2.0, lambda: False)  # SIGKILL cannot be caught: this waits for the kernel only
    return killed


def _wait_finished(workers: Sequence[Worker], timeout_s: float, hurry: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not hurry():
        live = live_process_groups()
        if all(w.finished(live) for w in workers):
            return
        time.sleep(0.02)
