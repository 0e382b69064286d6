"""The F(2x2, 3x3) Winograd transforms (mpnn/core/conv_kernels.py: winograd2_input, winograd2_output,
winograd2_grad_output, winograd2_grad_input) against plain NumPy definitions: B^T d B of every zero-padded 4x4
patch, A^T M A plus bias clipped at the map's edge, and their adjoints, on random geometries (maps 1..7 high and
wide, padding 0..2, batch 1..5 and 32, channels 1..9 and 512), float32 and float64. The references sum the
nonzero coefficients' terms only, so infinities and NaNs land where the kernels put them; and a reference with
one sign flipped must fail the same comparison (the checks can tell a wrong row)."""

import numpy as np
import pytest

from mpnn.core import conv_kernels as K

RNG = np.random.default_rng(2024)
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
DTYPES = (np.float32, np.float64)


def _geometries(count):
    """(n, c, h, w, ph, pw) with an output of at least 1x1, as conv_winograd2.py sees them."""
    out = [(32, 512, 4, 4, 1, 1), (32, 3, 4, 4, 1, 1), (2, 3, 1, 1, 1, 1), (3, 2, 7, 7, 0, 0), (1, 1, 3, 3, 0, 0)]
    while len(out) < count:
        h, w = int(RNG.integers(1, 8)), int(RNG.integers(1, 8))
        ph, pw = int(RNG.integers(0, 3)), int(RNG.integers(0, 3))
        if h + 2 * ph - 2 < 1 or w + 2 * pw - 2 < 1:
            continue
        n = 32 if RNG.random() < 0.15 else int(RNG.integers(1, 6))
        out.append((n, int(RNG.integers(1, 10)), h, w, ph, pw))
    return out


GEOMETRIES = _geometries(40)


def _tiles(h, w, ph, pw):
    oh, ow = h + 2 * ph - 2, w + 2 * pw - 2
    return oh, ow, (oh + 1) // 2, (ow + 1) // 2


def _signed_sum(coef, terms):
    """sum_k coef[k] * terms[k] over the nonzero coefficients (+-1), without multiplying anything by 0."""
    acc = None
    for k in np.flatnonzero(coef):
        term = terms[k] if coef[k] > 0 else -terms[k]
        acc = term.copy() if acc is None else acc + term
    return acc


def ref_input(x, ph, pw, tiles_h, tiles_w, bt=BT):
    n, c, h, w = x.shape
    pad = np.zeros((n, c, 2 * tiles_h + 2, 2 * tiles_w + 2), x.dtype)
    pad[:, :, ph : ph + h, pw : pw + w] = x
    d = [
        pad[:, :, r : r + 2 * tiles_h : 2, s : s + 2 * tiles_w : 2]  # (n, c, tiles_h, tiles_w)
        for r in range(4)
        for s in range(4)
    ]
    v = np.empty((16, c, n * tiles_h * tiles_w), x.dtype)
    for a in range(4):
        for b in range(4):
            e = _signed_sum(np.outer(bt[a], bt[b]).ravel(), d)
            v[4 * a + b] = e.transpose(1, 0, 2, 3).reshape(c, -1)
    return v


def ref_output(m, bias, tiles_h, tiles_w, oh, ow, at=AT):
    o, p = m.shape[1:]
    n = p // (tiles_h * tiles_w)
    mm = [m[k].reshape(o, n, tiles_h, tiles_w) for k in range(16)]
    full = np.empty((n, o, 2 * tiles_h, 2 * tiles_w), m.dtype)
    for i in range(2):
        for j in range(2):
            y = _signed_sum(np.outer(at[i], at[j]).ravel(), mm) + bias[:, None, None, None]
            full[:, :, i::2, j::2] = y.transpose(1, 0, 2, 3)
    return full[:, :, :oh, :ow]


def ref_grad_output(g, tiles_h, tiles_w, at=AT):
    n, o, oh, ow = g.shape
    full = np.zeros((n, o, 2 * tiles_h, 2 * tiles_w), g.dtype)
    full[:, :, :oh, :ow] = g
    dy = [full[:, :, i::2, j::2] for i in range(2) for j in range(2)]
    dm = np.empty((16, o, n * tiles_h * tiles_w), g.dtype)
    for a in range(4):
        for b in range(4):
            dm[4 * a + b] = _signed_sum(np.outer(at[:, a], at[:, b]).ravel(), dy).transpose(1, 0, 2, 3).reshape(o, -1)
    return dm


def ref_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w, bt=BT):
    n, c, h, w = dx0.shape
    dvt = [dv[k].reshape(c, n, tiles_h, tiles_w).transpose(1, 0, 2, 3) for k in range(16)]
    pad = np.zeros((n, c, 2 * tiles_h + 2, 2 * tiles_w + 2), dv.dtype)
    for a in range(4):
        for b in range(4):
            e = _signed_sum(np.outer(bt[:, a], bt[:, b]).ravel(), dvt)
            pad[:, :, a : a + 2 * tiles_h : 2, b : b + 2 * tiles_w : 2] += e  # (tiles overlap: added one by one)
    return dx0 + pad[:, :, ph : ph + h, pw : pw + w]


def _randn(shape, dtype):
    return RNG.standard_normal(shape).astype(dtype)


def _close(got, want, dtype):
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def _run_input(x, ph, pw, tiles_h, tiles_w):
    n, c = x.shape[:2]
    v = np.full((16, c, n * tiles_h * tiles_w), 7.0, x.dtype)  # every entry must be written
    K.winograd2_input(x, ph, pw, tiles_h, tiles_w, v)
    return v


def _run_output(m, bias, tiles_h, tiles_w, n, oh, ow):
    out = np.full((n, m.shape[1], oh, ow), 7.0, m.dtype)
    K.winograd2_output(m, bias, tiles_h, tiles_w, out)
    return out


def _run_grad_output(g, tiles_h, tiles_w):
    n, o = g.shape[:2]
    dm = np.full((16, o, n * tiles_h * tiles_w), 7.0, g.dtype)
    K.winograd2_grad_output(g, tiles_h, tiles_w, dm)
    return dm


def _run_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w):
    dx = dx0.copy()  # the kernel adds into dx
    K.winograd2_grad_input(dv, ph, pw, tiles_h, tiles_w, dx)
    return dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "n{}c{}h{}w{}p{}{}".format(*g))
def test_transforms_match_numpy(geometry, dtype):
    n, c, h, w, ph, pw = geometry
    oh, ow, tiles_h, tiles_w = _tiles(h, w, ph, pw)
    p = n * tiles_h * tiles_w
    x = _randn((n, c, h, w), dtype)
    _close(_run_input(x, ph, pw, tiles_h, tiles_w), ref_input(x, ph, pw, tiles_h, tiles_w), dtype)
    m, bias = _randn((16, c, p), dtype), _randn((c,), dtype)
    _close(_run_output(m, bias, tiles_h, tiles_w, n, oh, ow), ref_output(m, bias, tiles_h, tiles_w, oh, ow), dtype)
    g = _randn((n, c, oh, ow), dtype)
    _close(_run_grad_output(g, tiles_h, tiles_w), ref_grad_output(g, tiles_h, tiles_w), dtype)
    dv, dx0 = _randn((16, c, p), dtype), _randn((n, c, h, w), dtype)
    _close(_run_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w), ref_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w), dtype)


def _with_specials(a):
    """a with a seventh of its entries replaced by +-0, +-inf and NaN."""
    f = a.reshape(-1)
    idx = RNG.choice(f.size, size=max(1, f.size // 7), replace=False)
    f[idx] = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], a.dtype)[RNG.integers(0, 5, idx.size)]
    return a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES[:12], ids=lambda g: "n{}c{}h{}w{}p{}{}".format(*g))
def test_infinities_and_nans_land_where_the_definition_puts_them(geometry, dtype):
    """Which entries come out NaN or +-inf depends only on which terms each entry sums, not on their order."""
    n, c, h, w, ph, pw = geometry
    oh, ow, tiles_h, tiles_w = _tiles(h, w, ph, pw)
    p = n * tiles_h * tiles_w
    x = _with_specials(_randn((n, c, h, w), dtype))
    m, bias = _with_specials(_randn((16, c, p), dtype)), _with_specials(_randn((c,), dtype))
    g = _with_specials(_randn((n, c, oh, ow), dtype))
    dv, dx0 = _with_specials(_randn((16, c, p), dtype)), _randn((n, c, h, w), dtype)
    with np.errstate(invalid="ignore"):  # inf - inf in the references
        pairs = [
            (_run_input(x, ph, pw, tiles_h, tiles_w), ref_input(x, ph, pw, tiles_h, tiles_w)),
            (_run_output(m, bias, tiles_h, tiles_w, n, oh, ow), ref_output(m, bias, tiles_h, tiles_w, oh, ow)),
            (_run_grad_output(g, tiles_h, tiles_w), ref_grad_output(g, tiles_h, tiles_w)),
            (_run_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w), ref_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w)),
        ]
    for got, want in pairs:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        finite = np.isfinite(want)
        _close(got[finite], want[finite], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_keeps_signed_zeros(dtype):
    """An all -0.0 input: every entry is a difference or sum of two -0.0/+0.0 (padding) terms, as defined."""
    n, c, h, w, ph, pw = 2, 3, 4, 5, 1, 1
    oh, ow, tiles_h, tiles_w = _tiles(h, w, ph, pw)
    x = np.full((n, c, h, w), -0.0, dtype)
    got = _run_input(x, ph, pw, tiles_h, tiles_w)
    # B^T d B of an all-zero patch is zero, its sign from the operations; d0 - d2 of (-0) - (-0) is +0, and
    # (-0) + (-0) is -0: the interior entry v[5] = (d11 + d21) + (d12 + d22) of a patch with no padding is -0.0
    assert not np.any(got)
    inner = got[5].reshape(c, n, tiles_h, tiles_w)[:, :, 0, 0]  # tile (0, 0): entries 1..2 lie inside the map
    assert np.all(np.signbit(inner))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [(32, 5, 4, 4, 1, 1), (3, 4, 5, 3, 0, 2), (2, 9, 7, 6, 1, 0)])
def test_a_wrong_sign_fails_the_check(geometry, dtype):
    """The comparisons above notice one flipped sign in any of B^T's or A^T's rows: each reference built with
    such a row disagrees with the kernel."""
    n, c, h, w, ph, pw = geometry
    oh, ow, tiles_h, tiles_w = _tiles(h, w, ph, pw)
    p = n * tiles_h * tiles_w
    x, m, bias = _randn((n, c, h, w), dtype), _randn((16, c, p), dtype), _randn((c,), dtype)
    g, dv, dx0 = _randn((n, c, oh, ow), dtype), _randn((16, c, p), dtype), _randn((n, c, h, w), dtype)
    v = _run_input(x, ph, pw, tiles_h, tiles_w)
    out = _run_output(m, bias, tiles_h, tiles_w, n, oh, ow)
    dm = _run_grad_output(g, tiles_h, tiles_w)
    dx = _run_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w)
    for row in range(4):
        bt = BT.copy()
        bt[row, np.flatnonzero(bt[row])[-1]] *= -1
        with pytest.raises(AssertionError):
            _close(v, ref_input(x, ph, pw, tiles_h, tiles_w, bt), dtype)
        with pytest.raises(AssertionError):
            _close(dx, ref_grad_input(dv, dx0, ph, pw, tiles_h, tiles_w, bt), dtype)
    for row in range(2):
        at = AT.copy()
        at[row, np.flatnonzero(at[row])[-1]] *= -1
        with pytest.raises(AssertionError):
            _close(out, ref_output(m, bias, tiles_h, tiles_w, oh, ow, at), dtype)
        with pytest.raises(AssertionError):
            _close(dm, ref_grad_output(g, tiles_h, tiles_w, at), dtype)
