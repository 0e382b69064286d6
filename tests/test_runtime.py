"""mpnn.init() in a worker: denormals flushed to zero on the training thread unless MPNN_FLUSH_DENORMAL=0."""

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
