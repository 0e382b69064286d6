"""What the aarch64 job (.ci/arm64, emulated) adds to the marked tests from other files: every Numba kernel in
float32 (the dtype training uses) against the NumPy references of test_conv_pool and test_optim, backward
kernels included; the flush-to-zero control register (MXCSR on x86-64, FPCR on aarch64); the collectives in a
world of two; a short two-worker MNIST-1D run through `mpnn launch -n 2`; and launch/xor.py. Float32 only,
because under emulation compiling each kernel costs seconds; the float64 gradchecks stay in the native suite.
They run on every platform, as part of the ordinary suite too."""

import math
import platform
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from commworld import run_world, values
from mpnn import optim
from mpnn.core import conv as conv_module
from mpnn.core.activation import gelu
from mpnn.core.conv import conv1d, conv2d
from mpnn.core.fpenv import flush_denormals_begin, flush_denormals_end, set_flush_denormal
from mpnn.core.pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d
from mpnn.core.tensor import Tensor
from mpnn.telemetry.reader import load_run
from test_comm import assert_world_ok, collectives_worker
from test_conv_pool import avg_reduce, ref_conv2d, ref_pool2d
from test_optim import adam_reference, sgd_reference

pytestmark = pytest.mark.arm64

REPO = Path(__file__).resolve().parents[1]
DENORMALS = np.array([1e-39, -3e-40, 5e-45], np.float32)  # below float32's smallest normal, 1.2e-38
# Seconds per example or world. aarch64 in CI is emulated (several times slower, and Numba compiles every kernel
# there under emulation); a native arm64 host just finishes early.
TIMEOUT = 600 if platform.machine() in ("aarch64", "arm64") else 60
RNG = np.random.default_rng(11)


def float32_leaf(array):
    """A float32 leaf that records gradients (training's dtype)."""
    return Tensor(np.asarray(array, np.float32), requires_grad=True)


def numpy_vjp(reference, array, g, h=1e-3):
    """<d reference / d array, g> by central differences of a float64 NumPy reference that is linear in `array`
    (or piecewise linear, with no ties within h): exact up to rounding, so it checks a float32 backward kernel."""
    grad = np.zeros(array.size)
    for i in range(array.size):
        step = np.zeros(array.size)
        step[i] = h
        up, down = reference(array + step.reshape(array.shape)), reference(array - step.reshape(array.shape))
        grad[i] = np.sum((up - down) * g) / (2 * h)
    return grad.reshape(array.shape)


def assert_float32_close(got, want, what):
    assert got.dtype == np.float32, what
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()), err_msg=what)


def check_conv2d(x, w, b, stride, padding, dilation, groups):
    """conv2d in float32 (forward and the x, w, b gradients) against ref_conv2d in float64."""

    def ref(xx=x, ww=w):
        return ref_conv2d(xx, ww, b, (stride,) * 2, (padding,) * 2, (padding,) * 2, (dilation,) * 2, groups)

    leaves = [float32_leaf(a) for a in (x, w, b)]
    out = conv2d(*leaves, stride, padding, dilation, groups)
    assert_float32_close(out.data, ref(), "conv2d forward")
    g = RNG.standard_normal(out.shape)
    out.backward(g.astype(np.float32))
    assert_float32_close(leaves[0].grad.data, numpy_vjp(lambda xx: ref(xx=xx), x, g), "conv2d d/dx")
    assert_float32_close(leaves[1].grad.data, numpy_vjp(lambda ww: ref(ww=ww), w, g), "conv2d d/dw")
    assert_float32_close(leaves[2].grad.data, g.sum(axis=(0, 2, 3)), "conv2d d/db")


def run_example(args, cwd, timeout=TIMEOUT):
    """Run `python <args>` from cwd; the CompletedProcess, with a failure message that shows its output."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_im2col_conv2d_float32_matches_numpy():
    """im2col, col2im and swap_leading_axes (several samples per GEMM), with groups, stride and dilation."""
    x, w, b = RNG.standard_normal((3, 4, 7, 8)), RNG.standard_normal((6, 2, 3, 2)), RNG.standard_normal(6)
    check_conv2d(x, w, b, stride=2, padding=1, dilation=2, groups=2)


def test_winograd_conv2d_float32_matches_numpy(monkeypatch):
    """The five Winograd F(4x4, 3x3) kernels, forced on a small map cut into several chunks."""
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_WIDTH", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_TILES", 5)
    x, w, b = RNG.standard_normal((2, 3, 7, 9)), RNG.standard_normal((4, 3, 3, 3)), RNG.standard_normal(4)
    assert conv_module._winograd_fits((3, 3, 1, 1, 1, 1, 1, 1, 1), 3, 4, 9)
    check_conv2d(x, w, b, stride=1, padding=1, dilation=1, groups=1)


def test_conv1d_float32_matches_numpy():
    x, w, b = RNG.standard_normal((5, 1, 40)), RNG.standard_normal((4, 1, 5)), RNG.standard_normal(4)
    out = conv1d(float32_leaf(x), float32_leaf(w), float32_leaf(b), 2, 1)  # the MNIST-1D CNN's first layer
    want = ref_conv2d(x[:, :, None], w[:, :, None], b, (1, 2), (0, 1), (0, 1), (1, 1), 1)[:, :, 0]
    assert_float32_close(out.data, want, "conv1d forward")


def test_pool_kernels_float32_match_numpy():
    """max, avg and adaptive avg pooling, forward and backward (values spaced apart: no ties for max)."""
    x = RNG.permutation(np.arange(2 * 3 * 7 * 8) * 0.01).reshape(2, 3, 7, 8)
    cases = [
        (
            lambda t: max_pool2d(t, 3, 2, 1, 1, True),
            lambda a: ref_pool2d(a, (3, 3), (2, 2), (1, 1), (1, 1), True, lambda v, r, c: v.max(-1)),
        ),
        (
            lambda t: avg_pool2d(t, 3, 2, 1, True, False),
            lambda a: ref_pool2d(
                a, (3, 3), (2, 2), (1, 1), (1, 1), True, avg_reduce((3, 3), (2, 2), (1, 1), 7, 8, False)
            ),
        ),
        (
            lambda t: adaptive_avg_pool2d(t, (3, 5)),
            lambda a: np.stack(
                [
                    np.stack(
                        [
                            a[:, :, (i * 7) // 3 : -((-(i + 1) * 7) // 3), (j * 8) // 5 : -((-(j + 1) * 8) // 5)].mean(
                                axis=(2, 3)
                            )
                            for j in range(5)
                        ],
                        -1,
                    )
                    for i in range(3)
                ],
                -2,
            ),
        ),
    ]
    for pool, ref in cases:
        leaf = float32_leaf(x)
        out = pool(leaf)
        assert_float32_close(out.data, ref(x), f"{pool} forward")
        g = RNG.standard_normal(out.shape)
        out.backward(g.astype(np.float32))
        assert_float32_close(leaf.grad.data, numpy_vjp(ref, x, g), f"{pool} backward")


def test_erf_kernel_float32_matches_math_erf():
    x = np.linspace(-4, 4, 41)
    want = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]
    assert_float32_close(gelu(Tensor(x.astype(np.float32))).data, want, "gelu (erf kernel)")


@pytest.mark.parametrize(
    "make,reference",
    [
        (
            lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
            lambda p, gs: sgd_reference(p, gs, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
        ),
        (
            lambda ps: optim.SGD(ps, lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=True, maximize=True),
            lambda p, gs: sgd_reference(p, gs, lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=True, maximize=True),
        ),
        (
            lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
            lambda p, gs: adam_reference(p, gs, lr=0.01, weight_decay=0.1, amsgrad=True),
        ),
        (
            lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.3),
            lambda p, gs: adam_reference(p, gs, lr=0.01, weight_decay=0.3, decoupled=True),
        ),
    ],
    ids=["sgd", "sgd-nesterov", "adam-amsgrad", "adamw"],
)
def test_optimizer_kernels_float32_match_numpy(make, reference):
    start, grads = RNG.standard_normal(300), [RNG.standard_normal(300) for _ in range(4)]
    param = float32_leaf(start)
    opt = make([param])
    for step, want in enumerate(reference(start, grads)):
        param.grad = Tensor(grads[step].astype(np.float32))
        opt.step()
        np.testing.assert_allclose(param.data, want, rtol=2e-5, atol=2e-5, err_msg=f"step {step}")


def test_flush_denormals_sets_and_restores_the_control_register():
    kept = DENORMALS * np.float32(2)
    assert np.all(kept != 0)  # gradual underflow is the default
    old = flush_denormals_begin()
    try:
        flushed = DENORMALS * np.float32(2)
    finally:
        flush_denormals_end(old)
    assert np.all(flushed == 0), f"flush-to-zero on {sys.platform}: {flushed}"
    np.testing.assert_array_equal(DENORMALS * np.float32(2), kept)


def test_set_flush_denormal_applies_to_the_whole_thread():
    assert set_flush_denormal(True), "flush-to-zero is supported on x86-64 and aarch64"
    try:
        assert np.all(DENORMALS + np.float32(0) == 0)
    finally:
        set_flush_denormal(False)
    assert np.all(DENORMALS + np.float32(0) != 0)


@pytest.mark.parametrize("env", [{}, {"MPNN_SHM": "0"}], ids=["shared-memory", "socket-ring"])
def test_collectives_in_a_world_of_two(env):
    reports = values(run_world(collectives_worker, 2, (True,), env=env, comm_timeout=60, deadline=TIMEOUT))
    assert_world_ok(reports)


def test_mnist1d_on_two_workers_through_mpnn_launch(tmp_path):
    steps, run_id = 100, f"arm64-{uuid.uuid4().hex[:8]}"
    proc = run_example(
        [
            "-m",
            "mpnn",
            "launch",
            "-n",
            "2",
            "--log-dir",
            str(tmp_path),
            "--run-id",
            run_id,
            str(REPO / "launch" / "mnist1d.py"),
            "--steps",
            str(steps),
            "--eval-every",
            "50",
        ],
        tmp_path,
    )
    found = re.search(rf"final test accuracy ([0-9.]+) \(cnn, {steps} steps, world 2\)", proc.stdout)
    assert found, proc.stdout[-3000:]
    assert float(found.group(1)) > 0.3, proc.stdout[-3000:]  # chance is 0.1; 0.55 after 100 steps on x86-64
    run = load_run(tmp_path / run_id)
    assert sorted(run.ranks) == [0, 1]
    for log in run.ranks.values():
        assert [record["step"] for record in log.steps] == list(range(1, steps + 1)), f"rank {log.rank}"
        first, last = np.mean([r["loss"] for r in log.steps[:10]]), np.mean([r["loss"] for r in log.steps[-10:]])
        assert last < first - 0.5, f"rank {log.rank}: loss {first:.3f} -> {last:.3f}"


def test_xor_example_learns_xor(tmp_path):
    proc = run_example([str(REPO / "launch" / "xor.py")], tmp_path)
    assert "predictions [0, 1, 1, 0]" in proc.stdout, proc.stdout
