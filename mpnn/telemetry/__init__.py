"""Telemetry: each worker's Recorder writes worker-<rank>.jsonl in the run dir; readers, a summary table, a
Perfetto trace and plots turn those files back into answers (`mpnn telemetry show|trace|plot RUN_DIR`)."""

from __future__ import annotations

from mpnn.telemetry.recorder import Recorder

_recorder: Recorder | None = None


def start(run_dir, rank: int, world_size: int, flush_interval: float = 1.0) -> Recorder:
    """Start this process's recorder (mpnn.init() calls it when MPNN_RUN_DIR is set); idempotent per file."""
    global _recorder
    if _recorder is not None and not _recorder.closed:
        if _recorder.path == Recorder.path_for(run_dir, rank):
            return _recorder
        _recorder.close()
    _recorder = Recorder(run_dir, rank, world_size, flush_interval)
    return _recorder


def get_recorder() -> Recorder | None:
    """This process's recorder, or None when telemetry was not started (no run dir)."""
    return _recorder if _recorder is not None and not _recorder.closed else None


def plan(total_steps: int) -> None:
    """Tell the run how many steps it will take (the launcher's live view shows "step N/total")."""
    rec = get_recorder()
    if rec is not None:
        rec.event("plan", total_steps=int(total_steps))


def stop() -> None:
    """Close this process's recorder (writes the "end" event and flushes); a no-op when none is running."""
    global _recorder
    if _recorder is not None:
        _recorder.close()
        _recorder = None


__all__ = ["Recorder", "get_recorder", "plan", "start", "stop"]
