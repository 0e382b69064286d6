"""A character-level GPT trained with nanoGPT's CPU recipe, then validation loss and a sample.

    python launch/gpt.py                          # the English text Python ships (pydoc_data.topics), 2000 steps
    python launch/gpt.py --text input.txt         # any text file, split 90/10
    mpnn launch -n 2 launch/gpt.py                # DataParallel: each rank a batch of --batch-size
    mpnn launch -n 2 --checkpoint-every 500 launch/gpt.py

The recipe (nanoGPT's README, "I only have a macbook"): block 64, batch 12, 4 layers, 4 heads, 128 embedding,
dropout 0, no biases, AdamW lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4 over 2000 steps, betas
(0.9, 0.99), weight decay 0.1 on matrices only, gradient clip 1.0; validation loss is the mean over
--eval-iters random batches of the held-out 10%.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass

import numpy as np

import mpnn
from mpnn import nn
from mpnn.data import DataLoader, Dataset, DistributedSampler
from mpnn.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = c // self.n_head
        q = q.view(b, t, self.n_head, hs).transpose(1, 2)
        k = k.view(b, t, self.n_head, hs).transpose(1, 2)
        v = v.view(b, t, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        _, t = idx.size()
        pos = mpnn.arange(0, t, dtype=mpnn.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizer(self, weight_decay, lr, betas):
        """AdamW with weight decay on matrices (dim >= 2: linear weights and embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return mpnn.optim.AdamW(groups, lr=lr, betas=betas)

    @mpnn.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = mpnn.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = mpnn.cat((idx, mpnn.multinomial(probs, num_samples=1)), dim=1)
        return idx


def load_text(path=None):
    """The training text: a file, or the English help text every CPython ships (pydoc_data.topics)."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


class Windows(Dataset):
    """Every (block, next block) window of a token array: item i is tokens[i:i+T] and tokens[i+1:i+T+1]."""

    def __init__(self, tokens, block_size):
        self.tokens, self.block_size = tokens, block_size

    def __len__(self):
        return len(self.tokens) - self.block_size

    def __getitem__(self, i):
        return self.tokens[i : i + self.block_size], self.tokens[i + 1 : i + 1 + self.block_size]


def lr_at(step, args):
    """nanoGPT's schedule: linear warm-up, then cosine decay to min_lr at --lr-decay-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    if step > args.lr_decay_steps:
        return args.min_lr
    ratio = (step - args.warmup_steps) / (args.lr_decay_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


@mpnn.no_grad()
def estimate_loss(model, tokens, args, seed=1234):
    """Mean loss over --eval-iters batches of random windows (the same windows on every call)."""
    model.eval()
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(args.eval_iters):
        starts = rng.integers(0, len(tokens) - args.block_size - 1, args.batch_size)
        x = np.stack([tokens[s : s + args.block_size] for s in starts])
        y = np.stack([tokens[s + 1 : s + 1 + args.block_size] for s in starts])
        losses.append(model(mpnn.from_numpy(x), mpnn.from_numpy(y))[1].item())
    model.train()
    return float(np.mean(losses))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=None, help="a text file to train on (default: pydoc_data.topics)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=12, help="sequences per rank per step")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--lr-decay-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--sample-chars", type=int, default=300)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--checkpoint-every", type=int, default=int(os.environ.get("MPNN_CHECKPOINT_EVERY") or 0))
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the step through mpnn.compile (captured once, then replayed: every op, clipping included)",
    )
    args = p.parse_args(argv)
    if args.lr_decay_steps is None:
        args.lr_decay_steps = args.steps
    return args


def main(argv=None):
    args = parse_args(argv)
    comm = mpnn.init()
    rank, world = comm.rank, comm.world_size
    text = load_text(args.text)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    tokens = np.array([stoi[ch] for ch in text], dtype=np.int64)
    split = int(0.9 * len(tokens))
    train, val = tokens[:split], tokens[split:]

    mpnn.manual_seed(args.seed)
    cfg = GPTConfig(
        block_size=args.block_size,
        vocab_size=len(chars),
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
    )
    gpt = GPT(cfg)
    model = mpnn.DataParallel(gpt) if world > 1 else gpt
    opt = gpt.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.99))
    windows = Windows(train, args.block_size)
    sampler = DistributedSampler(windows, shuffle=True, seed=args.seed)
    loader = DataLoader(windows, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    ckpt = mpnn.Checkpointer(
        model, opt, sampler=sampler, loader=loader, every=args.checkpoint_every, directory=args.checkpoint_dir
    )
    resumed = ckpt.restore()
    if rank == 0:
        n = sum(p.numel() for p in gpt.parameters())
        print(
            f"{len(tokens):,} characters, vocabulary {len(chars)}, {n / 1e6:.2f}M parameters, world {world}", flush=True
        )
        if resumed.resumed:
            print(f"resumed from {resumed.path} at step {resumed.step}", flush=True)

    def train_step(x, y):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            nn.utils.clip_grad_norm_(gpt.parameters(), args.grad_clip)
        opt.step()
        return loss

    run_step = mpnn.compile(train_step) if args.compile else train_step

    mpnn.telemetry.plan(total_steps=args.steps)
    step, epoch = resumed.step, resumed.epoch
    start = time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            lr = lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = run_step(x, y)
            step += 1
            ckpt.step(step, epoch=epoch)
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                elapsed = time.perf_counter() - start
                tok_s = (step - resumed.step) * args.batch_size * args.block_size * world / elapsed
                print(
                    f"step {step:5d}/{args.steps}  loss {loss.item():.4f}  val {estimate_loss(gpt, val, args):.4f}"
                    f"  lr {lr:.2e}  {tok_s:,.0f} tokens/s",
                    flush=True,
                )
            if step == args.steps:
                break
        epoch += 1
    val_loss = estimate_loss(gpt, val, args)
    if rank == 0:
        print(f"final validation loss {val_loss:.4f} ({args.steps} steps, world {world})", flush=True)
        if args.sample_chars:
            start_idx = mpnn.tensor([[stoi.get("\n", 0)]])
            out = gpt.generate(start_idx, args.sample_chars, temperature=0.8, top_k=50)[0].tolist()
            print("sample:\n" + "".join(chars[i] for i in out), flush=True)
    return val_loss


if __name__ == "__main__":
    main()
