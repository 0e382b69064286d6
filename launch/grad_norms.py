"""A whole plugin in under 30 lines: log each layer's gradient norm every `every` steps (event + line).

PYTHONPATH=. mpnn launch -n 2 --plugin launch.grad_norms:GradNorms:every=500 launch/mnist1d.py   # repo root
"""

import numpy as np

from mpnn.plugins import Option, hookimpl


class GradNorms:
    """Log the L2 norm of each parameter's averaged gradient every `every` steps (rank 0)."""

    name = "grad_norms"
    version = "1.0"
    options = {"every": Option(int, 100, "steps between two logs")}

    def __init__(self, every=100):
        self.every, self.steps = every, 0

    @hookimpl
    def mpnn_after_backward(self, run, named_grads):
        self.steps += 1
        if run.rank == 0 and self.steps % self.every == 0:
            norms = {name: float(np.linalg.norm(g)) for name, g in named_grads.items()}
            if run.recorder is not None:
                run.recorder.event("grad_norms", step=self.steps, norms=norms)
            print(f"step {self.steps} gradient norms " + "  ".join(f"{k} {v:.3g}" for k, v in norms.items()))
