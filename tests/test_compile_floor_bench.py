"""benchmarks/compile.py --floor's reference step: the MLP's replay written out as straight-line kernel calls must
train bit for bit as mpnn.compile's step, or its figures (the floor of the compiled/eager ratio) mean nothing."""

import os

import numpy as np

import mpnn
from test_contention_bench import import_benchmark

_env = dict(os.environ)
compile_bench = import_benchmark("compile")  # it sets one-thread defaults in os.environ for its own runs
os.environ.clear()
os.environ.update(_env)


def _batches(n=4):
    return [(mpnn.from_numpy(x), mpnn.from_numpy(y)) for x, y in compile_bench.data(n)]


def test_floor_step_trains_as_the_compiled_step_bit_for_bit():
    same, compiled, _ = compile_bench.floor_trains_alike(_batches(), steps=6)
    assert same
    assert compiled.stats["captures"] == 1 and compiled.stats["hits"] == 6 and compiled.eager_reason is None


def test_floor_check_sees_a_floor_that_trains_differently(monkeypatch):
    """The check compares bits: a floor step that moves one bias entry by an ulp a step is caught."""
    real = compile_bench.mlp_floor_step

    def off_by_an_ulp(model, opt):
        step = real(model, opt)

        def perturbed(x, y):
            out = step(x, y)
            w = model.linear3.bias.data
            w[0] = np.nextafter(w[0], np.float32(np.inf))
            return out

        return perturbed

    monkeypatch.setattr(compile_bench, "mlp_floor_step", off_by_an_ulp)
    same, _, _ = compile_bench.floor_trains_alike(_batches(), steps=3)
    assert not same


def test_matmuls_alone_are_the_floor_steps_matmuls(monkeypatch):
    """The 'matmuls alone' line times the floor step's products and nothing else: the same operand shapes,
    strides and output arrays, in the same order, as one floor step makes."""
    _, _, floor_step = compile_bench.floor_trains_alike(_batches(), steps=1)
    real, calls = np.matmul, []

    def recording(a, b, out):
        calls.append((a.shape, a.strides, b.shape, b.strides, id(out)))
        return real(a, b, out=out)

    monkeypatch.setattr(np, "matmul", recording)
    x, y = _batches(1)[0]
    floor_step(x, y)
    in_step, calls[:] = list(calls), []
    floor_step.matmuls_only(x, y)
    assert len(in_step) == 8 and calls == in_step
