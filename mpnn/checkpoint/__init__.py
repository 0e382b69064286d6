"""Exact checkpoint and resume: mpnn.Checkpointer writes <run_dir>/checkpoints/step-<step>/ atomically and
restores the newest valid one, so a stopped run continues bit for bit (see checkpointer.py), or on another number of
ranks with its data order and loss curve going on (resize.py)."""

from mpnn.checkpoint.checkpointer import Checkpointer, CheckpointSaveError, ResumeError, ResumeState

__all__ = ["Checkpointer", "ResumeState", "ResumeError", "CheckpointSaveError"]
