"""XOR with the classic 2-3-1 sigmoid MLP: the smallest complete mpnn training loop.

Under `mpnn launch --checkpoint-every N` it checkpoints, and resumes from the newest checkpoint, like any run:
`ckpt.steps(500)` restores first and saves on the launcher's schedule (without it, it only counts)."""

import mpnn
from mpnn import nn

mpnn.manual_seed(0)
x, y = mpnn.tensor([[0.0, 0], [0, 1], [1, 0], [1, 1]]), mpnn.tensor([[0.0], [1], [1], [0]])
model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
opt = mpnn.optim.Adam(model.parameters(), lr=0.1)
for _ in mpnn.Checkpointer(model, opt).steps(500):
    opt.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    opt.step()
loss = nn.functional.binary_cross_entropy_with_logits(out := model(x), y)
print(f"loss {loss.item():.4f}  predictions {(out.numpy() > 0).astype(int).ravel().tolist()}  (target [0, 1, 1, 0])")
