"""The gradient codec slot: one stateful object that replaces a DataParallel bucket's mean all-reduce (like a
DDP communication hook). It runs on the communicator's thread, owns its error-feedback residuals (saved with
state_dict) and counts what it puts on the wire for telemetry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpnn._version import __version__
from mpnn.comm import CommError
from mpnn.plugins.errors import PluginError

FLOAT32_BYTES = 4


@dataclass
class BucketContext:
    """What a codec knows of one bucket: its index, the step (synchronised backward passes so far), the world,
    the communicator, and the shapes of the parameters whose gradients lie back to back in the flat bucket."""

    bucket_index: int
    step: int
    world_size: int
    rank: int
    comm: Any
    numel: int
    shapes: tuple  # one shape per parameter, in the bucket's order

    def slices(self):
        """(start, stop, shape) of each parameter's gradient in the flat bucket."""
        start = 0
        for shape in self.shapes:
            stop = start + int(np.prod(shape, dtype=np.int64))
            yield start, stop, shape
            start = stop


class Codec:
    """Base of gradient codecs. A subclass implements ``allreduce(bucket, ctx)``: leave in `bucket` (this rank's
    local gradient, a flat float array) the mean over ranks, as exact as the method allows, using ctx.comm's
    synchronous collectives; every rank must end with bit-identical values (decode in rank order).

    ``residuals`` (bucket index -> array) is the error feedback, saved by state_dict(); subclasses add other
    state (e.g. PowerSGD's warm-start factors) by extending state_dict/load_state_dict.
    """

    kind = "codec"
    name = "codec"
    version = __version__  # a built-in plugin is versioned with mpnn
    options: dict = {}
    # What a resume at another world size does with the residuals (see resize_state): "sum" or "drop".
    resize_rule = "sum"

    def __init__(self):
        self.residuals: dict[int, np.ndarray] = {}
        self._sent = self._dense = 0

    def allreduce(self, bucket: np.ndarray, ctx: BucketContext) -> None:
        raise NotImplementedError

    # ----- error feedback -------------------------------------------------------------------------------
    def residual(self, ctx: BucketContext, dtype) -> np.ndarray:
        """This bucket's error-feedback residual (zeros the first time)."""
        res = self.residuals.get(ctx.bucket_index)
        if res is None:
            res = self.residuals[ctx.bucket_index] = np.zeros(ctx.numel, dtype)
        elif res.shape != (ctx.numel,):
            raise PluginError(
                f"{self.name}: the residual of bucket {ctx.bucket_index} has shape {res.shape} but the "
                f"bucket holds {ctx.numel} gradients (a codec state from another model?)",
                plugin=self.name,
            )
        return res

    def state_dict(self) -> dict:
        """The codec's state as NumPy arrays by name (for checkpoints): residual.<bucket> for each bucket."""
        return {f"residual.{index}": res.copy() for index, res in self.residuals.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        residuals = {}
        for key, value in state.items():
            kind, _, index = key.partition(".")
            if kind == "residual" and index.isdigit():
                residuals[int(index)] = np.array(value, copy=True)
            elif not self._load_extra(key, value):
                raise PluginError(
                    f"{self.name}.load_state_dict: unexpected key {key!r} (expected residual.<bucket>"
                    f"{self._extra_keys_help()})",
                    plugin=self.name,
                )
        self.residuals = residuals

    def resize_state(
        self, states: list, old_world_size: int, new_world_size: int, rank: int
    ) -> tuple[dict, str | None]:
        """This rank's state when a checkpoint written by `old_world_size` ranks resumes on `new_world_size`, and
        one line for the log (None when there is nothing to say). `states` holds the old ranks' state_dict()s in
        rank order: all of them on new rank 0, old rank 0's alone on every other rank.

        Every key but the residuals is state every rank holds alike (e.g. PowerSGD's warm-start Q): old rank 0's.
        The residuals (error feedback: gradient each rank owes the mean but has not sent yet) follow
        ``resize_rule``. "sum": new rank 0 takes their sum scaled by new/old world size, so that the mean update
        still owed is the same (rank r's residual reaches the mean divided by the world size), and the other ranks
        start at zero. "drop": every rank starts at zero, with one warning line saying so."""
        shared = {k: np.array(v, copy=True) for k, v in states[0].items() if not k.startswith("residual.")}
        owed = sorted({k for state in states for k in state if k.startswith("residual.")})
        if not owed:
            return shared, None
        if self.resize_rule == "drop":
            if rank != 0:
                return shared, None
            return shared, (
                f"{self.name}: dropping the error-feedback residuals of {old_world_size} rank(s) (its rule on a "
                f"resume at another world size): the gradient they still owed is never applied"
            )
        if self.resize_rule != "sum":
            raise PluginError(
                f"{self.name}: resize_rule is {self.resize_rule!r}; expected 'sum' or 'drop'", plugin=self.name
            )
        if rank != 0:
            return shared, None
        if len(states) != old_world_size:
            raise PluginError(
                f"{self.name}.resize_state: rank 0 needs the states of all {old_world_size} old ranks, "
                f"got {len(states)}",
                plugin=self.name,
            )
        scale = new_world_size / old_world_size
        for key in owed:
            parts = [np.asarray(state[key]) for state in states if key in state]
            if len({part.shape for part in parts}) != 1:
                raise PluginError(
                    f"{self.name}.resize_state: {key} has shapes {sorted({part.shape for part in parts})} "
                    f"across the old ranks",
                    plugin=self.name,
                )
            total = np.sum(parts, axis=0, dtype=np.float64) * scale
            shared[key] = total.astype(parts[0].dtype)
        return shared, (
            f"{self.name}: the error-feedback residuals of {old_world_size} rank(s) summed into rank 0's "
            f"(times {new_world_size}/{old_world_size}, so the mean update still owed is unchanged)"
        )

    def _load_extra(self, key: str, value) -> bool:
        """Take one key this subclass adds to state_dict; False when the key is not its own."""
        return False

    def _extra_keys_help(self) -> str:
        return ""

    # ----- wire accounting --------------------------------------------------------------------------------
    def count_wire(self, payload_bytes: int, numel: int) -> None:
        """Add what this rank put into collectives for `numel` gradient entries (vs numel float32s uncompressed)."""
        self._sent += int(payload_bytes)
        self._dense += int(numel) * FLOAT32_BYTES

    def take_wire_stats(self) -> tuple[int, int]:
        """(payload bytes sent, float32 bytes the same gradients would take) since the last call; resets both."""
        stats = self._sent, self._dense
        self._sent = self._dense = 0
        return stats

    @property
    def wire_bytes(self) -> int:
        """Payload bytes put on the wire since the last take_wire_stats()."""
        return self._sent


def run_codec(codec: Codec, bucket: np.ndarray, ctx: BucketContext) -> np.ndarray:
    """Call codec.allreduce(bucket, ctx); an exception (not the communicator's own) becomes a PluginError
    naming the codec, the bucket and the step."""
    try:
        codec.allreduce(bucket, ctx)
    except (CommError, PluginError):
        raise
    except Exception as error:
        raise PluginError(
            f"plugin {codec.name!r} failed in allreduce (bucket {ctx.bucket_index}, step {ctx.step}): "
            f"{type(error).__name__}: {error}",
            plugin=codec.name,
        ) from error
    return bucket
