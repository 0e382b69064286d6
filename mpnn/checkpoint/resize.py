"""Resuming a checkpoint written by N ranks on M ranks (M != N).

The model, optimizer and schedule are the same on every rank, so they load as they are. What each rank kept of its
own is rebuilt for the new world from the old ranks' files:
- data: a DistributedSampler's order is global (the permutation of seed + epoch, rank r taking positions r, r + R,
  ...), so after k batches of b on each of N ranks the pass has consumed its first k b N positions. On M ranks the
  same pass goes on from there: each rank skips k b N / M of its positions, i.e. k b N / (M b') batches of its own
  b' (the whole global batch b N = b' M kept: k batches again). A position that is not a whole number of the new
  global batches is refused, naming the numbers; a position past the new pass's end (its padding differs) ends it.
- codec: the gradient codec's resize_state() (mpnn/plugins/codec.py): residuals summed into rank 0's or dropped,
  by the codec's rule; a run without DataParallel drops them with one line.
- random streams: a rank that existed keeps its own; a new rank's are derived from the run's seed, the step and
  its rank (SeedSequence([seed, step, rank])), so a resume is repeatable.
"""

from __future__ import annotations

import random

import numpy as np

from mpnn.checkpoint.state import distributed_sampler_of


def source_ranks(old_world_size: int, new_world_size: int, rank: int) -> list[int]:
    """The old ranks whose files new rank `rank` reads: all of them on rank 0 (it sums the codec's residuals), old
    rank 0's (the state every rank shares) and its own namesake's, when there was one, elsewhere."""
    if rank == 0:
        return list(range(old_world_size))
    return [0, rank] if rank < old_world_size else [0]


def derived_rng_state(seed: int, step: int, rank: int) -> dict:
    """Random streams for a rank the old world did not have, in rng_state()'s form: mpnn's PCG64, NumPy's global
    MT19937 and Python's random, each from SeedSequence([seed, step, rank])."""
    sequence = np.random.SeedSequence([int(seed), int(step), int(rank)])
    mpnn_key, numpy_key, python_key = (int(word) for word in sequence.generate_state(3, np.uint64))
    numpy_state = np.random.RandomState(numpy_key % 2**32).get_state(legacy=False)
    return {
        "mpnn": np.random.PCG64(mpnn_key).state,
        "numpy": numpy_state,
        "python": random.Random(python_key).getstate(),
    }


def resized_loader_state(old: dict, position: dict | None, loader, old_world_size: int, new_world_size: int) -> dict:
    """The loader state that continues the old world's pass at the same global position on this rank."""
    sampler = distributed_sampler_of(loader)
    if sampler is None or loader.batch_size is None:
        raise ValueError(
            f"its data loader does not draw from a DistributedSampler, so its order is per rank, not global: "
            f"only a DistributedSampler's order continues on {new_world_size} ranks instead of {old_world_size}"
        )
    if position is None:
        raise ValueError(
            "its rank files record no global data position (a checkpoint written by an older mpnn, or its loader "
            f"had no DistributedSampler): resume it on {old_world_size} ranks"
        )
    samples, batch = int(position["samples"]), int(loader.batch_size)
    global_batch = batch * new_world_size
    if samples % global_batch:
        raise ValueError(
            f"its data position, {samples} samples into pass {old['epoch']} "
            f"({position['world_size']} ranks x batch {position['batch_size']}), is not a whole number of this "
            f"run's global batches ({new_world_size} ranks x batch {batch} = {global_batch}): keep the global "
            f"batch size when the world size changes"
        )
    consumed = min(samples // global_batch, len(loader))  # past the end of this world's (padded) pass: it ended
    return {"epoch": old["epoch"], "batches_consumed": consumed, "sampler": old["sampler"]}


def resized_codec_state(states: list, old_world_size: int, new_world_size: int, rank: int, data_parallel):
    """(DataParallel's codec state for this rank, or None without DataParallel; one line for the log, or None)."""
    first = states[0]
    if data_parallel is None:
        owed = any(
            state is not None and state["codec_state"] and any(k.startswith("residual.") for k in state["codec_state"])
            for state in states
        )
        if owed and rank == 0:
            return None, (
                f"{first['codec']}: dropping the error-feedback residuals of {old_world_size} rank(s): "
                "this run has no DataParallel (and no codec) to give them to"
            )
        return None, None
    codec = data_parallel.codec
    own = None if codec is None else codec.name
    if first is None:  # written without DataParallel (e.g. a one-rank run): nothing was owed
        return {"step": None, "codec": own, "codec_state": None if codec is None else {}}, None
    if first["codec"] != own:
        raise ValueError(
            f"the checkpoint's gradient codec is {first['codec']!r}, this model's is {own!r} "
            "(resume with the same --plugin)"
        )
    if codec is None:
        return {"step": first["step"], "codec": None, "codec_state": None}, None
    codec_state, note = codec.resize_state(
        [state["codec_state"] for state in states], old_world_size, new_world_size, rank
    )
    return {"step": first["step"], "codec": own, "codec_state": codec_state}, note


def resized_rank_state(
    states: dict, old_world_size: int, new_world_size: int, rank: int, data_parallel, sampler, loader
) -> tuple[dict, list[str]]:
    """(this rank's state, in rank_state()'s form, built from the old ranks' `states` {old rank: state}; the lines
    rank 0 writes to the log). Raises ValueError saying why the checkpoint cannot continue on this world."""
    first = states[0]
    step = int(first["step"])
    notes = []
    seed = 0 if first.get("seed") is None else int(first["seed"])
    rng = states[rank]["rng"] if rank in states else derived_rng_state(seed, step, rank)
    if rank == 0 and new_world_size > old_world_size:
        ranks = (
            f"rank {old_world_size}"
            if new_world_size - old_world_size == 1
            else (f"ranks {old_world_size}-{new_world_size - 1}")
        )
        notes.append(
            f"{ranks}: random streams derived from the run's seed {seed} (SeedSequence([seed, step {step}, rank]))"
        )
    loader_state = None
    if loader is not None:
        if first["loader"] is None:
            raise ValueError("the checkpoint has no loader state (it was saved without a loader)")
        loader_state = resized_loader_state(
            first["loader"], first.get("data_position"), loader, old_world_size, new_world_size
        )
        if rank == 0:
            position = first["data_position"]
            notes.append(
                f"data: pass {loader_state['epoch']} goes on at global sample {position['samples']} "
                f"(batch {loader_state['batches_consumed']} of {len(loader)} on each rank)"
            )
    ordered = [states[r].get("data_parallel") for r in (range(old_world_size) if rank == 0 else [0])]
    codec_state, note = resized_codec_state(ordered, old_world_size, new_world_size, rank, data_parallel)
    if codec_state is not None and codec_state["step"] is None:
        codec_state["step"] = step
    if note:
        notes.append(note)
    state = {
        "step": step,
        "epoch": int(first["epoch"]),
        "rank": rank,
        "seed": first.get("seed"),
        "rng": rng,
        "sampler": first["sampler"],
        "loader": loader_state,
        "data_position": None,
        "data_parallel": codec_state,
    }
    return state, notes
