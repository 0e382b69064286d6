"""Run a PyTorch model file on mpnn unchanged: ``install_torch_alias()`` makes ``import torch`` give mpnn.

A migration aid, not a torch replacement. It lets a model definition written against torch's API (nanoGPT's
model.py: ``import torch``, ``import torch.nn as nn``, ``from torch.nn import functional as F``,
``torch.optim.AdamW``, ``torch.no_grad``, ``torch.tril``, ``torch.topk``, ``torch.multinomial``...) import, build,
train and sample on mpnn, so that it can be tried, compared or moved over one file at a time. Whatever mpnn does
not provide fails at the attribute, by name (``AttributeError: module 'torch' (mpnn alias) has no attribute
'compile'``), not with a wrong result.

While installed, these module names resolve to mpnn's::

    torch                      a proxy module: every attribute is mpnn's (mpnn.tensor, mpnn.no_grad, ...), plus
                               ``cuda`` (is_available() is False), ``device`` (only 'cpu') and the submodules below
    torch.nn                   mpnn.nn
    torch.nn.functional        mpnn.nn.functional
    torch.nn.init              mpnn.nn.init
    torch.nn.utils             mpnn.nn.utils
    torch.optim                mpnn.optim
    torch.optim.lr_scheduler   mpnn.optim.lr_scheduler
    torch.utils.data           mpnn.data

Any real ``torch`` and ``torch.*`` modules already imported are set aside (not unloaded) and put back by
``uninstall_torch_alias()``; objects that code already holds from real torch keep working, but a real torch
function that imports one of its own submodules while the alias is installed would get the alias. Use it in a
process (or a ``with torch_alias():`` block) that runs mpnn only.

    from mpnn.compat import torch_alias
    with torch_alias():
        import model            # nanoGPT's model.py, unchanged
        gpt = model.GPT(model.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65))
"""

from __future__ import annotations

import contextlib
import sys
import types

import mpnn
import mpnn.data
import mpnn.nn
import mpnn.nn.functional
import mpnn.nn.init
import mpnn.nn.utils
import mpnn.optim
import mpnn.optim.lr_scheduler

__all__ = ["install_torch_alias", "is_installed", "torch_alias", "uninstall_torch_alias"]

_saved: dict[str, types.ModuleType] | None = None  # the real torch modules set aside while the alias is in


class device:
    """torch.device for the one device mpnn has: ``device('cpu')``, ``device('cpu', 0)``; others are refused."""

    def __init__(self, type: str | device = "cpu", index: int | None = None):
        if isinstance(type, device):
            type, index = type.type, type.index
        name, _, idx = str(type).partition(":")
        if name != "cpu":
            raise RuntimeError(f"device: {str(type)!r} is not available: mpnn runs on the CPU only")
        self.type = "cpu"
        self.index = int(idx) if idx else index

    def __str__(self):
        return "cpu" if self.index is None else f"cpu:{self.index}"

    def __repr__(self):
        return f"device(type='cpu'{'' if self.index is None else f', index={self.index}'})"

    def __eq__(self, other):
        return isinstance(other, device) and (self.type, self.index) == (other.type, other.index)

    def __hash__(self):
        return hash((self.type, self.index))


def _cuda_module() -> types.ModuleType:
    cuda = types.ModuleType("torch.cuda", "No CUDA under mpnn: is_available() is False, device_count() is 0.")
    cuda.is_available = lambda: False  # type: ignore[attr-defined]
    cuda.device_count = lambda: 0  # type: ignore[attr-defined]
    cuda.is_bf16_supported = lambda *args, **kwargs: False  # type: ignore[attr-defined]
    return cuda


class _TorchProxy(types.ModuleType):
    """The module named ``torch`` while the alias is installed: mpnn's attributes, plus the extras above."""

    def __getattr__(self, name):
        try:
            return getattr(mpnn, name)
        except AttributeError:
            raise AttributeError(
                f"module 'torch' (mpnn alias) has no attribute {name!r}: mpnn does not provide torch.{name}"
            ) from None

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(mpnn)))


def _aliases() -> dict[str, types.ModuleType]:
    torch = _TorchProxy("torch", "mpnn under the name torch (mpnn.compat.install_torch_alias); not PyTorch.")
    utils = types.ModuleType("torch.utils", "mpnn's torch.utils: only torch.utils.data (mpnn.data).")
    utils.data = mpnn.data  # type: ignore[attr-defined]
    cuda = _cuda_module()
    torch.__version__ = mpnn.__version__  # type: ignore[attr-defined]
    torch.nn = mpnn.nn  # type: ignore[attr-defined]
    torch.optim = mpnn.optim  # type: ignore[attr-defined]
    torch.utils = utils  # type: ignore[attr-defined]
    torch.cuda = cuda  # type: ignore[attr-defined]
    torch.device = device  # type: ignore[attr-defined]
    return {
        "torch": torch,
        "torch.nn": mpnn.nn,
        "torch.nn.functional": mpnn.nn.functional,
        "torch.nn.init": mpnn.nn.init,
        "torch.nn.utils": mpnn.nn.utils,
        "torch.optim": mpnn.optim,
        "torch.optim.lr_scheduler": mpnn.optim.lr_scheduler,
        "torch.utils": utils,
        "torch.utils.data": mpnn.data,
        "torch.cuda": cuda,
    }


def is_installed() -> bool:
    """True while ``import torch`` gives mpnn (between install_torch_alias and uninstall_torch_alias)."""
    return _saved is not None


def install_torch_alias() -> None:
    """Make ``torch``, ``torch.nn``, ``torch.nn.functional``, ``torch.nn.init``, ``torch.optim`` and
    ``torch.utils.data`` (and the few others in this module's docstring) import as mpnn's modules.

    Real torch modules already in ``sys.modules`` are set aside until ``uninstall_torch_alias()``. Installing
    twice is a no-op. A migration aid for running PyTorch model files on mpnn; see the module docstring.
    """
    global _saved
    if _saved is not None:
        return
    saved = {name: mod for name, mod in sys.modules.items() if name == "torch" or name.startswith("torch.")}
    for name in saved:
        del sys.modules[name]
    sys.modules.update(_aliases())
    _saved = saved


def uninstall_torch_alias() -> None:
    """Remove the alias and put back whatever real torch modules were imported before it (if any)."""
    global _saved
    if _saved is None:
        return
    for name in [n for n in sys.modules if n == "torch" or n.startswith("torch.")]:
        del sys.modules[name]
    sys.modules.update(_saved)
    _saved = None


@contextlib.contextmanager
def torch_alias():
    """``with torch_alias():`` — the alias for the block only (nothing to do if it was already installed)."""
    if is_installed():
        yield sys.modules["torch"]
        return
    install_torch_alias()
    try:
        yield sys.modules["torch"]
    finally:
        uninstall_torch_alias()
