"""Ring algorithms over a RingLink: pipelined reduce-scatter, all-gather, chain broadcast, variable-size pieces.

Buffers are flat, contiguous NumPy arrays split into world_size segments (np.array_split boundaries); each
segment moves in chunks, so a chunk is reduced (NumPy ufunc, memory-bound, nothing for Numba to win) and sent
on while the next chunk is still on the wire. Every step sends at least one frame, even for empty segments,
so each collective is checked against every neighbour's header. Rank r ends reduce-scatter owning segment r.
"""

import math

import numpy as np

CHUNK_BYTES = 512 * 1024


def split_bounds(total, parts):
    """(start, stop) of `parts` pieces of `total` items, in np.array_split order (the first ones one larger)."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def chunk_ranges(start, stop, step):
    """Chunks of [start, stop) of at most `step` items; an empty range still yields one empty chunk."""
    if stop <= start:
        return [(start, start)]
    return [(low, min(low + step, stop)) for low in range(start, stop, step)]


def chunk_items(array):
    """Items of `array`'s dtype per chunk."""
    return max(1, CHUNK_BYTES // array.itemsize)


def reduce_scatter(link, work, segments, ufunc):
    """Reduce `work` (flat, contiguous) across the ring in place; afterwards segments[rank] holds the full
    reduction on this rank (other segments hold partial sums)."""
    n, r = link.world_size, link.rank
    step = chunk_items(work)
    for low, high in chunk_ranges(*segments[(r - 1) % n], step):
        link.send(work[low:high])
    for k in range(n - 1):
        last = k == n - 2
        for low, high in chunk_ranges(*segments[(r - k - 2) % n], step):
            target = work[low:high]
            received = np.frombuffer(link.recv_frame(target.nbytes).buffer, work.dtype)  # ZeroMQ's buffer, no copy
            ufunc(target, received, out=target)
            if not last:
                link.send(target)


def allgather_segments(link, buf, segments):
    """Complete `buf` (flat, contiguous) on every rank when each rank r holds segments[r]: chunks received
    from the previous rank land in place and are forwarded unchanged."""
    n, r = link.world_size, link.rank
    step = chunk_items(buf)
    for low, high in chunk_ranges(*segments[r], step):
        link.send(buf[low:high])
    for k in range(n - 1):
        forward = k < n - 2
        for low, high in chunk_ranges(*segments[(r - k - 1) % n], step):
            link.recv_into(buf[low:high])
            if forward:
                link.send(buf[low:high])


def broadcast_chain(link, buf, root):
    """Copy the root's `buf` (flat, contiguous) to every rank along the ring root -> root+1 -> ... -> root-1.
    Ranks in the middle of the chain first send an empty "joined" frame, so a timeout names the silent rank."""
    n, r = link.world_size, link.rank
    position = (r - root) % n
    step = chunk_items(buf)
    chunks = chunk_ranges(0, buf.size, step)
    if 1 <= position <= n - 2:
        link.send(buf[:0])
    if position >= 2:
        link.recv_into(buf[:0])
    for low, high in chunks:
        if position > 0:
            link.recv_into(buf[low:high])
        if position < n - 1:
            link.send(buf[low:high])


def _recv_piece(link, dtype, forward):
    """Receive one variable-size piece (shape in its header) chunk by chunk; forward it if asked.
    Returns (origin rank, array)."""
    header, decoded, frame = link.recv_head()
    flat = np.empty(math.prod(decoded.call.shape), dtype)
    onward = link.header(decoded.origin, decoded.call.shape) if forward else None
    for index, (low, high) in enumerate(chunk_ranges(0, flat.size, chunk_items(flat))):
        if index == 0:
            link.payload_into(frame, flat[low:high])
        else:
            link.recv_into(flat[low:high], expected=header)
        if forward:
            link.send(flat[low:high], header=onward)
    return decoded.origin, flat.reshape(decoded.call.shape)


def _send_piece(link, flat, shape):
    header = link.header(link.rank, shape)
    for low, high in chunk_ranges(0, flat.size, chunk_items(flat)):
        link.send(flat[low:high], header=header)


def allgather_pieces(link, flat, shape):
    """Every rank's piece (same dtype, any shape) on every rank, in rank order."""
    n, r = link.world_size, link.rank
    pieces = [None] * n
    pieces[r] = flat.reshape(shape)
    _send_piece(link, flat, shape)
    for k in range(n - 1):
        origin, piece = _recv_piece(link, flat.dtype, forward=k < n - 2)
        pieces[origin] = piece
    return pieces


def broadcast_piece(link, flat, root, dtype):
    """The root's piece (any shape; `flat` is None elsewhere) on every rank, along the chain of broadcast_chain."""
    n, r = link.world_size, link.rank
    position = (r - root) % n
    if position == 0:
        _send_piece(link, flat, flat.shape)
        return flat
    empty = np.empty(0, dtype)
    if position <= n - 2:
        link.send(empty, header=link.header(r, (0,)))
    if position >= 2:
        _recv_piece(link, dtype, forward=False)
    return _recv_piece(link, dtype, forward=position < n - 1)[1]
