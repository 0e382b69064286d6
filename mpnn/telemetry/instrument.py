"""Ties the recorder to a training loop the user writes as in PyTorch, with no extra calls in it.

A step is what lies between two optimizer steps: "forward" is the time from the end of the previous step
(or of the data fetch) to the start of loss.backward(), "backward" is backward itself (DataParallel's final
wait on the ring shows as "comm_wait"), "step" is optimizer.step(); the step record closes after it, with
the loss backward was called on.
"""

from __future__ import annotations

from time import perf_counter


class _StepTimer:
    def __init__(self, recorder, comm=None):
        self.rec = recorder
        self.comm = comm if comm is not None and comm.world_size > 1 else None
        self.sent = self.recv = 0
        self.by_transport = {}  # {transport: (sent, recv)} at the end of the previous step
        self.mailbox_waits = {"spun": 0, "blocked": 0}  # the mailboxes' wait counts at the end of the previous step
        self.wait = None  # (t0, t1) of DataParallel's wait on the ring at the end of this backward
        self.mark = perf_counter()  # where the current compute phase began
        self.t_opt = 0.0

    def data_done(self, t0, t1):
        self.rec.add_span("data", "next batch", t0, t1)
        self.mark = t1

    def backward_pre(self, root):
        now = perf_counter()
        self.rec.add_span("compute", "forward", self.mark, now)
        if root.data.size == 1:
            self.rec.set_loss(root.data)
        self.mark = now

    def backward_post(self, root):
        now = perf_counter()
        wait = self.wait
        if wait is None:
            self.rec.add_span("compute", "backward", self.mark, now)
        else:  # backward ended by waiting on the ring: that part is communication, not compute
            self.rec.add_span("compute", "backward", self.mark, wait[0])
            self.rec.add_span("comm_wait", "allreduce wait", wait[0], wait[1])
            if now > wait[1]:
                self.rec.add_span("compute", "backward tail", wait[1], now)
            self.wait = None
        self.mark = now

    def opt_pre(self, optimizer, args, kwargs):
        self.t_opt = perf_counter()

    def opt_post(self, optimizer, args, kwargs):
        now = perf_counter()
        self.rec.add_span("optimizer", "step", self.t_opt, now)
        if self.comm is not None:
            totals = self.comm.bytes_by_transport
            sent, recv = sum(s for s, _ in totals.values()), sum(r for _, r in totals.values())
            self.rec.add_bytes(sent - self.sent, recv - self.recv)
            before = self.by_transport
            self.rec.add_metrics(
                bytes_by_transport={
                    name: {"sent": s - before.get(name, (0, 0))[0], "recv": r - before.get(name, (0, 0))[1]}
                    for name, (s, r) in totals.items()
                }
            )
            self.sent, self.recv, self.by_transport = sent, recv, totals
            waits = getattr(self.comm, "mailbox_waits", None)
            if waits is not None:  # how this step's same-host waits ended: a spin, or a futex sleep (contention)
                before_waits = self.mailbox_waits
                self.rec.add_metrics(mailbox_waits={k: n - before_waits.get(k, 0) for k, n in waits.items()})
                self.mailbox_waits = waits
        self.rec.step_end()
        self.mark = perf_counter()


_installed = None


def instrument(recorder, comm=None):
    """Record every backward and optimizer step of this process into ``recorder`` (once per process),
    with the bytes ``comm`` moved in each step."""
    global _installed
    if _installed is not None:
        return _installed
    from mpnn import hooks

    timer = _StepTimer(recorder, comm)
    hooks.register_backward_hooks(timer.backward_pre, timer.backward_post)
    hooks.register_optimizer_step_hooks(timer.opt_pre, timer.opt_post)
    _installed = timer
    return timer


def is_recording() -> bool:
    return _installed is not None


def comm_wait(t0, t1):
    """Called by DataParallel with the time backward spent waiting for its all-reduces to finish."""
    if _installed is not None:
        _installed.wait = (t0, t1)


def data_span(t0, t1):
    """Called by the DataLoader after fetching a batch, when a run is being recorded."""
    if _installed is not None:
        _installed.data_done(t0, t1)
