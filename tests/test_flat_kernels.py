"""Numba kernels written for flat arrays stay inside the arrays they are given: one handed a 2-d array (a contract
slip by a caller) either computes row by row or refuses it (at compile time or at its first row), never writes past
its last row. Numba checks no
bounds: a loop over `x.size` indexing rows wrote size - rows rows beyond the array (heap corruption, then crashes
elsewhere). Each 2-d array here is the head of a larger one whose tail rows hold a sentinel."""

import numpy as np
import pytest
from numba.core.errors import TypingError

from mpnn.capture import kernels as capture_kernels
from mpnn.core import activation_kernels as act
from mpnn.optim import kernels as optim_kernels

ROWS, COLS, SENTINEL = 3, 4, 7.25


def _head(values):
    """(base, head): `values` as the first ROWS rows of a (ROWS * COLS + ROWS, COLS) float32 array of sentinels."""
    base = np.full((ROWS * COLS + ROWS, COLS), SENTINEL, np.float32)
    base[:ROWS] = values
    return base, base[:ROWS]


def _cases():
    """name -> (kernel, how many arrays it takes, its arguments from those arrays)."""
    s = np.float32(0.5)
    sgd = (np.float32(0.1), np.float32(0.9), np.float32(0), np.float32(0), False, False, False)
    arrays = tuple
    return {
        "scale_into": (capture_kernels.scale_into, 2, lambda a: (a[0], s, a[1])),
        "relu_in_place": (capture_kernels.relu_in_place, 1, arrays),
        "relu_forward": (act.relu_forward, 2, arrays),
        "relu_backward": (act.relu_backward, 3, arrays),
        "gelu_tanh_inner": (act.gelu_tanh_inner, 2, arrays),
        "gelu_tanh_forward": (act.gelu_tanh_forward, 3, arrays),
        "gelu_tanh_backward": (act.gelu_tanh_backward, 4, arrays),
        "gelu_backward": (act.gelu_backward, 5, arrays),
        "gelu_forward_exact": (act.gelu_forward_exact, 3, arrays),
        "sgd_update": (optim_kernels.sgd_update, 3, lambda a: (*a, *sgd)),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_flat_kernel_given_2d_arrays_writes_no_row_past_them(name):
    kernel, n_arrays, arguments = _cases()[name]
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((ROWS, COLS)).astype(np.float32) for _ in range(n_arrays)]
    heads = [_head(v) for v in values]
    try:
        kernel(*arguments([h for _, h in heads]))
    except (TypingError, ValueError):  # refused at compile time, or at its first row (an array's truth value)
        pass
    else:
        flat = [v.reshape(-1).copy() for v in values]
        kernel(*arguments(flat))
        for (_, head), f in zip(heads, flat):
            np.testing.assert_array_equal(head, f.reshape(ROWS, COLS))  # row by row: the flat call's values
    for base, _ in heads:
        assert np.all(base[ROWS:] == SENTINEL), f"{name} wrote past its arrays' last row"
