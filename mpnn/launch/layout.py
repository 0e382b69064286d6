"""The CPU layout Linux shows under /sys/devices/system/cpu (physical cores, SMT siblings, packages, NUMA nodes,
big.LITTLE capacities), kept to the cpus this process may use: what the pinning plan is made from."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Core:
    """One physical core: its usable hardware threads (SMT siblings, first one first) and where it sits."""

    cpus: tuple[int, ...]
    core_id: int | None = None
    package: int | None = None
    die: int | None = None
    cluster: int | None = None
    node: int | None = None  # NUMA node
    capacity: int | None = None  # cpu_capacity: 1024 on the biggest cores; smaller on big.LITTLE's LITTLE ones


@dataclass(frozen=True)
class Layout:
    """The usable online cpus grouped into physical cores; `unknown` says why the topology could not be read
    (then every cpu counts as a core of its own and nothing else is known)."""

    root: Path
    cpus: tuple[int, ...]
    cores: tuple[Core, ...]
    unknown: str | None = None

    @property
    def smt(self) -> bool:
        """Whether some usable core has more than one usable hardware thread."""
        return any(len(core.cpus) > 1 for core in self.cores)


class _Unreadable(Exception):
    """A sysfs file that is missing or holds something other than what the kernel writes there."""


def parse_cpu_list(text: str) -> list[int]:
    """The cpus of a kernel cpu list such as "0-3,8,10-11" (an empty list for an empty string)."""
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def format_cpu_list(numbers: Iterable[int]) -> str:
    """The kernel's compact form of a set of numbers: [0, 1, 2, 3, 8] -> "0-3,8"."""
    runs: list[list[int]] = []
    for number in sorted(set(numbers)):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def read_layout(root: Path = SYSFS_CPU, usable: Iterable[int] | None = None) -> Layout:
    """The layout of the `usable` cpus (default: this process's affinity mask) as sysfs under `root` shows it.

    Offline cpus are left out. A cpu without topology files (a container's sparse /sys, an odd kernel) makes the
    whole layout unknown: each usable cpu then counts as one core, and the plan falls back to round-robin.
    """
    root = Path(root)
    usable = sorted(os.sched_getaffinity(0) if usable is None else set(usable))
    try:
        online = set(parse_cpu_list(_read(root / "online")))
    except _Unreadable:
        online = set(usable)
    cpus = tuple(cpu for cpu in usable if cpu in online and _online(root, cpu)) or tuple(usable)
    try:
        cores = _cores(root, cpus)
    except _Unreadable as missing:
        return Layout(root, cpus, tuple(Core((cpu,)) for cpu in cpus), unknown=str(missing))
    return Layout(root, cpus, cores)


def _cores(root: Path, cpus: tuple[int, ...]) -> tuple[Core, ...]:
    usable = set(cpus)
    capacities = {cpu: _int_or_none(root / f"cpu{cpu}" / "cpu_capacity") for cpu in cpus}
    if None in capacities.values():
        capacities = dict.fromkeys(cpus)  # sizes known for only some cpus compare nothing: treat all as equal
    cores: list[Core] = []
    placed: set[int] = set()
    for cpu in cpus:
        if cpu in placed:
            continue  # a sibling of a core already made
        topology = root / f"cpu{cpu}" / "topology"
        siblings_file = topology / "core_cpus_list"
        if not siblings_file.exists():
            siblings_file = topology / "thread_siblings_list"  # the older name of the same list
        threads = tuple(sorted((set(_cpu_list(siblings_file)) | {cpu}) & usable - placed))
        placed.update(threads)
        package = _int_or_none(topology / "physical_package_id")
        cores.append(
            Core(
                cpus=threads,
                core_id=_int_or_none(topology / "core_id"),
                package=package if package is not None else _int_or_none(topology / "package_id"),
                die=_int_or_none(topology / "die_id"),
                cluster=_int_or_none(topology / "cluster_id"),
                node=_numa_node(root / f"cpu{cpu}"),
                capacity=capacities[cpu],
            )
        )
    return tuple(cores)


def _online(root: Path, cpu: int) -> bool:
    try:
        return _read(root / f"cpu{cpu}" / "online").strip() != "0"
    except _Unreadable:
        return True  # cpu0 often has no online file: it cannot be taken offline


def _numa_node(cpu_dir: Path) -> int | None:
    try:
        nodes = [entry.name[4:] for entry in cpu_dir.iterdir() if entry.name.startswith("node")]
    except OSError:
        return None
    return int(nodes[0]) if len(nodes) == 1 and nodes[0].isdigit() else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise _Unreadable(f"cannot read {path}: {e.strerror or e}") from None


def _cpu_list(path: Path) -> list[int]:
    text = _read(path)
    try:
        return parse_cpu_list(text)
    except ValueError:
        raise _Unreadable(f"{path} holds {text.strip()!r}, not a cpu list") from None


def _int_or_none(path: Path) -> int | None:
    try:
        return int(_read(path))
    except (_Unreadable, ValueError):
        return None


def format_layout(layout: Layout) -> str:
    """The layout as `mpnn launch --print-layout` shows it: one row per usable cpu, then a summary line."""
    header = f"layout of the {len(layout.cpus)} usable cpus ({format_cpu_list(layout.cpus)}) from {layout.root}"
    if layout.unknown:
        return f"{header}\n  topology unknown ({layout.unknown}): each cpu counts as one core"
    rows = [("cpu", "core", "siblings", "package", "die", "cluster", "node", "capacity")]
    for core in layout.cores:
        for cpu in core.cpus:
            rows.append(
                (
                    str(cpu),
                    _show(core.core_id),
                    format_cpu_list(core.cpus),
                    _show(core.package),
                    _show(core.die),
                    _show(core.cluster),
                    _show(core.node),
                    _show(core.capacity),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    packages = {core.package for core in layout.cores}
    capacities = sorted({core.capacity for core in layout.cores if core.capacity is not None}, reverse=True)
    summary = (
        f"  {len(layout.cores)} physical cores, {'SMT' if layout.smt else 'no SMT'}, "
        f"{len(packages)} package{'s' if len(packages) > 1 else ''}, capacities "
        f"{', '.join(map(str, capacities)) if capacities else 'not shown'}"
    )
    return "\n".join([header, *table, summary])


def _show(value: int | None) -> str:
    return "-" if value is None else str(value)
