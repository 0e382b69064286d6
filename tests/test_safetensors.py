"""Weights in safetensors (mpnn/checkpoint/weights.py): a state_dict round-trips with dtypes, shapes and metadata;
tied weights are written under both names and stay tied after loading; a missing file, a file that is not
safetensors and a dtype mpnn cannot hold are refused naming the file and key; a model saved by mpnn loads into
PyTorch with safetensors.torch + load_state_dict and back (when torch is installed); the Checkpointer writes its
model weights as model.safetensors (SHA-256 in the manifest) and still resumes a checkpoint of the old format."""

import json
import struct
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")

import mpnn  # noqa: E402
from mpnn import nn  # noqa: E402
from mpnn.checkpoint import Checkpointer, layout  # noqa: E402
from mpnn.checkpoint.weights import SafetensorsError, safetensors_metadata  # noqa: E402


def _net():
    mpnn.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )


class _Tied(nn.Module):
    """nanoGPT's tying: the output projection is the embedding's Parameter under a second name."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(7, 4)
        self.lm_head = nn.Linear(4, 7, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(self.wte(idx))


def test_a_state_dict_round_trips_with_dtypes_shapes_and_metadata(tmp_path):
    model = _net()
    model.train()
    model(mpnn.randn(2, 1, 5, 5))  # moves the BatchNorm buffers off their initial values
    path = tmp_path / "net.safetensors"
    mpnn.save_safetensors(model.state_dict(), path, metadata={"epoch": "3"})
    loaded = mpnn.load_safetensors(path)
    assert set(loaded) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert isinstance(loaded[key], mpnn.Tensor)
        assert loaded[key].dtype == value.dtype, key
        np.testing.assert_array_equal(loaded[key].numpy(), value.numpy())
    assert safetensors_metadata(path) == {"epoch": "3"}
    fresh = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    fresh.load_state_dict(loaded)
    x = mpnn.randn(2, 1, 5, 5)
    model.eval(), fresh.eval()
    np.testing.assert_array_equal(fresh(x).numpy(), model(x).numpy())


def test_tied_weights_are_saved_under_both_names_and_stay_tied(tmp_path):
    model = _Tied()
    path = tmp_path / "tied.safetensors"
    mpnn.save_safetensors(model.state_dict(), path)
    loaded = mpnn.load_safetensors(path)
    assert set(loaded) == {"wte.weight", "lm_head.weight"}
    np.testing.assert_array_equal(loaded["wte.weight"].numpy(), loaded["lm_head.weight"].numpy())
    other = _Tied()
    other.load_state_dict(loaded)
    assert other.lm_head.weight is other.wte.weight
    np.testing.assert_array_equal(other.wte.weight.numpy(), model.wte.weight.numpy())


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_safetensors: .*nothing\.safetensors: no such file"):
        mpnn.load_safetensors(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "no header"),
        (b"\xff" * 64, "give a header of"),
        (struct.pack("<Q", 5) + b"nope!", "header is not JSON"),
    ],
    ids=["empty", "huge header", "not JSON"],
)
def test_a_file_that_is_not_safetensors_is_refused_naming_it(tmp_path, content, why):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError, match=rf"weights\.bin: not a safetensors file .*{why}"):
        mpnn.load_safetensors(path)


def test_an_mpnn_checkpoint_file_is_not_taken_for_safetensors(tmp_path):
    mpnn.save({"w": np.ones(3)}, tmp_path / "w.mpnn")
    with pytest.raises(SafetensorsError, match=r"w\.mpnn: not a safetensors file"):
        mpnn.load_safetensors(tmp_path / "w.mpnn")


def test_a_dtype_mpnn_cannot_hold_is_refused_naming_the_key(tmp_path):
    header = json.dumps({"h.weight": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    with pytest.raises(SafetensorsError, match=r"bf16\.safetensors: key 'h\.weight' has dtype BF16, which mpnn"):
        mpnn.load_safetensors(path)
    with pytest.raises(SafetensorsError, match=r"'codes' has dtype uint8"):
        mpnn.save_safetensors({"codes": np.zeros(3, np.uint8)}, tmp_path / "u8.safetensors")
    with pytest.raises(TypeError, match=r"'lr' is a float, not a Tensor or array"):
        mpnn.save_safetensors({"lr": 0.1}, tmp_path / "f.safetensors")


def test_a_model_saved_by_mpnn_loads_into_torch_and_back(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    model = _net()
    model.train()
    model(mpnn.randn(4, 1, 5, 5))
    model.eval()
    path = tmp_path / "mpnn.safetensors"
    mpnn.save_safetensors(model.state_dict(), path)
    tnet = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    ).eval()
    tnet.load_state_dict(load_file(path))  # strict: every key and buffer (num_batches_tracked included)
    x = np.random.default_rng(1).standard_normal((2, 1, 5, 5)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(tnet(torch.from_numpy(x)).numpy(), model(mpnn.from_numpy(x)).numpy(), atol=1e-5)

    with torch.no_grad():  # torch changes the weights, saves them; mpnn loads them
        for p in tnet.parameters():
            p.mul_(0.5)
    save_file(tnet.state_dict(), tmp_path / "torch.safetensors")
    model.load_state_dict(mpnn.load_safetensors(tmp_path / "torch.safetensors"))
    with torch.no_grad():
        np.testing.assert_allclose(tnet(torch.from_numpy(x)).numpy(), model(mpnn.from_numpy(x)).numpy(), atol=1e-5)

    tied = _Tied()  # tied weights: torch's strict load_state_dict takes both names, and ties stay ties
    mpnn.save_safetensors(tied.state_dict(), tmp_path / "tied.safetensors")
    ttied = torch.nn.Module()
    ttied.wte = torch.nn.Embedding(7, 4)
    ttied.lm_head = torch.nn.Linear(4, 7, bias=False)
    ttied.lm_head.weight = ttied.wte.weight
    ttied.load_state_dict(load_file(tmp_path / "tied.safetensors"))
    np.testing.assert_array_equal(ttied.lm_head.weight.detach().numpy(), tied.wte.weight.numpy())


def _train(model, opt, steps):
    rng = np.random.default_rng(5)
    for _ in range(steps):
        x = mpnn.from_numpy(rng.standard_normal((4, 1, 5, 5)).astype(np.float32))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoints_hold_model_weights_as_safetensors_with_their_sha256(tmp_path):
    model = _net()
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 2)
    path = Checkpointer(model, opt, directory=tmp_path).save(2)
    manifest, _ = layout.read_manifest(path)
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.mpnn", "rank-0.mpnn"]
    assert manifest["files"]["model.safetensors"]["sha256"] == layout.file_sha256(path / "model.safetensors")
    weights = mpnn.load_safetensors(path / "model.safetensors")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(weights[key].numpy(), value.numpy())


def test_a_checkpoint_of_the_previous_format_still_resumes(tmp_path):
    """Before model weights were safetensors, a checkpoint held model.mpnn: it resumes as it did."""
    model = _net()
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 3)
    new = Checkpointer(model, opt, directory=tmp_path).save(3)
    old = tmp_path / layout.step_name(3)
    (old / "model.safetensors").unlink()
    (old / layout.MANIFEST).unlink()
    mpnn.save(model.state_dict(), old / "model.mpnn")
    layout.write_manifest(old, 3, 0, 1, ["model.mpnn", "optimizer.mpnn", "rank-0.mpnn"])
    assert new == old

    fresh = _net()
    fresh_opt = mpnn.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    state = Checkpointer(fresh, fresh_opt, directory=tmp_path).restore()
    assert state.step == 3
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_without_the_safetensors_package_checkpoints_write_model_mpnn_and_resume(tmp_path, monkeypatch, capsys):
    from mpnn.checkpoint import checkpointer

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    monkeypatch.setattr(checkpointer, "_warned_no_safetensors", False)
    model = _net()
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1)
    _train(model, opt, 1)
    path = Checkpointer(model, opt, directory=tmp_path).save(1)
    Checkpointer(model, opt, directory=tmp_path).save(2)
    assert capsys.readouterr().err.count("safetensors package is not installed") == 1
    assert sorted(layout.read_manifest(path)[0]["files"]) == ["model.mpnn", "optimizer.mpnn", "rank-0.mpnn"]
    fresh = _net()
    assert Checkpointer(fresh, mpnn.optim.SGD(fresh.parameters(), lr=0.1), directory=tmp_path).restore().step == 2
    np.testing.assert_array_equal(fresh.state_dict()["4.weight"].numpy(), model.state_dict()["4.weight"].numpy())
