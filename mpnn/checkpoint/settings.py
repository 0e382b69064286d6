"""The Checkpointer's settings from its arguments and the launcher's environment (the launcher's flags win):
MPNN_CHECKPOINT_EVERY (--checkpoint-every), MPNN_CHECKPOINT_KEEP (--checkpoint-keep), MPNN_RESUME_FROM (--resume or
an automatic restart), MPNN_RESTART_COUNT, and MPNN_RUN_DIR for where checkpoints go by default."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

from mpnn.checkpoint.layout import CHECKPOINTS
from mpnn.worldspec import current_world

DEFAULT_KEEP = 3


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Checkpointer: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _env_count(name: str, minimum: int) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return _count(int(text), name, minimum)
    except ValueError:
        raise ValueError(f"Checkpointer: {name}={text!r} must be an integer >= {minimum}") from None


def every_from(every) -> int:
    """Steps between checkpoints: MPNN_CHECKPOINT_EVERY when set and not 0, else `every`, else 0 (never)."""
    from_env = _env_count("MPNN_CHECKPOINT_EVERY", 0)
    if from_env:
        return from_env
    return 0 if every is None else _count(every, "every", 0)


def keep_from(keep) -> int:
    """How many checkpoints to keep: MPNN_CHECKPOINT_KEEP when set, else `keep`, else 3."""
    from_env = _env_count("MPNN_CHECKPOINT_KEEP", 1)
    if from_env is not None:
        return from_env
    return DEFAULT_KEEP if keep is None else _count(keep, "keep", 1)


def directory_from(directory) -> Path | None:
    """Where checkpoints are written: `directory`, else <MPNN_RUN_DIR>/checkpoints, else None."""
    if directory is not None:
        return Path(directory)
    run_dir = current_world().run_dir
    return Path(run_dir) / CHECKPOINTS if run_dir else None


def resume_from() -> Path | None:
    """MPNN_RESUME_FROM: a run directory, its checkpoints/ folder or one step-* checkpoint to resume from."""
    text = os.environ.get("MPNN_RESUME_FROM", "").strip()
    return Path(text) if text else None


def restart_count() -> int:
    """MPNN_RESTART_COUNT: 0 on the first attempt, k on the launcher's k-th automatic restart."""
    return _env_count("MPNN_RESTART_COUNT", 0) or 0
