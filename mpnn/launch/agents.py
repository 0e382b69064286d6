"""Elastic agents: `mpnn launch --nnodes N --max-restarts R` restarts a multi-node world together, as torchrun's
elastic agent does. Every node's launcher is an agent; node 0's also runs the store, a thread serving a ROUTER at
--master-addr, port --master-port + 2 (the rendezvous's port + 2; + 1 is the script's MASTER_PORT).

    agent -> store  JOIN {round, checkpoints}   its workers are stopped; it is ready for round r. checkpoints: the
                                                run dir's checkpoints this node verified, {name: manifest SHA-256}
                    PING {round}                every HEARTBEAT_S while it lives (answered PONG)
                    FAILED {round, rank, pid, how}   one of its workers failed
                    DONE {round}                every one of its workers exited 0
                    LEAVE {round, why}          it stops (a stop signal, an error): the run ends
    store -> agent  GO {round, resume, passed_over}  every node joined: start the workers, resuming from the newest
                                                checkpoint every node verified alike (`resume`, a name, or None)
                    STOP {round, restart, failed}    a rank failed somewhere (or a launcher went silent): stop the
                                                workers, then JOIN round + 1 when `restart` is a number, else end
                    END {}                      every node's workers exited 0: the run is over
                    ABORT {reason}              the run cannot go on: a node did not join within --rdzv-timeout,
                                                left, or the store saw a protocol error

The ROUTER is a CURVE server whose ZAP handler admits only the agents' keys, each derived from the run's shared
secret and the node rank (a message's user id is the node whose key spoke; every holder of the secret can derive
every key, so this tells nodes apart, it does not guard one from another); the agents trust only
the store's key, derived alike. A stranger fails the handshake before a message is read; only JSON is parsed.
Liveness both ways: the store stops a round whose agent is silent for SILENT_S (its launcher was killed: the
workers there die with it, by its guardian), and an agent whose store is silent as long ends the run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from mpnn.checkpoint.layout import (
    InvalidCheckpoint,
    checkpoints_in,
    list_checkpoints,
    read_manifest,
    step_of,
    verify_files,
)
from mpnn.comm.auth import ZapHandler, mac
from mpnn.comm.rendezvous import BACKLOG
from mpnn.launch.errors import LaunchError

AGENT_PORT_OFFSET = 2  # the store's port: --master-port + 2 (+ 1 is MASTER_PORT, the script's)
AGENT_DOMAIN = "mpnn-agents"
HEARTBEAT_S = 1.0
SILENT_S = 10.0  # no message for this long: the peer (its launcher) is gone
MAX_MESSAGE_BYTES = 256 * 1024  # a JOIN lists a few checkpoints; anything larger is not an agent's
POLL_MS = 100
DEFAULT_RDZV_TIMEOUT_S = 300.0
LAST_CALL_S = 5.0  # --nnodes MIN:MAX: once MIN nodes joined a round, how long it waits for more


class AgentAbort(Exception):
    """The run cannot go on (the store's ABORT, or the store silent); str() says why, naming the node."""


def store_port(master_port: int) -> int:
    """The agents' store port for a rendezvous port; a LaunchError when it would pass 65535."""
    port = master_port + AGENT_PORT_OFFSET
    if port > 65535:
        raise LaunchError(
            f"--master-port {master_port}: --max-restarts with --nnodes > 1 needs port {port} "
            f"(--master-port + {AGENT_PORT_OFFSET}) for the agents; pick a port <= {65535 - AGENT_PORT_OFFSET}"
        )
    return port


def _keypair(secret: bytes, run_id: str, who: str | int) -> tuple[bytes, bytes]:
    """The CURVE (public, secret) z85 keys of the store ("store") or of node `who`, derived from the secret."""
    secret_key = z85.encode(mac(secret, b"mpnn-agent-key", run_id, str(who)))
    return zmq.curve_public(secret_key), secret_key


def _pack(kind: str, **fields) -> list[bytes]:
    return [kind.encode(), json.dumps(fields).encode()]


def _unpack(frames: list[bytes]) -> tuple[str, dict] | None:
    """(kind, fields) of a message, or None when it is not two frames of an ASCII kind and a JSON object."""
    if len(frames) != 2:
        return None
    try:
        kind, fields = frames[0].decode("ascii"), json.loads(frames[1])
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return (kind, fields) if isinstance(fields, dict) else None


def verified_checkpoints(run_dir: Path) -> dict[str, str]:
    """{name: manifest SHA-256} of the run dir's checkpoints whose manifest reads and whose every file has the size
    and SHA-256 it records, as this node sees them (a restart resumes only from one every node sees alike)."""
    folder = checkpoints_in(run_dir)
    if folder == Path(run_dir):
        return {}
    found = {}
    for _, name in list_checkpoints(folder):
        try:
            manifest, digest = read_manifest(folder / name)
            verify_files(folder / name, manifest, list(manifest["files"]))
        except (InvalidCheckpoint, OSError):
            continue
        found[name] = digest
    return found


def common_checkpoint(offers: Mapping[int, Mapping[str, str]]) -> tuple[str | None, list[str]]:
    """(the newest checkpoint every node offered with one manifest hash, or None; why each newer one was passed
    over, naming the nodes). Names sort by step (step-<8+ digits>)."""
    names = sorted({name for offer in offers.values() for name in offer}, key=lambda n: (len(n), n), reverse=True)
    passed_over = []
    for name in names:
        digests = {node: offer.get(name) for node, offer in sorted(offers.items())}
        missing = [node for node, digest in digests.items() if digest is None]
        if missing:
            passed_over.append(f"{name}: node(s) {missing} cannot verify it")
        elif len(set(digests.values())) > 1:
            passed_over.append(f"{name}: the nodes read different manifests of it")
        else:
            return name, passed_over
    return None, passed_over


@dataclass
class _Round:
    number: int
    deadline: float  # for at least min_nodes (node 0 among them) to JOIN
    joined: dict[int, dict[str, str]]  # node -> its checkpoint offer
    last_call: float | None = None  # min_nodes joined: GO at this time unless all max_nodes join before
    members: tuple[int, ...] = ()  # the nodes of the running round, in node order (node i gets node rank i)
    done: frozenset[int] = frozenset()


class Store:
    """Node 0's coordinator of the agents, serving in a thread until the run ends (END, a final STOP or ABORT).

    A round runs on every node that joined: all max_nodes, or at least min_nodes (node 0 among them: it holds rank 0
    and this store) once LAST_CALL_S passed without another. A node that joins while a round runs (it came back,
    or it is new) stops the round without using a restart, and the next round runs on one more node."""

    def __init__(
        self,
        context: zmq.Context,
        address: str,
        run_id: str,
        secret: bytes,
        nodes: tuple[int, int],
        max_restarts: int,
        rdzv_timeout: float,
        silent_s: float = SILENT_S,
        last_call_s: float = LAST_CALL_S,
    ) -> None:
        self.min_nodes, self.max_nodes = nodes
        self.max_restarts, self.rdzv_timeout, self.silent_s, self.last_call_s = (
            max_restarts,
            rdzv_timeout,
            silent_s,
            last_call_s,
        )
        self._handler = ZapHandler()
        self._handler.start(context)
        self._sock = context.socket(zmq.ROUTER)
        self._sock.linger = 2000  # the last verdicts reach every agent before the socket goes
        self._sock.maxmsgsize = MAX_MESSAGE_BYTES
        self._sock.backlog = BACKLOG  # as the rendezvous's: a burst of strangers' connects must not fill the queue
        self._sock.zap_domain = AGENT_DOMAIN.encode()
        self._sock.curve_publickey, self._sock.curve_secretkey = _keypair(secret, run_id, "store")
        self._sock.curve_server = True
        for node in range(self.max_nodes):
            self._handler.admit_key(AGENT_DOMAIN, z85.decode(_keypair(secret, run_id, node)[0]), node)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as error:
            self._sock.close()
            self._handler.stop()
            raise LaunchError(f"node 0 cannot serve the agents' store at {address}: {error}") from None
        self._identities: dict[int, bytes] = {}
        self._last_seen: dict[int, float] = {}
        self._waiting: set[int] = set()  # nodes that joined while a round ran: they are in the next one
        self._restarts = 0
        self._round = _Round(0, time.monotonic() + rdzv_timeout, {})
        self._closing = threading.Event()
        self.ended: str | None = None  # "end", "stop" or "abort" once the store has said its last word
        self._thread = threading.Thread(target=self._serve, name="mpnn-agent-store", daemon=True)
        self._thread.start()

    def close(self, wait_s: float = 5.0) -> None:
        """Stop serving (after the last verdict has gone out, or at once when the run never got one)."""
        self._thread.join(timeout=wait_s)
        self._closing.set()
        self._thread.join()
        self._handler.stop()

    def _serve(self) -> None:
        try:
            while self.ended is None and not self._closing.is_set():
                if self._sock.poll(POLL_MS):
                    frames = self._sock.recv_multipart(copy=False)
                    try:
                        node = int(frames[0].get("User-Id"))
                    except (zmq.ZMQError, ValueError, TypeError):
                        continue
                    message = _unpack([f.bytes for f in frames[1:]])
                    self._identities[node] = frames[0].bytes
                    self._last_seen[node] = time.monotonic()
                    if message is None:
                        self._abort(f"node {node} sent a message that is not an agent's")
                    else:
                        self._handle(node, *message)
                self._check_time()
        finally:
            self._sock.close()

    def _send(self, node: int, kind: str, **fields) -> None:
        identity = self._identities.get(node)
        if identity is not None:
            self._sock.send_multipart([identity, *_pack(kind, **fields)])

    def _broadcast(self, kind: str, to=None, **fields) -> None:
        for node in sorted(self._identities if to is None else to):
            self._send(node, kind, **fields)

    def _abort(self, reason: str) -> None:
        self._broadcast("ABORT", reason=reason)
        self.ended = "abort"

    def _handle(self, node: int, kind: str, fields: dict) -> None:
        current = self._round
        if kind == "PING":
            self._send(node, "PONG")
        elif kind == "LEAVE":
            self._abort(f"node {node} left the run: {str(fields.get('why'))[:500]}")
        elif kind == "JOIN":
            offer = fields.get("checkpoints")
            if not isinstance(offer, dict) or not all(isinstance(v, str) for v in offer.values()):
                self._abort(f"node {node} sent a JOIN without its checkpoint list")
            elif not current.members:  # only checkpoint names (step-NNNNNNNN) are kept: never a path
                current.joined[node] = {k: v for k, v in offer.items() if step_of(k) is not None}
                self._maybe_go()
            elif node in current.members:  # its launcher started again: the one that ran its workers is gone
                self._waiting.add(node)
                how = "was lost with its launcher (a new launcher of that node joined)"
                self._stop_round({"node": node, "rank": None, "pid": None, "how": how})
            elif node not in self._waiting:
                self._waiting.add(node)  # the world grows: every member stops and all join the next round
                self._next_round({"round": current.number, "next": True, "restart": None, "failed": None,
                                  "joined": node})  # fmt: skip
        elif fields.get("round") != current.number or node not in current.members:
            return  # a late word about a round that is over (a peer's FAILED after the STOP): nothing to do
        elif kind == "FAILED":
            self._stop_round({"node": node, **{k: fields.get(k) for k in ("rank", "pid", "how")}})
        elif kind == "DONE":
            current.done = current.done | {node}
            if current.done == set(current.members):
                self._broadcast("END")
                self.ended = "end"

    def _maybe_go(self) -> None:
        """Start the gathering round when every node joined, or when enough did and the last call is over."""
        current, now = self._round, time.monotonic()
        enough = len(current.joined) >= self.min_nodes and 0 in current.joined
        if not enough:
            current.last_call = None
        elif current.last_call is None:
            current.last_call = now + self.last_call_s
        if len(current.joined) < self.max_nodes and not (enough and now >= (current.last_call or now)):
            return
        resume, passed_over = common_checkpoint(current.joined)
        current.members = tuple(sorted(current.joined))
        self._last_seen.update(dict.fromkeys(current.members, now))
        self._broadcast("GO", current.members, round=current.number, resume=resume, passed_over=passed_over,
                        nodes=list(current.members))  # fmt: skip

    def _stop_round(self, failed: dict) -> None:
        """A rank failed in the running round: every agent stops its workers, and all join the next round while
        restarts are left."""
        more = self._restarts < self.max_restarts
        self._restarts += more
        restart = self._restarts if more else None
        self._next_round(
            {"round": self._round.number, "next": more, "restart": restart, "failed": failed, "joined": None}
        )

    def _next_round(self, stop: dict) -> None:
        self._broadcast("STOP", self._round.members, **stop)
        if not stop["next"]:
            failed = stop["failed"]
            who = (
                f"node {failed['node']}"
                if failed["rank"] is None
                else f"rank {failed['rank']} on node {failed['node']}"
            )
            why = f"the run ended: {who} {failed['how']}, no restart left"
            self._broadcast("ABORT", self._waiting, reason=why)  # nodes waiting to get in
            self.ended = "stop"
            return
        self._round = _Round(self._round.number + 1, time.monotonic() + self.rdzv_timeout, {})
        self._broadcast("AGAIN", self._waiting, round=self._round.number)  # join again, with a fresh offer
        self._waiting = set()

    def _check_time(self) -> None:
        current, now = self._round, time.monotonic()
        if self.ended is not None:
            return
        if not current.members:
            for node in [n for n in current.joined if now - self._last_seen.get(n, now) > self.silent_s]:
                del current.joined[node]  # joined, then its launcher went away before the round began
            self._maybe_go()
            if not current.members and now > current.deadline:
                missing = sorted(set(range(self.max_nodes)) - set(current.joined))
                need = (
                    f"{self.min_nodes} node(s), node 0 among them" if self.min_nodes < self.max_nodes else "every node"
                )
                self._abort(
                    f"node(s) {missing} did not join round {current.number} within --rdzv-timeout "
                    f"{self.rdzv_timeout:g} s (node(s) {sorted(current.joined)} did; the run needs {need})"
                )
        else:
            silent = [n for n in current.members if now - self._last_seen.get(n, now) > self.silent_s]
            if silent:
                how = f"was lost with its launcher, which went silent ({self.silent_s:g} s without a heartbeat)"
                self._stop_round({"node": silent[0], "rank": None, "pid": None, "how": how})


class Agent:
    """One node's link to the store: join rounds, report its workers' end, hear the store's verdicts."""

    def __init__(
        self,
        context: zmq.Context,
        address: str,
        run_id: str,
        secret: bytes,
        node_rank: int,
        rdzv_timeout: float,
        silent_s: float = SILENT_S,
    ) -> None:
        self.address, self.node_rank, self.rdzv_timeout, self.silent_s = address, node_rank, rdzv_timeout, silent_s
        self._sock = context.socket(zmq.DEALER)
        self._sock.linger = 1000
        self._sock.maxmsgsize = MAX_MESSAGE_BYTES
        self._sock.curve_publickey, self._sock.curve_secretkey = _keypair(secret, run_id, node_rank)
        self._sock.curve_serverkey = _keypair(secret, run_id, "store")[0]
        self._sock.connect(address)
        self._last_sent = 0.0
        self._last_heard: float | None = None  # None until the store first answers
        self._unsent: list[list[bytes]] = []  # messages the DEALER could not take yet (no connection to the store)
        self.round = 0

    def close(self) -> None:
        self._sock.close()

    def _send(self, kind: str, **fields) -> None:
        """Queue a message and send what the socket takes now: a DEALER with no connection (the store not up yet,
        a handshake refused) would block a send, and the launcher must never block on the store."""
        if kind != "PING" or not self._unsent:
            self._unsent.append(_pack(kind, round=self.round, **fields))
        self._last_sent = time.monotonic()
        self._flush()

    def _flush(self) -> None:
        while self._unsent:
            try:
                self._sock.send_multipart(self._unsent[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._unsent.pop(0)

    def heartbeat(self) -> None:
        """A PING when none went out for HEARTBEAT_S, and whatever is still queued; called from every wait."""
        self._flush()
        if time.monotonic() - self._last_sent >= HEARTBEAT_S:
            self._send("PING")

    def receive(self, timeout_s: float = 0.0) -> tuple[str, dict] | None:
        """The store's next verdict (GO, STOP, END or ABORT as (kind, fields)) within timeout_s, else None; PONGs
        only prove the store lives. AgentAbort for an ABORT, and when the store has been silent for silent_s."""
        end = time.monotonic() + timeout_s
        while True:
            self.heartbeat()
            wait_ms = max(0, min(POLL_MS, int((end - time.monotonic()) * 1000)))
            if self._sock.poll(wait_ms):
                message = _unpack(self._sock.recv_multipart())
                self._last_heard = time.monotonic()
                if message is None:
                    raise AgentAbort(f"the agents' store at {self.address} sent a message that is not a store's")
                kind, fields = message
                if kind == "ABORT":
                    raise AgentAbort(str(fields.get("reason")))
                if kind != "PONG":
                    return kind, fields
            elif self._last_heard is not None and time.monotonic() - self._last_heard > self.silent_s:
                raise AgentAbort(
                    f"the agents' store at {self.address} (node 0's launcher) went silent "
                    f"({self.silent_s:g} s without an answer)"
                )
            if time.monotonic() >= end:
                return None

    def join(self, offer: Callable[[], Mapping[str, str]], stopping: Callable[[], bool]) -> dict | None:
        """JOIN the next round with offer() (the checkpoints this node verified) and wait for its GO (its fields:
        the round, the member nodes, where to resume), or None when `stopping()` turns true first. A node that
        joins while the others run is asked AGAIN, with a fresh offer, when their round stops. An END instead
        (the run finished before this node got in) is returned as {"end": True}. AgentAbort when the store aborts
        or says nothing within --rdzv-timeout (and a margin for its own verdict)."""
        self._send("JOIN", checkpoints=dict(offer()))
        deadline = time.monotonic() + self.rdzv_timeout + 2 * HEARTBEAT_S + 5.0
        while not stopping():
            verdict = self.receive(0.2)
            if verdict is not None:
                kind, fields = verdict
                if kind == "GO" and isinstance(fields.get("round"), int) and fields["round"] >= self.round:
                    self.round = fields["round"]
                    return fields
                if kind == "AGAIN" and isinstance(fields.get("round"), int):
                    self.round = fields["round"]
                    self._send("JOIN", checkpoints=dict(offer()))
                    deadline = time.monotonic() + self.rdzv_timeout + 2 * HEARTBEAT_S + 5.0
                elif kind == "END":
                    return {"end": True}
                continue  # a late STOP of the round this node already left
            if time.monotonic() > deadline:
                raise AgentAbort(
                    f"node {self.node_rank} got no answer from the agents' store at {self.address} (node 0's "
                    f"launcher) within --rdzv-timeout {self.rdzv_timeout:g} s: node 0 is not up, or the nodes hold "
                    "different secret files"
                )
        return None

    def report_failed(self, rank: int, pid: int, how: str) -> None:
        self._send("FAILED", rank=rank, pid=pid, how=how)

    def report_done(self) -> None:
        self._send("DONE")

    def leave(self, why: str) -> None:
        """Tell the store this node stops (the others then end too); never raises."""
        try:
            self._send("LEAVE", why=why)
        except zmq.ZMQError:
            pass

    def verdict(self, stopping: Callable[[], bool]) -> tuple[str, dict] | None:
        """Wait for this round's STOP or END (None when `stopping()` turns true first)."""
        while not stopping():
            verdict = self.receive(0.2)
            if verdict is not None and verdict[1].get("round", self.round) == self.round:
                return verdict
        return None
