"""Transformed conv weights (Winograd's U) kept between forwards that do not train the weight: evaluation under
no_grad, frozen layers. The Winograd algorithms (conv_winograd*.py) ask here instead of transforming each call.

Why: ResNet-18's eval forward (batch 32) transforms all its 3x3 weights on every call; F(2x2, 3x3) of one
512x512 layer took 3.3 ms of that layer's 19 (AMD EPYC Zen 4, one thread). A hit costs a comparison of the
weight with a copy instead (0.25 ms for those 9.4 MB when in cache).

Exact: an entry is used only when the weight's bytes equal the private copy taken when the entry was made,
compared in full. A write through ``.data`` (which bumps no version counter) is caught as surely as an
optimizer's step, and NaN payloads and signed zeros count as the bits they are.

Bounded: an entry is made at the second forward that meets the same weight array (a weight computed afresh each
call, standardized or merged, is never copied), lives while that array does (a weakref), is dropped when a forward
trains the weight (the eval after makes it again), and is added only while all entries (U and the copy) stay under
the budget (MPNN_CONV_CACHE_MB, 512 by default), so a model larger than the budget caches its first layers and
recomputes the rest, with no eviction churn.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np
from numba import njit


def budget_from_env(value=None):
    """MPNN_CONV_CACHE_MB in bytes: the MiB all entries may hold (default 512; 0 keeps none). ResNet-18 at batch 32
    holds ~140 MB (U is 16/9 to 9x the weight, plus the copy). A malformed value raises, naming it."""
    if value is None:
        value = os.environ.get("MPNN_CONV_CACHE_MB", "")
    if not value.strip():
        return 512 << 20
    try:
        mb = float(value)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb >= 0):
        raise ValueError(
            f"MPNN_CONV_CACHE_MB={value!r}: must be a number of MiB >= 0 (the transformed conv weights kept for "
            f"forwards that do not train them; 0 keeps none)"
        )
    return int(mb * (1 << 20))


_BUDGET_BYTES = budget_from_env()

# reentrant: an allocation under the lock may run the garbage collector, whose weakref callbacks (_forget) take it
_lock = threading.RLock()
_entries: dict = {}  # (id(weight array), kind) -> _Entry
_sighted: dict = {}  # (id(weight array), kind) -> weakref of an array met once (no entry made yet)
_counts = {"hits": 0, "misses": 0, "stale": 0, "dropped": 0}


class _Entry:
    __slots__ = ("ref", "copy", "u", "nbytes")

    def __init__(self, ref, copy, u):
        self.ref, self.copy, self.u = ref, copy, u
        self.nbytes = copy.nbytes + u.nbytes


@njit(cache=True, fastmath=False)
def _differ(a, b):
    """Whether the unsigned words a and b differ anywhere (one OR-reduced pass, no early exit, so LLVM
    vectorizes it: 0.25 ms for 9.4 MB against 4.4 ms with an exit test per block of 4096)."""
    if a.shape[0] == 0:
        return False
    d = a[0] ^ b[0]
    for i in range(1, a.shape[0]):
        d |= a[i] ^ b[i]
    return d != 0


def _words(a):
    """a's bytes as a flat array of unsigned words (8 bytes when they divide its size, else 4)."""
    flat = a.reshape(-1)
    return flat.view(np.uint64) if a.nbytes % 8 == 0 else flat.view(np.uint32)


def _same_bits(a, copy):
    return a.shape == copy.shape and a.dtype == copy.dtype and not _differ(_words(a), _words(copy))


def _forget(key, ref):
    """The weight array died: drop its entry or sighting (unless a newer array under a reused id owns the key now)."""
    with _lock:
        e = _entries.get(key)
        if e is not None and e.ref is ref:
            del _entries[key]
        if _sighted.get(key) is ref:
            del _sighted[key]


def transformed(w, kind, make, train):
    """U = make(w) for the conv weight array w, from the cache when a forward does not train w (``train`` False)
    and w's bytes are those U was made from. U is shared between calls: callers only read it.

    kind names the transform (one weight can feed several algorithms); a forward that trains w drops w's entries
    of that kind, as the weight is about to change."""
    key = (id(w), kind)
    if train:
        if _entries:
            with _lock:
                if _entries.pop(key, None) is not None:
                    _counts["dropped"] += 1
        return make(w)
    if not (w.flags.c_contiguous and w.flags.aligned):
        return make(w)
    e = _entries.get(key)
    if e is not None and e.ref() is w:
        if _same_bits(w, e.copy):
            _counts["hits"] += 1
            return e.u
        _counts["stale"] += 1
        again = True  # a lasting weight whose bits changed: keep the new ones
    else:
        seen = _sighted.get(key)
        again = seen is not None and seen() is w
    _counts["misses"] += 1
    u = make(w)
    with _lock:
        ref = weakref.ref(w, lambda r, key=key: _forget(key, r))
        if not again:  # met once: remember the array, copy nothing yet
            _sighted[key] = ref
            return u
        _sighted.pop(key, None)
        old = _entries.pop(key, None)
        used = sum(x.nbytes for x in _entries.values())
        if used + w.nbytes + u.nbytes <= _BUDGET_BYTES:
            _entries[key] = _Entry(ref, w.copy(), u)
        del old
    return u


def info():
    """{'entries', 'bytes', 'hits', 'misses', 'stale', 'dropped'}: what the cache holds and has done (misses
    include the stale lookups; dropped: entries removed by a forward that trains their weight)."""
    with _lock:
        return {
            "entries": len(_entries),
            "bytes": sum(e.nbytes for e in _entries.values()),
            **_counts,
        }


def clear():
    """Drop every entry and zero the counts."""
    with _lock:
        _entries.clear()
        _sighted.clear()
        for k in _counts:
            _counts[k] = 0
