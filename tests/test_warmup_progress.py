"""The kernel warm-up says what it does when it takes long (a cold Numba cache: the first launch after an
install), stays silent when the cache is warm, and `mpnn warmup` does it ahead of time."""

import io
import subprocess
import sys

from mpnn.launch.warmup import ConsoleProgress, warm_numba_cache


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_silent_while_fast_then_one_line_and_a_closing_line(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("mpnn.launch.warmup.time.monotonic", clock)
    stream = io.StringIO()
    progress = ConsoleProgress(after=2.0, stream=stream)
    progress(1, 10)
    clock.now += 1.5
    progress(2, 10)
    assert stream.getvalue() == ""  # a warm cache finishes well inside the threshold: nothing printed
    clock.now += 1.0
    progress(3, 10)
    progress(4, 10)
    clock.now += 20.0
    progress(10, 10)
    progress.close()
    assert stream.getvalue().splitlines() == [
        "mpnn: compiling kernels once into the Numba cache (3 of 10 done; `mpnn warmup` does this ahead of time)",
        "mpnn: kernels ready (10 of 10) in 22.5 s",
    ]


def test_a_fast_warmup_closes_silently():
    stream = io.StringIO()
    progress = ConsoleProgress(after=3600, stream=stream)
    progress(5, 5)
    progress.close()
    assert stream.getvalue() == ""


def test_every_piece_is_counted_up_to_the_total():
    seen = []
    assert warm_numba_cache(progress=lambda done, total: seen.append((done, total)))
    total = seen[0][1]
    assert seen == [(done, total) for done in range(1, total + 1)] and total > 10


def test_mpnn_warmup_command_reports_and_exits_zero():
    proc = subprocess.run(
        [sys.executable, "-c", "from mpnn.cli import main; main()", "warmup"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("mpnn: compiling kernels once into the Numba cache (1 of ")
    assert lines[1].startswith("mpnn: kernels ready (") and lines[2].startswith("cache: ")
