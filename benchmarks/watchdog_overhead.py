"""The memory-leak watchdog's cost in step time, in this process (moved here from mpnn.plugins.watchdog, which
must not import mpnn's top level: mpnn.init sits above the plugins).

    python benchmarks/watchdog_overhead.py [--features 40 --hidden 256 --batch 100] [--block 100] [--blocks 40]
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, as `mpnn launch` gives each worker; before NumPy loads

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from time import perf_counter  # noqa: E402

import numpy as np  # noqa: E402

import mpnn  # noqa: E402
from mpnn import nn, telemetry  # noqa: E402
from mpnn.plugins.hookspec import hookimpl  # noqa: E402
from mpnn.plugins.watchdog import Watchdog  # noqa: E402


def measure_overhead(features: int = 32, hidden: int = 64, batch: int = 64, block: int = 100, blocks: int = 40) -> dict:
    """The watchdog's cost in step time, as `--plugin watchdog` adds it to a recorded run: an mpnn MLP
    (features-hidden-hidden-10 on `batch` random rows) in this process under mpnn.init(plugins=[Watchdog()]) with a run
    directory, past warm-up. Blocks of `block` steps rotate through three set-ups, so that drift on a busy machine
    hits all alike: "bare" (telemetry only), "record" (the recorder builds each step's record dict for the plugins,
    which nobody reads) and "watchdog" (that, plus pluggy's dispatch and the hook). Prints and returns the median,
    over rounds, of each set-up's step time relative to "bare", in percent, and the time spent inside the watchdog's
    own hook ("hook", timed around it, in percent of the bare step). Run it in its own process, with
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 as the launcher gives workers (this script sets them); it pins itself
    to one core as the launcher pins a worker. Each block ends with a telemetry flush inside its timing: without
    plugins the recorder builds a step's line at flush time instead of at the step, and a flush landing in another
    set-up's block charged that set-up with it (which made "record" look ~2.5 points dearer than it is). The
    defaults are a worst case (a ~0.2 ms step); features=40, hidden=256, batch=100 is the MNIST-1D MLP's shape."""

    class TimedWatchdog(Watchdog):
        """The watchdog, timing its own step hook."""

        hook_s, hook_calls = 0.0, 0

        @hookimpl(trylast=True)
        def mpnn_step_end(self, run, record):
            t0 = perf_counter()
            super().mpnn_step_end(run, record)
            self.hook_s += perf_counter() - t0
            self.hook_calls += 1

    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core, as `mpnn launch` gives each worker
    with tempfile.TemporaryDirectory() as run_dir:
        os.environ["MPNN_RUN_DIR"] = run_dir  # mpnn.init records telemetry there, and the plugin sees each step
        dog = TimedWatchdog()
        mpnn.init(plugins=[dog])
        recorder = telemetry.get_recorder()
        setups = {"bare": None, "record": lambda record: None, "watchdog": recorder.on_step}
        mpnn.manual_seed(0)
        rng = np.random.default_rng(0)
        x = mpnn.from_numpy(rng.standard_normal((batch, features)).astype(np.float32))
        y = mpnn.from_numpy(rng.integers(0, 10, batch))
        model = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        opt = mpnn.optim.Adam(model.parameters(), lr=1e-3)

        def steps(n, setup):
            recorder.on_step = setups[setup]
            t0 = perf_counter()
            for _ in range(n):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            recorder.flush()  # this block's lines, built and written on its own clock
            return (perf_counter() - t0) / n

        steps(dog.warmup + dog.window, "watchdog")  # past warm-up: every watched step now feeds the trend checks
        names, times = list(setups), {name: [] for name in setups}
        for b in range(blocks):
            for name in names[b % 3 :] + names[: b % 3]:
                times[name].append(steps(block, name))
        recorder.on_step = setups["watchdog"]
        telemetry.stop()
        del os.environ["MPNN_RUN_DIR"]
    bare = statistics.median(times["bare"])
    result = {
        name: 100.0 * (statistics.median(t / b for t, b in zip(times[name], times["bare"])) - 1.0)
        for name in ("record", "watchdog")
    }
    result["hook"] = 100.0 * dog.hook_s / dog.hook_calls / bare
    print(
        f"step time over bare telemetry ({1e6 * bare:.1f} us/step): record dict for plugins "
        f"{result['record']:+.2f}%, with the watchdog {result['watchdog']:+.2f}%; inside the watchdog's hook "
        f"{1e6 * dog.hook_s / dog.hook_calls:.2f} us/step = {result['hook']:.2f}% (medians over {blocks} rounds of "
        f"{block}-step blocks; {dog._stats['checks']} trend checks of "
        f"{1e6 * dog._stats['check_s'] / max(1, dog._stats['checks']):.0f} us, {dog._stats['suspicions']} "
        "tracemalloc confirmations)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--block", type=int, default=100, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=40, help="timed blocks (rotating through the three set-ups)")
    args = parser.parse_args()
    measure_overhead(args.features, args.hidden, args.batch, args.block, args.blocks)


if __name__ == "__main__":
    main()
