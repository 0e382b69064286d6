"""Which cpu each worker runs on (one per physical core, biggest cores first, spread over packages; SMT siblings
only when there are more workers than cores), and pinning a child to it from its first instruction (before it
imports NumPy, so BLAS and Numba see one cpu)."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from mpnn.launch.layout import Core, Layout, format_cpu_list, format_layout

SAME_SIZE_RATIO = 0.9  # capacities within 10% of the biggest in their class count as one size (turbo-favoured cores)


def usable_cores() -> list[int]:
    """The cpus this process may run on (its affinity mask, so taskset and cgroup limits count), sorted."""
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Plan:
    """The cpu of each local rank with the reason for it, the policy in words, and what to warn the user about."""

    cpus: tuple[int, ...]
    why: tuple[str, ...]
    policy: str
    warnings: tuple[str, ...] = ()

    def record(self) -> dict:
        """The plan as run.json's config "pinning" keeps it."""
        return {"policy": self.policy, "cpus": list(self.cpus), "why": list(self.why)}


def size_classes(cores: tuple[Core, ...]) -> dict[Core, int]:
    """Each core's size class, 0 for the biggest: a class holds the capacities down to SAME_SIZE_RATIO of its
    biggest, so big.LITTLE's kinds of core separate while favoured turbo cores and rounding do not."""
    capacities = sorted({core.capacity or 0 for core in cores}, reverse=True)
    heads: list[int] = []
    for capacity in capacities:
        if not heads or capacity < SAME_SIZE_RATIO * heads[-1]:
            heads.append(capacity)
    return {core: sum((core.capacity or 0) < SAME_SIZE_RATIO * head for head in heads) for core in cores}


def default_nproc(layout: Layout) -> int:
    """`mpnn launch`'s default -n: one worker per usable physical core of the biggest size (synchronous steps go at
    the pace of the slowest rank, so LITTLE cores and SMT siblings would only add stragglers)."""
    return list(size_classes(layout.cores).values()).count(0)


def pin_plan(nproc: int, layout: Layout) -> Plan:
    """The cpu of each of `nproc` local ranks on `layout`.

    Cpus are taken first thread of each physical core before any SMT sibling, biggest size class first, evenly
    over (package, NUMA node) domains; ranks are then numbered domain by domain, so ring neighbours share a package
    except at its edges. Past the usable cpus the plan repeats (workers share cpus). With no topology known this
    is plain round-robin over the usable cpus.
    """
    if nproc < 1:
        raise ValueError(f"-n {nproc}: must be at least 1")
    classes = size_classes(layout.cores)
    preference = []
    for level in range(max(len(core.cpus) for core in layout.cores)):
        for size in sorted(set(classes.values())):
            group = [core for core in layout.cores if classes[core] == size and len(core.cpus) > level]
            preference += [(core.cpus[level], core, level) for core in _spread(group)]
    slots = sorted(preference[:nproc], key=lambda slot: _domain(slot[1]))
    cpus, why = [], []
    for rank in range(nproc):
        cpu, core, level = slots[rank % len(slots)]
        cpus.append(cpu)
        if rank >= len(slots):
            why.append(f"shares cpu {cpu} with rank {rank % len(slots)}: more ranks than usable cpus")
        elif level:
            why.append(f"SMT sibling of cpu {core.cpus[0]} ({_where(core)}): more ranks than physical cores")
        else:
            why.append(("first thread of " if len(core.cpus) > 1 else "") + _where(core))
    return Plan(tuple(cpus), tuple(why), _policy(layout), _warnings(layout, slots, classes, nproc))


def _spread(cores: list[Core]) -> list[Core]:
    """`cores` taken in turn from each (package, NUMA node) domain, biggest capacity first within a domain."""
    by_domain = defaultdict(list)
    for core in sorted(cores, key=lambda core: (-(core.capacity or 0), core.cpus[0])):
        by_domain[_domain(core)].append(core)
    queues = [by_domain[domain] for domain in sorted(by_domain)]
    return [queue[turn] for turn in range(max(map(len, queues), default=0)) for queue in queues if turn < len(queue)]


def _domain(core: Core) -> tuple[int, int]:
    return (-1 if core.package is None else core.package, -1 if core.node is None else core.node)


def _where(core: Core) -> str:
    parts = [
        f"{name} {value}"
        for name, value in (
            ("core", core.core_id),
            ("package", core.package),
            ("node", core.node),
            ("capacity", core.capacity),
        )
        if value is not None
    ]
    return ", ".join(parts) or f"cpu {core.cpus[0]}"


def _policy(layout: Layout) -> str:
    if layout.unknown:
        return f"round-robin over usable cpus (topology unknown: {layout.unknown})"
    return (
        "one worker per physical core, biggest capacity first, spread evenly over packages and NUMA nodes "
        f"with ranks contiguous per package; SMT siblings only beyond {len(layout.cores)} physical cores"
    )


def _warnings(layout: Layout, slots: list, classes: dict[Core, int], nproc: int) -> tuple[str, ...]:
    warnings = []
    if nproc > len(layout.cpus):
        warnings.append(f"-n {nproc} is more than the {len(layout.cpus)} usable cpus; workers will share cpus")
    elif nproc > len(layout.cores):
        siblings = [rank for rank, (_, _, level) in enumerate(slots) if level]
        warnings.append(
            f"-n {nproc} is more than the {len(layout.cores)} physical cores; ranks "
            f"{format_cpu_list(siblings)} run on SMT siblings of busy cores"
        )
    ranks_by_size = defaultdict(list)
    for rank in range(nproc):
        ranks_by_size[classes[slots[rank % len(slots)][1]]].append(rank)
    if len(ranks_by_size) > 1:
        groups = []
        for size, ranks in sorted(ranks_by_size.items()):
            capacities = sorted({core.capacity or 0 for core in classes if classes[core] == size})  # all known here
            shown = str(capacities[0]) if len(capacities) == 1 else f"{capacities[0]}-{capacities[-1]}"
            cpus = format_cpu_list(slots[rank % len(slots)][0] for rank in ranks)
            groups.append(f"ranks {format_cpu_list(ranks)} on capacity {shown} (cpus {cpus})")
        warnings.append(", ".join(groups) + ": a straggler by construction, every step waits for the smaller cores")
    return tuple(warnings)


def layout_report(layout: Layout, nproc: int | None = None) -> str:
    """What `mpnn launch --print-layout` prints: the layout, the default -n, then the plan for `nproc` (default: the
    default -n) with the reason for each rank's cpu and the warnings a launch would print."""
    default = default_nproc(layout)
    plan = pin_plan(nproc or default, layout)
    width = len(str(max(plan.cpus)))
    lines = [
        format_layout(layout),
        f"default -n: {default} (one worker per usable physical core of the biggest size)",
        f"plan for -n {len(plan.cpus)}: {plan.policy}",
    ]
    lines += [f"  rank {rank} -> cpu {cpu:>{width}}  {why}" for rank, (cpu, why) in enumerate(zip(plan.cpus, plan.why))]
    lines += [f"warning: {warning}" for warning in plan.warnings]
    return "\n".join(lines)


@contextlib.contextmanager
def thread_pinned_to(core: int) -> Iterator[None]:
    """Pin the calling thread (only it: Linux affinity is per thread) to `core` for the block.

    A child forked inside inherits the mask before it runs any code, with no preexec_fn (unsafe while the
    launcher's output threads run); the launcher's other threads keep their masks.
    """
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
