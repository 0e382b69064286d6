"""Optimizers and learning-rate schedules with torch.optim's names, update rules and state_dict layout."""

from mpnn.optim import lr_scheduler  # noqa: F401
from mpnn.optim.adam import Adam, AdamW
from mpnn.optim.optimizer import Optimizer
from mpnn.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "Optimizer", "SGD", "lr_scheduler"]
