"""Same-host all-reduce through shared memory: copy in, reduce your own segment, copy out.

Measured on the 2-core machine (2 ranks, 16 MB float32): the socket ring spends ~7.5-9 ms of CPU per rank
(two kernel copies per byte plus the user-space add/copy), this path ~4.8 ms (copy in, one reduction pass, copy
out), and 1 MB ran at ~2.7 GB/s against ~1.4 GB/s. A "sync" (every rank reached this point) is a mailbox
synchronisation point when the world uses mailboxes (mailbox.py: shared counters waited for by spinning briefly,
then by blocking on a futex, so a loaded machine's cores go to work, not to waiting), else
an empty frame passed n-1 hops around the ring; both carry the all-reduce's header, so mismatches, timeouts and
aborts behave exactly as on the socket path.

Each rank owns one file in /dev/shm (0600, created O_EXCL|O_NOFOLLOW under a random name, space reserved with
posix_fallocate so a full tmpfs fails at startup instead of with SIGBUS later), holding two slots of BLOCK_BYTES.
The name is never computable from what the run publishes: under `mpnn launch` it lies in the attempt's private
/dev/shm/mpnn-XXXXXXXX/ directory (MPNN_SHM_DIR, removed by the launcher and its guardian after any end), else
it is /dev/shm/mpnn-<32 random hex>-r<rank>. Peers learn it from the authenticated rendezvous (the "shm" entry
of each rank's table row). A name that exists already is an error, never a silent fallback to sockets.

Buffers go through in blocks; block k uses slot k % 2. Rank r rewrites a slot only after passing the first sync
of the block before, which every rank enters only after finishing the block before that, so nobody still reads
it. Files are unlinked as soon as every rank has mapped them (a rank killed before that leaves its file to the
launcher's cleanup of MPNN_SHM_DIR). After the two slots each file holds the rank's mailbox for small
all-reduces (mailbox.py).
"""

import mmap
import os
import secrets

import numpy as np

from .mailbox import MAILBOX_BYTES

BLOCK_BYTES = 4 * 1024 * 1024
SHM_DIR = "/dev/shm"


class SharedSlots:
    """This rank's two shared slots and, once attached, views of every rank's."""

    def __init__(self, rank, directory=None, block_bytes=BLOCK_BYTES):
        """Create this rank's file under a fresh random name: in `directory` (a private directory of this user,
        e.g. the launcher's MPNN_SHM_DIR) or else directly in /dev/shm. FileExistsError (naming the path) if the
        name is taken; other OSErrors (no /dev/shm, no room) as they come."""
        self.rank, self.block_bytes = rank, block_bytes
        self.file_bytes = 2 * block_bytes + MAILBOX_BYTES
        token = secrets.token_hex(16)
        name = f"r{rank}-{token}" if directory else f"mpnn-{token}-r{rank}"
        self.path = os.path.join(directory or SHM_DIR, name)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise FileExistsError(
                f"rank {rank}: the shared-memory name {self.path} is taken (someone created it first); not using it"
            ) from None
        try:
            os.posix_fallocate(fd, 0, self.file_bytes)
            self._maps = {rank: mmap.mmap(fd, self.file_bytes)}
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.counter = 0  # blocks done so far: block k uses slot k % 2
        self.bytes_sent = self.bytes_recv = 0  # payload other ranks read from this rank's slots / it read from theirs

    def attach(self, paths):
        """Map every other rank's file (paths[rank]); they must be private files of this user of the right size."""
        for rank, path in enumerate(paths):
            if rank == self.rank:
                continue
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                info = os.fstat(fd)
                if info.st_uid != os.getuid() or info.st_mode & 0o077 or info.st_size != self.file_bytes:
                    raise PermissionError(
                        f"shared-memory file {path} of rank {rank} is not a private "
                        f"{self.file_bytes}-byte file of this user"
                    )
                self._maps[rank] = mmap.mmap(fd, self.file_bytes)
            finally:
                os.close(fd)

    def unlink(self):
        """Remove this rank's file name (the mappings stay valid)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def slot(self, rank, parity, dtype, count):
        """The first `count` items of `rank`'s slot `parity` as a `dtype` array."""
        return np.frombuffer(self._maps[rank], dtype, count, parity * self.block_bytes)

    def region(self, rank, offset, nbytes):
        """`nbytes` bytes of `rank`'s mailbox region, from `offset`, as a uint8 array."""
        return np.frombuffer(self._maps[rank], np.uint8, nbytes, 2 * self.block_bytes + offset)

    def close(self):
        """Drop the mappings (views into them must be gone) and the file name."""
        self.unlink()
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes when it does
        self._maps.clear()


def sync(link):
    """Return once every rank has reached the same point: an empty frame travels n-1 hops around the ring."""
    empty = np.empty(0, np.uint8)
    link.send(empty)
    for k in range(link.world_size - 1):
        link.recv_into(empty)
        if k < link.world_size - 2:
            link.send(empty)


def allreduce(link, slots, flat, ufunc, accumulate, divide_by, mailboxes=None):
    """All-reduce the flat contiguous `flat` in place block by block through the shared slots.
    Rank r reduces segment r of each block: its own data first, then the others' in rank order, in the
    `accumulate` dtype, divided by `divide_by` if given; every rank then copies every segment out.
    Synchronisation points go through `mailboxes` (mailbox.Mailboxes.sync) when given, else around the ring."""
    wait_for_all = mailboxes.sync if mailboxes is not None else (lambda: sync(link))
    n, r = link.world_size, link.rank
    per_block = slots.block_bytes // flat.itemsize
    for low in range(0, max(flat.size, 1), per_block):
        high = min(low + per_block, flat.size)
        count = high - low
        parity = slots.counter % 2
        slots.counter += 1
        views = [slots.slot(rank, parity, flat.dtype, count) for rank in range(n)]
        views[r][:] = flat[low:high]
        wait_for_all()
        bounds = [(count * i // n, count * (i + 1) // n) for i in range(n)]
        start, stop = bounds[r]
        own = views[r][start:stop]
        total = own if accumulate == flat.dtype else own.astype(accumulate)
        for rank in range(n):
            if rank != r:
                ufunc(total, views[rank][start:stop], out=total)
        if divide_by:
            np.divide(total, divide_by, out=total)
        if total is not own:
            own[:] = total
        mine, others = (stop - start) * flat.itemsize, (count - (stop - start)) * flat.itemsize
        slots.bytes_sent += others + mine * (n - 1)  # they reduce their segments of my block, then copy my result
        slots.bytes_recv += mine * (n - 1) + others  # I reduce my segment of theirs, then copy their results
        wait_for_all()
        for rank, (start, stop) in enumerate(bounds):
            flat[low + start : low + stop] = views[rank][start:stop]
