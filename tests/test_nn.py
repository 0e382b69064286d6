"""nn.Module registration and state_dict as PyTorch names them, layers against NumPy, init statistics,
gradient clipping."""

import copy
import math
import pickle
from collections import OrderedDict

import numpy as np
import pytest

import mpnn
from mpnn import nn
from mpnn.core.gradcheck import gradcheck
from mpnn.core.random import generator, get_rng_state, manual_seed, set_rng_state
from mpnn.core.tensor import Tensor
from mpnn.nn import init
from mpnn.nn.utils import clip_grad_norm_, clip_grad_value_, parameters_to_vector, vector_to_parameters


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(np.ones(3, dtype=np.float32))
        self.inner = nn.Linear(3, 2)
        self.register_buffer("count", Tensor(np.zeros((), dtype=np.int64)))
        self.register_buffer("cache", Tensor(np.zeros(3)), persistent=False)
        self.note = "plain attribute"

    def forward(self, x):
        return self.inner(x * self.scale)


# ----- registration, traversal, state_dict ---------------------------------------------------------
def test_attribute_assignment_registers_parameters_modules_and_buffers():
    b = Block()
    assert [n for n, _ in b.named_parameters()] == ["scale", "inner.weight", "inner.bias"]
    assert [n for n, _ in b.named_buffers()] == ["count", "cache"]
    assert [n for n, _ in b.named_children()] == ["inner"]
    assert [n for n, _ in b.named_modules()] == ["", "inner"]
    assert list(b.state_dict()) == ["scale", "count", "inner.weight", "inner.bias"]  # non-persistent left out
    assert b.note == "plain attribute" and "note" not in b.state_dict()
    assert all(p.requires_grad for p in b.parameters())
    assert list(b.parameters(recurse=False)) == [b.scale]


def test_assigning_none_and_wrong_types():
    b = Block()
    b.scale = None
    assert b.scale is None and "scale" not in b.state_dict()
    with pytest.raises(TypeError, match="parameter 'scale'"):
        b.scale = Tensor(np.ones(3))
    with pytest.raises(TypeError, match="buffer 'count'"):
        b.count = np.zeros(())
    b.inner = nn.Linear(3, 4)  # replacing a child module
    assert b.state_dict()["inner.weight"].shape == (4, 3)
    del b.inner
    assert "inner.weight" not in b.state_dict()
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        _ = b.missing
    with pytest.raises(KeyError, match="attribute 'count' already exists"):
        b.register_parameter("count", nn.Parameter(np.ones(1)))
    with pytest.raises(KeyError, match="attribute 'note' already exists"):
        b.register_buffer("note", None)

    class Early(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.ones(1))

    with pytest.raises(AttributeError, match="before Module.__init__"):
        Early()


def test_sequential_and_batchnorm_keys_are_pytorchs():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    )
    assert list(model.state_dict()) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "3.1.weight",
        "3.1.bias",
    ]
    sd = model.state_dict()
    assert sd["1.num_batches_tracked"].dtype == np.int64 and sd["1.num_batches_tracked"].shape == ()
    assert isinstance(sd, OrderedDict) and all(isinstance(v, mpnn.Tensor) and not v.requires_grad for v in sd.values())
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 2)), ("act", nn.Tanh())]))
    assert list(named.state_dict()) == ["fc.weight", "fc.bias"]


def test_state_dict_shares_storage_as_torchs_and_load_copies_in_place():
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    sd = src.state_dict()
    assert all(not v.requires_grad and v.grad_fn is None for v in sd.values())
    snapshot = copy.deepcopy(sd)
    version = src.weight._version
    with mpnn.no_grad():
        sd["weight"].copy_(mpnn.full((2, 3), 5.0))  # nanoGPT's from_pretrained writes weights this way
    np.testing.assert_array_equal(src.weight.data, 5.0)  # into the parameter's own storage
    assert src.weight._version == version + 1  # and the write is counted, as any in-place write
    assert not np.any(snapshot["weight"].numpy() == 5.0)  # the deep copy is a snapshot
    weight_array = dst.weight.data
    result = dst.load_state_dict({"weight": Tensor(sd["weight"]), "bias": sd["bias"].numpy().astype(np.float64)})
    assert dst.weight.data is weight_array  # loaded in place: optimizers keep pointing at it
    np.testing.assert_array_equal(dst.weight.data, 5.0)
    assert dst.bias.data.dtype == np.float32
    np.testing.assert_array_equal(dst.bias.data, src.bias.data)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_strict_load_lists_every_missing_unexpected_and_mismatched_key_and_changes_nothing():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    before = copy.deepcopy(model.state_dict())  # a snapshot: state_dict() shares storage, as torch's
    sd = model.state_dict()
    del sd["0.bias"], sd["1.running_var"]
    sd["extra.weight"] = np.zeros(1)
    sd["head.bias"] = np.zeros(1)
    sd["2.weight"] = np.zeros((2, 3))
    sd["0.weight"] = np.full((3, 2), 7.0)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd)
    msg = str(info.value)
    assert "Error(s) in loading state_dict for Sequential" in msg
    assert 'Missing key(s) in state_dict: "0.bias", "1.running_var".' in msg
    assert 'Unexpected key(s) in state_dict: "extra.weight", "head.bias".' in msg
    assert (
        "size mismatch for 2.weight: copying a param with shape (2, 3) from checkpoint, "
        "the shape in current model is (1, 3)." in msg
    )
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # nothing was copied


def test_non_strict_load_returns_the_key_lists_but_still_refuses_shape_mismatch():
    model = nn.Linear(2, 3)
    missing, unexpected = model.load_state_dict({"weight": np.ones((3, 2)), "other": np.ones(1)}, strict=False)
    assert missing == ["bias"] and unexpected == ["other"]
    np.testing.assert_array_equal(model.weight.data, 1.0)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        model.load_state_dict({"weight": np.ones((2, 2))}, strict=False)
    with pytest.raises(RuntimeError, match='value for "weight" is a str'):
        model.load_state_dict({"weight": "zeros", "bias": np.ones(3)})


def test_shared_parameters_are_listed_once_but_saved_under_both_names():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(list(model.modules())) == 3


def test_train_eval_zero_grad_apply_to_requires_grad_and_deepcopy():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2)))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())

    for p in model.parameters():
        p.grad = Tensor(np.ones_like(p.data))
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.data.any() for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    visited = []
    model.apply(lambda m: visited.append(type(m).__name__))
    assert visited == ["Linear", "Dropout", "BatchNorm1d", "Sequential", "Sequential"]

    model.double()
    assert all(p.data.dtype == np.float64 for p in model.parameters())
    assert model[2][0].num_batches_tracked.data.dtype == np.int64  # integer buffers stay
    assert model[2][0].running_mean.data.dtype == np.float64
    with pytest.raises(ValueError, match="cuda"):
        model.to("cuda")
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())

    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert list(twin.state_dict()) == list(model.state_dict())
        assert isinstance(twin[0].weight, nn.Parameter)
        twin[0].weight.data[...] = 3.0
        assert not np.any(model[0].weight.data == 3.0)


def test_repr_reads_like_pytorchs():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Flatten(), nn.Linear(8, 10, bias=False)),
    )
    assert repr(model) == (
        "Sequential(\n"
        "  (0): Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))\n"
        "  (1): ReLU()\n"
        "  (2): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)\n"
        "  (3): Sequential(\n"
        "    (0): Flatten(start_dim=1, end_dim=-1)\n"
        "    (1): Linear(in_features=8, out_features=10, bias=False)\n"
        "  )\n"
        ")"
    )
    assert repr(nn.BatchNorm1d(4, bias=False)) == (
        "BatchNorm1d(4, eps=1e-05, momentum=0.1, affine=True, bias=False, track_running_stats=True)"
    )
    assert repr(nn.LayerNorm(3)) == "LayerNorm((3,), eps=1e-05, elementwise_affine=True, bias=True)"
    assert repr(nn.Parameter(np.zeros(1, np.float32))).startswith("Parameter containing:\ntensor(")


def test_containers_index_slice_append_and_renumber():
    a, b, c = nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 2)
    seq = nn.Sequential(a, b)
    seq.append(c)
    assert len(seq) == 3 and seq[0] is a and seq[-1] is c and list(seq) == [a, b, c]
    assert list(seq[1:]) == [b, c] and isinstance(seq[1:], nn.Sequential)
    with pytest.raises(IndexError, match="index 3 is out of range for 3"):
        seq[3]
    ml = nn.ModuleList([a])
    ml.append(b).extend([c])
    ml.insert(0, nn.Identity())
    assert [type(m).__name__ for m in ml] == ["Identity", "Linear", "Tanh", "Linear"]
    assert list(ml.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    del ml[0]
    assert list(ml.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"] and ml[2] is c
    ml += [nn.Linear(2, 2)]
    assert len(ml) == 4 and ml[-1].weight.shape == (2, 2)


# ----- init ----------------------------------------------------------------------------------------
def test_default_inits_follow_pytorch_bounds():
    manual_seed(0)
    lin = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for arr in (lin.weight.data, lin.bias.data):
        assert np.abs(arr).max() <= bound and np.abs(arr).max() > 0.98 * bound
    w = lin.weight.data.astype(np.float64)
    assert abs(w.mean()) < 0.01 * bound and abs(w.var() - bound**2 / 3) < 0.02 * bound**2

    conv = nn.Conv2d(6, 20, (3, 5), groups=2)
    fan_in = 3 * 3 * 5
    assert conv.weight.shape == (20, 3, 3, 5)
    assert np.abs(conv.weight.data).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(conv.bias.data).max() <= 1 / math.sqrt(fan_in)
    assert np.abs(conv.weight.data).max() > 0.9 / math.sqrt(fan_in)

    emb = nn.Embedding(500, 64, padding_idx=-1)
    assert emb.padding_idx == 499 and not emb.weight.data[499].any()
    rows = emb.weight.data[:499].astype(np.float64)
    assert abs(rows.mean()) < 0.02 and abs(rows.std() - 1) < 0.02

    bn, ln = nn.BatchNorm2d(3), nn.LayerNorm((2, 3))
    np.testing.assert_array_equal(bn.weight.data, 1)
    np.testing.assert_array_equal(bn.bias.data, 0)
    np.testing.assert_array_equal(bn.running_var.data, 1)
    assert ln.weight.shape == (2, 3) and not ln.bias.data.any()


def test_init_functions_gains_and_fans():
    assert init.calculate_gain("relu") == math.sqrt(2)
    assert init.calculate_gain("tanh") == 5 / 3
    assert init.calculate_gain("conv2d") == 1
    assert init.calculate_gain("leaky_relu", 0.2) == math.sqrt(2 / 1.04)
    assert init.calculate_gain("leaky_relu") == math.sqrt(2 / (1 + 0.01**2))
    with pytest.raises(ValueError, match="unsupported nonlinearity 'swish'"):
        init.calculate_gain("swish")

    manual_seed(1)
    t = Tensor(np.empty((200, 50, 3), dtype=np.float64))
    fan_in, fan_out = 50 * 3, 200 * 3
    init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu")
    assert abs(t.data.std() - math.sqrt(2) / math.sqrt(fan_out)) < 0.02 * math.sqrt(2 / fan_out)
    init.xavier_uniform_(t, gain=2.0)
    a = 2.0 * math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(t.data).max() <= a and np.abs(t.data).max() > 0.99 * a
    init.xavier_normal_(t)
    assert abs(t.data.std() - math.sqrt(2 / (fan_in + fan_out))) < 0.02 * math.sqrt(2 / (fan_in + fan_out))
    init.kaiming_uniform_(t, nonlinearity="relu")
    assert np.abs(t.data).max() <= math.sqrt(6 / fan_in)
    init.constant_(t, 0.5)
    assert np.all(t.data == 0.5)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.xavier_uniform_(Tensor(np.zeros(4)))
    with pytest.raises(ValueError, match="mode 'fan_avg'"):
        init.kaiming_uniform_(t, mode="fan_avg")


def test_manual_seed_makes_inits_repeat_and_rng_state_round_trips():
    manual_seed(123)
    first = nn.Linear(5, 4).weight.data.copy()
    gen = generator()
    manual_seed(123)
    assert generator() is gen  # reseeded in place, kept references follow
    np.testing.assert_array_equal(nn.Linear(5, 4).weight.data, first)
    state = get_rng_state()
    a = generator().random(3)
    set_rng_state(state)
    np.testing.assert_array_equal(generator().random(3), a)
    with pytest.raises(ValueError, match="non-negative integer"):
        manual_seed(-1)


# ----- layers against NumPy --------------------------------------------------------------------------
def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_linear_and_embedding_forward():
    lin = nn.Linear(4, 3, dtype="float64")
    x = _x(5, 4)
    np.testing.assert_allclose(lin(Tensor(x)).data, x @ lin.weight.data.T + lin.bias.data, rtol=1e-12)
    emb = nn.Embedding(6, 2)
    idx = np.array([[0, 5], [2, 2]])
    np.testing.assert_array_equal(emb(Tensor(idx)).data, emb.weight.data[idx])


def test_model_gradients_match_finite_differences():
    manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, dtype="float64"), nn.Tanh(), nn.Linear(4, 2, dtype="float64"))
    x = Tensor(_x(2, 3), requires_grad=True)
    gradcheck(lambda x, *params: model(x), [x, *model.parameters()])


def _conv2d_ref(x, w, b, stride, pad, dil, groups):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow))
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i in range(oh):
            for j in range(ow):
                patch = xp[
                    :,
                    g * cg : (g + 1) * cg,
                    i * stride[0] : i * stride[0] + dil[0] * (kh - 1) + 1 : dil[0],
                    j * stride[1] : j * stride[1] + dil[1] * (kw - 1) + 1 : dil[1],
                ]
                out[:, oc, i, j] = np.sum(patch * w[oc], axis=(1, 2, 3)) + b[oc]
    return out


def test_conv_layers_pass_their_settings_through():
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, dtype="float64")
    x = _x(2, 4, 7, 6)
    ref = _conv2d_ref(x, conv.weight.data, conv.bias.data, conv.stride, conv.padding, conv.dilation, 2)
    np.testing.assert_allclose(conv(Tensor(x)).data, ref, rtol=1e-10, atol=1e-12)
    c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1, dtype="float64")
    x1 = _x(2, 2, 9)
    ref1 = _conv2d_ref(x1[:, :, None], c1.weight.data[:, :, None], c1.bias.data, (1, 2), (0, 1), (1, 1), 1)[:, :, 0]
    np.testing.assert_allclose(c1(Tensor(x1)).data, ref1, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"in_channels \(3\).*divisible by groups \(2\)"):
        nn.Conv2d(3, 4, 3, groups=2)


def test_batchnorm_training_running_stats_and_eval():
    bn = nn.BatchNorm1d(3, momentum=0.2, dtype="float64")
    bn.weight.data[...] = [1.0, 2.0, 0.5]
    bn.bias.data[...] = [0.0, 1.0, -1.0]
    x = _x(8, 3)
    y = bn(Tensor(x)).data
    mean, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * bn.weight.data + bn.bias.data, rtol=1e-10)
    np.testing.assert_allclose(bn.running_mean.data, 0.2 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.data, 0.8 + 0.2 * x.var(0, ddof=1), rtol=1e-12)
    assert int(bn.num_batches_tracked.data) == 1
    bn.eval()
    y_eval = bn(Tensor(x)).data
    np.testing.assert_allclose(
        y_eval,
        (x - bn.running_mean.data) / np.sqrt(bn.running_var.data + 1e-5) * bn.weight.data + bn.bias.data,
        rtol=1e-10,
    )
    assert int(bn.num_batches_tracked.data) == 1  # eval does not count batches

    cumulative = nn.BatchNorm2d(2, momentum=None, dtype="float64")
    batches = [_x(4, 2, 3, 3, seed=s) for s in range(3)]
    for b in batches:
        cumulative(Tensor(b))
    expected = np.mean([b.mean(axis=(0, 2, 3)) for b in batches], axis=0)  # factor 1/num_batches_tracked
    np.testing.assert_allclose(cumulative.running_mean.data, expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        cumulative(Tensor(_x(2, 2, 3)))


def test_layernorm_activations_dropout_flatten():
    ln = nn.LayerNorm((3, 4), dtype="float64")
    x = _x(2, 3, 4)
    m, v = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(ln(Tensor(x)).data, (x - m) / np.sqrt(v + 1e-5), rtol=1e-10)
    t = Tensor(x)
    erf = np.vectorize(math.erf)
    cases = [
        (nn.ReLU(), np.maximum(x, 0)),
        (nn.LeakyReLU(0.2), np.where(x > 0, x, 0.2 * x)),
        (nn.GELU(), 0.5 * x * (1 + erf(x / math.sqrt(2)))),
        (nn.Tanh(), np.tanh(x)),
        (nn.Sigmoid(), 1 / (1 + np.exp(-x))),
        (nn.Softmax(dim=1), np.exp(x) / np.exp(x).sum(1, keepdims=True)),
        (nn.LogSoftmax(dim=-1), x - np.log(np.exp(x).sum(-1, keepdims=True))),
        (nn.Flatten(), x.reshape(2, 12)),
        (nn.Flatten(0, 1), x.reshape(6, 4)),
        (nn.Identity(), x),
    ]
    for module, ref in cases:
        np.testing.assert_allclose(module(t).data, ref, rtol=1e-7, atol=1e-12, err_msg=repr(module))
    drop = nn.Dropout(0.25)
    ones = Tensor(np.ones((200, 50)))
    out = drop(ones).data
    assert set(np.unique(out)) <= {0.0, 1 / 0.75} and abs((out == 0).mean() - 0.25) < 0.02
    drop.eval()
    np.testing.assert_array_equal(drop(ones).data, 1.0)
    with pytest.raises(ValueError, match="between 0 and 1, but got 1.5"):
        nn.Dropout(1.5)


def test_pooling_layers():
    x = _x(2, 3, 6, 4)
    np.testing.assert_allclose(nn.MaxPool2d(2)(Tensor(x)).data, x.reshape(2, 3, 3, 2, 2, 2).max(axis=(3, 5)))
    np.testing.assert_allclose(
        nn.AvgPool2d(2)(Tensor(x)).data, x.reshape(2, 3, 3, 2, 2, 2).mean(axis=(3, 5)), rtol=1e-12
    )
    np.testing.assert_allclose(nn.AdaptiveAvgPool2d(1)(Tensor(x)).data, x.mean(axis=(2, 3), keepdims=True), rtol=1e-12)
    x1 = _x(2, 3, 8)
    np.testing.assert_allclose(nn.MaxPool1d(2)(Tensor(x1)).data, x1.reshape(2, 3, 4, 2).max(-1))
    np.testing.assert_allclose(nn.AvgPool1d(4, stride=4)(Tensor(x1)).data, x1.reshape(2, 3, 2, 4).mean(-1), rtol=1e-12)
    windows = np.lib.stride_tricks.sliding_window_view
    np.testing.assert_allclose(nn.MaxPool1d(3, stride=1)(Tensor(x1)).data, windows(x1, 3, axis=-1).max(-1))
    np.testing.assert_allclose(
        nn.AvgPool2d(2, stride=1, divisor_override=1)(Tensor(x)).data,
        windows(x, (2, 2), axis=(2, 3)).sum(axis=(-2, -1)),
        rtol=1e-12,
    )


def test_loss_modules():
    logits, labels = _x(5, 4), np.array([0, 3, 1, 1, 2])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = nn.CrossEntropyLoss()(Tensor(logits), Tensor(labels)).item()
    assert ce == pytest.approx(-logp[np.arange(5), labels].mean(), rel=1e-10)
    total = nn.NLLLoss(reduction="sum")(Tensor(logp), Tensor(labels)).item()
    assert total == pytest.approx(-logp[np.arange(5), labels].sum(), rel=1e-10)
    a, b = _x(3, 2), _x(3, 2, seed=1)
    assert nn.MSELoss()(Tensor(a), Tensor(b)).item() == pytest.approx(((a - b) ** 2).mean(), rel=1e-12)
    y = (b > 0).astype(np.float64)
    bce = nn.BCEWithLogitsLoss()(Tensor(a), Tensor(y)).item()
    sig = 1 / (1 + np.exp(-a))
    assert bce == pytest.approx(np.mean(-(y * np.log(sig) + (1 - y) * np.log(1 - sig))), rel=1e-10)
    with pytest.raises(ValueError, match="reduction 'avg'"):
        nn.MSELoss(reduction="avg")


# ----- nn.utils ----------------------------------------------------------------------------------
def _with_grads(*grads):
    params = [nn.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = Tensor(g.copy())
    return params


def test_clip_grad_norm_scales_all_gradients_together():
    g1, g2 = _x(3, 4).astype(np.float32), _x(5, seed=1).astype(np.float32)
    params = _with_grads(g1, g2)
    total = math.sqrt((g1.astype(np.float64) ** 2).sum() + (g2.astype(np.float64) ** 2).sum())
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert isinstance(norm, Tensor) and norm.item() == pytest.approx(total, rel=1e-6)
    coef = 1.0 / (total + 1e-6)
    np.testing.assert_allclose(params[0].grad.data, g1 * coef, rtol=1e-6)
    np.testing.assert_allclose(params[1].grad.data, g2 * coef, rtol=1e-6)
    untouched = _with_grads(g1)
    clip_grad_norm_(untouched, max_norm=1e3)
    np.testing.assert_array_equal(untouched[0].grad.data, g1)
    inf_params = _with_grads(g1, g2)
    assert clip_grad_norm_(inf_params, 0.5, norm_type="inf").item() == pytest.approx(
        max(np.abs(g1).max(), np.abs(g2).max())
    )
    one = _with_grads(g1)
    assert clip_grad_norm_(one[0], 10.0, norm_type=1).item() == pytest.approx(np.abs(g1).sum(), rel=1e-6)
    assert clip_grad_norm_([nn.Parameter(np.zeros(2))], 1.0).item() == 0.0  # no grads at all
    bad = _with_grads(np.array([1.0, np.nan]))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(bad, 1.0, error_if_nonfinite=True)


def test_clip_grad_value_and_vector_round_trip():
    params = _with_grads(np.array([-3.0, 0.5, 2.0]))
    clip_grad_value_(params, 1.0)
    np.testing.assert_array_equal(params[0].grad.data, [-1.0, 0.5, 1.0])
    model = nn.Linear(3, 2)
    vec = parameters_to_vector(model.parameters())
    assert vec.shape == (8,)
    vector_to_parameters(Tensor(np.arange(8.0)), model.parameters())
    np.testing.assert_array_equal(model.bias.data, [6.0, 7.0])
    with pytest.raises(ValueError, match="8 elements"):
        vector_to_parameters(Tensor(np.arange(7.0)), model.parameters())


def test_nn_is_reachable_from_the_package():
    assert mpnn.nn.Linear is nn.Linear and mpnn.nn.functional.linear is not None
