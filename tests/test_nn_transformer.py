"""torch.nn parity for what model files such as nanoGPT's use: ModuleDict/ParameterList/ParameterDict, weight
tying, buffers, Module.to/cpu, the init functions, Embedding/LayerNorm/GELU/Conv signatures, and
MultiheadAttention / TransformerEncoderLayer / TransformerEncoder against torch (forward, attention weights and
gradients, state_dicts loaded both ways). The torch comparisons skip when torch is not installed."""

import copy
import inspect
import math
import pickle

import numpy as np
import pytest

import mpnn
from mpnn import nn
from mpnn.core.tensor import Tensor
from mpnn.nn import functional as F
from mpnn.nn import init
from mpnn.nn.transformer import generate_square_subsequent_mask


def _torch():
    return pytest.importorskip("torch")


def to_mpnn(torch_module, mpnn_module):
    """Copy a torch module's state_dict (as NumPy) into an mpnn module; keys and order must agree."""
    sd = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    assert list(sd) == list(mpnn_module.state_dict())
    mpnn_module.load_state_dict(sd)


def to_torch(mpnn_module, torch_module):
    torch = _torch()
    sd = {k: torch.from_numpy(v.numpy().copy()) for k, v in mpnn_module.state_dict().items()}
    assert list(sd) == list(torch_module.state_dict())
    torch_module.load_state_dict(sd)


# ----- containers, tying, buffers, dtype/device ---------------------------------------------------
def test_module_dict_behaves_as_torchs():
    d = nn.ModuleDict({"a": nn.Linear(2, 3), "b": nn.ReLU()})
    d["c"] = nn.Linear(3, 1)
    d.update([("d", nn.Tanh())])
    assert list(d) == list(d.keys()) == ["a", "b", "c", "d"] and len(d) == 4 and "c" in d and "z" not in d
    assert [n for n, _ in d.named_parameters()] == ["a.weight", "a.bias", "c.weight", "c.bias"]
    assert isinstance(d.pop("b"), nn.ReLU) and list(d) == ["a", "c", "d"]
    del d["d"]
    assert [k for k, _ in d.items()] == ["a", "c"] and all(isinstance(m, nn.Linear) for m in d.values())
    with pytest.raises(KeyError):
        d["e.f"] = nn.ReLU()
    with pytest.raises(TypeError, match="iterable"):
        d.update(nn.ReLU())
    with pytest.raises(ValueError, match="length 3"):
        d.update([("x", nn.ReLU(), 1)])
    twin = copy.deepcopy(d)
    assert list(twin.state_dict()) == list(d.state_dict())
    d.clear()
    assert len(d) == 0 and not list(d.parameters())


def test_parameter_list_and_dict_register_their_parameters():
    pl = nn.ParameterList([nn.Parameter(np.ones(2, dtype=np.float32)), Tensor(np.zeros(3, dtype=np.float32))])
    pl.append(nn.Parameter(np.ones(1, dtype=np.float32)))
    assert [n for n, _ in pl.named_parameters()] == ["0", "1", "2"] and len(pl) == 3
    assert isinstance(pl[1], nn.Parameter) and pl[1].requires_grad is False  # a plain tensor is wrapped as torch
    assert [p.shape for p in pl] == [(2,), (3,), (1,)] and pl[-1].shape == (1,)
    pd = nn.ParameterDict({"w": nn.Parameter(np.ones((2, 2), dtype=np.float32))})
    pd["b"] = nn.Parameter(np.zeros(2, dtype=np.float32))
    assert list(pd) == ["w", "b"] and list(pd.state_dict()) == ["w", "b"] and "b" in pd
    del pd["w"]
    assert list(pd.state_dict()) == ["b"] and len(pd) == 1
    m = pickle.loads(pickle.dumps(pl))
    assert len(m) == 3 and [n for n, _ in m.named_parameters()] == ["0", "1", "2"]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(5, 4), ln_f=nn.LayerNorm(4, bias=False)))
        self.lm_head = nn.Linear(4, 5, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.register_buffer("mask", Tensor(np.tril(np.ones((3, 3), dtype=np.float32))), persistent=False)
        self.register_buffer("count", Tensor(np.zeros((), dtype=np.int64)))

    def forward(self, idx):
        return self.lm_head(self.transformer.ln_f(self.transformer.wte(idx)))


def test_weight_tying_buffers_and_state_dict_keys_as_torch():
    m = Tied()
    assert [n for n, _ in m.named_parameters()] == ["transformer.wte.weight", "transformer.ln_f.weight"]
    assert sum(p.numel() for p in m.parameters()) == 5 * 4 + 4
    assert list(m.state_dict()) == ["count", "transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"]
    assert [n for n, _ in m.named_parameters(remove_duplicate=False)] == [
        "transformer.wte.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
    ]
    assert [n for n, _ in m.named_buffers()] == ["mask", "count"]  # non-persistent: a buffer, not saved
    sd = m.state_dict()
    sd["lm_head.weight"] = sd["transformer.wte.weight"] = np.full((5, 4), 0.5, dtype=np.float32)
    m.load_state_dict(sd)
    assert m.lm_head.weight is m.transformer.wte.weight and np.all(m.lm_head.weight.data == 0.5)
    loss = m(mpnn.tensor([[0, 1, 2]])).sum()
    loss.backward()  # both uses of the tied weight accumulate into its one .grad
    assert m.lm_head.weight.grad.shape == (5, 4)

    assert m.to("cpu") is m and m.cpu() is m and m.to(device="cpu", dtype=mpnn.float64) is m
    assert m.lm_head.weight.data.dtype == np.float64 and m.mask.data.dtype == np.float64
    assert m.count.data.dtype == np.int64 and m.lm_head.weight is m.transformer.wte.weight
    m.to(mpnn.zeros(1, dtype=mpnn.float32))
    assert m.lm_head.weight.data.dtype == np.float32
    with pytest.raises(ValueError, match="CPU only"):
        m.to("cuda:0")
    with pytest.raises(ValueError, match="CPU only"):
        m.cuda()
    assert m.get_submodule("transformer.wte") is m.transformer.wte
    assert m.get_parameter("lm_head.weight") is m.lm_head.weight and m.get_buffer("mask") is m.mask
    with pytest.raises(AttributeError):
        m.get_submodule("transformer.nope")

    torch = _torch()

    class TTied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.ModuleDict(
                dict(wte=torch.nn.Embedding(5, 4), ln_f=torch.nn.LayerNorm(4, bias=False))
            )
            self.lm_head = torch.nn.Linear(4, 5, bias=False)
            self.transformer.wte.weight = self.lm_head.weight
            self.register_buffer("mask", torch.tril(torch.ones(3, 3)), persistent=False)
            self.register_buffer("count", torch.zeros((), dtype=torch.long))

    t = TTied()
    assert [n for n, _ in t.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert list(t.state_dict()) == list(m.state_dict())
    assert [n for n, _ in t.named_buffers()] == [n for n, _ in m.named_buffers()]
    to_mpnn(t, m)
    np.testing.assert_array_equal(m.lm_head.weight.data, t.lm_head.weight.detach().numpy())


def test_apply_visits_children_first_then_self():
    seen = []
    Tied().apply(lambda mod: seen.append(type(mod).__name__))
    assert seen == ["Embedding", "LayerNorm", "ModuleDict", "Linear", "Tied"]


# ----- init ----------------------------------------------------------------------------------------
def test_init_functions_match_torchs_distributions():
    mpnn.manual_seed(0)
    t = mpnn.empty(200_000)
    init.trunc_normal_(t, std=0.02)
    assert abs(t.data.std() - 0.02) < 5e-4 and t.data.min() >= -2 and t.data.max() <= 2
    init.trunc_normal_(t, mean=0.0, std=1.0, a=-1.0, b=0.5)
    assert t.data.min() >= -1.0 and t.data.max() <= 0.5
    # truncated N(0, 1) on [-1, 0.5]: mean -(phi(0.5) - phi(-1)) / (Phi(0.5) - Phi(-1))
    phi = [math.exp(-x * x / 2) / math.sqrt(2 * math.pi) for x in (-1.0, 0.5)]
    z = (math.erf(0.5 / math.sqrt(2)) - math.erf(-1 / math.sqrt(2))) / 2
    assert abs(t.data.mean() - (phi[0] - phi[1]) / z) < 5e-3
    with pytest.warns(UserWarning, match="more than 2 std"):
        init.trunc_normal_(t, mean=5.0, std=1.0, a=-1.0, b=1.0)
    assert t.data.min() >= -1.0 and t.data.max() <= 1.0
    w = nn.Parameter(np.empty((64, 32), dtype=np.float32))
    assert init.normal_(w, mean=0.0, std=0.02) is w and abs(w.data.std() - 0.02) < 2e-3
    assert not init.zeros_(w).data.any() and np.all(init.ones_(w).data == 1)
    init.orthogonal_(w)
    np.testing.assert_allclose(w.data.T @ w.data, np.eye(32), atol=1e-5)
    init.eye_(w)
    np.testing.assert_array_equal(w.data, np.eye(64, 32))
    g = np.random.default_rng(3)
    a, b = mpnn.empty(5), mpnn.empty(5)
    init.uniform_(a, generator=np.random.default_rng(3))
    init.uniform_(b, generator=g)
    np.testing.assert_array_equal(a.data, b.data)
    for fn in (init.trunc_normal_, init.normal_, init.xavier_uniform_, init.kaiming_normal_):
        assert "generator" in inspect.signature(fn).parameters


# ----- layer signatures ------------------------------------------------------------------------------
def test_layer_signatures_take_torchs_factory_keywords():
    lin = nn.Linear(3, 2, bias=False, device="cpu", dtype=mpnn.float64)
    assert lin.weight.data.dtype == np.float64 and lin.bias is None
    ln = nn.LayerNorm(4, bias=False, device="cpu")
    assert ln.bias is None and [n for n, _ in ln.named_parameters()] == ["weight"]
    with pytest.raises(RuntimeError, match="CPU only"):
        nn.Linear(3, 2, device="cuda")
    emb = nn.Embedding(10, 3, padding_idx=0, sparse=True, device="cpu")
    assert not emb.weight.data[0].any()
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    frozen = nn.Embedding.from_pretrained(mpnn.tensor(table))
    assert not frozen.weight.requires_grad
    np.testing.assert_array_equal(frozen(mpnn.tensor([2, 0])).data, table[[2, 0]])
    with pytest.raises(NotImplementedError, match="max_norm"):
        nn.Embedding(4, 2, max_norm=1.0)
    for cls in (nn.BatchNorm1d, nn.Conv2d, nn.Conv1d, nn.LayerNorm, nn.Linear, nn.Embedding):
        assert {"device", "dtype"} <= set(inspect.signature(cls).parameters)


def test_gelu_layernorm_and_padding_modes_match_torch():
    torch = _torch()
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    for approx in ("none", "tanh"):
        np.testing.assert_allclose(
            nn.GELU(approximate=approx)(mpnn.tensor(x)).data,
            torch.nn.GELU(approximate=approx)(torch.from_numpy(x)).numpy(),
            atol=1e-6,
        )
    t, m = torch.nn.LayerNorm(8, bias=False), nn.LayerNorm(8, bias=False)
    with torch.no_grad():
        t.weight.uniform_()
    to_mpnn(t, m)
    np.testing.assert_allclose(m(mpnn.tensor(x)).data, t(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    img = np.random.default_rng(1).standard_normal((2, 2, 5, 6)).astype(np.float32)
    for mode in ("reflect", "replicate", "circular"):
        t, m = torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode)
        to_mpnn(t, m)
        np.testing.assert_allclose(m(mpnn.tensor(img)).data, t(torch.from_numpy(img)).detach().numpy(), atol=1e-5)
        assert repr(m) == repr(t)


# ----- attention and the encoder, against torch ------------------------------------------------------
def _compare(t_mod, m_mod, t_inputs, m_inputs, kwargs_t=None, kwargs_m=None, pick=lambda out: out, atol=3e-5):
    """Forward both, compare outputs; backward a fixed random projection of the output, compare every grad."""
    torch = _torch()
    t_out = pick(t_mod(*t_inputs, **(kwargs_t or {})))
    m_out = pick(m_mod(*m_inputs, **(kwargs_m or {})))
    np.testing.assert_allclose(m_out.data, t_out.detach().numpy(), atol=atol, rtol=1e-4)
    proj = np.random.default_rng(7).standard_normal(m_out.shape).astype(np.float32)
    (t_out * torch.from_numpy(proj)).sum().backward()
    (m_out * mpnn.tensor(proj)).sum().backward()
    t_grads = {n: p.grad.numpy() for n, p in t_mod.named_parameters() if p.grad is not None}
    m_grads = {n: p.grad.data for n, p in m_mod.named_parameters() if p.grad is not None}
    assert t_grads and sorted(t_grads) == sorted(m_grads)
    for n in t_grads:
        np.testing.assert_allclose(m_grads[n], t_grads[n], atol=atol * 10, rtol=1e-3, err_msg=n)
    for tx, mx in zip(t_inputs, m_inputs):
        if getattr(tx, "grad", None) is not None:
            np.testing.assert_allclose(mx.grad.data, tx.grad.numpy(), atol=atol * 10, rtol=1e-3)


MHA_CASES = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(kdim=5, vdim=7),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, batch_first=True),
]


@pytest.mark.parametrize("kwargs", MHA_CASES, ids=str)
def test_multihead_attention_matches_torch(kwargs):
    torch = _torch()
    rng = np.random.default_rng(0)
    t, m = torch.nn.MultiheadAttention(8, 2, **kwargs), nn.MultiheadAttention(8, 2, **kwargs)
    to_mpnn(t, m)
    L, S, N = 4, 6, 3
    bf = kwargs.get("batch_first", False)

    def arr(T, E):
        return rng.standard_normal((N, T, E) if bf else (T, N, E)).astype(np.float32)

    q, k, v = arr(L, 8), arr(S, kwargs.get("kdim", 8)), arr(S, kwargs.get("vdim", 8))
    attn = rng.random((L, S)) < 0.3
    pad = rng.random((N, S)) < 0.3
    attn[:, 0] = pad[:, 0] = False  # no fully masked rows (NaN in both)
    float_attn = rng.standard_normal((N * 2, L, S)).astype(np.float32)
    cases = [
        dict(),
        dict(attn_mask=attn),
        dict(key_padding_mask=pad),
        dict(attn_mask=attn, key_padding_mask=pad, average_attn_weights=False),
        dict(attn_mask=float_attn, need_weights=False),
    ]
    for case in cases:
        t.zero_grad()
        m.zero_grad()
        tk = {a: torch.from_numpy(b) if isinstance(b, np.ndarray) else b for a, b in case.items()}
        mk = {a: mpnn.tensor(b) if isinstance(b, np.ndarray) else b for a, b in case.items()}
        tin = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
        min_ = [mpnn.tensor(x, requires_grad=True) for x in (q, k, v)]
        _compare(t, m, tin, min_, tk, mk, pick=lambda out: out[0])
        t_w = t(*tin, **tk)[1]
        m_w = m(*min_, **mk)[1]
        if case.get("need_weights", True):
            np.testing.assert_allclose(m_w.data, t_w.detach().numpy(), atol=2e-6)
            assert tuple(m_w.shape) == tuple(t_w.shape)
        else:
            assert m_w is None and t_w is None


def test_multihead_self_attention_unbatched_and_state_dict_back_to_torch():
    torch = _torch()
    m = nn.MultiheadAttention(6, 3, batch_first=True)
    t = torch.nn.MultiheadAttention(6, 3, batch_first=True)
    to_torch(m, t)
    x = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)  # unbatched (L, E)
    X, TX = mpnn.tensor(x), torch.from_numpy(x)
    mask = generate_square_subsequent_mask(5)
    t_out, t_w = t(TX, TX, TX, attn_mask=torch.from_numpy(mask.data), is_causal=True, average_attn_weights=False)
    m_out, m_w = m(X, X, X, attn_mask=mask, is_causal=True, average_attn_weights=False)
    np.testing.assert_allclose(m_out.data, t_out.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(m_w.data, t_w.detach().numpy(), atol=2e-6)
    assert m_w.shape == (3, 5, 5) and not np.triu(m_w.data[0], 1).any()
    np.testing.assert_array_equal(mask.data, torch.nn.Transformer.generate_square_subsequent_mask(5).numpy())


def test_multihead_attention_errors_are_torchs():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        nn.MultiheadAttention(10, 3)
    m = nn.MultiheadAttention(4, 2)
    x = mpnn.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        m(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match=r"2D attn_mask is \(3, 4\), but should be \(3, 3\)"):
        m(x, x, x, attn_mask=mpnn.zeros(3, 4))
    with pytest.raises(RuntimeError, match="key_padding_mask shape"):
        m(x, x, x, key_padding_mask=mpnn.zeros(3, 3))
    with pytest.raises(ValueError, match="embedding dimension of 4"):
        m(mpnn.randn(3, 2, 5), x, x)
    with pytest.raises(TypeError, match="only bool and floating"):
        m(x, x, x, attn_mask=mpnn.zeros(3, 3, dtype=mpnn.int64))
    assert [n for n, _ in m.named_parameters()] == [
        "in_proj_weight",
        "in_proj_bias",
        "out_proj.weight",
        "out_proj.bias",
    ]
    assert not m.in_proj_bias.data.any() and not m.out_proj.bias.data.any()
    bound = math.sqrt(6 / (4 + 12))  # xavier_uniform_ over the packed (3E, E) weight, as torch
    assert np.abs(m.in_proj_weight.data).max() <= bound


LAYER_CASES = [
    dict(),
    dict(activation="gelu", norm_first=True),
    dict(batch_first=True, bias=False),
    dict(activation="relu", layer_norm_eps=1e-3, batch_first=True),
]


@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=str)
def test_transformer_encoder_layer_matches_torch(kwargs):
    torch = _torch()
    t = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs)
    m = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs)
    assert [n for n, _ in t.named_modules()] == [n for n, _ in m.named_modules()]
    to_mpnn(t, m)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 8) if kwargs.get("batch_first") else (5, 3, 8)).astype(np.float32)
    pad = rng.random((3, 5)) < 0.3
    pad[:, 0] = False
    causal = generate_square_subsequent_mask(5)
    for tk, mk in [
        ({}, {}),
        (dict(src_key_padding_mask=torch.from_numpy(pad)), dict(src_key_padding_mask=mpnn.tensor(pad))),
        (dict(src_mask=torch.from_numpy(causal.data), is_causal=True), dict(src_mask=causal, is_causal=True)),
    ]:
        t.zero_grad()
        m.zero_grad()
        _compare(t, m, [torch.tensor(x, requires_grad=True)], [mpnn.tensor(x, requires_grad=True)], tk, mk)


def test_transformer_encoder_layers_are_deep_copies_and_match_torch_both_ways():
    torch = _torch()
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, activation=F.gelu, batch_first=True)
    m = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    assert m.layers[0] is not layer and m.layers[0].linear1.weight is not m.layers[1].linear1.weight
    assert m.layers[0].activation is F.gelu
    t_layer = torch.nn.TransformerEncoderLayer(
        8, 2, dim_feedforward=16, dropout=0.1, activation="gelu", batch_first=True
    )
    t = torch.nn.TransformerEncoder(t_layer, num_layers=2, norm=torch.nn.LayerNorm(8), enable_nested_tensor=False)
    assert list(t.state_dict()) == list(m.state_dict())
    assert list(m.state_dict())[:2] == ["layers.0.self_attn.in_proj_weight", "layers.0.self_attn.in_proj_bias"]
    rng = np.random.default_rng(3)
    for p in m.parameters():  # distinct values everywhere so a key mix-up shows
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    to_torch(m, t)
    t.eval()
    m.eval()  # dropout off in both
    assert not any(mod.training for mod in m.modules())
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    pad = np.zeros((2, 5), dtype=bool)
    pad[1, 3:] = True
    causal = np.triu(np.ones((5, 5), dtype=bool), 1)  # bool, as the padding mask (torch warns on a mix)
    _compare(
        t,
        m,
        [torch.tensor(x, requires_grad=True)],
        [mpnn.tensor(x, requires_grad=True)],
        dict(mask=torch.from_numpy(causal), src_key_padding_mask=torch.from_numpy(pad)),
        dict(mask=mpnn.tensor(causal), src_key_padding_mask=mpnn.tensor(pad)),
    )
    # and back: a fresh mpnn encoder loads torch's weights
    fresh = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, 0.1, "gelu", batch_first=True), 2, norm=nn.LayerNorm(8)
    ).eval()
    to_mpnn(t, fresh)
    np.testing.assert_allclose(fresh(mpnn.tensor(x)).data, m(mpnn.tensor(x)).data, atol=1e-6)


def test_encoder_layer_activation_module_is_registered_and_bad_names_refused():
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, activation=nn.GELU(approximate="tanh"))
    assert "activation" in dict(layer.named_children())
    with pytest.raises(RuntimeError, match="activation should be relu/gelu, not swish"):
        nn.TransformerEncoderLayer(4, 2, activation="swish")
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8), 1)
    x = mpnn.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        enc(x, is_causal=True)
    out = enc(x)
    assert out.shape == (3, 2, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


# ----- decoder and the encoder-decoder Transformer --------------------------------------------------------------
@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=str)
def test_transformer_decoder_layer_matches_torch(kwargs):
    torch = _torch()
    t = torch.nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs)
    m = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs)
    assert [n for n, _ in t.named_modules()] == [n for n, _ in m.named_modules()]
    to_mpnn(t, m)
    rng = np.random.default_rng(4)
    bf = kwargs.get("batch_first")
    x = rng.standard_normal((3, 5, 8) if bf else (5, 3, 8)).astype(np.float32)
    mem = rng.standard_normal((3, 6, 8) if bf else (6, 3, 8)).astype(np.float32)
    mem_pad = rng.random((3, 6)) < 0.3
    mem_pad[:, 0] = False
    causal = generate_square_subsequent_mask(5)
    cross = (rng.random((5, 6)) < 0.3) & ~np.eye(5, 6, dtype=bool)  # bool: True = may not attend
    for tk, mk in [
        ({}, {}),
        (
            dict(tgt_mask=torch.from_numpy(causal.data), tgt_is_causal=True),
            dict(tgt_mask=causal, tgt_is_causal=True),
        ),
        (
            dict(memory_key_padding_mask=torch.from_numpy(mem_pad), memory_mask=torch.from_numpy(cross)),
            dict(memory_key_padding_mask=mpnn.tensor(mem_pad), memory_mask=mpnn.tensor(cross)),
        ),
    ]:
        t.zero_grad()
        m.zero_grad()
        t_in = [torch.tensor(x, requires_grad=True), torch.tensor(mem, requires_grad=True)]
        m_in = [mpnn.tensor(x, requires_grad=True), mpnn.tensor(mem, requires_grad=True)]
        _compare(t, m, t_in, m_in, tk, mk)  # the gradient reaches memory too


def test_transformer_matches_torch_both_ways_and_initialises_as_torch():
    torch = _torch()
    kw = dict(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=16, dropout=0.1)
    m = nn.Transformer(**kw, activation="gelu", batch_first=True)
    t = torch.nn.Transformer(**kw, activation="gelu", batch_first=True)
    assert list(t.state_dict()) == list(m.state_dict())
    assert [n for n, _ in t.named_modules()] == [n for n, _ in m.named_modules()]
    w = m.decoder.layers[1].multihead_attn.in_proj_weight.data  # xavier_uniform_: bound sqrt(6 / (8 + 24))
    assert np.abs(w).max() <= math.sqrt(6 / 32) and w.std() > 0.5 * math.sqrt(6 / 32) / math.sqrt(3)
    rng = np.random.default_rng(5)
    for p in m.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.3
    to_torch(m, t)
    t.eval()
    m.eval()
    src = rng.standard_normal((2, 6, 8)).astype(np.float32)
    tgt = rng.standard_normal((2, 5, 8)).astype(np.float32)
    pad = np.zeros((2, 6), dtype=bool)
    pad[1, 4:] = True
    tmask = nn.Transformer.generate_square_subsequent_mask(5)
    _compare(
        t,
        m,
        [torch.tensor(src, requires_grad=True), torch.tensor(tgt, requires_grad=True)],
        [mpnn.tensor(src, requires_grad=True), mpnn.tensor(tgt, requires_grad=True)],
        dict(
            tgt_mask=torch.from_numpy(tmask.data),
            src_key_padding_mask=torch.from_numpy(pad),
            memory_key_padding_mask=torch.from_numpy(pad),
        ),
        dict(tgt_mask=tmask, src_key_padding_mask=mpnn.tensor(pad), memory_key_padding_mask=mpnn.tensor(pad)),
    )
    fresh = nn.Transformer(**kw, activation="gelu", batch_first=True).eval()
    to_mpnn(t, fresh)
    np.testing.assert_allclose(
        fresh(mpnn.tensor(src), mpnn.tensor(tgt)).data, m(mpnn.tensor(src), mpnn.tensor(tgt)).data, atol=1e-6
    )


def test_transformer_trains_a_copy_task_and_refuses_mismatched_inputs():
    """A tiny encoder-decoder learns to copy its source (teacher forcing): the loss falls well below chance."""
    mpnn.manual_seed(0)
    vocab, d = 6, 16
    emb, pos = nn.Embedding(vocab, d), nn.Embedding(5, d)
    model = nn.Transformer(d, 2, 1, 1, 32, dropout=0.0, batch_first=True)
    head = nn.Linear(d, vocab)
    params = [p for mod in (emb, pos, model, head) for p in mod.parameters()]
    position = mpnn.arange(5)
    opt = mpnn.optim.Adam(params, lr=1e-2)
    rng = np.random.default_rng(0)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    for _ in range(150):
        seq = rng.integers(1, vocab, size=(16, 5))
        tgt_in = np.concatenate([np.zeros((16, 1), dtype=np.int64), seq[:, :-1]], axis=1)  # 0 = start token
        src, tgt = emb(mpnn.tensor(seq)) + pos(position), emb(mpnn.tensor(tgt_in)) + pos(position)
        out = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
        loss = F.cross_entropy(head(out).reshape(-1, vocab), mpnn.tensor(seq.reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * math.log(vocab - 1)
    with pytest.raises(RuntimeError, match="the batch number of src and tgt must be equal"):
        model(mpnn.randn(2, 5, d), mpnn.randn(3, 5, d))
    with pytest.raises(RuntimeError, match="the feature number of src and tgt must be equal to d_model"):
        model(mpnn.randn(2, 5, d), mpnn.randn(2, 5, d + 1))
    with pytest.raises(RuntimeError, match="TransformerDecoderLayer: device .cuda. is not available"):
        nn.TransformerDecoderLayer(4, 2, device="cuda")
