"""Multi-node restarts and elastic membership (`mpnn launch --nnodes N|MIN:MAX --max-restarts R`): this node's
launcher as one agent of the run (agents.py; node 0's also runs the store). Round after round every node that is
in joins, starts its workers from the newest checkpoint all of them verified, and ends the round together: when a
rank fails anywhere every node stops its workers and all join the next round while restarts are left; a node that
joins while a round runs makes the world grow at the next round (no restart used); a round begins without a
missing node once MIN nodes (node 0 among them) joined, else the run fails within --rdzv-timeout naming it.

Each round numbers the nodes in it 0..k-1 in --node-rank order, so a node's global ranks can change between rounds
(as torchrun's do); the workers get the round's world in MPNN_* and torchrun's variables and MPNN_RESTART_COUNT =
the round, and a checkpoint written by another world size resumes through mpnn/checkpoint/resize.py."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import zmq

from mpnn.checkpoint.layout import CHECKPOINTS, step_of
from mpnn.comm.errors import AuthError
from mpnn.comm.secret import read_secret
from mpnn.launch.agents import Agent, AgentAbort, Store, store_port, verified_checkpoints
from mpnn.launch.attempt import LaunchResult, finish, run_attempt
from mpnn.launch.env import RunContext, World, host_port, rendezvous_address
from mpnn.launch.errors import LaunchError
from mpnn.launch.liveview import make_view
from mpnn.launch.restart import Restart, append_restart_event
from mpnn.launch.rundir import RunRecord
from mpnn.launch.signals import StopSignals
from mpnn.launch.supervise import Worker, describe_returncode

if TYPE_CHECKING:
    from mpnn.launch.launcher import LaunchConfig


def supervise_elastic(
    config: LaunchConfig,
    world: World,
    run: RunContext,
    cpus: Sequence[int],
    record: RunRecord,
    stack: contextlib.ExitStack,
    on_restart: Callable[[Restart], None] | None = None,
    on_attempt_end: Callable[[int, str, dict], None] | None = None,
) -> LaunchResult:
    """Take part in rounds until the store says the run is over (END, a STOP with no restart left, an ABORT) or a
    stop signal comes; on_restart before a round that follows a failure, on_attempt_end(round, status, {rank: exit
    code}) after each round."""
    stop = stack.enter_context(StopSignals())
    try:
        secret = read_secret(run.secret_file)
    except AuthError as error:
        raise LaunchError(str(error)) from None
    host, port = host_port(run.rendezvous)
    address = rendezvous_address(host, store_port(port))
    context = zmq.Context()
    stack.callback(context.destroy, linger=0)
    if world.node_rank == 0:  # on every interface, as rank 0's rendezvous across hosts (--master-addr may be a name)
        nodes = (config.min_nodes or world.nnodes, world.nnodes)
        bind = f"tcp://*:{store_port(port)}"
        store = Store(context, bind, run.run_id, secret, nodes, config.max_restarts, config.rdzv_timeout)
        stack.callback(store.close)
    agent = Agent(context, address, run.run_id, secret, world.node_rank, config.rdzv_timeout)
    stack.callback(agent.close)
    rounds = _Rounds(config, world, run, cpus, record, stop, agent, on_restart, on_attempt_end)
    try:
        rounds.run()
    except AgentAbort as error:
        rounds.remote = str(error)
    except BaseException as error:
        agent.leave(f"node {world.node_rank}'s launcher failed: {error!r}")
        raise
    finally:
        rounds.view.close()
    if stop.received is not None:
        agent.leave(f"node {world.node_rank}'s launcher got {signal.Signals(stop.received).name}")
    return finish(
        rounds.workers,
        rounds.failed,
        stop,
        rounds.still_running,
        rounds.sigkilled,
        record,
        rounds.run_context,
        len(rounds.restarts),
        config.max_restarts,
        rounds.remote,
    )


class _Rounds:
    """The rounds of one node, and what the last one left for the end report."""

    def __init__(self, config, world, run, cpus, record, stop, agent, on_restart, on_attempt_end) -> None:
        self.config, self.node, self.run_context, self.cpus, self.record = config, world, run, cpus, record
        self.stop, self.agent, self.on_restart, self.on_attempt_end = stop, agent, on_restart, on_attempt_end
        self.view = make_view(run.run_dir, world.local_global_ranks(), config.live)
        self.restarts: list[Restart] = []
        self.workers: list[Worker] = []
        self.failed: Worker | None = None
        self.still_running = 0
        self.sigkilled: list[int] = []
        self.remote: str | None = None  # why another node (or the store) ended the run
        self._told: list[tuple[str, dict]] = []  # a verdict that came while the workers ran
        self._pending: Restart | None = None  # the restart the next round begins
        self._views_ranks = world.local_global_ranks()

    def _stopping(self) -> bool:
        return self.stop.received is not None

    def _offer(self) -> dict[str, str]:
        return verified_checkpoints(self.run_context.run_dir)

    def run(self) -> None:
        while True:
            go = self.agent.join(self._offer, self._stopping)
            if go is None:
                return
            if go.get("end"):
                self.view.note(f"mpnn launch: the run ended before node {self.node.node_rank} got into it")
                return
            world = self._begin_round(go)
            self.workers, self.failed, self.still_running, self.sigkilled = run_attempt(
                self.config,
                world,
                self.run_context,
                self.cpus,
                self.record,
                self.stop,
                self.view,
                self._interrupted,
                on_failed=lambda w: self.agent.report_failed(w.rank, w.pid, describe_returncode(w.proc.returncode)),
            )
            verdict = self._verdict()
            if self.on_attempt_end is not None:
                ended = "ok" if self.failed is None and verdict is not None and verdict[0] == "END" else "failed"
                status = "interrupted" if self.stop.received is not None else ended
                self.on_attempt_end(self.agent.round, status, {w.rank: w.proc.returncode for w in self.workers})
            if verdict is None or verdict[0] == "END" or not self._next_round(verdict[1], world):
                return

    def _begin_round(self, go: dict) -> World:
        """This node's world in the round that GO starts, with the restart that leads to it told and recorded."""
        members = [int(n) for n in go.get("nodes") or range(self.node.nnodes)]
        world = World(self.node.nproc_per_node, len(members), members.index(self.node.node_rank))
        if world.local_global_ranks() != self._views_ranks:  # the world changed size: the live view follows
            self.view.close()
            self.view = make_view(self.run_context.run_dir, world.local_global_ranks(), self.config.live)
            self._views_ranks = world.local_global_ranks()
        for note in go.get("passed_over") or []:
            self.view.note(f"mpnn launch: warning: not resuming from {note}")
        name = go.get("resume")
        if name is not None and (not isinstance(name, str) or step_of(name) is None):
            raise AgentAbort(f"the agents' store named {name!r} as the checkpoint to resume from: not a checkpoint")
        resume = self.run_context.run_dir / CHECKPOINTS / name if name else self.run_context.resume_from
        if self._pending is not None:
            restart = replace(self._pending, resume_from=resume)
            self.restarts.append(restart)
            self.view.note(f"mpnn launch: {restart.begins()} on every node")
            self.record.update(restarts=[r.record() for r in self.restarts])
            append_restart_event(self.run_context.run_dir, world.local_global_ranks(), restart)
            if self.on_restart is not None:
                self.on_restart(restart)
            self._pending = None
        elif self.agent.round > 0:
            self.view.note(f"mpnn launch: round {self.agent.round} begins on nodes {members}, resuming from {resume}")
        self.record.update(
            round=self.agent.round,
            world={"world_size": world.world_size, "nnodes": world.nnodes, "nproc_per_node": world.nproc_per_node,
                   "node_rank": world.node_rank, "nodes": members},
        )  # fmt: skip
        self.run_context = replace(self.run_context, restart_count=self.agent.round, resume_from=resume)
        return world

    def _interrupted(self) -> bool:
        """Polled while the workers run: true once the store said stop (or the run cannot go on)."""
        if not self._told and self.remote is None:
            try:
                verdict = self.agent.receive()
            except AgentAbort as error:
                self.remote = str(error)
                return True
            if verdict is not None:
                self._told.append(verdict)
        return bool(self._told) or self.remote is not None

    def _verdict(self) -> tuple[str, dict] | None:
        """How the round ended for the whole run: the store's STOP or END (None: a stop signal or an abort)."""
        if self.remote is not None or self.stop.received is not None:
            return None
        if self._told:
            return self._told.pop()
        if self.failed is None:
            self.agent.report_done()
        return self.agent.verdict(self._stopping)

    def _next_round(self, stop: dict, world: World) -> bool:
        """After a STOP: whether another round follows (with the restart it begins, if a rank failed)."""
        lost, joined = stop.get("failed"), stop.get("joined")
        if lost is None:  # the world grows: no restart used
            self.view.note(f"mpnn launch: node {joined} joined; every node stops its workers and rejoins")
            self.agent.round += 1
            return True
        node = int(lost.get("node", -1))
        members = self.record.fields.get("world", {}).get("nodes") or list(range(world.nnodes))
        first_rank = (members.index(node) if node in members else 0) * world.nproc_per_node
        rank = lost["rank"] if isinstance(lost.get("rank"), int) else first_rank  # a silent node: its first rank
        pid = lost["pid"] if isinstance(lost.get("pid"), int) else None
        how = str(lost.get("how"))
        if not stop.get("next"):
            if self.failed is None or self.failed.rank != rank:
                self.failed = None  # the cause is elsewhere: this node's failure, if any, followed from it
                used = f"{len(self.restarts)}/{self.config.max_restarts}"
                self.remote = f"rank {rank} on node {node} {how}; no restart left ({used} used)"
            return False
        number = int(stop["restart"])
        self._pending = Restart(
            number, self.config.max_restarts, rank, pid, how, self.still_running, None, failed_node=node
        )
        self.record.update(restarts=[r.record() for r in [*self.restarts, self._pending]])  # resume_from at the GO
        self.view.note(
            f"mpnn launch: {self._pending.cause()}; restart {number}/{self.config.max_restarts}: every node stops "
            f"its workers and rejoins within --rdzv-timeout {self.config.rdzv_timeout:g} s"
        )
        self.agent.round += 1
        return True
