"""mpnn.compat.install_torch_alias (issue 12): a PyTorch model file in the style of nanoGPT's model.py, written
here against torch's API, imports with `torch` resolved to mpnn, builds, trains (the loss falls) and generates.
When torch is installed, the same file also runs on real torch and both agree on the loss for the same weights."""

import importlib.util
import inspect
import math
import sys
import textwrap

import numpy as np
import pytest

import mpnn
from mpnn.compat import install_torch_alias, is_installed, torch_alias, uninstall_torch_alias

MODEL_FILE = textwrap.dedent('''
    """A small GPT written against torch's API (the surface nanoGPT's model.py uses)."""
    import inspect
    import math
    from dataclasses import dataclass

    import torch
    import torch.nn as nn
    from torch.nn import functional as F


    class LayerNorm(nn.Module):
        """LayerNorm with an optional bias, built from parameters and F.layer_norm."""

        def __init__(self, ndim, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))
            self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


    class CausalSelfAttention(nn.Module):
        def __init__(self, config):
            super().__init__()
            assert config.n_embd % config.n_head == 0
            self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
            self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.attn_dropout = nn.Dropout(config.dropout)
            self.resid_dropout = nn.Dropout(config.dropout)
            self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
            self.flash = config.flash and hasattr(torch.nn.functional, "scaled_dot_product_attention")
            if not self.flash:
                mask = torch.tril(torch.ones(config.block_size, config.block_size))
                self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            if self.flash:
                y = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
                att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
                att = F.softmax(att, dim=-1)
                att = self.attn_dropout(att)
                y = att @ v
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))


    class MLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


    class Block(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
            self.attn = CausalSelfAttention(config)
            self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
            self.mlp = MLP(config)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            x = x + self.mlp(self.ln_2(x))
            return x


    @dataclass
    class GPTConfig:
        block_size: int = 64
        vocab_size: int = 128
        n_layer: int = 2
        n_head: int = 2
        n_embd: int = 32
        dropout: float = 0.0
        bias: bool = True
        flash: bool = True


    class GPT(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            ))
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
            self.apply(self._init_weights)
            for pn, p in self.named_parameters():
                if pn.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            print("number of parameters: %.2fM" % (self.get_num_params() / 1e6,))

        def get_num_params(self, non_embedding=True):
            n_params = sum(p.numel() for p in self.parameters())
            if non_embedding:
                n_params -= self.transformer.wpe.weight.numel()
            return n_params

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets=None):
            device = idx.device
            b, t = idx.size()
            assert t <= self.config.block_size, f"sequence of length {t} > block size {self.config.block_size}"
            pos = torch.arange(0, t, dtype=torch.long, device=device)
            tok_emb = self.transformer.wte(idx)
            pos_emb = self.transformer.wpe(pos)
            x = self.transformer.drop(tok_emb + pos_emb)
            for block in self.transformer.h:
                x = block(x)
            x = self.transformer.ln_f(x)
            if targets is not None:
                logits = self.lm_head(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            else:
                logits = self.lm_head(x[:, [-1], :])
                loss = None
            return logits, loss

        def crop_block_size(self, block_size):
            assert block_size <= self.config.block_size
            self.config.block_size = block_size
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
            for block in self.transformer.h:
                if hasattr(block.attn, "bias"):
                    block.attn.bias = block.attn.bias[:, :, :block_size, :block_size]

        def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
            param_dict = {pn: p for pn, p in self.named_parameters()}
            param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
            decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
            nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
            optim_groups = [
                {"params": decay_params, "weight_decay": weight_decay},
                {"params": nodecay_params, "weight_decay": 0.0},
            ]
            print(f"num decayed parameter tensors: {len(decay_params)}, "
                  f"with {sum(p.numel() for p in decay_params):,} parameters")
            fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
            use_fused = fused_available and device_type == "cuda"
            extra_args = dict(fused=True) if use_fused else dict()
            optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
            print(f"using fused AdamW: {use_fused}")
            return optimizer

        @torch.no_grad()
        def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
            for _ in range(max_new_tokens):
                idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
                logits, _ = self(idx_cond)
                logits = logits[:, -1, :] / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("Inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)
                idx = torch.cat((idx, idx_next), dim=1)
            return idx
''')


def _import_model(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(MODEL_FILE)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batches(vocab, block, batch, seed=0):
    """A learnable stream: each sequence counts up by a fixed stride modulo the vocabulary."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, size=(batch, 1))
    stride = rng.integers(1, 4, size=(batch, 1))
    seq = (start + stride * np.arange(block + 1)) % vocab
    return mpnn.tensor(seq[:, :-1]), mpnn.tensor(seq[:, 1:])


@pytest.fixture
def alias():
    with torch_alias() as torch:
        yield torch
    assert not is_installed()


def test_alias_puts_mpnn_under_torchs_module_names(alias):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torch.nn.init
    import torch.optim
    import torch.utils.data
    from torch.optim import lr_scheduler
    from torch.utils.data import DataLoader

    assert torch is alias and nn is mpnn.nn and F is mpnn.nn.functional and torch.optim is mpnn.optim
    assert torch.nn.init is mpnn.nn.init and torch.utils.data is mpnn.data and DataLoader is mpnn.data.DataLoader
    assert lr_scheduler is mpnn.optim.lr_scheduler
    assert torch.tensor is mpnn.tensor and torch.Tensor is mpnn.Tensor and torch.long is mpnn.int64
    assert not torch.cuda.is_available() and str(torch.device("cpu")) == "cpu"
    with pytest.raises(RuntimeError, match="CPU only"):
        torch.device("cuda")
    with pytest.raises(AttributeError, match="mpnn alias"):
        torch.no_such_function  # noqa: B018
    with pytest.raises(ImportError):
        import torch.distributed  # noqa: F401
    assert {"fused", "foreach", "capturable", "differentiable", "maximize"} <= set(
        inspect.signature(torch.optim.AdamW).parameters
    )


def test_install_uninstall_restores_real_torch_modules():
    real = {n: m for n, m in sys.modules.items() if n == "torch" or n.startswith("torch.")}
    install_torch_alias()
    try:
        install_torch_alias()  # twice: a no-op
        assert is_installed() and sys.modules["torch.nn"] is mpnn.nn
        assert not any(sys.modules.get(n) is m for n, m in real.items())
    finally:
        uninstall_torch_alias()
    assert not is_installed()
    assert {n: m for n, m in sys.modules.items() if n == "torch" or n.startswith("torch.")} == real
    uninstall_torch_alias()  # when not installed: a no-op


def test_a_torch_model_file_builds_trains_and_generates_on_mpnn(alias, tmp_path):
    model_file = _import_model(tmp_path, "gpt_model_mpnn")
    assert model_file.torch is alias and model_file.nn is mpnn.nn
    cfg = model_file.GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32)
    mpnn.manual_seed(0)
    model = model_file.GPT(cfg)

    # weight tying: one Parameter, counted once, saved under both names
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    sd = model.state_dict()
    assert "lm_head.weight" in sd and "transformer.wte.weight" in sd
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params() == total - 16 * 32
    assert model.get_num_params(non_embedding=False) == total
    c_proj = np.concatenate([p.data.ravel() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    assert abs(c_proj.std() - 0.02 / math.sqrt(4)) < 2e-3

    # configure_optimizers: nanoGPT's groups, and the fused= path it takes on CUDA is accepted
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95), device_type="cpu")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"])
    assert opt.param_groups[0]["fused"] is None
    fused = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), device_type="cuda")
    assert fused.param_groups[0]["fused"] is True

    # train: a warmup schedule written into param_groups, set_to_none zero_grad, loss falls
    x, y = _batches(cfg.vocab_size, cfg.block_size, batch=8)
    losses = []
    for it in range(30):
        lr = 3e-3 * min(1.0, (it + 1) / 5)
        for group in opt.param_groups:
            group["lr"] = lr
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.lm_head.weight is model.transformer.wte.weight

    # generate under torch.no_grad with top-k and multinomial sampling
    model.eval()
    out = model.generate(x[:2, :4], max_new_tokens=20, temperature=0.8, top_k=5)
    assert out.shape == (2, 24) and out.dtype == np.int64
    assert out.data.min() >= 0 and out.data.max() < cfg.vocab_size
    np.testing.assert_array_equal(out.data[:, :4], x.data[:2, :4])
    assert mpnn.is_grad_enabled()
    greedy = [model.generate(x[:1, :4], max_new_tokens=6, top_k=1).data for _ in range(2)]
    np.testing.assert_array_equal(greedy[0], greedy[1])  # top-1 leaves one choice: sampling is deterministic

    # crop_block_size: a sliced Parameter and (manual path) a sliced buffer
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    logits, loss = model(x[:, :8], y[:, :8])
    assert logits.shape == (8, 8, 32) and loss is not None


def test_manual_attention_path_matches_the_fused_one(alias, tmp_path):
    model_file = _import_model(tmp_path, "gpt_model_paths")
    if not hasattr(mpnn.nn.functional, "scaled_dot_product_attention"):
        pytest.skip("F.scaled_dot_product_attention not in mpnn yet: only the manual path runs")
    mpnn.manual_seed(1)
    flash = model_file.GPT(model_file.GPTConfig(block_size=16, vocab_size=32, flash=True))
    manual = model_file.GPT(model_file.GPTConfig(block_size=16, vocab_size=32, flash=False))
    assert "transformer.h.0.attn.bias" in manual.state_dict()  # the tril buffer is persistent, as in nanoGPT
    missing, unexpected = manual.load_state_dict(flash.state_dict(), strict=False)
    assert unexpected == [] and all(k.endswith("attn.bias") for k in missing)
    x, y = _batches(32, 16, batch=4, seed=2)
    lf, loss_f = flash(x, y)
    lm, loss_m = manual(x, y)
    np.testing.assert_allclose(lf.data, lm.data, atol=2e-5)
    loss_f.backward()
    loss_m.backward()
    for (n, p), (_, q) in zip(flash.named_parameters(), manual.named_parameters()):
        np.testing.assert_allclose(p.grad.data, q.grad.data, atol=2e-5, err_msg=n)


@pytest.mark.parametrize("flash", [False, True], ids=["manual-attention", "sdpa"])
def test_the_same_file_on_real_torch_agrees(tmp_path, flash):
    torch = pytest.importorskip("torch")
    if flash and not hasattr(mpnn.nn.functional, "scaled_dot_product_attention"):
        pytest.skip("F.scaled_dot_product_attention not in mpnn yet")
    real = _import_model(tmp_path, "gpt_model_torch")
    assert real.torch is torch
    with torch_alias():
        ours = _import_model(tmp_path, "gpt_model_ours")
        mpnn.manual_seed(3)
        m = ours.GPT(ours.GPTConfig(block_size=16, vocab_size=32, bias=flash, flash=flash))
    t = real.GPT(real.GPTConfig(block_size=16, vocab_size=32, bias=flash, flash=flash))
    assert list(t.state_dict()) == list(m.state_dict())
    assert [n for n, _ in t.named_parameters()] == [n for n, _ in m.named_parameters()]
    t.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in m.state_dict().items()})
    x, y = _batches(32, 16, batch=4, seed=4)
    tx, ty = torch.from_numpy(x.data), torch.from_numpy(y.data)
    t_logits, t_loss = t(tx, ty)
    m_logits, m_loss = m(x, y)
    np.testing.assert_allclose(m_logits.data, t_logits.detach().numpy(), atol=1e-5)
    assert abs(m_loss.item() - t_loss.item()) < 1e-5
    # one optimizer step each from nanoGPT's configure_optimizers: same gradients, same parameters after it
    t_opt = t.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    with torch_alias():
        m_opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    assert [{k: v for k, v in g.items() if k != "params"} for g in m_opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in t_opt.param_groups
    ]
    for opt, loss in ((t_opt, t_loss), (m_opt, m_loss)):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    t_params = dict(t.named_parameters())
    grads = {n: t_params[n].grad.numpy().copy() for n in t_params}
    for n, p in m.named_parameters():
        np.testing.assert_allclose(p.grad.data, grads[n], atol=1e-6, rtol=1e-4, err_msg=n)
    t_opt.step()
    m_opt.step()
    for n, p in m.named_parameters():
        # Adam's first step is lr * sign(grad): where the true gradient is 0 (the key bias: softmax ignores a
        # per-row shift) the sign is rounding noise in both, so compare where the gradient is signal
        signal = np.abs(grads[n]) > 1e-6
        np.testing.assert_allclose(p.data[signal], t_params[n].detach().numpy()[signal], atol=1e-5, err_msg=n)
