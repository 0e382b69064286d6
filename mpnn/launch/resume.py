"""Finding a run's checkpoints from the launcher: `--resume RUN_DIR` is checked before any worker starts (resuming
from nothing is one clear error, not a run that silently begins again at step 0), and a restart resumes from the
run's own checkpoints once it has one. The layout is mpnn.Checkpointer's (mpnn/checkpoint/layout.py); here only
the manifests are read, the workers' Checkpointer checks every file's SHA-256 when it loads."""

from __future__ import annotations

from pathlib import Path

from mpnn.checkpoint.layout import CHECKPOINTS, InvalidCheckpoint, checkpoints_in, list_checkpoints, read_manifest
from mpnn.launch.errors import LaunchError


def newest_checkpoint(path: Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint of a run dir or checkpoints/ folder whose manifest reads, or None; why each newer
    one was passed over)."""
    folder = checkpoints_in(path)
    passed_over = []
    for _, name in list_checkpoints(folder):
        try:
            read_manifest(folder / name)
        except InvalidCheckpoint as why:
            passed_over.append(f"{name}: {why}")
            continue
        return folder / name, passed_over
    return None, passed_over


def check_resume(path: Path) -> Path:
    """The run dir (or its checkpoints/ folder) to resume from, made absolute; a LaunchError naming the directory
    when it is missing, has no checkpoints/ folder or holds no complete checkpoint."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise LaunchError(f"--resume {path}: no such run directory")
    folder = checkpoints_in(path)
    if folder == path and not list_checkpoints(path):
        raise LaunchError(
            f"--resume {path}: no {CHECKPOINTS}/ directory in it; only a run that saved checkpoints "
            "(mpnn.Checkpointer, e.g. with --checkpoint-every N) can be resumed"
        )
    newest, passed_over = newest_checkpoint(path)
    if newest is None:
        why = "; ".join(passed_over) if passed_over else "it is empty"
        raise LaunchError(f"--resume {path}: {folder} holds no complete checkpoint ({why})")
    return path
