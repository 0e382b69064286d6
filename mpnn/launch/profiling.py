"""`mpnn launch --profile`: one py-spy sampler per worker, attached by pid right after the worker starts, and one
flame graph per rank in the run dir when the workers are done.

py-spy samples the worker from outside (no code in the worker) at RATE_HZ with `--native`, so BLAS and other
native code with symbols appear by name under the Python frame that called them; JIT code without symbols
(Numba's kernels) appears as bare addresses, which the SVG folds into one "[native code without symbols]" frame.
Each sampler records speedscope JSON (profile-<rank>.speedscope.json); mpnn.telemetry.flamegraph draws the SVG
(profile-<rank>.svg) from it. One sampler per worker, not two (one per format): a process can have only one
ptrace tracer at a time.

py-spy writes its file when the process it samples exits, so the launcher stops nothing early: after the workers
are gone (exited, failed, or stopped by stop_all), each sampler gets FINISH_S to write and exit, then SIGINT (it
writes what it has), then SIGKILL. A file that is not complete JSON then is reported and gets no SVG.

When py-spy is missing or cannot attach (no ptrace permission), one line says why and how to allow it, and the
run goes on unprofiled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from mpnn.telemetry.flamegraph import write_flamegraph
from mpnn.telemetry.profiles import flamegraph_path, speedscope_path

RATE_HZ = 100  # py-spy's default
FINISH_S = 15.0  # after the worker is gone: py-spy notices within a sample period and writes its file
SIGINT_WAIT_S = 5.0
CAP_SYS_PTRACE = 19
PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
INSTALL_HINT = "pip install 'mpnn[profile]'"
ALLOW_HINT = (
    "allow ptrace: run as root with CAP_SYS_PTRACE (in a container: docker run --cap-add SYS_PTRACE) "
    "or `sysctl kernel.yama.ptrace_scope=0`"
)
# What py-spy prints when ptrace or process_vm_readv is refused.
_DENIED = ("Permission Denied", "Operation not permitted", "os error 1)", "os error 13)")


def _say(line: str, err: IO[str] | None = None) -> None:
    print(f"mpnn launch: --profile: {line}", file=err or sys.stderr, flush=True)


def find_pyspy(path: str | None = None, executable: str = sys.executable) -> str | None:
    """The py-spy binary: on PATH, else beside the Python running mpnn (a venv's bin/ that is not on PATH)."""
    found = shutil.which("py-spy", path=path if path is not None else os.environ.get("PATH", os.defpath))
    if found:
        return found
    beside = Path(executable).parent / "py-spy"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _has_cap_sys_ptrace(status: Path = Path("/proc/self/status")) -> bool:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def ptrace_blocked(scope_file: Path = PTRACE_SCOPE, has_cap: bool | None = None) -> str | None:
    """Why py-spy (the launcher's child, not the workers' ancestor) cannot attach to a worker, when Yama says so
    before trying; None when it may (other refusals show when py-spy runs)."""
    try:
        scope = int(scope_file.read_text().strip())
    except (OSError, ValueError):
        return None  # no Yama: classic ptrace rules (same user) apply
    if scope >= 3:
        return f"kernel.yama.ptrace_scope is {scope}: no process may ptrace another until reboot"
    if scope >= 1 and not (_has_cap_sys_ptrace() if has_cap is None else has_cap):
        return f"kernel.yama.ptrace_scope is {scope} and this process lacks CAP_SYS_PTRACE"
    return None


class _Sampler:
    """One py-spy process recording one worker; ``on_exit(sampler)`` runs on its reader thread when py-spy exits."""

    def __init__(self, rank: int, proc: subprocess.Popen, output: Path, on_exit):
        self.rank, self.proc, self.output, self.on_exit = rank, proc, output, on_exit
        self.text: list[str] = []
        self.reader = threading.Thread(target=self._read, name=f"py-spy rank {rank}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.text.append(line.rstrip())
            del self.text[:-20]
        self.proc.wait()
        self.on_exit(self)


class Samplers:
    """The samplers of one attempt: ``attach(pid, rank)`` after each worker starts, ``finish()`` once they are all
    gone. ``open_samplers`` returns None (after saying why) when the run cannot be profiled."""

    def __init__(self, pyspy: str, run_dir: Path, restart: int = 0, native: bool = True, err: IO[str] | None = None):
        self.pyspy, self.run_dir, self.restart, self.native, self.err = pyspy, Path(run_dir), restart, native, err
        self.samplers: list[_Sampler] = []
        self._denied = threading.Event()
        self._lock = threading.Lock()

    def attach(self, pid: int, rank: int) -> None:
        if self._denied.is_set():
            return
        output = speedscope_path(self.run_dir, rank, self.restart)
        argv = [self.pyspy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "speedscope"]
        argv += ["--output", str(output)] + (["--native"] if self.native else [])
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # the terminal's Ctrl-C goes to the launcher, which ends the samplers itself
            )
        except OSError as error:
            _say(f"cannot run {self.pyspy}: {error.strerror}; the run goes on unprofiled", self.err)
            self._denied.set()
            return
        self.samplers.append(_Sampler(rank, proc, output, self._exited))

    def _exited(self, sampler: _Sampler) -> None:
        """A sampler's py-spy exited: if it said it may not attach, say so now (once) with how to allow it."""
        text = "\n".join(sampler.text)
        if sampler.proc.returncode == 0 or not any(marker in text for marker in _DENIED):
            return
        with self._lock:
            if not self._denied.is_set():
                self._denied.set()
                _say(
                    f"py-spy may not attach to the workers (it said: {_last_line(text)}); {ALLOW_HINT}; "
                    "the run goes on unprofiled",
                    self.err,
                )

    def finish(self) -> list[Path]:
        """Wait for every sampler to write its file (then SIGINT, then SIGKILL), draw the SVGs; the SVGs drawn."""
        for sampler in self.samplers:
            _end(sampler.proc)
        drawn = []
        for sampler in self.samplers:
            sampler.reader.join(timeout=1.0)
            if self._denied.is_set() and not sampler.output.exists():
                continue
            problem = _check_speedscope(sampler.output)
            if problem is not None:
                text = "\n".join(sampler.text)
                said = f" (py-spy: {_last_line(text)})" if text else ""
                _say(f"rank {sampler.rank}: no profile: {problem}{said}", self.err)
                continue
            svg = flamegraph_path(self.run_dir, sampler.rank, self.restart)
            try:
                write_flamegraph(sampler.output, svg, title=f"rank {sampler.rank}")
            except (OSError, ValueError) as error:
                _say(f"rank {sampler.rank}: cannot draw {svg.name}: {error}", self.err)
                continue
            drawn.append(svg)
        if drawn:
            names = ", ".join(p.name for p in drawn)
            _say(f"flame graphs in {self.run_dir}: {names} (and their .speedscope.json)", self.err)
        return drawn


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "nothing"


def _end(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=FINISH_S)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=SIGINT_WAIT_S)
        return
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    proc.kill()
    proc.wait()


def _check_speedscope(path: Path) -> str | None:
    """None when `path` is a complete speedscope file, else what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return f"py-spy wrote no {path.name}"
    except (OSError, ValueError) as error:
        return f"{path.name} is not complete JSON ({error})"
    if not isinstance(data, dict) or "profiles" not in data or "shared" not in data:
        return f"{path.name} is not a speedscope file"
    return None


_said: set[str] = set()


def open_samplers(run_dir: Path, restart: int = 0, err: IO[str] | None = None) -> Samplers | None:
    """Samplers for one attempt, or None after one line saying why this run cannot be profiled (said once per
    run dir, not again on a restart)."""
    pyspy = find_pyspy()
    why = None
    if pyspy is None:
        why = f"py-spy is not installed ({INSTALL_HINT}); the run goes on unprofiled"
    else:
        blocked = ptrace_blocked()
        if blocked is not None:
            why = f"py-spy may not attach to the workers ({blocked}); {ALLOW_HINT}; the run goes on unprofiled"
    if why is not None or pyspy is None:
        if why and str(run_dir) not in _said:
            _said.add(str(run_dir))
            _say(why, err)
        return None
    return Samplers(pyspy, run_dir, restart, err=err)
