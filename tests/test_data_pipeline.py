"""The image data pipeline (issue 13): ArrayShards (memory-mapped shards, manifest checks), the Numba image
transforms and their fused Compose (bit-equal to the chain step by step, torch's semantics, seeded per rank,
epoch and batch), and DataLoader(prefetch=N) (same batches, clean shutdown, errors carried, telemetry's wait)."""

import gc
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mpnn.data import ArrayShards, DataLoader, DistributedSampler, ManifestError
from mpnn.data import transform_kernels as kernels
from mpnn.data import transforms as T

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def images_and_labels(n=100, height=8, width=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.fixture
def shards(tmp_path):
    images, labels = images_and_labels(100)
    return ArrayShards.write(tmp_path / "set", images, labels, shard_size=30), images, labels


def fusible_chain(seed=7):
    return T.Compose(
        [T.RandomCrop(8, padding=2), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)], seed=seed
    )


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "mpnn-dataloader-prefetch"]


# ----- ArrayShards --------------------------------------------------------------------------------


def test_write_then_read_rows_and_batches_across_shards(shards):
    ds, images, labels = shards
    assert len(ds) == 100 and len(ds.shard_images) == 4  # 30 + 30 + 30 + 10
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in ds.shard_images + ds.shard_labels)
    x, y = ds[31]
    assert x.dtype == np.uint8 and x.shape == (8, 8, 3) and np.array_equal(x.data, images[31])
    assert y.data.dtype == np.int64 and int(y.item()) == labels[31]
    assert np.array_equal(ds[-1][0].data, images[-1])
    index = np.array([99, 0, 45, 29, 30, 61, 0])
    xb, yb = ds[index]
    assert np.array_equal(xb.data, images[index]) and np.array_equal(yb.data, labels[index])
    assert np.array_equal(ds[10:13][0].data, images[10:13])
    with pytest.raises(IndexError, match="ArrayShards: index 100 out of range for a dataset of 100 samples"):
        ds[100]
    with pytest.raises(IndexError, match="ArrayShards: index 100 out of range"):
        ds[[1, 100]]
    with pytest.raises(TypeError, match="ArrayShards: a batch index must hold integers"):
        ds[np.array([0.5])]


def test_the_manifest_lists_sizes_and_checksums(shards):
    ds, _, _ = shards
    manifest = json.loads((ds.root / "manifest.json").read_text())
    first = manifest["shards"][0]
    assert manifest["rows"] == 100 and manifest["image_shape"] == [8, 8, 3]
    assert first["rows"] == 30 and first["images"]["shape"] == [30, 8, 8, 3] and first["labels"]["dtype"] == "int64"
    import hashlib

    path = ds.root / first["images"]["file"]
    assert first["images"]["bytes"] == path.stat().st_size
    assert first["images"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    ArrayShards(ds.root, verify=True)  # a clean set passes the full checksum pass


def test_the_distributed_sampler_shards_it_disjointly_and_completely(shards):
    ds, _, labels = shards
    seen = []
    for rank in range(4):
        sampler = DistributedSampler(ds, num_replicas=4, rank=rank, shuffle=True, seed=3)
        rows = [int(i) for batch in DataLoader(ds, batch_size=7, sampler=sampler) for i in batch[1].data]
        seen.append(set(np.flatnonzero(np.isin(np.arange(100), list(sampler)))))
        assert len(rows) == 25
    assert all(not (seen[a] & seen[b]) for a in range(4) for b in range(a + 1, 4))
    assert set().union(*seen) == set(range(100))


def rewrite_manifest(ds, edit):
    path = ds.root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: m["shards"][1]["labels"].update(dtype="int32"), r"shards\[1\]\.labels\.dtype: must be 'int64'"),
        (lambda m: m["shards"][0].update(rows="30"), r"shards\[0\]\.rows: must be an int >= 0, got '30'"),
        (lambda m: m["shards"][0].update(rows=True), r"shards\[0\]\.rows: must be an int"),
        (lambda m: m["shards"][2]["images"].update(shape=[[30, 8, 8, 3]]), r"shards\[2\]\.images\.shape\[0\]"),
        (lambda m: m["shards"][0].update(images=[1, 2]), r"shards\[0\]\.images: must be an object"),
        (lambda m: m["shards"][0]["images"].pop("sha256"), r"shards\[0\]\.images\.sha256: missing"),
        (lambda m: m["shards"][0]["images"].update(sha256="xyz"), r"sha256: must be 64 lowercase hex"),
        (lambda m: m["shards"][0]["images"].update(file="../x.npy"), r"must be a plain \.npy file name"),
        (lambda m: m.update(rows=99), r"rows: is 99 but the shards hold 100 rows"),
        (lambda m: m.update(extra=1), r"extra: unknown key"),
        (lambda m: m.update(image_shape=[8, 8]), r"image_shape: must be \[height, width, channels\]"),
        (lambda m: m.update(shards={}), r"shards: must be a list"),
    ],
)
def test_a_bad_manifest_is_one_error_naming_the_file_and_key(shards, edit, pattern):
    ds, _, _ = shards
    rewrite_manifest(ds, edit)
    with pytest.raises(ManifestError, match=pattern) as info:
        ArrayShards(ds.root)
    assert "manifest.json" in str(info.value)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("{", r"malformed JSON \(Expecting"),
        ('{"rows": NaN}', r"malformed JSON \(NaN is not allowed\)"),
        ('{"rows": 1, "rows": 2}', r"malformed JSON \(duplicate key 'rows'\)"),
        ("[1, 2]", r"must be a JSON object, got list"),
        ("[" * 100000 + "]" * 100000, r"malformed JSON \(nested too deeply\)"),
    ],
)
def test_malformed_json_is_one_error_naming_the_manifest(shards, text, pattern):
    ds, _, _ = shards
    (ds.root / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=pattern):
        ArrayShards(ds.root)


def test_shard_files_are_checked_against_the_manifest(shards):
    ds, _, _ = shards
    root = ds.root
    (root / "labels-00001.npy").unlink()
    with pytest.raises(ManifestError, match=r"labels-00001\.npy \(manifest\.json shards\[1\]\.labels\): missing"):
        ArrayShards(root)
    # A file of the right size but another dtype (int64 labels of 30 rows == float64 of 30 rows).
    np.save(root / "labels-00001.npy", np.zeros(30, np.float64))
    with pytest.raises(ManifestError, match=r"labels-00001\.npy .*: dtype is float64, the manifest says int64"):
        ArrayShards(root)
    np.save(root / "labels-00001.npy", np.zeros(30, np.int64))
    ArrayShards(root)  # sizes, shapes and dtypes are what the manifest says: opens without hashing
    with pytest.raises(ManifestError, match=r"labels-00001\.npy .*: SHA-256 checksum mismatch"):
        ArrayShards(root, verify=True)
    with open(root / "images-00002.npy", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"images-00002\.npy .*: 5889 bytes on disk, the manifest says 5888"):
        ArrayShards(root)


def test_write_refuses_bad_input(tmp_path):
    images, labels = images_and_labels(10)
    with pytest.raises(TypeError, match="images must be a uint8 NHWC array, got dtype float32"):
        ArrayShards.write(tmp_path, images.astype(np.float32), labels)
    with pytest.raises(TypeError, match="images must be a uint8 NHWC array, got dtype uint8, shape \\(10, 8, 8\\)"):
        ArrayShards.write(tmp_path, images[..., 0], labels)
    with pytest.raises(TypeError, match="labels must be a 1-D integer array, got dtype float64"):
        ArrayShards.write(tmp_path, images, labels.astype(float))
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        ArrayShards.write(tmp_path, images, labels[:9])
    with pytest.raises(ValueError, match="shard_size must be a positive int, got 0"):
        ArrayShards.write(tmp_path, images, labels, shard_size=0)
    ArrayShards.write(tmp_path, images, labels, shard_size=3)
    with pytest.raises(FileExistsError, match="manifest.json exists"):
        ArrayShards.write(tmp_path, images, labels)
    again = ArrayShards.write(tmp_path, images, labels.astype(np.uint8), shard_size=5, overwrite=True)
    assert len(again.shard_images) == 2 and not (tmp_path / "images-00003.npy").exists()  # stale shards removed


# ----- transforms ---------------------------------------------------------------------------------


def reference_chain(images, rng, steps, mean, std):
    """torchvision's semantics in plain NumPy, drawing parameters in the transforms' order from ``rng``."""
    x = images
    for step in steps:
        if step[0] == "crop":
            _, size, pad = step
            padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # zero padding
            top = rng.integers(0, padded.shape[1] - size + 1, size=len(x))
            left = rng.integers(0, padded.shape[2] - size + 1, size=len(x))
            x = np.stack([p[t : t + size, s : s + size] for p, t, s in zip(padded, top, left)])
        else:
            flip = rng.random(len(x)) < step[1]
            x = np.stack([img[:, ::-1] if f else img for img, f in zip(x, flip)])
    x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return (x - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]


CHAINS = {
    "crop-flip": [("crop", 6, 2), ("flip", 0.5)],
    "flip-crop": [("flip", 0.5), ("crop", 10, 3)],
    "crop": [("crop", 8, 1)],
    "flip": [("flip", 0.7)],
    "none": [],
}


def build(steps, mean=MEAN, std=STD, seed=5, fusible=True):
    made = [T.RandomCrop(s[1], padding=s[2]) if s[0] == "crop" else T.RandomHorizontalFlip(s[1]) for s in steps]
    tail = [T.Lambda(lambda a: a)] if not fusible else []  # an opaque step turns fusion off
    return T.Compose(made + [T.ToTensor(), T.Normalize(mean, std)] + tail, seed=seed)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_the_fused_chain_is_bit_equal_to_the_chain_step_by_step_and_to_torchs_semantics(name):
    images, _ = images_and_labels(64, height=8, width=9)
    fused, unfused = build(CHAINS[name]), build(CHAINS[name], fusible=False)
    assert fused.fused is not None and unfused.fused is None
    got = fused(images, key=(0, 1, 2))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, unfused(images, key=(0, 1, 2)))
    want = reference_chain(images, np.random.default_rng([5, 0, 1, 2]), CHAINS[name], MEAN, STD)
    assert np.array_equal(got, want)
    assert np.array_equal(fused(images[3], key=(0, 1, 2)).shape, want[0].shape)  # one HWC image -> CHW


def test_each_transform_alone_follows_torchvision():
    images, _ = images_and_labels(16)
    flipped = T.RandomHorizontalFlip(p=1.0)(images)
    assert flipped.dtype == np.uint8 and np.array_equal(flipped, images[:, :, ::-1])
    assert np.array_equal(T.RandomHorizontalFlip(p=0.0)(images), images)
    crop = T.RandomCrop(4, padding=0, seed=1)(images, key=(3,))
    rng = np.random.default_rng([1, 3])
    top, left = rng.integers(0, 5, 16), rng.integers(0, 5, 16)
    assert np.array_equal(crop, np.stack([im[t : t + 4, s : s + 4] for im, t, s in zip(images, top, left)]))
    padded = T.RandomCrop(12, padding=2)(images)  # the whole padded image: a zero border of 2
    assert padded.shape == (16, 12, 12, 3) and not padded[:, :2].any() and np.array_equal(padded[:, 2:10, 2:10], images)
    tensor = T.ToTensor()(images)
    assert tensor.shape == (16, 3, 8, 8) and np.array_equal(tensor, images.transpose(0, 3, 1, 2) / np.float32(255))
    normalized = T.Normalize(MEAN, STD)(tensor)  # NCHW: per channel of dim 1
    assert np.array_equal(normalized[:, 1], (tensor[:, 1] - np.float32(MEAN[1])) / np.float32(STD[1]))


def test_transform_errors_name_the_transform_and_value():
    images, _ = images_and_labels(4)
    with pytest.raises(ValueError, match=r"RandomCrop: required crop size \(13, 13\) is larger than the padded"):
        T.RandomCrop(13, padding=2)(images)
    with pytest.raises(TypeError, match="RandomCrop: expected uint8 images"):
        T.RandomCrop(4)(images.astype(np.float32))
    with pytest.raises(ValueError, match="RandomHorizontalFlip: p must be a probability in \\[0, 1\\], got 2"):
        T.RandomHorizontalFlip(2)
    with pytest.raises(ValueError, match="RandomCrop: padding must be a non-negative int, got -1"):
        T.RandomCrop(4, padding=-1)
    with pytest.raises(ValueError, match="Compose: key must be a tuple of non-negative ints"):
        fusible_chain()(images, key=(-1,))
    with pytest.raises(ValueError, match="Normalize: mean and std must be finite"):
        T.Normalize([float("nan")], [1.0])
    with pytest.raises(ValueError, match="Normalize: 2 channel values do not fit images of 3 channels"):
        T.Compose([T.ToTensor(), T.Normalize([0.0, 0.0], 1.0)])(images)


def test_draws_repeat_per_key_and_differ_by_rank_epoch_and_batch(shards):
    ds, _, _ = shards
    ds.transform = fusible_chain()
    index = np.arange(40)
    first = ds.get_batch(index, key=(0, 0, 0, 0))[0].data
    assert np.array_equal(first, ds.get_batch(index, key=(0, 0, 0, 0))[0].data)
    for other in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]:
        assert not np.array_equal(first, ds.get_batch(index, key=other)[0].data), other


def test_the_loader_keys_each_batch_by_rank_epoch_and_pass(tmp_path):
    """Identical images everywhere, so only the crops can tell batches apart."""
    images = np.repeat(images_and_labels(1)[0], 64, axis=0)
    ds = ArrayShards.write(tmp_path, images, np.zeros(64, np.int64), shard_size=16)
    ds.transform = fusible_chain()

    def batches(rank, epoch=0, passes=1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=False)
        sampler.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=8, sampler=sampler)
        return [b[0].data for _ in range(passes) for b in loader]

    base = batches(0)
    assert all(np.array_equal(a, b) for a, b in zip(base, batches(0)))  # a second run repeats exactly
    assert not np.array_equal(base[0], base[1])  # batch number
    assert not np.array_equal(base[0], batches(1)[0])  # rank
    assert not np.array_equal(base[0], batches(0, epoch=1)[0])  # sampler epoch
    assert not np.array_equal(base[0], batches(0, passes=2)[4])  # the loader's pass


def test_the_kernels_release_the_gil_and_use_the_disk_cache():
    for kernel in (kernels.fused_to_float_nchw, kernels.affine_u8, kernels.gather_rows_u8, kernels.gather_labels):
        assert kernel.targetoptions.get("nogil") is True
        assert type(kernel._cache).__name__ == "FunctionCache"  # cache=True


# ----- zero copy ----------------------------------------------------------------------------------


def test_the_fused_kernel_reads_the_memory_map_itself(shards, monkeypatch):
    ds, _, _ = shards
    ds.transform = fusible_chain()
    sources = []
    real = kernels.fused_to_float_nchw

    def spy(src, *args):
        sources.append(src)
        return real(src, *args)

    monkeypatch.setattr(kernels, "fused_to_float_nchw", spy)
    ds.get_batch(np.array([5, 70, 40, 6]))
    assert len(sources) == 3 and all(any(s is m for m in ds.shard_images) for s in sources)


def test_no_batch_sized_array_but_the_output_is_allocated(tmp_path):
    """tracemalloc sees NumPy's allocations: gathering a 256-image batch through the fused chain into a given
    buffer allocates well under one uint8 copy of the batch (786 KB), so nothing was staged on the way."""
    images, labels = images_and_labels(1024, height=32, width=32, seed=1)
    ds = ArrayShards.write(tmp_path, images, labels, shard_size=300)
    ds.transform = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)], seed=0
    )
    index = np.random.default_rng(0).permutation(1024)[:256]
    out = np.empty((256, 3, 32, 32), np.float32)
    ds.get_batch(index, out=out)  # compile and warm outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        batch, _ = ds.get_batch(index, key=(0, 0, 0, 1), out=out)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert np.shares_memory(batch.data, out)
    assert peak < 256 * 32 * 32 * 3 // 8, f"{peak} bytes allocated while gathering"
    unfused = T.Compose(ds.transform.transforms + [T.Lambda(lambda a: a)], seed=0)
    assert np.array_equal(out, unfused(images[index], key=(0, 0, 0, 1)))


# ----- prefetch -----------------------------------------------------------------------------------


def test_prefetch_gives_the_same_batches_and_resumes_exactly(shards):
    ds, _, _ = shards
    ds.transform = fusible_chain()

    def run(prefetch, resume_after=None):
        loader = DataLoader(ds, batch_size=16, shuffle=True, seed=4, prefetch=prefetch)
        out = []
        for _ in range(2):
            for x, y in loader:
                out.append((x.data.copy(), y.data.copy()))
                if resume_after is not None and len(out) == resume_after:
                    state = loader.state_dict()
                    loader = DataLoader(ds, batch_size=16, shuffle=True, seed=99, prefetch=prefetch)
                    loader.load_state_dict(state)
                    resume_after = None
                    break
            else:
                continue
            for x, y in loader:  # the rest of the interrupted pass
                out.append((x.data.copy(), y.data.copy()))
        return out

    serial = run(0)
    assert len(serial) == 14
    for other in (run(2), run(1, resume_after=3), run(0, resume_after=9)):
        assert len(other) == len(serial)
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(serial, other))
    assert not prefetch_threads()


class SlowDataset:
    """A batched dataset whose fetch sleeps (the GIL is free meanwhile), optionally failing at one batch."""

    batched_getitem = True

    def __init__(self, n=40, delay=0.0, fail_at=None):
        self.n, self.delay, self.fail_at, self.fetched = n, delay, fail_at, 0

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        time.sleep(self.delay)
        if self.fail_at is not None and self.fetched == self.fail_at:
            raise_in_producer()
        self.fetched += 1
        return np.asarray(index, dtype=np.float32), np.asarray(index, dtype=np.int64)


def raise_in_producer():
    raise RuntimeError("broken shard row")


def test_prefetch_stops_its_thread_when_the_loop_stops_early():
    loader = DataLoader(SlowDataset(), batch_size=2, prefetch=3)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    gc.collect()
    assert not prefetch_threads()
    iterator = iter(loader)
    next(iterator)
    del iterator  # dropped mid-pass without close()
    gc.collect()
    assert not prefetch_threads()
    with pytest.raises(ZeroDivisionError):
        for _ in loader:
            1 / 0  # noqa: B018 - an error in the loop body
    gc.collect()
    assert not prefetch_threads()


def test_an_error_in_the_producer_is_raised_in_the_loop_with_its_traceback():
    loader = DataLoader(SlowDataset(fail_at=3), batch_size=2, prefetch=2)
    got = []
    with pytest.raises(RuntimeError, match="broken shard row") as info:
        for x, _ in loader:
            got.append(x)
    assert len(got) == 3
    assert any(entry.name == "raise_in_producer" for entry in info.traceback)
    gc.collect()
    assert not prefetch_threads()


def test_prefetch_overlaps_fetching_with_the_loop():
    """10 ms to fetch, 10 ms of "training" per batch: serial takes the sum, prefetch about the larger."""

    def elapsed(prefetch):
        loader = DataLoader(SlowDataset(n=40, delay=0.01), batch_size=2, prefetch=prefetch)
        t0 = time.perf_counter()
        for _ in loader:
            time.sleep(0.01)
        return time.perf_counter() - t0

    serial, overlapped = elapsed(0), elapsed(2)
    assert overlapped < 0.75 * serial, (serial, overlapped)


class SpanRecorder:
    def __init__(self):
        self.spans = []

    def data_done(self, t0, t1):
        self.spans.append(t1 - t0)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_the_data_span_is_the_time_the_loop_waited(monkeypatch, prefetch):
    from mpnn.telemetry import instrument

    recorder = SpanRecorder()
    monkeypatch.setattr(instrument, "_installed", recorder)
    for _ in DataLoader(SlowDataset(n=12, delay=0.02), batch_size=2, prefetch=prefetch):
        pass  # a loop faster than the data: it waits ~20 ms for each batch
    assert len(recorder.spans) == 6 and min(recorder.spans) > 0.012, recorder.spans
    recorder.spans.clear()
    for _ in DataLoader(SlowDataset(n=12, delay=0.005), batch_size=2, prefetch=prefetch):
        time.sleep(0.03)  # a loop slower than the data: with prefetch the batch is ready (no wait)
    waited = sorted(recorder.spans)[len(recorder.spans) // 2]
    assert (waited < 0.003) if prefetch else (waited > 0.004), recorder.spans


def test_an_abandoned_prefetch_thread_does_not_hold_up_interpreter_exit(tmp_path):
    script = tmp_path / "abandon.py"
    script.write_text(
        "import time\n"
        "import numpy as np\n"
        "from mpnn.data import DataLoader, TensorDataset\n"
        "class Slow(TensorDataset):\n"
        "    def __getitem__(self, index):\n"
        "        time.sleep(0.05)\n"
        "        return super().__getitem__(index)\n"
        "loader = DataLoader(Slow(np.zeros((1000, 2), np.float32)), batch_size=1, prefetch=4)\n"
        "kept = iter(loader)\n"
        "next(kept)\n"
        "print('exiting', flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
    assert time.perf_counter() - t0 < 30
