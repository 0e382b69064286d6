"""mpnn.init() in a worker: denormals flushed to zero on the training thread unless MPNN_FLUSH_DENORMAL=0, and freed
memory kept mapped unless MPNN_KEEP_FREED_MEMORY=0."""

import os
import subprocess
import sys

import pytest

CODE = (
    "import numpy as np, mpnn; tiny = np.float32(1e-39); before = bool(tiny * np.float32(2) == 0); "
    "mpnn.init(); print(before, bool(tiny * np.float32(2) == 0))"
)


@pytest.mark.parametrize("setting,flushed", [(None, True), ("1", True), ("0", False), ("no", False)])
def test_init_flushes_denormals_unless_told_not_to(setting, flushed):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    if setting is not None:
        env["MPNN_FLUSH_DENORMAL"] = setting
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", str(flushed)], out.stderr


KEEP = (
    "import numpy as np, mpnn; from mpnn.core import allocator; mpnn.init()\n"
    "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
    "a = np.ones(8 << 20, np.uint8); before = rss(); del a\n"
    "print(allocator._done, before - rss() > 4 << 20)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("setting,kept", [(None, True), ("0", False)])
def test_init_keeps_freed_memory_mapped_unless_told_not_to(setting, kept):
    """mpnn.init() pins glibc's mmap and trim thresholds: a freed 8 MB activation stays in the process (RSS does
    not drop) for the next op to reuse without page faults; MPNN_KEEP_FREED_MEMORY=0 keeps glibc's defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    if setting is not None:
        env["MPNN_KEEP_FREED_MEMORY"] = setting
    out = subprocess.run([sys.executable, "-c", KEEP], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [str(kept), str(not kept)], out.stdout + out.stderr
