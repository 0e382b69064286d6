"""mpnn.onnx.export (mpnn/onnx/exporter.py): every model in launch/ (MNIST-1D MLP and CNN, XOR, digits' residual
CNN, the GPT) and the nn layer set export, pass onnx.checker (full check) and give onnxruntime's output within
1e-5 of mpnn's at the traced batch size and at another (the batch axis is dynamic); GELU is composed below opset
20 and one node from 20; ops and layer modes ONNX cannot take are refused naming the layer and the op; training
flags come back as they were; mpnn imports without the onnx package and says how to install it."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import mpnn  # noqa: E402
from examples import load_example  # noqa: E402
from mpnn import nn  # noqa: E402
from mpnn.onnx import ExportError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def _outputs(model, x):
    with mpnn.no_grad():
        out = model(mpnn.from_numpy(x))
    return (out[0] if isinstance(out, tuple) else out).numpy()


def export_and_compare(model, example, other, path, **kwargs):
    """Export on `example`, check the file, run it in onnxruntime on `example` and `other` (another batch size);
    returns the largest absolute difference from mpnn's outputs."""
    model.eval()
    mpnn.onnx.export(model, example, path, **kwargs)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    worst = 0.0
    for x in (example, other):
        got = session.run(None, {"input_0": x})[0]
        want = _outputs(model, x)
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def _floats(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def mnist1d():
    return load_example("mnist1d")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_mnist1d_models_export(mnist1d, kind, tmp_path):
    mpnn.manual_seed(0)
    model = mnist1d.MODELS[kind]()
    assert export_and_compare(model, _floats(8, 40), _floats(3, 40, seed=1), tmp_path / "m.onnx") <= TOLERANCE


def test_the_trained_xor_model_exports(tmp_path, monkeypatch, capsys):
    for name in ("MPNN_CHECKPOINT_EVERY", "MPNN_RUN_DIR", "MPNN_RESUME_FROM"):
        monkeypatch.delenv(name, raising=False)
    model = runpy.run_path(str(ROOT / "launch" / "xor.py"))["model"]  # trains 500 Adam steps (well under a second)
    assert "predictions [0, 1, 1, 0]" in capsys.readouterr().out
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    assert export_and_compare(model, x, x[:3], tmp_path / "xor.onnx") <= TOLERANCE


@pytest.mark.skipif(not (ROOT / "launch" / "digits.py").exists(), reason="launch/digits.py not in this tree")
def test_the_digits_residual_cnn_exports_with_batchnorm_statistics(tmp_path):
    digits = load_example("digits")
    mpnn.manual_seed(0)
    model = digits.ResidualCNN()
    for _ in range(3):  # running statistics off their initial 0 and 1
        model(mpnn.randn(16, 1, 8, 8))
    worst = export_and_compare(model, _floats(4, 1, 8, 8), _floats(9, 1, 8, 8, seed=1), tmp_path / "digits.onnx")
    assert worst <= TOLERANCE


def test_the_gpt_exports_with_tied_weights_and_causal_attention(tmp_path):
    gpt = load_example("gpt")
    mpnn.manual_seed(0)
    cfg = gpt.GPTConfig(n_layer=2)
    model = gpt.GPT(cfg)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (2, cfg.block_size)).astype(np.int64)
    other = rng.integers(0, cfg.vocab_size, (5, cfg.block_size)).astype(np.int64)
    assert export_and_compare(model, idx, other, tmp_path / "gpt.onnx") <= TOLERANCE
    graph = onnx.load(tmp_path / "gpt.onnx").graph
    tied = [i.name for i in graph.initializer if i.name in ("lm_head.weight", "transformer.wte.weight")]
    assert len(tied) == 1  # one tied matrix, stored once


@pytest.mark.parametrize("opset", [17, 20])
def test_a_2d_layer_zoo_exports(tmp_path, opset):
    mpnn.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=4),
        nn.GELU(approximate="tanh"),
        nn.MaxPool2d(2),
        nn.AvgPool2d(2, padding=1, count_include_pad=False),
        nn.Conv2d(8, 6, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6, 5),
        nn.Tanh(),
        nn.LogSoftmax(dim=1),
    )
    model.train()
    model(mpnn.randn(4, 3, 16, 16))  # BatchNorm statistics moved
    worst = export_and_compare(
        model, _floats(2, 3, 16, 16), _floats(5, 3, 16, 16, seed=1), tmp_path / "z.onnx", opset=opset
    )
    assert worst <= TOLERANCE
    ops = {n.op_type for n in onnx.load(tmp_path / "z.onnx").graph.node}
    assert ("Gelu" in ops) == (opset >= 20)


def test_training_flags_come_back_as_they_were(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
    model.train()
    model[2].eval()
    before = [m.training for m in model.modules()]
    mpnn.onnx.export(model, _floats(2, 3), tmp_path / "m.onnx")
    assert [m.training for m in model.modules()] == before


def test_a_1d_layer_zoo_exports(tmp_path):
    mpnn.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.BatchNorm1d(6),
        nn.GELU(),
        nn.MaxPool1d(3, stride=2, padding=1),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.LayerNorm(12),
        nn.Sigmoid(),
        nn.Linear(12, 7),
        nn.ReLU(),
        nn.BatchNorm1d(7),
        nn.Softmax(dim=-1),
        nn.Identity(),
    )
    assert export_and_compare(model, _floats(2, 2, 20), _floats(6, 2, 20, seed=1), tmp_path / "z.onnx") <= TOLERANCE


def test_an_embedding_and_a_transformer_encoder_layer_export(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 16)
            self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, idx):
            h = self.layer(self.embed(idx))
            return self.head(h[:, 0, :])

    mpnn.manual_seed(0)
    rng = np.random.default_rng(0)
    idx, other = (rng.integers(0, 11, (n, 5)).astype(np.int64) for n in (3, 7))
    assert export_and_compare(Encoder(), idx, other, tmp_path / "enc.onnx") <= TOLERANCE


class _Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x).cumsum(1) + 1.0


def test_an_op_without_a_mapping_is_refused_naming_the_layer_and_op(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), _Cumulative())
    with pytest.raises(ExportError, match=r"_Cumulative \(1\): it reads a tensor made by op 'cumsum'"):
        mpnn.onnx.export(model, _floats(2, 4), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "layer, shape, why",
    [
        (nn.BatchNorm1d(4, track_running_stats=False), (2, 4), r"BatchNorm1d \(0\): BatchNorm without running"),
        (nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), (2, 4, 6), r"Conv1d \(0\): padding_mode='reflect'"),
        (nn.MaxPool1d(2, return_indices=True), (2, 4, 6), r"MaxPool1d \(0\): return_indices"),
    ],
    ids=["batchnorm-without-stats", "reflect-padding", "return-indices"],
)
def test_layer_modes_onnx_cannot_express_are_refused_by_layer_name(tmp_path, layer, shape, why):
    model = nn.Sequential(layer) if not isinstance(layer, nn.MaxPool1d) else _Indices(layer)
    with pytest.raises(ExportError, match=why):
        mpnn.onnx.export(model, _floats(*shape), tmp_path / "x.onnx")


class _Indices(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.add_module("0", pool)

    def forward(self, x):
        return getattr(self, "0")(x)[0]


def test_mpnn_imports_without_onnx_and_export_says_how_to_install_it():
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "import mpnn, mpnn.onnx\n"
        "try:\n"
        "    mpnn.onnx.export(mpnn.nn.Linear(2, 2), mpnn.ones(1, 2), 'x.onnx')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'mpnn[onnx]'" in done.stdout
