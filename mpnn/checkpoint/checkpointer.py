"""mpnn.Checkpointer: save a run every N steps and resume it exactly, bit for bit, on the same world size, or on
another one (N ranks' checkpoint on M ranks: the data order and the loss curve go on; see resize.py).

    ckpt = mpnn.Checkpointer(model, optimizer, scheduler, loader=loader, every=100)
    start = ckpt.restore()                     # the newest valid checkpoint (or step 0)
    step, epoch = start.step, start.epoch
    ... after each optimizer step:  step += 1; ckpt.step(step, epoch=epoch)

A save: rank 0 clears what an interrupted save left and makes .tmp-step-<step>/; each rank writes its own state
there and rank 0 the shared state; once every rank is done (the gather that carries any rank's error is the
barrier), rank 0 writes manifest.json, renames the directory into place and deletes the oldest beyond `keep`.
Every rank then fires mpnn_checkpoint_saved and writes a telemetry "checkpoint" event.
A restore: every rank checks the newest checkpoint (the manifest, the shared files and its own file, by SHA-256)
and all agree to load it or to skip it, with one warning line naming it and why, for the next older one.
Signed manifests: when a plugin gives a signing key (mpnn_checkpoint_key: the audit plugin's per-run key), rank 0
signs each manifest it writes, and on restore checks the manifest's signature under the key of the run that signed
it; a checkpoint that fails (edited weights with recomputed SHA-256s, an unsigned manifest under the audit plugin)
ends the restore with a ResumeError naming it: that is tampering, not a torn save to skip. Every rank then fires
mpnn_checkpoint_loaded (the audit trail records the source checkpoint's path and manifest hash).
Another world size: the manifest's world_size differs from this run's. Rank 0 reads every old rank's file, the others
old rank 0's and their namesake's; resize.py rebuilds each rank's own state (global data position, codec residuals by
the codec's rule, random streams of new ranks from the run's seed), and rank 0 writes one line saying what it did.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mpnn import telemetry
from mpnn.checkpoint import layout, resize, settings
from mpnn.checkpoint.layout import InvalidCheckpoint
from mpnn.checkpoint.state import load_rank_state, rank_state, unwrap
from mpnn.checkpoint.weights import load_safetensors, save_safetensors
from mpnn.core.serialize import load, save
from mpnn.plugins.errors import PluginError

# The model's weights are safetensors (any tool reads them); the optimizer, schedule and each rank's own state
# (RNG streams, data position, codec residuals) keep mpnn's checksummed format (mpnn/core/serialize.py).
MODEL, OPTIMIZER, SCHEDULER = "model.safetensors", "optimizer.mpnn", "scheduler.mpnn"
OLD_MODEL = "model.mpnn"  # checkpoints written before the weights moved to safetensors: still resumed


class ResumeError(RuntimeError):
    """A resume that cannot go on: nothing valid where MPNN_RESUME_FROM points, or a checkpoint that does not fit
    this run (another model or codec; at another world size, a data order that is not global)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the rank and the file."""


@dataclass(frozen=True)
class ResumeState:
    """Where the run starts: the loaded checkpoint's step, epoch, path and manifest SHA-256 (step 0, epoch 0 and
    path None when nothing was loaded), and MPNN_RESTART_COUNT (k on the launcher's k-th automatic restart)."""

    step: int = 0
    epoch: int = 0
    path: Path | None = None
    sha256: str | None = None
    restart_count: int = 0

    @property
    def resumed(self) -> bool:
        """True when a checkpoint was loaded."""
        return self.path is not None


class Checkpointer:
    """Saves and restores everything a run needs to continue bit-exactly: the model (a DataParallel's wrapped
    module), the optimizer, the schedule, the sampler and loader position, every random stream and the gradient
    codec's error feedback.

    every: steps between checkpoints (MPNN_CHECKPOINT_EVERY overrides it; 0 or None: only explicit save()).
    keep: how many checkpoints stay (MPNN_CHECKPOINT_KEEP overrides it; default 3).
    directory: where they go (default <MPNN_RUN_DIR>/checkpoints, the run directory of `mpnn launch`).
    comm: the world (default: the DataParallel's, else mpnn.init()'s; a lone process needs none).
    """

    def __init__(
        self,
        model,
        optimizer,
        scheduler=None,
        sampler=None,
        loader=None,
        every=None,
        keep=None,
        directory=None,
        comm=None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.sampler, self.loader = sampler, loader
        self.module, self.data_parallel = unwrap(model)
        self.every = settings.every_from(every)
        self.keep = settings.keep_from(keep)
        self.directory = settings.directory_from(directory)
        if self.every and self.directory is None:
            raise ValueError(
                f"Checkpointer: checkpoints every {self.every} steps need a directory: pass "
                f"directory=, or run under `mpnn launch` (checkpoints go into its run directory)"
            )
        self._comm = comm if comm is not None else getattr(self.data_parallel, "comm", None)

    # ----- saving ----------------------------------------------------------------------------------------
    def step(self, step: int, epoch: int = 0) -> Path | None:
        """Call after each optimizer step: saves when `every` divides `step`; returns the checkpoint's path."""
        if self.every and step % self.every == 0:
            return self.save(step, epoch)
        return None

    def steps(self, total: int):
        """The training loop's steps as a generator: restores the newest checkpoint first, then yields the step
        numbers from where it left off up to `total` - 1, and after each step's body calls step(n + 1), which saves
        on the `every` schedule. `for step in ckpt.steps(500):` replaces restore(), range() and step()."""
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"Checkpointer.steps: total must be an integer >= 0, got {total!r}")
        start = self.restore().step
        for step in range(start, total):
            yield step
            self.step(step + 1)

    def save(self, step: int, epoch: int = 0) -> Path:
        """Write a checkpoint of `step` now (every rank must call it) and return its directory."""
        if self.directory is None:
            raise ValueError("Checkpointer.save: no directory: pass directory=, or run under `mpnn launch`")
        comm, directory = self.comm, self.directory
        temporary, final = directory / layout.writing_name(step), directory / layout.step_name(step)
        if comm.rank == 0:
            _, making_failed = _attempt(0, f"make {temporary}", lambda: _prepare(directory, temporary))
        else:
            making_failed = None
        self._agree(making_failed)
        _, writing_failed = _attempt(comm.rank, f"write into {temporary}", lambda: self._write(temporary, step, epoch))
        self._agree(writing_failed)  # the barrier: every rank's files are complete before the manifest
        outcome = None
        if comm.rank == 0:

            def finish():
                files = [name for name in os.listdir(temporary) if name != layout.MANIFEST]
                key = _signing_key(comm.run_id)
                signer = None if key is None else (comm.run_id, key)
                digest = layout.write_manifest(temporary, step, epoch, comm.world_size, files, signer)
                layout.publish(temporary, final)
                layout.rotate(directory, self.keep)
                return digest

            outcome = _attempt(0, f"finish {final}", finish)
        digest, error = comm.broadcast_object(outcome, root=0)
        if error:
            raise CheckpointSaveError(error)
        self._announce(final, digest, step)
        return final

    def _write(self, temporary: Path, step: int, epoch: int) -> None:
        """This rank's file, and on rank 0 the shared ones, written into the temporary directory."""
        comm = self.comm
        if comm.rank == 0:
            if weights_format() == MODEL:
                save_safetensors(self.module.state_dict(), temporary / MODEL)
            else:
                save(self.module.state_dict(), temporary / OLD_MODEL, notify=False)
            save(self.optimizer.state_dict(), temporary / OPTIMIZER, notify=False)
            if self.scheduler is not None:
                save(self.scheduler.state_dict(), temporary / SCHEDULER, notify=False)
        state = rank_state(step, epoch, comm.rank, self.data_parallel, self.sampler, self.loader)
        save(state, temporary / layout.rank_file(comm.rank), notify=False)

    def _agree(self, error: str | None) -> None:
        """Every rank's error (None when it succeeded), gathered: the barrier between the phases of a save."""
        errors = [e for e in self.comm.allgather_object(error) if e]
        if errors:
            raise CheckpointSaveError(errors[0])

    def _announce(self, path: Path, sha256: str, step: int) -> None:
        from mpnn.plugins import session

        rec = telemetry.get_recorder()
        if rec is not None:
            rec.event("checkpoint", step=int(step), path=str(path), sha256=sha256)
            rec.flush()  # on disk now: a worker killed within the next flush interval keeps this line
        plugins = session.current()
        if plugins is not None:
            plugins.hook.mpnn_checkpoint_saved(run=plugins.run, path=str(path), sha256=sha256, step=int(step))

    # ----- restoring ----------------------------------------------------------------------------------------
    def restore(self, source=None) -> ResumeState:
        """Load the newest valid checkpoint of `source`, else of MPNN_RESUME_FROM, else of this Checkpointer's
        own directory (a run directory, its checkpoints/ folder or one step-* checkpoint).

        A corrupt or incomplete checkpoint costs one warning line on stderr and the next older one is tried.
        When `source` or MPNN_RESUME_FROM names a place holding no valid checkpoint, ResumeError says so;
        an own directory without checkpoints is a fresh start (step 0)."""
        explicit = Path(source) if source is not None else settings.resume_from()
        where = explicit if explicit is not None else self.directory
        restarts = settings.restart_count()
        if explicit is not None and not explicit.is_dir():
            raise ResumeError(
                f"Checkpointer.restore: {explicit} is not a directory (resume from a run directory, "
                f"its checkpoints/ folder or a step-* checkpoint)"
            )
        if where is None:
            return ResumeState(restart_count=restarts)
        directory, candidates = _candidates(where)
        if not candidates and explicit is None:
            return ResumeState(restart_count=restarts)
        comm = self.comm
        candidates = comm.broadcast_object(candidates, root=0)
        rejected = []
        for _, name in candidates:
            path = directory / name
            verdicts = comm.allgather_object(self._check(path, comm.rank, comm.world_size))
            forged = next((why for kind, why in verdicts if kind == "signature"), None)
            if forged:
                raise ResumeError(f"Checkpointer.restore: {forged}")
            problems = [
                why + (f" (rank {rank})" if rank else "")
                for rank, (kind, why) in enumerate(verdicts)
                if kind == "invalid"
            ]
            if not problems:
                resumed = self._load(path, verdicts[comm.rank][1], restarts)
                if comm.rank == 0:
                    _warn_interrupted(directory, resumed.step)
                return resumed
            rejected.append(f"{name}: {problems[0]}")
            if comm.rank == 0:
                _warn(f"skipping checkpoint {path}: {problems[0]}; trying an older one")
        if explicit is not None:
            found = "; ".join(rejected) if rejected else "it holds no step-* checkpoint"
            raise ResumeError(f"Checkpointer.restore: no valid checkpoint in {directory} to resume from ({found})")
        return ResumeState(restart_count=restarts)

    def _check(self, path: Path, rank: int, world_size: int) -> tuple[str, str | None]:
        """("ok", manifest SHA-256), ("invalid", why) or ("signature", why), as this rank sees the checkpoint: the
        shared files and the rank files this rank will read (its own, or at another world size resize.source_ranks)."""
        try:
            manifest, digest = layout.read_manifest(path)
            written_by = manifest["world_size"]
            if written_by < 1:
                raise InvalidCheckpoint(f"its manifest says world_size {written_by}")
            if path.name != layout.step_name(manifest["step"]):
                raise InvalidCheckpoint(f"its manifest says step {manifest['step']}")
            if rank == 0:  # one rank checks the signature (others may lack the key); the verdicts are gathered
                forged = layout.signature_problem(path, manifest, _signing_key)
                if forged:
                    return "signature", forged
            own = [rank] if written_by == world_size else resize.source_ranks(written_by, world_size, rank)
            names = [model_file(manifest), OPTIMIZER] + [layout.rank_file(r) for r in own]
            names += [SCHEDULER] if self.scheduler is not None else []
            layout.verify_files(path, manifest, names)
            return "ok", digest
        except InvalidCheckpoint as why:
            return "invalid", str(why)

    def _load(self, path: Path, sha256: str, restarts: int) -> ResumeState:
        """Load a checked checkpoint on every rank; when it does not fit one rank's objects, all raise ResumeError."""
        comm = self.comm
        own, failure, notes, written_by = None, None, [], comm.world_size
        try:
            manifest, _ = layout.read_manifest(path)
            written_by = manifest["world_size"]
            weights = model_file(manifest)
            self.module.load_state_dict(load_safetensors(path / weights) if weights == MODEL else load(path / weights))
            self.optimizer.load_state_dict(load(path / OPTIMIZER))
            if self.scheduler is not None:
                self.scheduler.load_state_dict(load(path / SCHEDULER))
            if written_by == comm.world_size:
                own = load(path / layout.rank_file(comm.rank))
            else:
                states = {
                    r: load(path / layout.rank_file(r))
                    for r in resize.source_ranks(written_by, comm.world_size, comm.rank)
                }
                own, notes = resize.resized_rank_state(
                    states, written_by, comm.world_size, comm.rank, self.data_parallel, self.sampler, self.loader
                )
            load_rank_state(own, self.data_parallel, self.sampler, self.loader)
        except (ValueError, KeyError, TypeError, RuntimeError, PluginError) as error:
            where = (
                f" (written by a world of {written_by}, this run has {comm.world_size})"
                if written_by != comm.world_size
                else ""
            )
            failure = f"rank {comm.rank}: {path}{where} does not fit this run: {error}"
        failures = [f for f in comm.allgather_object(failure) if f]
        if failures:
            raise ResumeError(f"Checkpointer.restore: {failures[0]}")
        if written_by != comm.world_size and comm.rank == 0:
            _warn(
                f"resuming {path}, written by a world of {written_by}, on {comm.world_size} rank(s): "
                + "; ".join(["model, optimizer and schedule as saved"] + notes)
            )
        rec = telemetry.get_recorder()
        if rec is not None:
            rec.step = own["step"]  # telemetry lines go on numbering from the checkpoint's step
            rec.event(
                "resume",
                step=own["step"],
                path=str(path),
                sha256=sha256,
                restart_count=restarts,
                written_by_world_size=written_by,
            )
            rec.flush()  # on disk now, even if this worker is killed before the next periodic flush
        from mpnn.plugins import session

        plugins = session.current()
        if plugins is not None:
            plugins.hook.mpnn_checkpoint_loaded(
                run=plugins.run,
                path=str(path),
                sha256=sha256,
                step=int(own["step"]),
                signature=manifest.get("signature"),
                world_size=written_by,
            )
        return ResumeState(own["step"], own["epoch"], path, sha256, restarts)

    @property
    def comm(self):
        """The world this Checkpointer saves for: found when first needed, so a lone process needs no mpnn.init()."""
        if self._comm is None:
            self._comm = _default_comm()
        return self._comm


_warned_no_safetensors = False


def _signing_key(run_id: str | None) -> bytes | None:
    """The key that signs run `run_id`'s manifests, from the run's plugins (mpnn_checkpoint_key); None without one.
    run_id None asks whether this run has a key at all."""
    from mpnn.plugins import session

    plugins = session.current()
    if plugins is None or not plugins.implements("mpnn_checkpoint_key"):
        return None
    return plugins.hook.mpnn_checkpoint_key(run=plugins.run, run_id=run_id)


def weights_format() -> str:
    """The file a save writes the model into: model.safetensors, or model.mpnn (with one warning per process)
    where the safetensors package is not installed, so checkpoints never need an extra."""
    global _warned_no_safetensors
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        if not _warned_no_safetensors:
            _warned_no_safetensors = True
            _warn(
                "the safetensors package is not installed: model weights go into model.mpnn "
                "(pip install 'mpnn[safetensors]' for model.safetensors, which other tools read)"
            )
        return OLD_MODEL
    return MODEL


def model_file(manifest: dict) -> str:
    """The model's file in a checkpoint: model.safetensors, or model.mpnn in a checkpoint written before the
    model's weights moved to safetensors (such checkpoints still resume, through mpnn.load)."""
    listed = manifest["files"]
    return OLD_MODEL if OLD_MODEL in listed and MODEL not in listed else MODEL


def _default_comm():
    from mpnn.comm import CommError, Communicator, get_comm
    from mpnn.worldspec import current_world

    try:
        return get_comm()
    except CommError:
        spec = current_world()
        if spec.world_size > 1:
            raise RuntimeError(
                f"Checkpointer: this process is rank {spec.describe('rank')} of a world of "
                f"{spec.describe('world_size')} but has not joined it: call mpnn.init() first"
            ) from None
        return Communicator()


def _candidates(where: Path) -> tuple[Path, list[tuple[int, str]]]:
    """(the folder, [(step, name)] newest first) for a run directory, a checkpoints/ folder or one checkpoint."""
    step = layout.step_of(where.name)
    if step is not None:
        return where.parent, [(step, where.name)]
    directory = layout.checkpoints_in(where)
    return directory, layout.list_checkpoints(directory)


def _prepare(directory: Path, temporary: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    layout.remove_temporaries(directory)
    temporary.mkdir()


def _attempt(rank: int, doing: str, action) -> tuple:
    """(action()'s value, None), or (None, one line naming the rank, what it did and why it failed): errors cross
    ranks as text."""
    try:
        return action(), None
    except OSError as error:
        hint = " (checkpoints need a directory every rank shares)" if rank else ""
        return None, f"checkpoint: rank {rank}: cannot {doing}: {error}{hint}"
    except Exception as error:
        return None, f"checkpoint: rank {rank}: cannot {doing}: {type(error).__name__}: {error}"


def _warn(message: str) -> None:
    sys.stderr.write(f"mpnn checkpoint: {message}\n")
    sys.stderr.flush()


def _warn_interrupted(directory: Path, loaded_step: int) -> None:
    """One line for each save newer than the checkpoint loaded that never finished."""
    for step, name in layout.interrupted_saves(directory):
        if step > loaded_step:
            _warn(
                f"ignoring {directory / name}: a save that never finished (no checkpoint is read from "
                f"a temporary directory)"
            )
