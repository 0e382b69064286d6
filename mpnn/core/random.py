"""The one random generator every mpnn draw uses (init, dropout, shuffling, multinomial), seeded by manual_seed.

The Generator object itself never changes: manual_seed and set_rng_state reseed it in place, so code
that kept a reference from ``generator()`` follows the new seed too.
"""

from __future__ import annotations

import numpy as np

from mpnn import hooks
from mpnn.core.errors import OpError
from mpnn.core.tensor_base import TensorBase, from_array

_generator = np.random.Generator(np.random.PCG64())
_last_seed: int | None = None  # the seed manual_seed was last given in this process


def generator() -> np.random.Generator:
    """The process-wide np.random.Generator (PCG64) behind every random draw in mpnn."""
    return _generator


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the generator so that every later draw repeats (as torch.manual_seed); returns it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"manual_seed: seed must be a non-negative integer, got {seed!r}")
    global _last_seed
    _generator.bit_generator.state = np.random.PCG64(int(seed)).state
    _last_seed = int(seed)
    for fn in list(hooks.seed_hooks):  # the audit trail records the seed the script really used
        fn(_last_seed)
    return _generator


def last_seed() -> int | None:
    """The seed manual_seed was last given in this process, None before the first call."""
    return _last_seed


def get_rng_state() -> dict:
    """The generator's state as a plain dict (ints and strings), fit for a checkpoint."""
    return _generator.bit_generator.state


def set_rng_state(state: dict) -> None:
    """Restore a state taken by get_rng_state, so the draws continue exactly from there."""
    try:
        _generator.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"set_rng_state: not a PCG64 state from get_rng_state ({exc})") from None


def multinomial(input, num_samples: int, replacement: bool = False, *, generator=None):
    """Draw ``num_samples`` category indices per row of ``input`` (1-D: one distribution; 2-D: one per row) with
    probabilities proportional to its non-negative weights (they need not sum to 1), as torch.multinomial:
    without replacement no index repeats in a row. int64 indices, off the tape. Draws come from ``generator``
    (an np.random.Generator) or mpnn's own, so ``mpnn.manual_seed`` makes them repeat."""
    w = input.data if isinstance(input, TensorBase) else np.asarray(input)
    if w.ndim not in (1, 2):
        raise OpError("multinomial", f"prob_dist must be 1 or 2 dim, got shape {w.shape}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
        raise OpError("multinomial", f"num_samples must be a positive int, got {num_samples!r}")
    if generator is None:
        generator = _generator
    elif not isinstance(generator, np.random.Generator):
        raise TypeError(f"multinomial: generator must be an np.random.Generator, got {type(generator).__name__}")
    rows = w.reshape(1, -1).astype(np.float64) if w.ndim == 1 else w.astype(np.float64)
    n = rows.shape[1]
    if not np.all(np.isfinite(rows)) or np.any(rows < 0):
        raise OpError("multinomial", "probability tensor contains either inf, nan or element < 0")
    totals = rows.sum(axis=1)
    if n == 0 or np.any(totals <= 0):
        raise OpError("multinomial", "invalid distribution: a row's weights sum to 0 (or it has no categories)")
    if not replacement:
        if num_samples > n:
            raise OpError("multinomial", f"cannot sample {num_samples} > {n} categories without replacement")
        positive = int((rows > 0).sum(axis=1).min())
        if num_samples > positive:
            raise OpError(
                "multinomial",
                f"cannot sample {num_samples} without replacement from a row with only "
                f"{positive} categories of non-zero weight",
            )
        # Exponential races (Efraimidis-Spirakis): category i finishes at E_i / w_i, E_i ~ Exp(1); the first
        # num_samples to finish, in finishing order, are an ordered draw without replacement. Zero weight: never.
        with np.errstate(divide="ignore"):
            times = generator.standard_exponential(rows.shape) / rows
        out = np.argsort(times, axis=1, kind="stable")[:, :num_samples]
    else:
        cdf = np.cumsum(rows, axis=1)
        u = generator.random((rows.shape[0], num_samples)) * cdf[:, -1:]
        last = n - 1 - np.argmax(rows[:, ::-1] > 0, axis=1)  # a u rounding up to the total lands here
        out = np.empty((rows.shape[0], num_samples), dtype=np.int64)
        for r in range(rows.shape[0]):
            out[r] = np.minimum(np.searchsorted(cdf[r], u[r], side="right"), last[r])
    out = out.astype(np.int64, copy=False)
    return from_array(out.reshape(num_samples) if w.ndim == 1 else out)
