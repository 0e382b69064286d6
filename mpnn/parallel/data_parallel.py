"""DataParallel: every rank holds a replica; gradients are averaged over the ring, bucket by bucket,
while backward is still running (as torch's DistributedDataParallel).

- At wrap time rank 0's parameters and buffers are broadcast, so every replica starts identical.
- Parameters are grouped into buckets of about ``bucket_mb`` in reverse registration order (the order in
  which backward produces their gradients). A post-accumulate hook on each parameter copies its gradient
  into the bucket's flat buffer; a full bucket is handed to the communicator's background thread.
- Buckets are launched strictly in bucket order on every rank (a bucket that fills early waits for the ones
  before it), so all ranks issue the same sequence of collectives whatever order backward visits leaves in.
- When backward ends, the remaining buckets are reduced on the calling thread (a parameter that got no
  gradient contributes zeros; waiting on the communication thread would only add a hand-off), every
  launched bucket is awaited, and each ``.grad`` becomes a view of its averaged slice: any optimizer
  can then step. ``no_sync()`` skips all of this, for gradient accumulation.
- A backward that raises midway (a failing op, a hook) drops that end-of-backward step; DataParallel's
  ``on_error`` waits for every bucket already launched (every rank launched the same ones when all fail at the
  same point, as a data-independent error does) and resets its per-backward state, so the script may catch the
  error and go on: the next backward is reduced in full. The failed step's ``.grad`` are partial and not all
  averaged, as after any failed backward: zero them (``optimizer.zero_grad()``) rather than step on them.
- BatchNorm running statistics (buffers) are broadcast from rank 0 before each forward, as torch does.
- A gradient codec (the run's compression plugin, or ``codec=``) replaces each bucket's mean all-reduce, like a
  DDP communication hook: it runs on the communicator's thread through comm.run_async, in bucket order, and its
  wire bytes go into the step's telemetry ("codec_bytes", "codec_ratio" against float32).
- Plugins implementing mpnn_after_backward get the averaged gradients by parameter name after each backward.
"""

from __future__ import annotations

import contextlib
import functools
import time

import numpy as np

from mpnn import telemetry
from mpnn.core.tensor import Tensor
from mpnn.hooks import queue_callback
from mpnn.nn.module import Module
from mpnn.plugins import session as plugin_session
from mpnn.plugins.codec import BucketContext, run_codec
from mpnn.telemetry import instrument


class _Bucket:
    __slots__ = ("index", "params", "offsets", "flat", "ready", "work", "ctx", "span")

    def __init__(self, index, params):
        self.index = index
        self.params = params
        self.offsets = np.cumsum([0] + [p.data.size for p in params])
        self.flat = np.zeros(int(self.offsets[-1]), dtype=params[0].data.dtype)
        self.ready = 0
        self.work = None
        self.ctx = None
        self.span = None  # (start, end) of its last reduction, for the trace

    def slot(self, i):
        return self.flat[self.offsets[i] : self.offsets[i + 1]]


def _build_buckets(params, bucket_bytes):
    """Group parameters (already in reverse registration order) into same-dtype buckets of ~bucket_bytes."""
    buckets, current, size = [], [], 0
    for p in params:
        if current and (size + p.data.nbytes > bucket_bytes or p.data.dtype != current[0].data.dtype):
            buckets.append(_Bucket(len(buckets), current))
            current, size = [], 0
        current.append(p)
        size += p.data.nbytes
    if current:
        buckets.append(_Bucket(len(buckets), current))
    return buckets


class DataParallel(Module):
    """Wrap ``module`` so that ``loss.backward()`` leaves gradients averaged over every rank.

    codec: a gradient codec (mpnn.plugins.codec.Codec) for this model; default: the run's, from mpnn.init()'s
    plugins (``--plugin topk:ratio=0.01``), else plain float32 mean all-reduces."""

    def __init__(self, module: Module, bucket_mb: float = 25, comm=None, broadcast_buffers: bool = True, codec=None):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DataParallel: expects an mpnn.nn.Module, got {type(module).__name__}")
        if not bucket_mb > 0:
            raise ValueError(f"DataParallel: bucket_mb must be positive, got {bucket_mb}")
        if comm is None:
            from mpnn.comm import get_comm

            comm = get_comm()
        self.module = module
        self.comm = comm
        self.broadcast_buffers = broadcast_buffers
        self._sync = True
        self._pending = False
        params = [p for p in module.parameters() if p.requires_grad]
        self._buckets = _build_buckets(params[::-1], int(bucket_mb * 2**20))
        where = {}
        for b in self._buckets:
            for i, p in enumerate(b.params):
                where[id(p)] = (b, i)
        self._where = where
        self._next_launch = 0
        self._step = 0
        self._plugins = plugin_session.current()
        self.codec = codec if codec is not None else plugin_session.active_codec()
        for b in self._buckets:
            b.ctx = BucketContext(
                b.index, 0, comm.world_size, comm.rank, comm, b.flat.size, tuple(p.data.shape for p in b.params)
            )
        self._named_params = None
        if self._plugins is not None and self._plugins.implements("mpnn_after_backward"):
            self._named_params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self._broadcast_state(module.parameters())
        self._broadcast_state(module.buffers())
        if comm.world_size > 1 or self._named_params is not None:
            for p in params:
                p.register_post_accumulate_grad_hook(self._grad_ready)

    # ----- setup ------------------------------------------------------------------------------
    def _broadcast_state(self, tensors):
        if self.comm.world_size == 1:
            return
        for t in tensors:
            self.comm.broadcast(t.data, root=0)

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self.module.training:
            self._broadcast_state(self.module.buffers())
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Inside this block backward only accumulates local gradients; the next synced backward averages
        the accumulated sum."""
        prev = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = prev

    # ----- checkpoints -------------------------------------------------------------------------
    def codec_state_dict(self) -> dict:
        """This rank's gradient-path state for a checkpoint: the codec's name and state (error-feedback residuals)
        and the count of synchronised backward passes, which codecs see as ctx.step."""
        codec = self.codec
        return {
            "step": self._step,
            "codec": None if codec is None else codec.name,
            "codec_state": None if codec is None else codec.state_dict(),
        }

    def load_codec_state_dict(self, state: dict) -> None:
        """Restore what codec_state_dict() returned; a checkpoint of another codec is refused, naming both."""
        own = None if self.codec is None else self.codec.name
        if state["codec"] != own:
            raise ValueError(
                f"DataParallel.load_codec_state_dict: the checkpoint's gradient codec is "
                f"{state['codec']!r}, this model's is {own!r} (resume with the same --plugin)"
            )
        if self.codec is not None:
            self.codec.load_state_dict(state["codec_state"])
        self._step = int(state["step"])

    # ----- the hook path during backward -----------------------------------------------------
    def _grad_ready(self, p: Tensor):
        if not self._sync:
            return
        if not self._pending:
            self._pending = True
            queue_callback(self._finish, on_error=self._abandon)
        bucket, i = self._where[id(p)]
        slot = bucket.slot(i)
        g = p.grad.data
        if not np.shares_memory(g, slot):
            np.copyto(slot, g.reshape(-1))
        bucket.ready += 1
        self._launch_ready()

    def _launch_ready(self, force=False):
        buckets = self._buckets
        while self._next_launch < len(buckets):
            b = buckets[self._next_launch]
            if not force and b.ready < len(b.params):
                return
            if force:
                for i, p in enumerate(b.params):
                    if p.grad is None:
                        b.slot(i)[...] = 0
            if self.comm.world_size == 1:
                b.work = None
            elif self.codec is None and force:
                # Backward is over and we are about to wait anyway: reduce on this thread, sparing the
                # hand-off to the communication thread and back (measured ~0.15 ms per step for MNIST-1D).
                t0 = time.perf_counter()
                self.comm.allreduce(b.flat, op="mean")
                b.work, b.span = None, (t0, time.perf_counter())
            elif self.codec is None:
                b.work = self.comm.allreduce_async(b.flat, op="mean")
            else:
                b.ctx.step = self._step
                b.work = self.comm.run_async(functools.partial(run_codec, self.codec, b.flat, b.ctx))
            self._next_launch = self._next_launch + 1

    def _abandon(self, exc=None):
        """The backward raised before its end: wait for the buckets already launched (their reductions write into
        the flat buffers that .grad may view), then forget this backward, so that the next one starts afresh."""
        for b in self._buckets[: self._next_launch]:
            if b.work is not None:
                try:
                    b.work.wait()
                except Exception:  # noqa: BLE001  the backward's own error is the one the caller sees
                    pass
        self._reset()

    def _reset(self):
        for b in self._buckets:
            b.ready, b.work, b.span = 0, None, None
        self._next_launch = 0
        self._pending = False

    def _finish(self):
        """End of backward: launch what is left, wait for every bucket, point each .grad at its slice."""
        try:
            self._finish_buckets()
        except BaseException:
            self._abandon()  # a failed reduction must not leave the next step skipping its own
            raise
        self._step += 1
        if self._named_params is not None:
            self._plugins.after_backward({name: p.grad.data for name, p in self._named_params if p.grad is not None})

    def _finish_buckets(self):
        rec = telemetry.get_recorder()
        t_wait = time.perf_counter()
        self._launch_ready(force=True)
        for b in self._buckets:
            if b.work is not None:
                b.work.wait()
                b.span = (b.work.t_start, b.work.t_end)
            if rec is not None and b.span is not None:
                rec.add_span("comm", f"allreduce bucket {b.index}", *b.span)
            b.span = None
            for i, p in enumerate(b.params):
                view = b.slot(i).reshape(p.data.shape)
                if p.grad is None:
                    p.grad = Tensor._from_array(view)
                else:
                    p.grad.data = view
            b.ready = 0
            b.work = None
        if rec is not None:
            instrument.comm_wait(t_wait, time.perf_counter())
            if self.codec is not None and self.comm.world_size > 1:
                sent, dense = self.codec.take_wire_stats()
                rec.add_metrics(codec_bytes=sent, codec_ratio=round(dense / sent, 3) if sent else None)
        self._next_launch = 0
        self._pending = False
