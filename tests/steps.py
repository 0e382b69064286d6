"""Training steps the capture tests compile and run eagerly alike, and what those tests read off a compiled step."""

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


def step_names(fn):
    """The qualnames of the steps of fn's captured programs (fn: an mpnn.compile'd function), in order."""
    return [getattr(step, "__qualname__", "") for prog in fn._cache.values() for step in prog.steps]


def backward_fns(fn):
    """The replayed backward forms of fn's programs (from the unrolled reverse passes), newest op first."""
    forms = []
    for prog in fn._cache.values():
        for step in prog.steps:
            if step.__qualname__.endswith("_backward_step.<locals>.backward"):
                reverse = dict(zip(step.__code__.co_freevars, step.__closure__))["reverse"].cell_contents
                cells = dict(zip(reverse.__code__.co_freevars, reverse.__closure__))
                forms += [bwd for _, bwd, _, _ in cells["steps"].cell_contents]
    return forms
