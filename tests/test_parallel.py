"""DataParallel against single-process training: 2 (and 3) workers at batch B each match one process at
batch world*B; the same seed gives bit-identical parameters twice; no_sync accumulates; bucketing is exact
whatever the bucket size."""

import numpy as np
import pytest

import mpnn
from mpnn import nn
from mpnn.launch import run


def _model(seed):
    mpnn.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


def _data(steps, batch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((steps, batch, 1, 16)).astype(np.float32)
    y = rng.integers(0, 3, size=(steps, batch))
    return x, y


def _train(model, opt, xs, ys):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(mpnn.from_numpy(x)), mpnn.from_numpy(y))
        loss.backward()
        opt.step()


def _worker(steps, batch, bucket_mb, seed):
    comm = mpnn.init()
    # Each rank starts from a different initialisation: DataParallel must broadcast rank 0's.
    model = mpnn.DataParallel(_model(seed + comm.rank), bucket_mb=bucket_mb)
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _data(steps, batch * comm.world_size)
    lo, hi = comm.rank * batch, (comm.rank + 1) * batch
    _train(model, opt, x[:, lo:hi], y[:, lo:hi])
    states = comm.allgather_object(model.module.state_dict())
    return states


def _single(steps, batch, seed):
    model = _model(seed)
    opt = mpnn.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _data(steps, batch)
    _train(model, opt, x, y)
    return model.state_dict()


@pytest.mark.parametrize("world,bucket_mb", [(2, 25), (3, 0.0005)])
def test_data_parallel_matches_single_process(world, bucket_mb):
    steps, batch = 6, 8
    states = run(_worker, n=world, args=(steps, batch, bucket_mb, 0))
    reference = _single(steps, batch * world, 0)
    for rank_state in states[1:]:  # every replica holds exactly the same parameters
        for k in reference:
            np.testing.assert_array_equal(rank_state[k], states[0][k])
    for k, v in reference.items():
        np.testing.assert_allclose(states[0][k], v, rtol=2e-5, atol=2e-6, err_msg=k)
    # and training actually moved them
    start = _model(0).state_dict()
    assert any(not np.allclose(start[k], reference[k]) for k in reference)


def test_same_seed_gives_bit_identical_parameters():
    a = run(_worker, n=2, args=(4, 8, 25, 3))[0]
    b = run(_worker, n=2, args=(4, 8, 25, 3))[0]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _no_sync_worker():
    comm = mpnn.init()
    model = mpnn.DataParallel(_model(0))
    x, y = _data(2, 4 * comm.world_size)
    lo, hi = comm.rank * 4, (comm.rank + 1) * 4
    with model.no_sync():
        loss = nn.functional.cross_entropy(model(mpnn.from_numpy(x[0, lo:hi])), mpnn.from_numpy(y[0, lo:hi]))
        loss.backward()
    local_after_first = {n: p.grad.data.copy() for n, p in model.module.named_parameters()}
    loss = nn.functional.cross_entropy(model(mpnn.from_numpy(x[1, lo:hi])), mpnn.from_numpy(y[1, lo:hi]))
    loss.backward()
    return local_after_first, {n: p.grad.data.copy() for n, p in model.module.named_parameters()}


def test_no_sync_accumulates_then_averages_the_sum():
    local, synced = run(_no_sync_worker, n=2)
    # reference: per-rank sum of the two micro-batch gradients, averaged over the two ranks
    model = _model(0)
    x, y = _data(2, 8)
    grads = {}
    for r in range(2):
        for s in range(2):
            model.zero_grad()
            nn.functional.cross_entropy(
                model(mpnn.from_numpy(x[s, r * 4 : (r + 1) * 4])), mpnn.from_numpy(y[s, r * 4 : (r + 1) * 4])
            ).backward()
            for n, p in model.named_parameters():
                grads[n] = grads.get(n, 0) + p.grad.data / 2
            if r == 0 and s == 0:
                for n, p in model.named_parameters():  # rank 0's first micro-batch stayed local
                    np.testing.assert_allclose(local[n], p.grad.data, rtol=1e-6)
    for n in grads:
        np.testing.assert_allclose(synced[n], grads[n], rtol=2e-5, atol=1e-6, err_msg=n)


class _Boom(RuntimeError):
    pass


def _failing_step_worker(steps, batch, fail_step, set_to_none):
    """Both ranks raise inside backward at `fail_step` (a post-accumulate hook on the first layer's weight, near
    the end of backward, after some buckets were launched and while others wait), catch it, skip that step and
    train on."""
    comm = mpnn.init()
    model = mpnn.DataParallel(_model(comm.rank), bucket_mb=0.0005)  # three buckets: some launched before the raise
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data(steps, batch * comm.world_size)
    lo, hi = comm.rank * batch, (comm.rank + 1) * batch
    first = model.module[0].weight  # Conv1d's: the last bucket, not launched when the hook raises
    caught, grads, launched = [], [], []

    def raise_in_backward(param):
        launched.append([b.work is not None for b in model._buckets])  # reductions in flight at the failure
        raise _Boom(f"injected failure in backward (parameter of shape {param.data.shape})")

    for step in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(mpnn.from_numpy(x[step, lo:hi])), mpnn.from_numpy(y[step, lo:hi]))
        if step == fail_step:
            handle = first.register_post_accumulate_grad_hook(raise_in_backward)
            try:
                loss.backward()
            except _Boom as exc:
                caught.append(str(exc))
            finally:
                handle.remove()
            continue
        loss.backward()
        grads.append({n: p.grad.data.copy() for n, p in model.module.named_parameters()})
        opt.step()
    return caught, launched, grads, model.module.state_dict()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_goes_on_correctly_after_a_backward_that_raised(set_to_none):
    """The failed backward's end-of-backward step is replaced by DataParallel's on_error (mpnn.hooks): it waits for
    the launched buckets and resets, so every later step reduces every bucket; parameters and gradients then
    equal a single process's on the same data without the failed step (before the fix, every later step skipped
    the final bucket reduction)."""
    steps, batch, fail_step, world = 5, 4, 1, 2
    caught, launched, grads, state = run(_failing_step_worker, n=world, args=(steps, batch, fail_step, set_to_none))
    assert len(caught) == 1 and "injected failure in backward" in caught[0]
    assert launched == [[True, True, False]]  # two buckets in flight, one not launched, when backward raised
    model = _model(0)
    opt = mpnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data(steps, batch * world)
    kept = [s for s in range(steps) if s != fail_step]
    for i, s in enumerate(kept):
        opt.zero_grad()
        nn.functional.cross_entropy(model(mpnn.from_numpy(x[s])), mpnn.from_numpy(y[s])).backward()
        for n, p in model.named_parameters():  # the true gradient of the whole batch: the mean over the ranks
            np.testing.assert_allclose(grads[i][n], p.grad.data, rtol=2e-5, atol=2e-6, err_msg=f"step {s} {n}")
        opt.step()
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(state[k], v, rtol=2e-5, atol=2e-6, err_msg=k)
