"""Numba loops for the indexing ops' backward passes.

embedding's gradient adds each picked row's gradient into its weight row: np.add.at took 0.4 ms for a GPT
step's (768, 128) float32 token gradient into 65 rows (it handles any index generally, element by element);
this loop adds whole contiguous rows, about 0.05 ms.
"""

from numba import njit


@njit(cache=True, fastmath=True, error_model="numpy")
def add_rows(full, idx, g):
    """full[idx[i]] += g[i] for every i: rows of a (rows, D) array, repeats accumulated."""
    d = g.shape[1]
    for i in range(idx.shape[0]):
        r = idx[i]
        for j in range(d):
            full[r, j] += g[i, j]
