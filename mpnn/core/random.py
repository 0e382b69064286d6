"""The one random generator every mpnn draw uses (init, dropout, shuffling), seeded by manual_seed.

The Generator object itself never changes: manual_seed and set_rng_state reseed it in place, so code
that kept a reference from ``generator()`` follows the new seed too.
"""
from __future__ import annotations

import numpy as np

_generator = np.random.Generator(np.random.PCG64())


def generator() -> np.random.Generator:
    """The process-wide np.random.Generator (PCG64) behind every random draw in mpnn."""
    return _generator


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the generator so that every later draw repeats (as torch.manual_seed); returns it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"manual_seed: seed must be a non-negative integer, got {seed!r}")
    _generator.bit_generator.state = np.random.PCG64(int(seed)).state
    return _generator


def get_rng_state() -> dict:
    """The generator's state as a plain dict (ints and strings), fit for a checkpoint."""
    return _generator.bit_generator.state


def set_rng_state(state: dict) -> None:
    """Restore a state taken by get_rng_state, so the draws continue exactly from there."""
    try:
        _generator.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"set_rng_state: not a PCG64 state from get_rng_state ({exc})") from None
