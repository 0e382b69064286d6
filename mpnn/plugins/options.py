"""Plugin options: each declared with a type, a default and one line of help, checked before a run starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One option of a plugin. ``type`` is int, float, str, bool, or a tuple of the allowed strings."""

    type: Any
    default: Any
    help: str
