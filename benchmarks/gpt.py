"""nanoGPT's CPU recipe on mpnn and on PyTorch, side by side in one process, one thread each: tokens/s and loss.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gpt.py              # speed: tokens/s, ratio
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gpt.py --full       # + 2000 steps, val loss
    python benchmarks/gpt.py --full --text input.txt                                   # another text
    python benchmarks/gpt.py --compile         # + mpnn's step through mpnn.compile: compiled / eager step time
    python benchmarks/gpt.py --profile 20      # per-op tables: mpnn.profiler and torch.profiler over 20 steps each

One model definition serves both libraries (``build(lib)`` gets torch or mpnn as ``lib``), so the two run the
same code: character GPT, block 64, batch 12, 4 layers, 4 heads, 128 embedding, no bias, dropout 0, AdamW
(betas 0.9/0.99, weight decay 0.1 on matrices), lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4, clip 1.0.
Both see the same batches (drawn once with NumPy). Speed: the median over --repeats blocks of --steps steps of
each library's tokens/s, after warm-up; the ratio is mpnn / torch (>1: mpnn faster).
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402


def build(lib, vocab, block=64, n_layer=4, n_head=4, n_embd=128):
    """The GPT, written once against torch's API; ``lib`` is torch or mpnn."""
    nn, F = lib.nn, lib.nn.functional

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
            self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

        def forward(self, x):
            b, t, c = x.size()
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(n_embd, bias=False)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(n_embd, bias=False)
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, n_embd)
            self.wpe = nn.Embedding(block, n_embd)
            self.h = nn.ModuleList([Block() for _ in range(n_layer)])
            self.ln_f = nn.LayerNorm(n_embd, bias=False)
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            t = idx.size(1)
            x = self.wte(idx) + self.wpe(lib.arange(0, t, dtype=lib.long))
            for blk in self.h:
                x = blk(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def init_like(model, lib, seed):
    """The same initial weights in both libraries: N(0, 0.02) matrices (scaled for c_proj), LayerNorm ones."""
    rng = np.random.default_rng(seed)
    with lib.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * 4) if name.endswith("c_proj.weight") else 0.02
                values = rng.normal(0.0, std, size=tuple(p.shape)).astype(np.float32)
            else:
                values = np.ones(tuple(p.shape), np.float32)
            p.copy_(lib.from_numpy(values))


def optimizer(model, lib):
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return lib.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))


def lr_at(step, steps):
    if step < 100:
        return 1e-3 * (step + 1) / 101
    ratio = min(1.0, (step - 100) / max(1, steps - 100))
    return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)


def load_tokens(path):
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        from pydoc_data.topics import topics

        text = "".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return np.array([stoi[c] for c in text], dtype=np.int64), len(chars)


def batches(tokens, n, seed, batch=12, block=64):
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - block - 1, size=(n, batch))
    x = np.stack([[tokens[s : s + block] for s in row] for row in starts])
    y = np.stack([[tokens[s + 1 : s + 1 + block] for s in row] for row in starts])
    return x, y


class Trainer:
    """One library's model, optimizer and step."""

    def __init__(self, lib, vocab, seed, total_steps, compiled=False):
        self.lib = lib
        self.model = build(lib, vocab)
        init_like(self.model, lib, seed)
        self.opt = optimizer(self.model, lib)
        self.total, self.done = total_steps, 0
        # mpnn.compile: the learning rate is set outside the step (the replayed AdamW reads it from the groups)
        self._run = lib.compile(self._step) if compiled else self._step

    def _step(self, x, y):
        loss = self.model(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.lib.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss

    def step(self, x, y):
        lib = self.lib
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.done, self.total)
        loss = self._run(lib.from_numpy(x), lib.from_numpy(y))
        self.done += 1
        return loss

    def evaluate(self, xs, ys):
        lib = self.lib
        self.model.eval()
        with lib.no_grad():
            losses = [self.model(lib.from_numpy(x), lib.from_numpy(y)).item() for x, y in zip(xs, ys)]
        self.model.train()
        return float(np.mean(losses))


def libraries(compiled=False):
    """name -> library; with compiled, "mpnn compiled" too (the same mpnn, its step through mpnn.compile)."""
    import torch

    import mpnn

    torch.set_num_threads(1)
    mpnn.init()  # as a training script starts: a world of one, flush-to-zero, freed memory kept (for both libraries:
    #              malloc is the process's, and torch's CPU allocator sits on it too)
    libs = {"mpnn": mpnn, "torch": torch}
    if compiled:
        libs["mpnn compiled"] = mpnn
    return libs


def speed(libs, tokens, vocab, steps, repeats, warmup):
    """Median tokens/s per library over the timed blocks, by wall time and by this thread's CPU time (which
    leaves out the time the thread waited for a core: the steadier figure on a shared, loaded machine)."""
    x, y = batches(tokens, steps * repeats + warmup, seed=1)
    rates = {name: [] for name in libs}
    cpu_rates = {name: [] for name in libs}
    trainers = {
        name: Trainer(lib, vocab, seed=0, total_steps=10_000, compiled=name.endswith("compiled"))
        for name, lib in libs.items()
    }
    for tr in trainers.values():
        for i in range(warmup):
            tr.step(x[i], y[i])
    for r in range(repeats):  # interleave the libraries so that machine load hits both alike
        for name, tr in trainers.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            for i in range(warmup + r * steps, warmup + (r + 1) * steps):
                tr.step(x[i], y[i])
            cpu_rates[name].append(steps * x.shape[1] * x.shape[2] / (time.thread_time() - c0))
            rates[name].append(steps * x.shape[1] * x.shape[2] / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in rates.items()}
    return med, rates, {name: statistics.median(v) for name, v in cpu_rates.items()}


def profile_ops(libs, tokens, vocab, steps, warmup, rows=30):
    """Each library's op table over ``steps`` steps after warm-up, from its own profiler (mpnn.profiler,
    torch.profiler), sorted by self time; both time wall clock around each op."""
    x, y = batches(tokens, steps + warmup, seed=1)
    for name, lib in libs.items():
        tr = Trainer(lib, vocab, seed=0, total_steps=10_000, compiled=name.endswith("compiled"))
        for i in range(warmup):
            tr.step(x[i], y[i])
        if lib.__name__ == "torch":
            prof = lib.profiler.profile(activities=[lib.profiler.ProfilerActivity.CPU])
        else:
            prof = lib.profiler.profile()
        with prof:
            t0 = time.perf_counter()
            for i in range(warmup, warmup + steps):
                tr.step(x[i], y[i])
            ms = (time.perf_counter() - t0) / steps * 1e3
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        print(f"{name}: {steps} steps profiled, {ms:.1f} ms per step (wall, profiler on)\n{table}", flush=True)


def full_run(libs, tokens, vocab, steps, eval_iters):
    split = int(0.9 * len(tokens))
    train, val = tokens[:split], tokens[split:]
    x, y = batches(train, steps, seed=2)
    vx, vy = batches(val, eval_iters, seed=3)
    out = {}
    for name, lib in libs.items():
        tr = Trainer(lib, vocab, seed=0, total_steps=steps, compiled=name.endswith("compiled"))
        t0 = time.perf_counter()
        for i in range(steps):
            tr.step(x[i], y[i])
        out[name] = SimpleNamespace(val=tr.evaluate(vx, vy), seconds=time.perf_counter() - t0)
        print(
            f"{name:13s} {steps} steps in {out[name].seconds:7.1f} s, validation loss {out[name].val:.4f}", flush=True
        )
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--full", action="store_true", help="also train each library for --full-steps, report val loss")
    p.add_argument("--full-steps", type=int, default=2000)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--text", default=None)
    p.add_argument("--compile", action="store_true", help="also time mpnn's step through mpnn.compile")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="print each library's per-op table")
    args = p.parse_args()
    tokens, vocab = load_tokens(args.text)
    libs = libraries(args.compile)
    if args.profile:
        profile_ops(libs, tokens, vocab, args.profile, args.warmup)
        return
    med, rates, cpu = speed(libs, tokens, vocab, args.steps, args.repeats, args.warmup)
    from mpnn.core import linalg

    route = "mpnn's own AVX-512 kernel" if linalg._OWN_GEMM else "OpenBLAS"  # MPNN_GEMM=own|blas picks it
    print(
        f"tokens/s (median of {args.repeats} blocks of {args.steps} steps, batch 12 x 64, one thread; mpnn's "
        f"GEMMs: {route}):"
    )
    for name in libs:
        print(
            f"  {name:13s} {med[name]:10,.0f}   blocks: {', '.join(f'{r:,.0f}' for r in rates[name])}   "
            f"per CPU second: {cpu[name]:,.0f}"
        )
    print(
        f"  ratio mpnn/torch {med['mpnn'] / med['torch']:.3f}x (wall), {cpu['mpnn'] / cpu['torch']:.3f}x (thread CPU "
        f"time); load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    if args.compile:
        c, e = "mpnn compiled", "mpnn"
        print(
            f"  step time mpnn compiled / eager {med[e] / med[c]:.3f}x (wall), {cpu[e] / cpu[c]:.3f}x (thread CPU "
            f"time); compiled / torch {med[c] / med['torch']:.3f}x (tokens/s, wall)"
        )
    if args.full:
        out = full_run(libs, tokens, vocab, args.full_steps, args.eval_iters)
        print(
            f"validation loss after {args.full_steps} steps: mpnn {out['mpnn'].val:.4f}, torch "
            f"{out['torch'].val:.4f} (difference {out['mpnn'].val - out['torch'].val:+.4f})"
        )


if __name__ == "__main__":
    main()
