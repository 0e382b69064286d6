"""Keep freed activation memory in the process instead of handing it back to the kernel after every op.

glibc's malloc serves blocks above its mmap threshold (128 KB at first, raised up to 32 MB by the dynamic rule)
with fresh mmap'd pages and trims freed memory at the top of the heap back to the kernel, so a training step that
allocates and frees the same megabyte activations every op pays a page fault per 4 KB page, again each step. On
the nanoGPT CPU recipe (benchmarks/gpt.py) pinning both thresholds made the mpnn step 73 ms instead of 81 ms
(medians of three runs each, one thread); setting the trim threshold alone made it 118 ms (fixing one parameter
switches the dynamic mmap threshold off, leaving it at 128 KB). torch's CPU allocator sits on the same malloc.
The cost: the process keeps up to ``trim_mb`` of freed memory mapped, so RSS stays at its peak working set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(mmap_mb: int = 32, trim_mb: int = 1024) -> bool:
    """Serve blocks up to ``mmap_mb`` from the heap and keep up to ``trim_mb`` of freed heap mapped (glibc's
    mallopt; 32 MB is glibc's largest mmap threshold on 64-bit). Once per process; False where not glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_mb << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_mb << 20))
    _done = ok
    return ok
