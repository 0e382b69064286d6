"""Every hook a plugin may implement, declared once with its arguments: the whole extension surface.

A plugin is a plain class with ``name``, ``version``, ``options`` (name -> Option) and a docstring whose first
line is its help; it implements any of the hooks below as methods marked ``@hookimpl``. pluggy calls
implementations last-registered-first unless they are marked ``tryfirst``/``trylast``; mpnn registers plugins in
the order the run names them (the --plugin specs in order, then objects passed to mpnn.init(plugins=...)), and
the built-in observers mark themselves so that, whatever the order:
the audit trail runs first at run start and at launch end (closing the trail matters most: pluggy stops at the
first hook that raises), last at step end and run end (it records what the others did),
the watchdog runs after user plugins at step end.

Gradient compression is not a hook but one stateful slot (a codec, ``kind = "codec"``): see ``Codec`` in
mpnn/plugins/codec.py. At most one codec per run; it runs inside backward, so mpnn_after_backward sees the
gradients it decoded, and its wire bytes are in the record mpnn_step_end gets ("codec_bytes", "codec_ratio").

LaunchInfo and RunInfo (the ``launch`` and ``run`` arguments) are in mpnn/plugins/info.py. A hook that raises
fails the run with a PluginError naming the plugin and the hook (mpnn/plugins/manager.py).
"""

from __future__ import annotations

import pluggy

PROJECT = "mpnn"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----- launcher side: called in the `mpnn launch` process ------------------------------------------
@hookspec
def mpnn_launch_start(launch):
    """Before any worker starts. ``launch`` (LaunchInfo): run_id, run_dir, nprocs, nnodes, node_rank, world_size,
    script, script_args, argv, plugin_specs, env, seed. Raise PluginRefusal(message) to refuse the run: nothing
    starts and the launcher exits non-zero with the message."""


@hookspec
def mpnn_launch_end(launch, status, exit_codes, error):
    """After every worker is gone. status: "ok" | "failed" | "interrupted"; exit_codes: {rank: code or None};
    error: the launcher's one-line failure message or None."""


@hookspec
def mpnn_launch_restart(launch, restart, failed_rank, how):
    """Between two attempts of a run with --max-restarts, after every worker of the failed attempt is gone and
    before the next starts: restart is its number (1 to max restarts), failed_rank the rank whose failure caused
    it, how e.g. "killed by SIGKILL" or "exited with code 1". mpnn_launch_end still comes once, at the very end."""


@hookspec
def mpnn_launch_attempt_end(launch, attempt, status, exit_codes):
    """After every worker of one attempt is gone (attempt 0, then one per restart), before any restart:
    status "ok" | "failed" | "interrupted"; exit_codes: {rank: code or None} of that attempt's workers."""


# ----- worker side: called in each worker process ----------------------------------------------------
@hookspec
def mpnn_run_start(run):
    """Once, from mpnn.init(). ``run`` (RunInfo): rank, world_size, local_rank, run_id, run_dir, comm, recorder,
    config."""


@hookspec
def mpnn_step_end(run, record):
    """After each optimizer step, with the telemetry step record (t, rank, step, epoch, loss, batch, step_s,
    compute_s, comm_s, opt_s, bytes_sent, bytes_recv, rss_bytes). Keep it cheap: it runs every step."""


@hookspec
def mpnn_after_backward(run, named_grads):
    """After each synchronised backward of a DataParallel model: ``named_grads`` maps each parameter's name
    (as named_parameters() gives it) to its gradient, already averaged over ranks (the same on every rank).
    Read-only: the optimizer steps on these arrays next. Runs every step: keep it cheap."""


@hookspec
def mpnn_epoch_end(run, epoch, metrics):
    """When the epoch number changes between steps, and at run end; metrics: e.g. {"loss_mean", "steps"}."""


@hookspec
def mpnn_data_fingerprint(run, name, indices_sha256, data_sha256, size):
    """The first time a DistributedSampler is iterated: SHA-256 of this rank's shard indices and of the
    dataset's arrays, and the dataset's size."""


@hookspec
def mpnn_checkpoint_saved(run, path, sha256, step):
    """After mpnn.save wrote a file: its path, the SHA-256 of its bytes, and the optimizer step count. For a
    checkpoint of mpnn.Checkpointer (on every rank, once per checkpoint): its step-* directory, the SHA-256 of its
    manifest.json (which lists every file's SHA-256), and the step it saved."""


@hookspec
def mpnn_seed(run, seed, source):
    """The script seeded mpnn's generator: ``source`` is "mpnn.init" (mpnn.init(seed=...)) or "mpnn.manual_seed";
    a seed set before mpnn.init() is reported right after mpnn_run_start."""


@hookspec
def mpnn_checkpoint_loaded(run, path, sha256, step, signature, world_size):
    """A Checkpointer resumed from a checkpoint (on every rank): its step-* directory, the SHA-256 of its
    manifest.json, the step, the manifest's signature ({"run_id", "hmac"}, None for an unsigned one) and the world
    size of the run that wrote it (this run's own, or another when it resumed at another world size)."""


@hookspec(firstresult=True)
def mpnn_checkpoint_key(run, run_id):
    """The key that signs (and checks) the manifests of run ``run_id``'s checkpoints, or None: the audit plugin
    derives one per run from the user's audit key. The first plugin returning a key wins."""


@hookspec
def mpnn_error(run, error):
    """An uncaught exception is ending this worker."""


@hookspec
def mpnn_run_end(run, status):
    """At worker exit; status: "ok" | "error"."""
