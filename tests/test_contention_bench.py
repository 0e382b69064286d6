"""benchmarks/contention.py's competing load: N busy processes that really run, and none left behind."""

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
contention = pytest.importorskip("contention")


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
