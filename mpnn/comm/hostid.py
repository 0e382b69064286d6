"""Which machine a rank runs on, for the same-host paths (ipc sockets, /dev/shm slots, mailboxes): the host name
and the kernel's boot id (/proc/sys/kernel/random/boot_id, new at every boot and different on every machine).
The host name alone is not enough: containers on different machines can share one (a pod template, a fixed
--hostname), and would then pick shared memory between machines."""

from __future__ import annotations

import socket

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This kernel's boot id, None where there is no /proc (then the host name alone decides)."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


def host_identity() -> str:
    """'<host name> boot <boot id>' (or the host name alone without a boot id): equal only on one machine."""
    found = boot_id()
    name = socket.gethostname()
    return f"{name} boot {found}" if found else name
