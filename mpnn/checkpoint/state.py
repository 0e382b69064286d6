"""What a checkpoint holds, as plain dicts of arrays and numbers that mpnn.save stores without pickle.

Shared state is the same on every rank (model, optimizer, schedule): rank 0 writes it. Each rank writes its own:
every random stream mpnn's runs draw from (mpnn's generator for init and dropout, NumPy's global one, Python's
random), where its data loader and sampler stand, and DataParallel's gradient-codec state (error feedback).
"""

from __future__ import annotations

import random

import numpy as np

from mpnn.core import random as mpnn_random
from mpnn.parallel import DataParallel


def unwrap(model):
    """(the module whose state_dict is saved, the DataParallel around it or None): a checkpoint holds the wrapped
    module's keys, so it loads with or without DataParallel."""
    if isinstance(model, DataParallel):
        return model.module, model
    return model, None


def rng_state() -> dict:
    """Every random stream's state: mpnn's generator, NumPy's global RandomState, Python's random."""
    return {
        "mpnn": mpnn_random.get_rng_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Put every random stream back where rng_state() found it."""
    mpnn_random.set_rng_state(state["mpnn"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def rank_state(step: int, epoch: int, rank: int, data_parallel, sampler, loader) -> dict:
    """This rank's own part of a checkpoint. "seed" (the run's, mpnn.manual_seed's last) and "data_position" (where
    the loader stands in the global order) are what a resume at another world size needs (resize.py)."""
    loader_state = loader.state_dict() if loader is not None else None
    return {
        "step": int(step),
        "epoch": int(epoch),
        "rank": int(rank),
        "seed": mpnn_random.last_seed(),
        "rng": rng_state(),
        "sampler": sampler.state_dict() if sampler is not None else None,
        "loader": loader_state,
        "data_position": data_position(loader, loader_state),
        "data_parallel": data_parallel.codec_state_dict() if data_parallel is not None else None,
    }


def distributed_sampler_of(loader):
    """The DistributedSampler a DataLoader draws its batches from (directly or through a BatchSampler), else None."""
    from mpnn.data.sampler import BatchSampler, DistributedSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if type(batch_sampler) is BatchSampler:
        sampler = batch_sampler.sampler
    elif batch_sampler is not None:
        return None  # a custom batch sampler: its batches' sizes are its own
    return sampler if isinstance(sampler, DistributedSampler) else None


def data_position(loader, loader_state) -> dict | None:
    """Where a loader over a DistributedSampler stands in its pass's global order: {"samples": global samples
    consumed in the pass (every rank has taken as many batches, rank r the positions r, r + R, ...), "batch_size":
    this rank's batch, "world_size": R}; None for any other loader (its order is per rank, not global)."""
    sampler = distributed_sampler_of(loader) if loader is not None else None
    if sampler is None or loader.batch_size is None:
        return None
    consumed = int(loader_state["batches_consumed"])
    return {
        "samples": consumed * int(loader.batch_size) * sampler.num_replicas,
        "batch_size": int(loader.batch_size),
        "world_size": sampler.num_replicas,
    }


def load_rank_state(state: dict, data_parallel, sampler, loader) -> None:
    """Restore one rank's part: the sampler before the loader (whose position includes the sampler's state when
    its pass began), the random streams last."""
    if data_parallel is not None:
        if state["data_parallel"] is None:
            raise ValueError("the checkpoint has no DataParallel state (it was saved without DataParallel)")
        data_parallel.load_codec_state_dict(state["data_parallel"])
    for name, target in (("sampler", sampler), ("loader", loader)):
        if target is not None:
            if state[name] is None:
                raise ValueError(f"the checkpoint has no {name} state (it was saved without a {name})")
            target.load_state_dict(state[name])
    set_rng_state(state["rng"])
