"""launch/gpt.py's tokens/s in one process against `mpnn launch -n N` (issue 12's scaling target: -n 2 >= 1.7x).

    python benchmarks/gpt_scaling.py                 # -n 2, 300 steps, 3 interleaved repeats
    python benchmarks/gpt_scaling.py -n 4 --steps 500 --repeats 5

Each repeat runs the recipe (batch 12 per rank, block 64, 4 layers, 4 heads, 128 embedding) for --steps steps in
one process and then under the launcher, and reads the tokens/s the example prints at its last step (counted over
every rank's tokens; the validation estimate is outside the timed span). The ratio of the medians is printed. The
machine must have N free cores for the ratio to mean anything: say the load average with the figures.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT = ROOT / "launch" / "gpt.py"


def tokens_per_s(argv, env):
    """Run argv and return the tokens/s of the example's last progress line."""
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    found = re.findall(r"([\d,]+) tokens/s", result.stdout)
    if not found:
        sys.exit(f"no tokens/s line in the output of {' '.join(argv)}:\n{result.stdout[-2000:]}")
    return float(found[-1].replace(",", ""))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2, help="workers under mpnn launch")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPNN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    recipe = [str(GPT), "--steps", str(args.steps), "--eval-every", str(args.steps), "--sample-chars", "0"]
    one, many = [], []
    for repeat in range(args.repeats):
        one.append(tokens_per_s([sys.executable, *recipe], env))
        launch = [sys.executable, "-m", "mpnn", "launch", "-n", str(args.n), "--log-dir", "/tmp/mpnn-gpt-scaling"]
        many.append(tokens_per_s([*launch, *recipe], env))
        print(f"repeat {repeat + 1}: one process {one[-1]:,.0f} tokens/s, -n {args.n} {many[-1]:,.0f} tokens/s")
    ratio = statistics.median(many) / statistics.median(one)
    print(
        f"median: one process {statistics.median(one):,.0f} tokens/s, -n {args.n} {statistics.median(many):,.0f} "
        f"tokens/s, ratio {ratio:.2f}x (load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
