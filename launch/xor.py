"""XOR with the classic 2-3-1 sigmoid MLP: the smallest complete mpnn training loop."""
import mpnn
from mpnn import nn

mpnn.manual_seed(0)
x = mpnn.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
y = mpnn.tensor([[0.0], [1.0], [1.0], [0.0]])
model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
opt = mpnn.optim.Adam(model.parameters(), lr=0.1)
for step in range(500):
    opt.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    opt.step()

prediction = (model(x).sigmoid().numpy() > 0.5).astype(int).ravel().tolist()
print(f"loss {loss.item():.4f}  predictions {prediction}  (target [0, 1, 1, 0])")
