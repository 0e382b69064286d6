"""Random computation graphs against a float64 NumPy oracle: the composition check that per-op gradchecks miss.

Every op passes its own gradcheck, yet a tape can still be wrong when ops are *composed*: a tensor that reaches
the output along paths of different lengths (``x + x.exp()``, residual blocks, shared subexpressions) must
receive the sum of all its paths' gradients, and only once every path has delivered. So here hypothesis builds
random DAGs over 1-3 float64 leaves of small, mutually broadcasting shapes (0-d included). Each op in OPS
carries an mpnn implementation and a NumPy one; a graph is a recipe replayed by both. For each graph:

- every node's forward value (and shape, dtype) equals the NumPy oracle's;
- every leaf's .grad after one backward equals central finite differences (eps 1e-6) of the oracle;
- ``mpnn.core.gradcheck`` agrees too.

``test_random_tree_graphs`` uses each node at most once (no reuse anywhere, so it checks the harness and the
ops); ``test_random_dag_graphs`` draws operands from all earlier nodes, so shared subexpressions and residuals
abound. A few named regression graphs pin the classic failures."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mpnn
from mpnn.core import gradcheck

SHAPES = [(), (3,), (2, 3), (2, 1), (1, 3)]
MAX_NUMEL = 12  # keep every node small: finite differences and gradcheck cost grows with it
MAX_ABS = 100.0  # graphs whose values grow past this are skipped (finite differences lose digits)
KINK_MARGIN = 1e-4  # relu inputs closer than this to 0 would make finite differences straddle the kink
EPS = 1e-6
ATOL, RTOL = 1e-6, 1e-5

SETTINGS = settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ----- the op table ---------------------------------------------------------------------------------------------
def _np_sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _np_softmax(a, d):
    e = np.exp(a - a.max(axis=d, keepdims=True))
    return e / e.sum(axis=d, keepdims=True)


def _np_log_softmax(a, d):
    z = a - a.max(axis=d, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=d, keepdims=True))


_np_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_attention(q, kv, causal):
    scores = q @ kv.T / np.sqrt(q.shape[-1])
    if causal:  # top-left aligned, as torch: query i sees keys j <= i; a row with no key gives 0
        scores = np.where(np.tril(np.ones(scores.shape, bool)), scores, -np.inf)
    with np.errstate(invalid="ignore"):
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
    return np.nan_to_num(w) @ kv


def _mul_first_row_in_place(c):
    c[:1].mul_(3.0)  # through a view: the base's gradient must be 3 there and 1 elsewhere
    return c


def _numel(shape):
    return int(np.prod(shape, dtype=np.int64))


def _bshape(sa, sb):
    try:
        return tuple(np.broadcast_shapes(sa, sb))
    except ValueError:
        return None


class Op:
    """One entry of the table: how to apply it with mpnn and with NumPy, where it applies, what it draws."""

    def __init__(self, name, arity, mp, ref, ok=None, params=None, internal_reuse=False, kinks=None):
        self.name, self.arity, self.mp, self.ref = name, arity, mp, ref
        self.ok = ok or (lambda *shapes: True)
        self.params = params or (lambda r, *shapes: None)
        self.internal_reuse = internal_reuse  # the op itself uses one operand along two paths (relu(x) + x)
        self.kinks = kinks  # (p, *arrays) -> values that must stay away from 0

    def __repr__(self):
        return self.name


def _binary_ok(sa, sb):
    s = _bshape(sa, sb)
    return s is not None and _numel(s) <= MAX_NUMEL


class Chooser:
    """The graph's structural choices, drawn uniformly from a seeded NumPy generator (hypothesis's own draws
    lean towards the first choices, which would leave half of the op table untried in 60 examples)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def int(self, lo, hi):  # inclusive, like st.integers
        return int(self.rng.integers(lo, hi + 1))

    def bool(self, p=0.5):
        return bool(self.rng.random() < p)

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def perm(self, n):
        return tuple(int(i) for i in self.rng.permutation(n))


def _dim_params(r, s):
    """None, one dim (maybe negative) or a tuple of dims; keepdim when a dim is given."""
    nd = len(s)
    if nd == 0:
        return (None, False)
    kind = r.pick(["all", "one", "tuple"] if nd >= 2 else ["all", "one"])
    if kind == "all":
        return (None, False)
    if kind == "one":
        return (r.int(-nd, nd - 1), r.bool())
    dims = r.perm(nd)[: r.int(2, nd)]
    return (dims, r.bool())


def _mp_reduce(method):
    def fn(p, a):
        dim, keepdim = p
        if dim is None:
            return getattr(a, method)()
        return getattr(a, method)(dim, keepdim=keepdim)

    return fn


def _np_reduce(fn):
    def ref(p, a):
        dim, keepdim = p
        return np.asarray(fn(a, axis=dim, keepdims=keepdim))

    return ref


def _shapes_with_numel(n):
    out = [()] if n == 1 else []
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for rank in (1, 2, 3):
        for dims in itertools.product(divisors, repeat=rank):
            if _numel(dims) == n:
                out.append(dims)
    return out


def _reshape_params(r, s):
    target = r.pick(_shapes_with_numel(_numel(s)))
    if target and r.bool():
        i = r.int(0, len(target) - 1)
        target = target[:i] + (-1,) + target[i + 1 :]
    return target


def _index_params(r, s):
    """A basic index: ints (maybe negative) and non-empty positive-step slices over the leading dims,
    sometimes behind an Ellipsis (then over the trailing dims) or with a None inserted."""
    nd = len(s)
    k = r.int(1, nd)
    trailing = r.bool()
    dims = s[nd - k :] if trailing else s[:k]
    parts = []
    for n in dims:
        if r.bool():
            parts.append(r.int(-n, n - 1))
        else:
            start = r.int(0, n - 1)
            stop = r.int(start + 1, n)
            parts.append(slice(start, stop, r.pick([1, 1, 2])))
    if r.bool(0.25):
        parts.insert(r.int(0, len(parts)), None)
    return (Ellipsis, *parts) if trailing else tuple(parts)


def _expand_params(r, s):
    lead = (r.int(1, 2),) if not s or r.bool() else ()
    sizes = []
    for n in s:
        if n == 1:
            sizes.append(r.pick([1, 2, 3, -1]))
        else:
            sizes.append(r.pick([n, -1]))
    return lead + tuple(sizes)


def _expanded_shape(s, sizes):
    lead = len(sizes) - len(s)
    return tuple(sizes[:lead]) + tuple(n if k == -1 else k for n, k in zip(s, sizes[lead:]))


def _matmul_ok(sa, sb):
    if len(sa) not in (1, 2) or len(sb) not in (1, 2):
        return False
    return sa[-1] == (sb[0] if len(sb) == 1 else sb[-2])


def _matmul_t_ok(sa, sb):
    return len(sb) == 2 and _matmul_ok(sa, sb[::-1])


OPS = [
    Op("add", 2, lambda p, a, b: a + b, lambda p, a, b: a + b, ok=_binary_ok),
    Op("sub", 2, lambda p, a, b: a - b, lambda p, a, b: a - b, ok=_binary_ok),
    Op("mul", 2, lambda p, a, b: a * b, lambda p, a, b: a * b, ok=_binary_ok),
    Op("div", 2, lambda p, a, b: a / (1.5 + b * b), lambda p, a, b: a / (1.5 + b * b), ok=_binary_ok),
    Op("exp_tanh", 1, lambda p, a: a.tanh().exp(), lambda p, a: np.exp(np.tanh(a))),
    Op("tanh", 1, lambda p, a: a.tanh(), lambda p, a: np.tanh(a)),
    Op("sigmoid", 1, lambda p, a: a.sigmoid(), lambda p, a: _np_sigmoid(a)),
    Op(
        "relu_res",
        1,
        lambda p, a: a.relu() + a,
        lambda p, a: np.maximum(a, 0) + a,
        internal_reuse=True,
        kinks=lambda p, a: a,
    ),
    Op("sum", 1, _mp_reduce("sum"), _np_reduce(np.sum), params=_dim_params),
    Op("mean", 1, _mp_reduce("mean"), _np_reduce(np.mean), params=_dim_params),
    Op("reshape", 1, lambda p, a: a.reshape(p), lambda p, a: a.reshape(p), params=_reshape_params),
    Op("view", 1, lambda p, a: a.contiguous().view(p), lambda p, a: a.reshape(p), params=_reshape_params),
    Op(
        "transpose",
        1,
        lambda p, a: a.transpose(*p),
        lambda p, a: np.swapaxes(a, *p),
        ok=lambda s: len(s) >= 2,
        params=lambda r, s: (r.int(-len(s), len(s) - 1), r.int(-len(s), len(s) - 1)),
    ),
    Op(
        "permute",
        1,
        lambda p, a: a.permute(*p),
        lambda p, a: np.transpose(a, p),
        ok=lambda s: len(s) >= 2,
        params=lambda r, s: r.perm(len(s)),
    ),
    Op("getitem", 1, lambda p, a: a[p], lambda p, a: np.asarray(a[p]), ok=lambda s: len(s) >= 1, params=_index_params),
    Op(
        "unsqueeze",
        1,
        lambda p, a: a.unsqueeze(p),
        lambda p, a: np.expand_dims(a, p % (a.ndim + 1)),
        ok=lambda s: len(s) <= 2,
        params=lambda r, s: r.int(-len(s) - 1, len(s)),
    ),
    Op(
        "expand",
        1,
        lambda p, a: a.expand(*p),
        lambda p, a: np.broadcast_to(a, _expanded_shape(a.shape, p)),
        ok=lambda s: len(s) <= 2 and 2 * _numel(s) <= MAX_NUMEL,
        params=_expand_params,
    ),
    Op(
        "softmax",
        1,
        lambda p, a: mpnn.softmax(a, dim=p),
        lambda p, a: _np_softmax(a, p),
        ok=lambda s: len(s) >= 1,
        params=lambda r, s: r.int(-len(s), len(s) - 1),
    ),
    Op(
        "log_softmax",
        1,
        lambda p, a: mpnn.log_softmax(a, dim=p),
        lambda p, a: _np_log_softmax(a, p),
        ok=lambda s: len(s) >= 1,
        params=lambda r, s: r.int(-len(s), len(s) - 1),
    ),
    Op("gelu", 1, lambda p, a: mpnn.nn.functional.gelu(a), lambda p, a: a * 0.5 * (1.0 + _np_erf(a / np.sqrt(2.0)))),
    Op(
        "gelu_tanh",
        1,
        lambda p, a: mpnn.nn.functional.gelu(a, approximate="tanh"),
        lambda p, a: 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3))),
    ),
    Op(
        "layer_norm",
        1,
        lambda p, a: mpnn.nn.functional.layer_norm(a, a.shape[-1:]),
        lambda p, a: (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5),
        ok=lambda s: len(s) >= 1 and s[-1] >= 2,
    ),
    Op(
        "logsumexp",
        1,
        lambda p, a: mpnn.logsumexp(a, dim=p),
        lambda p, a: np.log(np.exp(a).sum(axis=p)),
        ok=lambda s: len(s) >= 1,
        params=lambda r, s: r.int(-len(s), len(s) - 1),
    ),
    Op(
        "cumsum",
        1,
        lambda p, a: mpnn.cumsum(a, dim=p),
        lambda p, a: np.cumsum(a, axis=p),
        ok=lambda s: len(s) >= 1,
        params=lambda r, s: r.int(-len(s), len(s) - 1),
    ),
    Op(
        "flip",
        1,
        lambda p, a: mpnn.flip(a, (p,)),
        lambda p, a: np.flip(a, p).copy(),
        ok=lambda s: len(s) >= 1,
        params=lambda r, s: r.int(-len(s), len(s) - 1),
    ),
    Op("tril", 1, lambda p, a: mpnn.tril(a), lambda p, a: np.tril(a), ok=lambda s: len(s) == 2),
    # in-place writes inside the graph: on an op's result, and through a view of one (recorded on the base)
    Op(
        "mul_inplace",
        2,
        lambda p, a, b: (a * 1.0).mul_(b),
        lambda p, a, b: a * b,
        ok=lambda sa, sb: _bshape(sa, sb) == tuple(sa),
    ),
    Op(
        "view_mul_inplace",
        1,
        lambda p, a: _mul_first_row_in_place(a * 1.0),
        lambda p, a: np.concatenate([a[:1] * 3.0, a[1:]]),
        ok=lambda s: len(s) >= 1,
    ),
    Op(
        "prod",
        1,
        lambda p, a: mpnn.prod(a, dim=p) if p is not None else mpnn.prod(a),
        lambda p, a: np.asarray(np.prod(a, axis=p)),
        params=lambda r, s: r.int(-len(s), len(s) - 1) if s else None,
    ),
    Op(
        "roll",
        1,
        lambda p, a: mpnn.roll(a, 1, p),
        lambda p, a: np.roll(a, 1, p),
        ok=lambda s: len(s) >= 1,
        params=lambda r, s: r.int(-len(s), len(s) - 1),
    ),
    Op(
        "repeat",
        1,
        lambda p, a: a.repeat(*p),
        lambda p, a: np.tile(a, p),
        ok=lambda s: 1 <= len(s) and 2 * _numel(s) <= MAX_NUMEL,
        params=lambda r, s: tuple(r.pick([1, 2]) if i == 0 else 1 for i in range(len(s))),
    ),
    Op(
        "einsum_t",
        2,
        lambda p, a, b: mpnn.einsum("ij,kj->ik", a, b),
        lambda p, a, b: np.einsum("ij,kj->ik", a, b),
        ok=_matmul_t_ok,
    ),
    Op(
        "attention",
        2,
        lambda p, a, b: mpnn.nn.functional.scaled_dot_product_attention(a, b, b, is_causal=p),
        lambda p, a, b: _np_attention(a, b, p),
        ok=lambda sa, sb: len(sa) == 2 and len(sb) == 2 and sa[-1] == sb[-1],
        params=lambda r, sa, sb: r.bool(),
    ),
    Op("matmul", 2, lambda p, a, b: a @ b, lambda p, a, b: np.matmul(a, b), ok=_matmul_ok),
    Op("matmul_t", 2, lambda p, a, b: a.matmul(b.transpose(0, 1)), lambda p, a, b: np.matmul(a, b.T), ok=_matmul_t_ok),
]
OPS_BY_NAME = {op.name: op for op in OPS}
# Used only by the named graphs below: unbounded, so random graphs would overflow with it.
EXTRA = {"exp": Op("exp", 1, lambda p, a: a.exp(), lambda p, a: np.exp(a))}


# ----- a graph: a recipe both backends replay ------------------------------------------------------------------
class Graph:
    """Inputs (float64 arrays) and steps (op name, operand node indices, params). Node i < len(inputs) is an
    input; node len(inputs) + k is step k's result. The loss sums every sink (a node no step reads),
    contracted with fixed random weights, so every node reaches it."""

    def __init__(self, inputs, steps, weight_seed=0):
        self.inputs = [np.asarray(x, dtype=np.float64) for x in inputs]
        self.steps = steps
        used = {i for _, args, _ in steps for i in args}
        self.sinks = [i for i in range(len(inputs) + len(steps)) if i not in used]
        rng = np.random.default_rng(weight_seed)
        self.shapes = [a.shape for a in self.oracle_nodes(self.inputs)[0]]
        self.weights = {i: np.asarray(rng.standard_normal(self.shapes[i]), dtype=np.float64) for i in self.sinks}

    @staticmethod
    def op(name):
        return OPS_BY_NAME.get(name) or EXTRA[name]

    def oracle_nodes(self, inputs):
        """NumPy float64 values of every node, and every value that must stay off relu's kink."""
        vals, kinks = [np.asarray(x, dtype=np.float64) for x in inputs], []
        for name, args, p in self.steps:
            op = self.op(name)
            operands = [vals[i] for i in args]
            if op.kinks is not None:
                kinks.append(np.ravel(op.kinks(p, *operands)))
            vals.append(np.asarray(op.ref(p, *operands), dtype=np.float64))
        return vals, kinks

    def oracle_loss(self, inputs):
        vals, _ = self.oracle_nodes(inputs)
        return float(sum(np.sum(vals[i] * w) for i, w in self.weights.items()))

    def mpnn_nodes(self, leaves):
        vals = list(leaves)
        for name, args, p in self.steps:
            vals.append(self.op(name).mp(p, *[vals[i] for i in args]))
        return vals

    def mpnn_loss(self, leaves):
        vals = self.mpnn_nodes(leaves)
        loss = None
        for i, w in self.weights.items():
            term = (vals[i] * mpnn.tensor(w)).sum()
            loss = term if loss is None else loss + term
        return loss

    def has_reuse(self):
        uses = [0] * (len(self.inputs) + len(self.steps))
        for _, args, _ in self.steps:
            for i in set(args):
                uses[i] += 1
        return max(uses) > 1 or any(self.op(n).internal_reuse for n, _, _ in self.steps)

    def __repr__(self):
        lines = [
            f"n{i} = input{tuple(x.shape)} {np.array2string(x.ravel(), precision=3)}" for i, x in enumerate(self.inputs)
        ]
        for k, (name, args, p) in enumerate(self.steps):
            arg_s = ", ".join(f"n{i}" for i in args)
            lines.append(
                f"n{len(self.inputs) + k} = {name}({arg_s}{'' if p is None else f', {p!r}'})"
                f"  -> {self.shapes[len(self.inputs) + k]}"
            )
        lines.append(f"loss = sum of sinks {[f'n{i}' for i in self.sinks]} times fixed weights")
        return "Graph(\n  " + "\n  ".join(lines) + "\n)"


@st.composite
def graphs(draw, reuse):
    n_inputs = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    r = Chooser(seed)
    shapes = [r.pick(SHAPES) for _ in range(n_inputs)]
    inputs = [r.rng.uniform(-1.5, 1.5, size=s) for s in shapes]
    node_shapes = list(shapes)
    used = [False] * n_inputs
    steps = []
    ops = OPS if reuse else [op for op in OPS if not op.internal_reuse]
    for _ in range(draw(st.integers(1, 7 if reuse else 5))):
        pool = [i for i in range(len(node_shapes)) if reuse or not used[i]]
        combos = {}
        for op in ops:
            if op.arity == 1:
                cands = [(i,) for i in pool if op.ok(node_shapes[i])]
            else:
                pairs = itertools.product(pool, pool) if reuse else itertools.permutations(pool, 2)
                cands = [(i, j) for i, j in pairs if op.ok(node_shapes[i], node_shapes[j])]
            if cands:
                combos[op.name] = cands
        if not combos:
            break
        op = OPS_BY_NAME[r.pick(sorted(combos))]
        cands = combos[op.name]
        again = [c for c in cands if any(used[i] for i in c)]
        if reuse and again and r.bool(0.6):
            cands = again  # lean towards reading a node that something already read
        args = r.pick(cands)
        p = op.params(r, *[node_shapes[i] for i in args])
        trial = Graph(inputs, steps + [(op.name, args, p)])
        out_shape = trial.shapes[-1]
        if _numel(out_shape) > MAX_NUMEL:
            continue
        steps.append((op.name, args, p))
        node_shapes.append(out_shape)
        used.append(False)
        for i in args:
            used[i] = True
    return Graph(inputs, steps, weight_seed=seed)


# ----- the checks -----------------------------------------------------------------------------------------------
def finite_difference_grads(graph):
    grads = []
    for k, x in enumerate(graph.inputs):
        g = np.zeros(x.shape)
        for idx in np.ndindex(*x.shape) if x.ndim else [()]:
            plus = [a.copy() for a in graph.inputs]
            minus = [a.copy() for a in graph.inputs]
            plus[k][idx] += EPS
            minus[k][idx] -= EPS
            g[idx] = (graph.oracle_loss(plus) - graph.oracle_loss(minus)) / (2 * EPS)
        grads.append(g)
    return grads


def well_conditioned(graph):
    vals, kinks = graph.oracle_nodes(graph.inputs)
    if any(not np.all(np.isfinite(v)) or np.abs(v).max(initial=0.0) > MAX_ABS for v in vals):
        return False
    return all(np.abs(k).min(initial=np.inf) > KINK_MARGIN for k in kinks)


def check_graph(graph):
    leaves = [mpnn.tensor(x, requires_grad=True) for x in graph.inputs]
    for leaf in leaves:
        assert leaf.dtype == np.float64
    expected, _ = graph.oracle_nodes(graph.inputs)
    got = graph.mpnn_nodes(leaves)
    for i, (t, ref) in enumerate(zip(got, expected)):
        assert isinstance(t, mpnn.Tensor), f"n{i} is a {type(t).__name__}"
        assert t.shape == ref.shape, f"n{i}: shape {t.shape}, oracle {ref.shape}"
        assert t.dtype == np.float64, f"n{i}: dtype {t.dtype}"
        np.testing.assert_allclose(t.data, ref, rtol=1e-10, atol=1e-12, err_msg=f"forward value of n{i}")

    loss = graph.mpnn_loss(leaves)
    assert loss.shape == ()
    np.testing.assert_allclose(loss.data, graph.oracle_loss(graph.inputs), rtol=1e-10, atol=1e-12)
    loss.backward()
    numeric = finite_difference_grads(graph)
    for k, (leaf, num) in enumerate(zip(leaves, numeric)):
        assert leaf.grad is not None, f"input n{k} got no gradient"
        assert leaf.grad.shape == leaf.shape, f"input n{k}: grad shape {leaf.grad.shape}, leaf {leaf.shape}"
        np.testing.assert_allclose(
            leaf.grad.data,
            num,
            atol=ATOL,
            rtol=RTOL,
            err_msg=f"gradient of input n{k} vs finite differences of the oracle",
        )

    fresh = [mpnn.tensor(x, requires_grad=True) for x in graph.inputs]
    assert gradcheck(lambda *xs: graph.mpnn_loss(xs), fresh)


@SETTINGS
@given(graphs(reuse=False))
def test_random_tree_graphs(graph):
    """No node is used twice: every tensor reaches the loss along exactly one path."""
    assert not graph.has_reuse()
    assume(well_conditioned(graph))
    check_graph(graph)


@SETTINGS
@given(graphs(reuse=True))
def test_random_dag_graphs(graph):
    """Operands come from all earlier nodes: shared subexpressions, residuals, a + a, x and f(g(x)) together."""
    assume(well_conditioned(graph))
    check_graph(graph)


# ----- named regression graphs ------------------------------------------------------------------------------------
def _residual_chain(depth=5):
    """h = h + tanh(h * x + b), depth times: x (the first input) is read at every level."""
    steps, h = [], 0
    for _ in range(depth):
        base = 2 + len(steps)
        steps += [
            ("mul", (h, 0), None),
            ("add", (base, 1), None),
            ("tanh", (base + 1,), None),
            ("add", (h, base + 2), None),
        ]
        h = base + 3
    return steps


NAMED = {
    "x_plus_exp_x": Graph([[0.1, 0.5, 1.0]], [("exp", (0,), None), ("add", (0, 1), None)]),
    "exp_x_plus_x": Graph([[0.1, 0.5, 1.0]], [("exp", (0,), None), ("add", (1, 0), None)]),
    "x_times_sigmoid_x": Graph([[-0.7, 0.2, 1.3]], [("sigmoid", (0,), None), ("mul", (0, 1), None)]),
    "residual_chain_depth5": Graph([[[0.3, -0.6, 0.9], [0.5, 0.1, -0.4]], [0.2, -0.1, 0.05]], _residual_chain(5)),
    # a -> (b, c) -> d -> e, and e reads a again
    "diamond": Graph(
        [[[0.4, -0.8, 1.1], [0.3, 0.7, -0.2]]],
        [("exp_tanh", (0,), None), ("sigmoid", (0,), None), ("mul", (1, 2), None), ("mul", (0, 3), None)],
    ),
    # x (2,1) and y (1,3) broadcast into z; x is read again at a later depth; the reduction meets y again
    "broadcast_diamond": Graph(
        [[[0.5], [-1.2]], [[0.3, -0.9, 1.4]]],
        [("mul", (0, 1), None), ("add", (2, 0), None), ("mean", (3,), (1, True)), ("mul", (4, 1), None)],
    ),
    # normalise by a sum that the numerator also feeds
    "shared_reduction": Graph(
        [[[0.4, 0.8, 1.2], [0.9, 0.3, 0.6]]],
        [("sum", (0,), (-1, True)), ("div", (0, 1), None), ("softmax", (2,), 0), ("mul", (3, 0), None)],
    ),
    # a 0-d leaf broadcast into every level of a chain
    "zero_dim_scale_everywhere": Graph(
        [0.7, [0.2, -0.5, 0.9]],
        [
            ("mul", (1, 0), None),
            ("tanh", (2,), None),
            ("mul", (3, 0), None),
            ("add", (4, 0), None),
            ("relu_res", (5,), None),
            ("sum", (6,), (None, False)),
            ("mul", (7, 0), None),
        ],
    ),
    # the same tensor as both matmul operands, plus a residual
    "matmul_self": Graph(
        [[[0.3, -0.2], [0.5, 0.8]]], [("matmul", (0, 0), None), ("add", (1, 0), None), ("matmul_t", (2, 0), None)]
    ),
}


@pytest.mark.parametrize("name", list(NAMED))
def test_named_graphs(name):
    graph = NAMED[name]
    assert well_conditioned(graph)
    check_graph(graph)


def test_named_x_plus_exp_x_gradient_by_hand():
    x = mpnn.tensor(np.array([0.1, 0.5, 1.0]), requires_grad=True)
    (x + x.exp()).sum().backward()
    np.testing.assert_allclose(x.grad.data, 1 + np.exp([0.1, 0.5, 1.0]), rtol=1e-12)


def test_residual_conv_block_reuses_its_input_at_three_depths():
    """A ResNet basic block with a strided 1x1 shortcut, composed (per-op conv gradchecks cannot see a tape bug
    between them): x reaches the output through two 3x3 convs, through the 1x1 shortcut and through a second
    strided 3x3 path, and the first conv's output is reused after the ReLU. 16x16 maps give the stride-1 convs
    one-sample tiles (>= 256 positions) and the strided ones the phase-split gather; float64 differences check it."""
    rng = np.random.default_rng(7)

    def weight(*shape):
        return mpnn.tensor(rng.standard_normal(shape) * 0.3, dtype=mpnn.float64, requires_grad=True)

    x = mpnn.tensor(rng.standard_normal((2, 2, 16, 16)), dtype=mpnn.float64, requires_grad=True)
    w1, w2, w3, w4 = weight(3, 2, 3, 3), weight(3, 3, 3, 3), weight(3, 2, 1, 1), weight(3, 2, 3, 3)
    conv = mpnn.nn.functional.conv2d

    def block(x, w1, w2, w3, w4):
        a = conv(x, w1, padding=1)
        h = conv(a.relu() + a * 0.5, w2, stride=2, padding=1)
        return (h + conv(x, w3, stride=2) + conv(x, w4, stride=2, padding=1)).tanh()

    assert gradcheck(block, [x, w1, w2, w3, w4])


def test_residual_block_through_both_winograd_algorithms_with_reuse_views_and_broadcasting(monkeypatch):
    """The Winograd paths composed, as ResNet runs them: F(4x4) chunked into several tile rows with a shorter last
    chunk (the column-by-column slots that leave the junk slots out of the GEMMs) on a 9x11 map, and F(2x2) on a
    6x6 view of the input (narrower than F(4x4)'s minimum width); x reaches the output at three depths, the first
    conv's output is reused after the ReLU, and the F(2x2) branch joins as a 0-d mean broadcast over the block.
    The thresholds are lowered so that 3-channel float64 convs take these paths (asserted), for finite differences."""
    from mpnn.core import conv as conv_module
    from mpnn.core.conv_winograd import WinogradF4x4
    from mpnn.core.conv_winograd2 import WinogradF2x2

    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD2_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_TILES", 5)
    used = []
    for cls in (WinogradF4x4, WinogradF2x2):
        original = cls.backward

        def spy(self, *args, _original=original, _name=cls.__name__):
            used.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(cls, "backward", spy)
    rng = np.random.default_rng(11)

    def weight(*shape):
        return mpnn.tensor(rng.standard_normal(shape) * 0.3, dtype=mpnn.float64, requires_grad=True)

    x = mpnn.tensor(rng.standard_normal((2, 3, 9, 11)), dtype=mpnn.float64, requires_grad=True)
    w1, w2, w3 = weight(3, 3, 3, 3), weight(3, 3, 3, 3), weight(2, 3, 3, 3)
    conv = mpnn.nn.functional.conv2d

    def block(x, w1, w2, w3):
        a = conv(x, w1, padding=1)
        h = conv(a.relu() + a * 0.5, w2, padding=1)
        narrow = conv(x[:, :, 1:7, 2:8], w3, padding=1)
        return (h + x).tanh() + narrow.mean()

    assert gradcheck(block, [x, w1, w2, w3])
    assert {"WinogradF4x4", "WinogradF2x2"} <= set(used), used


def test_residual_block_through_long_winograd_chunks_with_reuse_and_broadcasting(monkeypatch):
    """The same residual composition over chunks of 17 tile rows, where F(4x4)'s gathers and scatters run with the
    tile rows innermost in blocks of 8 (20 images 6 high: more than 8 images a chunk), the last chunk short (6
    rows, the row-by-row path): x reused at three depths, the first conv's output after its ReLU, a strided view
    and a 0-d mean broadcast; float64 gradcheck."""
    from mpnn.core import conv as conv_module
    from mpnn.core import conv_kernels, conv_winograd

    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_TILES", 17 * 4)  # 9 wide: 3 tiles + the junk slot a tile row
    _, _, chunks = conv_winograd._winograd_chunks(20, 6, 9, 17 * 4)
    assert [r for _, r in chunks] == [17, 17, 6] and 17 >= conv_kernels._GATHER_BY_TILE_ROWS
    rng = np.random.default_rng(12)

    def tensor(*shape, scale=1.0):
        return mpnn.tensor(rng.standard_normal(shape) * scale, dtype=mpnn.float64, requires_grad=True)

    x, w1, w2 = tensor(20, 2, 6, 9), tensor(2, 2, 3, 3, scale=0.3), tensor(2, 2, 3, 3, scale=0.3)
    conv = mpnn.nn.functional.conv2d

    def block(x, w1, w2):
        a = conv(x, w1, padding=1)
        h = conv(a.relu() + a * 0.5, w2, padding=1)
        return (h + x).tanh() + x[:, :, ::2].mean()

    assert gradcheck(block, [x, w1, w2])


def test_downsampling_block_through_the_stride_two_winograd_with_reuse_views_and_broadcasting(monkeypatch):
    """A downsampling residual block as ResNet's, with its 3x3 stride-2 convs on the stride-2 Winograd (thresholds
    lowered so that 2-channel float64 convs take it; chunks of one image, so the batch crosses chunk seams): the
    main branch's stride-2 conv feeds a stride-1 conv after its ReLU, and its output is reused; x reaches the
    output through a second stride-2 conv (the shortcut), a strided view and a 0-d mean broadcast; a second
    stride-2 conv of the block's own output stacks one on another. Float64 gradcheck of input and weights."""
    from mpnn.core import conv as conv_module
    from mpnn.core.conv_winograd_s2 import WinogradS2

    monkeypatch.setattr(conv_module, "_WINOGRAD_S2_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_S2_MIN_WIDTH", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_S2_TILES", 1)
    used = []
    original = WinogradS2.backward

    def spy(self, *args):
        used.append(args[0][0].shape)
        return original(self, *args)

    monkeypatch.setattr(WinogradS2, "backward", spy)
    rng = np.random.default_rng(13)

    def tensor(*shape, scale=1.0):
        return mpnn.tensor(rng.standard_normal(shape) * scale, dtype=mpnn.float64, requires_grad=True)

    x = tensor(3, 2, 9, 10)
    w1, w2, ws, w3 = (tensor(2, 2, 3, 3, scale=0.3) for _ in range(4))
    conv = mpnn.nn.functional.conv2d

    def block(x, w1, w2, ws, w3):
        a = conv(x, w1, stride=2, padding=1)  # 5x5
        h = conv(a.relu() + a * 0.5, w2, padding=1)
        out = (h + conv(x, ws, stride=2, padding=1)).tanh() + x[:, :, ::3, 1::2].mean()
        return conv(out, w3, stride=2, padding=1).sum() * 0.1 + out

    assert gradcheck(block, [x, w1, w2, ws, w3])
    assert len(used) >= 3, used  # both stride-2 convs of the block and the stacked one


def test_bottleneck_block_through_pointwise_and_a_kept_winograd_weight_with_reuse_views_and_broadcasting(monkeypatch):
    """A bottleneck block as ResNet-50's, on the paths a small float64 block would not take by default (thresholds
    lowered): 1x1 convs on Pointwise (stride 1: no copy; stride 2: the subsample and its scatter back), and a frozen
    3x3 conv on Winograd F(4x4) whose transformed weight comes from conv_weight_cache once gradcheck has met it
    twice. The reduced input reaches the 3x3 conv twice (through its ReLU and directly), x reaches the output at
    two depths (the residual and a strided view), and a 0-d mean broadcasts. Float64 gradcheck of input and the
    1x1 weights."""
    from mpnn.core import conv as conv_module
    from mpnn.core import conv_weight_cache
    from mpnn.core.conv_pointwise import Pointwise

    monkeypatch.setattr(conv_module, "_POINTWISE_MIN_POSITIONS", 1)
    monkeypatch.setattr(conv_module, "_WINOGRAD_MIN_CHANNELS", 1)
    conv_weight_cache.clear()
    strides = []
    original = Pointwise.backward

    def spy(self, *args):
        strides.append(args[0][2:4])
        return original(self, *args)

    monkeypatch.setattr(Pointwise, "backward", spy)
    rng = np.random.default_rng(17)

    def tensor(*shape, scale=1.0, grad=True):
        return mpnn.tensor(rng.standard_normal(shape) * scale, dtype=mpnn.float64, requires_grad=grad)

    x = tensor(3, 2, 9, 10)
    w_in, w_out, w_down = tensor(3, 2, 1, 1, scale=0.5), tensor(2, 3, 1, 1, scale=0.5), tensor(4, 2, 1, 1, scale=0.5)
    w_mid = tensor(3, 3, 3, 3, scale=0.3, grad=False)  # frozen: its forward never trains it, so U is kept
    conv = mpnn.nn.functional.conv2d

    def block(x, w_in, w_out, w_down):
        a = conv(x, w_in)
        h = conv(a.relu() + a * 0.5, w_mid, padding=1)
        b = (conv(h, w_out) + x).tanh()
        return conv(b, w_down, stride=2) + x[:, :1, ::2, 1::2] + b.mean()

    assert gradcheck(block, [x, w_in, w_out, w_down])
    assert (
        conv_module.select(
            conv_module.ConvProblem(x.data, w_mid.data, None, (3, 3, 1, 1, 1, 1, 1, 1, 1), 9, 10, False)
        ).name
        == "winograd-f4x4"
    )
    assert {(1, 1), (2, 2)} <= set(strides), strides
    assert conv_weight_cache.info()["hits"] > 0
    conv_weight_cache.clear()


def test_pre_norm_attention_block_with_its_norm_weights_reused():
    """A pre-norm transformer block composed: layer_norm with weight and bias (their gradients summed in the row-sum
    pass), the same weight and bias reused by a second norm deeper in, causal attention over a strided view, a
    residual back to x and a broadcast bias; float64 gradcheck over x, the norm's weight and bias and the projection."""
    rng = np.random.default_rng(5)

    def tensor(*shape, scale=1.0):
        return mpnn.tensor(rng.standard_normal(shape) * scale, dtype=mpnn.float64, requires_grad=True)

    x, g, b, p = tensor(2, 5, 6), tensor(6, scale=0.5), tensor(6, scale=0.5), tensor(6, 6, scale=0.4)
    F = mpnn.nn.functional

    def block(x, g, b, p):
        h = F.layer_norm(x, (6,), g, b)
        q = (h @ p).reshape(2, 5, 2, 3).transpose(1, 2)  # heads: a strided view
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(2, 5, 6)
        y = x + a
        return F.layer_norm(y, (6,), g, b) + b

    assert gradcheck(block, [x, g, b, p])
