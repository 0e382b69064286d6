"""benchmarks/contention.py's competing load: N busy processes that really run, and none left behind."""

import importlib
import os
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name):
    """Import benchmarks/<name>.py without leaving benchmarks/ on sys.path or its modules under their plain names:
    benchmarks/mnist1d.py would shadow the mnist1d package that later tests import (it did, in the whole suite)."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"benchmarks/{name}.py cannot be imported here: {error}", allow_module_level=True)
    finally:
        sys.path.remove(str(BENCHMARKS))
        for added in set(sys.modules) - before:
            origin = getattr(sys.modules[added], "__file__", None)
            if origin and Path(origin).resolve().parent == BENCHMARKS:
                del sys.modules[added]


contention = import_benchmark("contention")


def cpu_seconds(pid):
    """User + system CPU seconds of process `pid` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("kind", sorted(contention.BUSY_LOOPS))
def test_busy_load_burns_cpu_and_is_killed_on_the_way_out(kind):
    with pytest.raises(RuntimeError), contention.BusyLoad(2, kind) as load:
        processes = list(load.processes)
        assert len(processes) == 2 and all(p.poll() is None for p in processes)
        time.sleep(0.3)
        assert all(cpu_seconds(p.pid) > 0.01 for p in processes)  # spinning, not waiting
        raise RuntimeError("a failed measurement")
    assert all(p.returncode is not None for p in processes)  # killed and reaped even so
    assert not load.processes
