"""The Communicator: this process's rank in the world and the collectives over NumPy arrays, sync and async.

Semantics (PyTorch's where it has the thing):
- allreduce(a, op) reduces in place across ranks and returns `a`. "sum" and "max" as named; "mean" is the sum
  divided by world_size at the end (floating dtypes only). float16 sums accumulate in float32 (partial sums
  are kept, and on the socket ring sent, as float32; the result is rounded to float16 once). Integer sums wrap
  like NumPy's. Every rank gets bit-identical results: each segment is reduced once, by one owner, in a fixed
  order. Paths: when all ranks share this host, <= 32 KB goes through shared-memory mailboxes (a short spin,
  then a futex: mailbox.py) and larger arrays through shared slots (shm.py); across hosts, <= 32 KB gathers whole
  arrays around the ring and reduces locally (latency), larger ones run ring reduce-scatter + all-gather.
  Each path is a strategy class in algorithms.py; every collective runs the first of its registry's classes
  that applies (the selection order is in that module's docstring).
- broadcast(a, root) copies root's `a` into every rank's `a` in place (same dtype and shape everywhere).
- allgather(a) returns every rank's array in rank order; same dtype everywhere, any shape per rank.
- reduce_scatter(a, op) reduces `a` across ranks and returns this rank's part: a is split along axis 0 in
  np.array_split order (the first a.shape[0] % world_size ranks get one row more); `a` is left untouched.
- allgather_object / broadcast_object move JSON-like objects and NumPy arrays through the typed codec of
  objects.py; nothing a peer sends is ever unpickled. barrier() returns once every rank has entered it.
- allreduce_async(a, op) queues the allreduce on ONE background thread that runs queued collectives in call
  order and returns a Work handle; do not touch `a` before handle.wait(). A synchronous call first waits for
  the queue, so all ranks see the same sequence of collectives. run_async(fn) queues fn() on that thread in
  the same order; fn may call the synchronous collectives (they run at once there, not behind the queue).
Arrays: float16, float32, float64, int32, int64 (uint8 too, except "mean"); non-contiguous arrays are copied in
and back. A failure (timeout, mismatch, dead peer) aborts the whole world at once and leaves this communicator
closed: every later call raises the first error.
"""

import atexit
import ipaddress
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import weakref

import numpy as np
import zmq

from . import algorithms, frames, mailbox, objects, rendezvous, shm
from .algorithms import ALLREDUCE, REDUCE_UFUNCS, Setup, accumulate_dtype
from .auth import DataSocketSecurity
from .env import WorldSpec
from .errors import AuthError, CommError
from .hostid import host_identity
from .transport import FLUSH_LINGER_MS, RingLink

SMALL_ALLREDUCE_BYTES = algorithms.SMALL_BYTES  # below: latency-bound; mailboxes on one host, else gather + reduce
_LIVE: "weakref.WeakSet[Communicator]" = weakref.WeakSet()  # closed at exit


class Work:
    """Handle of a queued collective (like torch.distributed's Work): wait() returns its result or raises.
    t_start and t_end are the perf_counter times the communication thread ran it (for telemetry)."""

    def __init__(self):
        self._done = threading.Event()
        self._result = self._error = None
        self.t_start = self.t_end = None

    def _finish(self, result=None, error=None):
        self._result, self._error = result, error
        self._done.set()

    def is_completed(self):
        """True once the collective has finished, successfully or not."""
        return self._done.is_set()

    def wait(self, timeout=None):
        """Block until the collective is done; return its result or raise its error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"Work.wait: the collective did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


class Communicator:
    """Rank, world size and ring collectives over ZeroMQ. A world of one needs no sockets at all.

    spec: the WorldSpec (see env.spec_from_env). secret: the run's secret bytes, or a callable returning them
    that is re-read until it matches rank 0's. encrypt: CURVE-encrypt the data sockets (default: only when
    the world spans several hosts; about 3x slower). transport: "auto" (ipc within a host, tcp across
    hosts) or "tcp". shared_memory: all-reduce arrays above 32 KB through /dev/shm when every rank is on
    this host (see shm.py); the ring over sockets otherwise.
    """

    def __init__(self, spec=None, secret=None, *, encrypt=None, transport="auto", shared_memory=True):
        spec = spec or WorldSpec()
        self.rank, self.world_size = spec.rank, spec.world_size
        self.local_rank, self.local_world_size = spec.local_rank, spec.local_world_size
        self.run_id, self.timeout = spec.run_id, spec.timeout
        self.encrypt = spec.multi_host if encrypt is None else bool(encrypt)
        self.endpoint = None  # this rank's data endpoint (where the previous rank connects)
        self._seq = 0
        self._lock = threading.Lock()
        self._queue = None
        self._worker = None
        self._idle = threading.Condition()
        self._queued = 0
        self._error = None
        self._closed = False
        self._link = self._context = self._security = None
        self._ipc_dir = None
        self._slots = None  # shm.SharedSlots when the same-host shared-memory path is on
        self._mailboxes = None  # mailbox.Mailboxes (small all-reduces, barriers) when it is
        self._setup = Setup(self.rank, self.world_size)  # what the algorithms may use (algorithms.py)
        if self.world_size > 1:
            if transport not in ("auto", "tcp"):
                raise ValueError(f"Communicator: transport must be 'auto' or 'tcp', got {transport!r}")
            try:
                self._connect(spec, secret, transport, shared_memory)
            except BaseException:
                self._shutdown(linger_ms=0)
                raise
        _LIVE.add(self)

    def __repr__(self):
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, run_id={self.run_id!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def bytes_sent(self):
        """Payload bytes this rank has sent so far, over every transport (for telemetry)."""
        return sum(sent for sent, _ in self.bytes_by_transport.values())

    @property
    def bytes_recv(self):
        """Payload bytes this rank has received so far, over every transport (for telemetry)."""
        return sum(recv for _, recv in self.bytes_by_transport.values())

    @property
    def mailbox_waits(self):
        """{"spun": n, "blocked": n}: the mailbox waits so far that found a peer missing, by how they ended (a spin
        of at most 100 us, or a futex sleep); None when this world uses no mailboxes (for telemetry)."""
        return None if self._mailboxes is None else dict(self._mailboxes.waits)

    @property
    def bytes_by_transport(self):
        """{transport: (sent, recv)} payload bytes so far: the ring's sockets ("tcp" or "ipc"), the /dev/shm slots
        ("shm": bytes other ranks read from this rank's slots, and this rank from theirs) and the mailboxes
        ("mailbox"). Only "tcp" would cross a network."""
        counts = {}
        if self._link is not None:
            counts[self._link.scheme] = (self._link.bytes_sent, self._link.bytes_recv)
        for name, source in (("shm", self._slots), ("mailbox", self._mailboxes)):
            if source is not None:
                counts[name] = (source.bytes_sent, source.bytes_recv)
        return counts

    # -- collectives -------------------------------------------------------------------------------------
    def allreduce(self, a, op="sum"):
        """Reduce `a` across ranks in place ("sum", "mean" or "max") and return it."""
        call = self._array_call(frames.ALLREDUCE, a, op, writable=True)
        if self.world_size == 1:
            return a
        return self._run(call, lambda link: self._allreduce(link, a, op))

    def allreduce_async(self, a, op="sum"):
        """Queue allreduce(a, op) on the communication thread; returns a Work whose wait() returns `a`."""
        call = self._array_call(frames.ALLREDUCE, a, op, writable=True)
        if self.world_size == 1:
            work = Work()
            work._finish(a)
            return work
        return self._submit(call, lambda link: self._allreduce(link, a, op))

    def run_async(self, fn):
        """Queue fn() on the communication thread after everything queued before it; returns a Work whose wait()
        returns fn's result. fn may call this communicator's synchronous collectives (on that thread they run at
        once, in fn's order), not wait on async ones. An exception from fn aborts the world like a failed
        collective, so no peer waits for frames that will never come. In a world of one fn runs now."""
        if self.world_size == 1:
            work = Work()
            work.t_start = time.perf_counter()
            try:
                result = fn()
            except BaseException as error:
                work.t_end = time.perf_counter()
                work._finish(error=error)
            else:
                work.t_end = time.perf_counter()
                work._finish(result)
            return work
        return self._submit(None, fn)

    def broadcast(self, a, root=0):
        """Copy rank `root`'s `a` into `a` on every rank, in place; returns `a`."""
        self._check_root("broadcast", root)
        call = self._array_call(frames.BROADCAST, a, None, writable=self.rank != root, root=root)
        if self.world_size == 1:
            return a
        return self._run(call, lambda link: self._broadcast(link, a, root))

    def allgather(self, a):
        """Every rank's `a` (same dtype, any shape) as a list in rank order; this rank's entry is a copy."""
        call = frames.Call(frames.ALLGATHER, dtype=self._array_call(frames.ALLGATHER, a, None).dtype)
        if self.world_size == 1:
            return [a.copy()]
        flat = np.ascontiguousarray(a).reshape(-1)
        pieces = self._run(call, lambda link: self._allgather(link, flat, a.shape))
        pieces[self.rank] = a.copy()
        return pieces

    def reduce_scatter(self, a, op="sum"):
        """Reduce `a` across ranks and return this rank's part of it (np.array_split along axis 0)."""
        call = self._array_call(frames.REDUCE_SCATTER, a, op)
        if a.ndim == 0:
            raise ValueError("reduce_scatter: needs an array with at least one dimension, got a 0-d array")
        if self.world_size == 1:
            return a.copy()
        return self._run(call, lambda link: self._reduce_scatter(link, a, op))

    def barrier(self):
        """Return once every rank has called barrier()."""
        if self.world_size > 1:
            self._run(frames.Call(frames.BARRIER), self._barrier)

    def allgather_object(self, obj):
        """Every rank's `obj` as a list in rank order. Objects travel through the typed codec of objects.py (None,
        bool, int, float, str, bytes, list, tuple, dict, NumPy arrays and scalars), never pickle."""
        data = np.frombuffer(objects.encode(obj, "allgather_object"), np.uint8)
        if self.world_size == 1:
            return [obj]
        call = frames.Call(frames.ALLGATHER_OBJECT, dtype=frames.DTYPE_CODES[data.dtype])
        pieces = self._run(call, lambda link: self._allgather(link, data, data.shape))
        return [obj if rank == self.rank else self._decode(piece, rank) for rank, piece in enumerate(pieces)]

    def broadcast_object(self, obj, root=0):
        """Rank `root`'s `obj` on every rank (other ranks' `obj` is ignored); the types of allgather_object."""
        self._check_root("broadcast_object", root)
        data = None
        if self.rank == root:
            data = np.frombuffer(objects.encode(obj, "broadcast_object"), np.uint8)
        if self.world_size == 1:
            return obj
        call = frames.Call(frames.BROADCAST_OBJECT, dtype=frames.DTYPE_CODES[np.dtype(np.uint8)], root=root)
        piece = self._run(call, lambda link: self._broadcast_object(link, data, root))
        return obj if self.rank == root else self._decode(piece, root)

    def _decode(self, piece, sender):
        """A peer's object from its bytes; CommError naming the rank if they are not the codec's."""
        try:
            return objects.decode(piece)
        except objects.ObjectError as error:
            raise CommError(
                f"rank {self.rank} received an object from rank {sender} that it cannot decode: {error} "
                "(objects travel as mpnn's typed encoding, never as pickles)"
            ) from None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self):
        """Leave the world (idempotent): finish queued work, flush the last frames briefly, close sockets."""
        if self._closed:
            return
        if self._worker is not None and self._error is None:
            try:
                self._drain()
            except CommError:
                pass  # the failure was raised where the queued work is awaited; closing goes on
        self._shutdown(linger_ms=0 if self._error is not None else FLUSH_LINGER_MS)

    # -- the collectives' bodies (run under the lock, on this thread or the communication thread) ----------
    def _allreduce(self, link, a, op):
        copied = not a.flags.c_contiguous
        flat = np.ascontiguousarray(a).reshape(-1) if copied else a.reshape(-1)
        accumulate = np.float32 if a.dtype == np.float16 and op != "max" else a.dtype  # accumulate_dtype, inline
        setup = self._setup
        ALLREDUCE.select(setup, op, a.nbytes, a.dtype).run(link, setup, flat, op, accumulate)
        if copied:
            np.copyto(a, flat.reshape(a.shape))
        return a

    def _broadcast(self, link, a, root):
        copied = not a.flags.c_contiguous
        flat = np.ascontiguousarray(a).reshape(-1) if copied else a.reshape(-1)
        setup = self._setup
        algorithms.BROADCAST.select(setup, None, a.nbytes, a.dtype).run(link, setup, flat, root)
        if copied and self.rank != root:
            np.copyto(a, flat.reshape(a.shape))
        return a

    def _allgather(self, link, flat, shape):
        setup = self._setup  # no size in the choice: ranks' pieces differ in size, the choice must not
        return algorithms.ALLGATHER.select(setup, None, 0, flat.dtype).run(link, setup, flat, shape)

    def _reduce_scatter(self, link, a, op):
        setup = self._setup
        return algorithms.REDUCE_SCATTER.select(setup, op, a.nbytes, a.dtype).run(
            link, setup, a, op, accumulate_dtype(a.dtype, op)
        )

    def _barrier(self, link):
        setup = self._setup
        algorithms.BARRIER.select(setup).run(link, setup)

    def _broadcast_object(self, link, data, root):
        setup = self._setup  # no size in the choice: only the root knows it
        return algorithms.BROADCAST_OBJECT.select(setup).run(link, setup, data, root, np.uint8)

    # -- validation --------------------------------------------------------------------------------------
    def _array_call(self, op, a, reduce, writable=False, root=0):
        name = frames.OP_NAMES[op]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a NumPy array, got {type(a).__name__}")
        if a.dtype not in frames.DTYPE_CODES:
            supported = ", ".join(d.name for d in frames.DTYPES)
            raise TypeError(f"{name}: dtype {a.dtype} is not supported (use one of {supported})")
        if reduce is not None and reduce not in REDUCE_UFUNCS:
            raise ValueError(f"{name}: op must be 'sum', 'mean' or 'max', got {reduce!r}")
        if reduce == "mean" and a.dtype.kind != "f":
            raise TypeError(f"{name}: op='mean' needs a floating dtype, got {a.dtype} (use 'sum' and divide)")
        if writable and not a.flags.writeable:
            raise ValueError(f"{name}: works in place but the array of shape {a.shape} is read-only")
        return frames.Call(op, frames.REDUCE_CODES.get(reduce, 0), frames.DTYPE_CODES[a.dtype], a.shape, root)

    def _check_root(self, name, root):
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.world_size:
            raise ValueError(f"{name}: root must be a rank in 0..{self.world_size - 1}, got {root!r}")

    # -- execution: one collective at a time, in call order ---------------------------------------------
    def _run(self, call, body):
        """Run a collective now, after any queued async ones (at once on the communication thread itself)."""
        if self._worker is not None and threading.current_thread() is not self._worker:
            self._drain()
        with self._lock:
            return self._execute(call, body)

    def _execute(self, call, body):
        if self._error is not None:
            raise self._error
        if self._closed:
            raise CommError(f"rank {self.rank}: the communicator is closed")
        self._seq += 1
        link = self._link
        link.begin(call, self._seq)
        if self._mailboxes is not None:
            self._mailboxes.announce(call, self._seq)
        try:
            result = body(link)
            link.finish()
            return result
        except BaseException as error:
            if not isinstance(error, CommError):
                error = CommError(
                    f"rank {self.rank} aborted {call.describe()} at collective #{self._seq}: "
                    f"{type(error).__name__}: {error}"
                )
            self._error = error
            if self._mailboxes is not None:
                self._mailboxes.mark_aborted(error)
            link.abort(error)
            self._shutdown(linger_ms=0)
            raise

    def _submit(self, call, body):
        if self._error is not None:
            raise self._error
        if self._closed:
            raise CommError(f"rank {self.rank}: the communicator is closed")
        if self._worker is None:
            self._queue = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._serve_queue, name=f"mpnn-comm-{self.rank}", daemon=True)
            self._worker.start()
        work = Work()
        with self._idle:
            self._queued += 1
        self._queue.put((call, body, work))
        return work

    def _serve_queue(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            call, body, work = item
            try:
                if call is None:  # a run_async task: its collectives take the lock themselves
                    work.t_start = time.perf_counter()
                    result = self._run_task(body)
                    work.t_end = time.perf_counter()
                    work._finish(result)
                else:
                    with self._lock:
                        work.t_start = time.perf_counter()
                        result = self._execute(call, body)
                        work.t_end = time.perf_counter()
                        work._finish(result)
            except BaseException as error:
                work.t_end = time.perf_counter()
                work._finish(error=error)
            with self._idle:
                self._queued -= 1
                self._idle.notify_all()

    def _run_task(self, fn):
        if self._error is not None:
            raise self._error
        if self._closed:
            raise CommError(f"rank {self.rank}: the communicator is closed")
        try:
            return fn()
        except BaseException as error:
            with self._lock:
                if self._error is None and not self._closed:  # fn failed between collectives: abort the world
                    self._error = CommError(
                        f"rank {self.rank} aborted after collective #{self._seq}: {type(error).__name__}: {error}"
                    )
                    if self._mailboxes is not None:
                        self._mailboxes.mark_aborted(self._error, between=True)
                    self._link.abort(self._error)
                    self._shutdown(linger_ms=0)
            raise

    def _drain(self):
        """Wait until the communication thread has run everything queued so far."""
        with self._idle:
            while self._queued:
                self._idle.wait()
        if self._error is not None:
            raise self._error

    # -- setup and teardown ------------------------------------------------------------------------------
    def _connect(self, spec, secret, transport, shared_memory):
        load_secret = secret if callable(secret) else (lambda: secret)
        if not callable(secret) and not isinstance(secret, bytes):
            raise AuthError(
                f"rank {self.rank}: a world of {self.world_size} needs the run's secret (set MPNN_SECRET_FILE)"
            )
        self._context = zmq.Context()
        deadline = time.monotonic() + self.timeout
        address = _bind_address(spec)

        def prepare(proven_secret):
            self._security = DataSocketSecurity(proven_secret, self.run_id, self.world_size, self.encrypt)
            self._security.start(self._context)
            self._link = RingLink(self._context, self.rank, self.world_size, self.run_id, self.timeout, self._security)
            return self._bind_data(spec, transport, shared_memory)

        router = None
        if self.rank == 0:
            own = prepare(load_secret())
            table, router = rendezvous.serve(
                self._context, address, self.run_id, self.world_size, load_secret(), own, deadline, self._security
            )
        else:
            _, table = rendezvous.join(
                self._context, spec.rendezvous, self.rank, self.run_id, load_secret, callable(secret), prepare, deadline
            )
        try:
            peer = table[self._link.next]
            self._link.connect(_pick_endpoint(peer, table[self.rank]), peer.get("edge"))
            self._run(frames.Call(frames.BARRIER), self._barrier)  # collective #1 proves the ring is closed
        finally:
            if router is not None:
                router.close()
        if self._ipc_dir is not None:  # connected: the socket file has done its job; nothing is left behind
            _remove_ipc_dir(self._ipc_dir)
        self._share_memory(table)
        self._seq = 0  # the user's first collective is #1 in error messages

    def _share_memory(self, table):
        """Turn the shared-memory path on if every rank is on this host and offers slots, else drop ours; then
        tell the algorithms what the world offers (a new Setup)."""
        same_host = all(peer["host"] == table[self.rank]["host"] for peer in table)
        if self._slots is not None:
            if same_host and all(peer.get("shm") for peer in table):
                self._slots.attach([peer["shm"] for peer in table])
                self._run(frames.Call(frames.BARRIER), self._barrier)  # everyone has mapped everyone's file
                self._slots.unlink()
                if mailbox.wanted(self.world_size):
                    self._mailboxes = mailbox.Mailboxes(
                        self._slots, self.world_size, self.rank, self._link.tag, self.timeout
                    )
            else:
                self._slots.close()
                self._slots = None
        self._setup = Setup(self.rank, self.world_size, same_host, self._slots, self._mailboxes)

    def _bind_data(self, spec, transport, shared_memory):
        info = {
            "rank": self.rank,
            "host": host_identity(),  # host name + boot id: containers may share a host name across machines
            "pid": os.getpid(),
            "ipc": None,
            "tcp": None,
            "shm": None,
            "edge": self._security.nonce.hex(),  # what the previous rank's one-time data-socket proof is bound to
        }
        if transport == "auto":
            # Random names in private directories, announced to the peers over the authenticated rendezvous:
            # nothing another user could prepare from what run.json or the run id tell them.
            self._ipc_dir = _ipc_dir(self.rank)
            info["ipc"] = self._link.bind(f"ipc://{self._ipc_dir}/{IPC_SOCKET}")
            self.endpoint = info["ipc"]
            if shared_memory:
                try:
                    self._slots = shm.SharedSlots(self.rank, _checked_scratch("MPNN_SHM_DIR"))
                    info["shm"] = self._slots.path
                except FileExistsError as error:
                    raise CommError(str(error)) from None  # a planted name is an error, never a quiet fallback
                except OSError:
                    self._slots = None  # no /dev/shm or no room: this world all-reduces over the ring
        if transport == "tcp" or spec.multi_host:
            bound = self._link.bind("tcp://0.0.0.0:*" if spec.multi_host else "tcp://127.0.0.1:*")
            port = bound.rsplit(":", 1)[1]
            host = _reachable_ip(spec) if spec.multi_host else "127.0.0.1"
            info["tcp"] = f"tcp://{host}:{port}"
            self.endpoint = self.endpoint or info["tcp"]
        return info

    def _shutdown(self, linger_ms):
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            if self._worker is not threading.current_thread():
                self._worker.join(timeout=1.0)
        if self._link is not None:
            self._link.close(linger_ms=linger_ms)
        self._mailboxes = None  # its views into the shared files go before the mappings (the Setup's too)
        self._setup = Setup(self.rank, self.world_size)
        if self._slots is not None:
            self._slots.close()
            self._slots = None
        if self._security is not None:
            self._security.stop()
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._ipc_dir is not None:
            _remove_ipc_dir(self._ipc_dir)  # if startup failed before the socket file was removed
        _LIVE.discard(self)


def _bind_address(spec):
    """Rank 0's rendezvous bind address: every interface across hosts; on one host the address's own IP
    (loopback for a host name such as localhost)."""
    host, port = spec.rendezvous_host_port()
    if spec.multi_host:
        return f"tcp://*:{port}"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = "127.0.0.1"
    return f"tcp://{host}:{port}"


IPC_SOCKET = "s"  # the socket's name inside its rank's private directory


def _checked_scratch(variable):
    """The private scratch directory the launcher handed over in `variable` (MPNN_SCRATCH_DIR, MPNN_SHM_DIR), after
    checking that it is this user's and nobody else's (safefs.check_private_dir); None when unset or empty."""
    from mpnn import safefs

    path = os.environ.get(variable, "")
    if not path:
        return None
    try:
        safefs.check_private_dir(path)
    except OSError as error:
        raise AuthError(f"{variable}={path}: {error}") from None
    return path


def _ipc_dir(rank):
    """A fresh private directory (mkdtemp: random name, 0700, made exclusively) with a short path for this rank's
    ipc socket (paths are limited to 107 chars): inside the launcher's MPNN_SCRATCH_DIR, else the scratch root."""
    from mpnn import safefs

    parent = _checked_scratch("MPNN_SCRATCH_DIR") or safefs.scratch_root()
    return tempfile.mkdtemp(prefix=f"r{rank}-", dir=parent)


def _remove_ipc_dir(path):
    """Remove a rank's ipc directory and its socket file; nothing if it is gone already."""
    shutil.rmtree(path, ignore_errors=True)


def _remove_quietly(remove, path):
    try:
        remove(path)
    except OSError:
        pass  # already gone, or (a directory) another rank's socket file is still in it


def _reachable_ip(spec):
    """The address other hosts reach this one at: MPNN_HOST, else the interface that routes to rank 0."""
    if os.environ.get("MPNN_HOST"):
        return os.environ["MPNN_HOST"]
    host, port = spec.rendezvous_host_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


def _pick_endpoint(peer, me):
    """ipc when the next rank is on this host and offers it, else tcp."""
    if peer.get("ipc") and peer.get("host") == me.get("host"):
        return peer["ipc"]
    if not peer.get("tcp"):
        raise CommError(
            f"rank {me['rank']} cannot reach rank {peer['rank']} on host {peer.get('host')}: it offers "
            "no tcp endpoint (set MPNN_NNODES to the number of hosts on every rank)"
        )
    return peer["tcp"]


@atexit.register
def _close_all():
    for comm in list(_LIVE):
        comm.close()
