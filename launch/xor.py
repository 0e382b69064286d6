"""XOR with the classic 2-3-1 sigmoid MLP: the smallest complete mpnn training loop.

With MPNN_CHECKPOINT_EVERY set (`mpnn launch --checkpoint-every N`) it checkpoints and resumes like any run."""

import mpnn
from mpnn import nn

mpnn.manual_seed(0)
x = mpnn.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
y = mpnn.tensor([[0.0], [1.0], [1.0], [0.0]])
model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
opt = mpnn.optim.Adam(model.parameters(), lr=0.1)
ckpt = mpnn.Checkpointer(model, opt)  # saves only when MPNN_CHECKPOINT_EVERY is set
start = ckpt.restore().step
for step in range(start, 500):
    opt.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    opt.step()
    ckpt.step(step + 1)
if start == 500:  # resumed from the last step's checkpoint: nothing left to train
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)

prediction = (model(x).sigmoid().numpy() > 0.5).astype(int).ravel().tolist()
print(f"loss {loss.item():.4f}  predictions {prediction}  (target [0, 1, 1, 0])")
