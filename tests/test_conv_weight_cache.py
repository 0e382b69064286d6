"""The cache of transformed conv weights (mpnn/core/conv_weight_cache.py): a forward that does not train a weight
reuses its Winograd transform only while the weight's bits are unchanged, for each algorithm that asks (F(4x4, 3x3),
F(2x2, 3x3), the stride-2 Winograd); writes that bypass the version counter, optimizer steps, replaced arrays,
training forwards, dead weights and the byte budget are each checked against a forward with the cache off."""

import gc
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mpnn
from mpnn.core import conv as conv_module
from mpnn.core import conv_weight_cache
from mpnn.core.conv import conv2d

RNG = np.random.default_rng(5)

# (name, x shape, w shape, stride): one conv each algorithm takes at conv.py's thresholds
CASES = [
    ("winograd-f4x4", (2, 9, 10, 10), (9, 9, 3, 3), 1),  # 81 weight entries: an odd count of float32 words
    ("winograd-f2x2", (2, 64, 4, 4), (64, 64, 3, 3), 1),
    ("winograd-s2", (2, 64, 16, 16), (32, 64, 3, 3), 2),
]


@pytest.fixture(autouse=True)
def fresh_cache():
    conv_module_budget = conv_weight_cache._BUDGET_BYTES
    conv_weight_cache.clear()
    yield
    conv_weight_cache._BUDGET_BYTES = conv_module_budget
    conv_weight_cache.clear()


def tensors(x_shape, w_shape, dtype=np.float32):
    x = mpnn.tensor(RNG.standard_normal(x_shape).astype(dtype))
    w = mpnn.tensor((RNG.standard_normal(w_shape) * 0.1).astype(dtype), requires_grad=True)
    b = mpnn.tensor(RNG.standard_normal(w_shape[0]).astype(dtype))
    return x, w, b


def uncached(x, w, b, stride):
    """The forward with the cache out of the way (a budget of 0 adds nothing and the cache starts empty)."""
    saved_entries = dict(conv_weight_cache._entries)
    saved_sighted = dict(conv_weight_cache._sighted)
    saved_counts = dict(conv_weight_cache._counts)
    budget = conv_weight_cache._BUDGET_BYTES
    conv_weight_cache._entries.clear()
    conv_weight_cache._BUDGET_BYTES = 0
    try:
        with mpnn.no_grad():
            return conv2d(x, w, b, stride=stride, padding=1).data.copy()
    finally:
        conv_weight_cache._BUDGET_BYTES = budget
        conv_weight_cache._entries.update(saved_entries)
        conv_weight_cache._sighted.clear()
        conv_weight_cache._sighted.update(saved_sighted)
        conv_weight_cache._counts.update(saved_counts)


def evaluate(x, w, b, stride):
    with mpnn.no_grad():
        return conv2d(x, w, b, stride=stride, padding=1).data.copy()


def algorithm_of(x, w, stride):
    problem = conv_module.ConvProblem(x.data, w.data, None, (3, 3, stride, stride, 1, 1, 1, 1, 1), 1, 1, False)
    oh = (x.shape[2] + 2 - 3) // stride + 1
    problem = problem._replace(oh=oh, ow=(x.shape[3] + 2 - 3) // stride + 1)
    return conv_module.select(problem).name


@pytest.mark.parametrize("name, x_shape, w_shape, stride", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_forward_hits_and_gives_the_same_bits(name, x_shape, w_shape, stride, dtype):
    x, w, b = tensors(x_shape, w_shape, dtype)
    assert algorithm_of(x, w, stride) == name
    ref = uncached(x, w, b, stride)
    first = evaluate(x, w, b, stride)
    assert conv_weight_cache.info()["entries"] == 0  # met once: nothing copied yet
    second = evaluate(x, w, b, stride)
    third = evaluate(x, w, b, stride)
    info = conv_weight_cache.info()
    assert (info["misses"], info["hits"], info["entries"]) == (2, 1, 1)
    assert info["bytes"] > w.data.nbytes  # the copy and U
    for got in (first, second, third):
        np.testing.assert_array_equal(got, ref)


def _bit_flip(a):
    """The last word of a's bytes with its lowest bit flipped: the smallest change a float can see."""
    flat = a.reshape(-1).view(np.uint32)
    flat[-1] ^= 1


@pytest.mark.parametrize("name, x_shape, w_shape, stride", CASES)
@pytest.mark.parametrize(
    "write",
    [
        lambda a: a.__setitem__((0, 0, 0, 0), a[0, 0, 0, 0] + 0.25),  # the first entry
        _bit_flip,  # the last bit of the last entry
        lambda a: a.__setitem__((1, 2, 1, 1), -0.0 if a[1, 2, 1, 1] == 0 else 0.0),  # a zero's sign or a value
        lambda a: a.__setitem__((0, 1, 2, 0), np.nan),
    ],
    ids=["first-entry", "last-bit", "signed-zero", "nan"],
)
def test_a_write_through_data_is_seen(name, x_shape, w_shape, stride, write):
    """Writes through .data bump no version counter: the cache compares the bits themselves."""
    x, w, b = tensors(x_shape, w_shape)
    evaluate(x, w, b, stride)
    evaluate(x, w, b, stride)
    write(w.data)
    got = evaluate(x, w, b, stride)
    np.testing.assert_array_equal(got, uncached(x, w, b, stride))
    info = conv_weight_cache.info()
    assert (info["stale"], info["hits"]) == (1, 0)
    again = evaluate(x, w, b, stride)  # the new bits are cached now
    np.testing.assert_array_equal(again, got)
    assert conv_weight_cache.info()["hits"] == 1


def test_signed_zero_alone_is_a_change():
    """-0.0 == 0.0 as floats but not as bits; the transform is the same either way here, so the test checks
    the lookup: the entry made from +0.0 is not taken for -0.0."""
    x, w, b = tensors(*CASES[1][1:3])
    w.data[0, 0, 0, 0] = 0.0
    evaluate(x, w, b, 1)
    evaluate(x, w, b, 1)
    w.data[0, 0, 0, 0] = -0.0
    evaluate(x, w, b, 1)
    assert conv_weight_cache.info()["stale"] == 1


@pytest.mark.parametrize("name, x_shape, w_shape, stride", CASES)
def test_training_between_evals(name, x_shape, w_shape, stride):
    """An optimizer step changes the weight: the training forward drops the entry, the next eval makes it anew
    and matches a forward without the cache; a forward with grad on and a weight that trains never inserts."""
    x, w, b = tensors(x_shape, w_shape)
    opt = mpnn.optim.SGD([w], lr=0.1)
    for _ in range(3):
        evaluate(x, w, b, stride)
        evaluate(x, w, b, stride)
        assert conv_weight_cache.info()["entries"] == 1
        out = conv2d(x, w, b, stride=stride, padding=1)
        assert conv_weight_cache.info()["entries"] == 0
        (out * out).sum().backward()
        opt.step()
        opt.zero_grad()
        np.testing.assert_array_equal(evaluate(x, w, b, stride), uncached(x, w, b, stride))
    # the first step: a sighting and an entry; then each step's first eval makes the entry its last eval sighted
    # and its second hits; the training forward drops each entry before the weight changes (nothing goes stale)
    info = conv_weight_cache.info()
    assert (info["dropped"], info["hits"], info["misses"], info["stale"]) == (3, 2, 7, 0)


@pytest.mark.parametrize("name, x_shape, w_shape, stride", CASES)
def test_frozen_weight_backward(name, x_shape, w_shape, stride):
    """A frozen weight (requires_grad False) under grad mode: the forward takes U from the cache and its backward
    reads it for the input's gradient, with the same bits as without the cache, and leaves it unchanged."""
    x, w, b = tensors(x_shape, w_shape)
    w.requires_grad_(False)

    def grads():
        xi = mpnn.tensor(x.data.copy(), requires_grad=True)
        out = conv2d(xi, w, b, stride=stride, padding=1)
        (out * out).sum().backward()
        return out.data.copy(), xi.grad.data.copy()

    budget = conv_weight_cache._BUDGET_BYTES
    conv_weight_cache._BUDGET_BYTES = 0
    ref_out, ref_dx = grads()
    conv_weight_cache._BUDGET_BYTES = budget
    conv_weight_cache.clear()
    for _ in range(4):
        out, dx = grads()
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(dx, ref_dx)
    info = conv_weight_cache.info()
    assert (info["misses"], info["hits"]) == (2, 2)
    np.testing.assert_array_equal(evaluate(x, w, b, stride), uncached(x, w, b, stride))


def test_replaced_array_and_dead_weights_free_their_entries():
    x, w, b = tensors(*CASES[0][1:3])
    evaluate(x, w, b, 1)
    evaluate(x, w, b, 1)
    w.data = w.data * 2.0  # a new array: a new key; the old array dies with its entry
    gc.collect()
    assert conv_weight_cache.info()["entries"] == 0
    for _ in range(2):
        np.testing.assert_array_equal(evaluate(x, w, b, 1), uncached(x, w, b, 1))
    assert conv_weight_cache.info()["entries"] == 1
    del w
    gc.collect()
    assert conv_weight_cache.info()["entries"] == 0
    assert not conv_weight_cache._sighted


def test_a_weight_made_afresh_each_call_is_never_copied():
    """A weight computed in the forward (standardized, merged) is a new array each call: met once and gone, it
    never gets an entry, so no call pays for a copy; the results are the uncached ones."""
    x, w, b = tensors(*CASES[1][1:3])
    for _ in range(4):
        fresh = mpnn.tensor(w.data * 1.0)
        np.testing.assert_array_equal(evaluate(x, fresh, b, 1), uncached(x, fresh, b, 1))
        del fresh
    info = conv_weight_cache.info()
    assert (info["entries"], info["bytes"], info["hits"], info["misses"]) == (0, 0, 0, 4)
    assert not conv_weight_cache._sighted


def test_budget_bounds_what_is_kept():
    """Entries are added only while they fit: with room for one layer, a second layer's weight is not kept and
    recomputes each call, the first keeps hitting."""
    x, w1, b = tensors(*CASES[1][1:3])
    _, w2, _ = tensors(*CASES[1][1:3])
    evaluate(x, w1, b, 1)
    evaluate(x, w1, b, 1)
    one = conv_weight_cache.info()["bytes"]
    conv_weight_cache._BUDGET_BYTES = one + one // 2
    for _ in range(3):
        np.testing.assert_array_equal(evaluate(x, w2, b, 1), uncached(x, w2, b, 1))
        evaluate(x, w1, b, 1)
    info = conv_weight_cache.info()
    assert (info["entries"], info["bytes"], info["hits"], info["misses"]) == (1, one, 3, 5)


def test_model_eval_matches_without_cache():
    """A small residual CNN in eval mode under no_grad: logits with the cache (cold and warm) equal those without,
    after a training step changed every weight too."""
    x_shape = CASES[2][1]
    model = mpnn.nn.Sequential(
        mpnn.nn.Conv2d(64, 64, 3, padding=1),
        mpnn.nn.ReLU(),
        mpnn.nn.Conv2d(64, 64, 3, stride=2, padding=1),
        mpnn.nn.BatchNorm2d(64),
        mpnn.nn.ReLU(),
        mpnn.nn.Conv2d(64, 64, 3, padding=1),
    )
    x = mpnn.tensor(RNG.standard_normal(x_shape).astype(np.float32))
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)

    def logits():
        model.eval()
        with mpnn.no_grad():
            return model(x).data.copy()

    for _ in range(2):
        budget = conv_weight_cache._BUDGET_BYTES
        conv_weight_cache._BUDGET_BYTES = 0
        conv_weight_cache.clear()
        ref = logits()
        conv_weight_cache._BUDGET_BYTES = budget
        conv_weight_cache.clear()
        for _ in range(3):  # met, kept, used
            np.testing.assert_array_equal(logits(), ref)
        assert conv_weight_cache.info()["hits"] == 3  # the three convs, warm
        model.train()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    "value, expected", [("", 512 << 20), ("  ", 512 << 20), ("0", 0), ("64", 64 << 20), ("0.5", 1 << 19)]
)
def test_budget_from_env(value, expected):
    assert conv_weight_cache.budget_from_env(value) == expected


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "1e400", "12MB"])
def test_a_malformed_budget_names_the_variable_and_the_value(value):
    with pytest.raises(ValueError, match=r"MPNN_CONV_CACHE_MB='" + re.escape(value) + "'"):
        conv_weight_cache.budget_from_env(value)


def test_a_malformed_budget_stops_the_import_with_one_clear_error():
    env = dict(os.environ, MPNN_CONV_CACHE_MB="lots")
    proc = subprocess.run(
        [sys.executable, "-c", "import mpnn"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "MPNN_CONV_CACHE_MB='lots': must be a number of MiB >= 0" in proc.stderr
