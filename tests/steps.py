"""Training steps the capture tests compile and run eagerly alike."""

from mpnn import nn


def train_step(model, opt):
    """The usual step: zero_grad, cross-entropy of model(x) against y, backward, optimizer step; returns the loss."""

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step
