"""Transparent TCP proxy that holds every chunk for a fixed delay before passing it on, run inside a router
namespace behind an iptables REDIRECT: the kernel has no netem qdisc, so this is how the tests add latency."""

import asyncio
import json
import signal
import socket
import struct
import sys
import time

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: the address a REDIRECTed connection was sent to


async def _pump(reader, writer, delay_s, stats, direction):
    """Copy reader to writer, each chunk sent `delay_s` after it arrived; order kept, chunks still pipelined."""
    queue = asyncio.Queue()

    async def deliver():
        while (item := await queue.get()) is not None:
            due, data = item
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(data)
            await writer.drain()
            stats[direction] += len(data)
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + delay_s, data))
    except OSError:
        pass  # a reset on one side ends this direction; the other side is closed after what was read
    queue.put_nowait(None)
    try:
        await sender
    except OSError:
        pass


async def _relay(client_reader, client_writer, delay_s, stats):
    """Connect to where the client meant to go and pump both ways with the delay."""
    raw = client_writer.get_extra_info("socket").getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!H4s", raw, 2)
    try:
        server_reader, server_writer = await asyncio.open_connection(socket.inet_ntoa(packed), port)
    except OSError:
        client_writer.close()
        return
    stats["connections"] += 1
    await asyncio.gather(
        _pump(client_reader, server_writer, delay_s, stats, "bytes_up"),
        _pump(server_reader, client_writer, delay_s, stats, "bytes_down"),
    )


async def main(port, delay_s, stats_path):
    """Serve on `port` until SIGTERM, then write {connections, bytes_up, bytes_down} as JSON to `stats_path`."""
    stats = {"connections": 0, "bytes_up": 0, "bytes_down": 0}
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(lambda r, w: _relay(r, w, delay_s, stats), "0.0.0.0", port)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    with open(stats_path, "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
