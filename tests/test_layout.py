"""The cpu layout read from fake sysfs trees (SMT x86, ARM big.LITTLE, two packages, a sparse /sys, a narrowed
affinity mask), the pinning plan made from it with its warnings, and `mpnn launch --print-layout` on this machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mpnn.cli import main
from mpnn.launch.layout import Core, format_cpu_list, format_layout, parse_cpu_list, read_layout
from mpnn.launch.pinning import default_nproc, layout_report, pin_plan, size_classes

REPO = Path(__file__).resolve().parents[1]


def add_cpu(
    root,
    cpu,
    core_id,
    siblings,
    package=0,
    node=0,
    capacity=None,
    cluster=None,
    siblings_file="core_cpus_list",
    package_file="physical_package_id",
):
    """Write cpu<cpu>/ as Linux does: topology files, the NUMA node link (a directory here), cpu_capacity."""
    topology = root / f"cpu{cpu}" / "topology"
    topology.mkdir(parents=True)
    files = {
        "core_id": core_id,
        package_file: package,
        "die_id": 0,
        siblings_file: siblings,
        "cluster_id": cluster if cluster is not None else core_id,
    }
    for name, value in files.items():
        (topology / name).write_text(f"{value}\n")
    (root / f"cpu{cpu}" / f"node{node}").mkdir()
    if capacity is not None:
        (root / f"cpu{cpu}" / "cpu_capacity").write_text(f"{capacity}\n")


def smt_x86(root, cpus=8):
    """4 cores x 2 threads, siblings 0,4 / 1,5 / 2,6 / 3,7 (Linux numbers first threads before second ones)."""
    half = cpus // 2
    for cpu in range(cpus):
        add_cpu(root, cpu, core_id=cpu % half, siblings=f"{cpu % half},{cpu % half + half}")
    (root / "online").write_text(f"0-{cpus - 1}\n")
    return root


def big_little(root):
    """ARM: cpus 0-3 LITTLE (capacity 446, cluster 0), 4-7 big (capacity 1024, cluster 1), no SMT."""
    for cpu in range(8):
        add_cpu(root, cpu, core_id=cpu % 4, siblings=str(cpu), capacity=446 if cpu < 4 else 1024, cluster=cpu // 4)
    (root / "online").write_text("0-7\n")
    return root


def test_cpu_lists_round_trip():
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("") == []
    assert format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpu_list([5]) == "5"


def test_smt_x86_one_worker_per_physical_core_first(tmp_path):
    layout = read_layout(smt_x86(tmp_path), usable=range(8))
    assert layout.unknown is None and layout.smt
    assert [core.cpus for core in layout.cores] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert default_nproc(layout) == 4
    plan = pin_plan(4, layout)
    assert plan.cpus == (0, 1, 2, 3) and plan.warnings == ()
    assert plan.why[1] == "first thread of core 1, package 0, node 0"

    plan = pin_plan(6, layout)
    assert plan.cpus == (0, 1, 2, 3, 4, 5)
    assert plan.why[5] == "SMT sibling of cpu 1 (core 1, package 0, node 0): more ranks than physical cores"
    assert plan.warnings == ("-n 6 is more than the 4 physical cores; ranks 4-5 run on SMT siblings of busy cores",)

    plan = pin_plan(9, layout)
    assert plan.cpus == (0, 1, 2, 3, 4, 5, 6, 7, 0)
    assert plan.why[8] == "shares cpu 0 with rank 0: more ranks than usable cpus"
    assert plan.warnings == ("-n 9 is more than the 8 usable cpus; workers will share cpus",)


def test_big_little_pins_big_cores_first_and_warns_on_mixed_sizes(tmp_path):
    layout = read_layout(big_little(tmp_path), usable=range(8))
    assert not layout.smt and [core.capacity for core in layout.cores] == [446] * 4 + [1024] * 4
    assert default_nproc(layout) == 4
    plan = pin_plan(4, layout)
    assert plan.cpus == (4, 5, 6, 7) and plan.warnings == ()

    plan = pin_plan(6, layout)
    assert plan.cpus == (4, 5, 6, 7, 0, 1)
    assert plan.warnings == (
        "ranks 0-3 on capacity 1024 (cpus 4-7), ranks 4-5 on capacity 446 (cpus 0-1): "
        "a straggler by construction, every step waits for the smaller cores",
    )


def test_near_equal_capacities_are_one_size():
    """Turbo-favoured cores (1024 vs 980) are one size; a LITTLE core (446) is another."""
    cores = tuple(Core((cpu,), capacity=capacity) for cpu, capacity in enumerate([980, 1024, 446, 1000]))
    assert list(size_classes(cores).values()) == [0, 0, 1, 0]
    assert list(size_classes(tuple(Core((cpu,)) for cpu in range(3))).values()) == [0, 0, 0]


def test_two_packages_are_filled_evenly_with_ranks_contiguous_per_package(tmp_path):
    """Cpus numbered across sockets (0,2 on package 0; 1,3 on package 1), old sysfs names, NUMA node per package."""
    for cpu in range(4):
        add_cpu(
            tmp_path,
            cpu,
            core_id=cpu // 2,
            siblings=str(cpu),
            package=cpu % 2,
            node=cpu % 2,
            siblings_file="thread_siblings_list",
            package_file="package_id" if cpu == 3 else "physical_package_id",
        )
    layout = read_layout(tmp_path, usable=range(4))
    assert [(core.package, core.node) for core in layout.cores] == [(0, 0), (1, 1), (0, 0), (1, 1)]
    assert pin_plan(2, layout).cpus == (0, 1)  # one on each package
    assert pin_plan(4, layout).cpus == (0, 2, 1, 3)  # ranks 0-1 on package 0, ranks 2-3 on package 1
    assert pin_plan(3, layout).cpus == (0, 2, 1)


def test_sparse_sysfs_falls_back_to_round_robin(tmp_path):
    (tmp_path / "cpu0").mkdir()
    (tmp_path / "cpu1").mkdir()  # a container's /sys: cpu directories, no topology, no online list
    layout = read_layout(tmp_path, usable=[0, 1])
    assert layout.unknown == f"cannot read {tmp_path}/cpu0/topology/thread_siblings_list: No such file or directory"
    assert [core.cpus for core in layout.cores] == [(0,), (1,)] and default_nproc(layout) == 2
    plan = pin_plan(3, layout)
    assert plan.cpus == (0, 1, 0) and plan.why[:2] == ("cpu 0", "cpu 1")
    assert plan.policy.startswith("round-robin over usable cpus (topology unknown: cannot read ")
    assert plan.warnings == ("-n 3 is more than the 2 usable cpus; workers will share cpus",)
    assert "topology unknown" in format_layout(layout)

    assert read_layout(tmp_path / "absent", usable=[3]).cores == (Core((3,)),)


def test_garbled_sibling_list_names_the_file(tmp_path):
    smt_x86(tmp_path)
    (tmp_path / "cpu2" / "topology" / "core_cpus_list").write_text("banana\n")
    layout = read_layout(tmp_path, usable=range(8))
    assert layout.unknown == f"{tmp_path}/cpu2/topology/core_cpus_list holds 'banana', not a cpu list"
    assert pin_plan(8, layout).cpus == tuple(range(8))


def test_inconsistent_sibling_lists_never_put_a_cpu_in_two_cores(tmp_path):
    smt_x86(tmp_path)
    (tmp_path / "cpu5" / "topology" / "core_cpus_list").write_text("5,6\n")  # cpu1 says 1,5; cpu6 says 2,6
    layout = read_layout(tmp_path, usable=range(8))
    assert [core.cpus for core in layout.cores] == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_affinity_mask_and_offline_cpus_narrow_the_layout(tmp_path):
    smt_x86(tmp_path)
    (tmp_path / "cpu3" / "online").write_text("0\n")
    (tmp_path / "online").write_text("0-2,4-7\n")
    layout = read_layout(tmp_path, usable=[1, 2, 3, 5, 6])  # e.g. taskset -c 1-3,5-6 with cpu3 taken offline
    assert layout.cpus == (1, 2, 5, 6)
    assert [core.cpus for core in layout.cores] == [(1, 5), (2, 6)]
    assert default_nproc(layout) == 2 and pin_plan(2, layout).cpus == (1, 2)
    plan = pin_plan(3, layout)
    assert plan.cpus == (1, 2, 5)
    assert plan.warnings == ("-n 3 is more than the 2 physical cores; ranks 2 run on SMT siblings of busy cores",)


def test_capacity_known_for_only_some_cpus_is_ignored(tmp_path):
    big_little(tmp_path)
    (tmp_path / "cpu0" / "cpu_capacity").unlink()
    layout = read_layout(tmp_path, usable=range(8))
    assert {core.capacity for core in layout.cores} == {None}
    assert default_nproc(layout) == 8 and pin_plan(8, layout).warnings == ()


def test_report_shows_layout_default_and_plan(tmp_path):
    report = layout_report(read_layout(big_little(tmp_path), usable=range(8)), 5)
    lines = report.splitlines()
    assert lines[0] == f"layout of the 8 usable cpus (0-7) from {tmp_path}"
    assert lines[1].split() == ["cpu", "core", "siblings", "package", "die", "cluster", "node", "capacity"]
    assert lines[2].split() == ["0", "0", "0", "0", "0", "0", "0", "446"]
    assert lines[10] == "  8 physical cores, no SMT, 1 package, capacities 1024, 446"
    assert lines[11] == "default -n: 4 (one worker per usable physical core of the biggest size)"
    assert lines[13] == "  rank 0 -> cpu 4  core 0, package 0, node 0, capacity 1024"
    assert lines[17] == "  rank 4 -> cpu 0  core 0, package 0, node 0, capacity 446"
    assert lines[-1].startswith("warning: ranks 0-3 on capacity 1024 (cpus 4-7), ranks 4 on capacity 446")


def test_print_layout_on_this_machine():
    """`mpnn launch --print-layout -n N` needs no script, starts nothing, shows every usable cpu and N ranks."""
    usable = sorted(os.sched_getaffinity(0))
    n = len(usable) + 1
    proc = subprocess.run(
        [sys.executable, "-m", "mpnn", "launch", "--print-layout", "-n", str(n)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    layout = read_layout()
    if layout.unknown is None:
        rows = {int(line.split()[0]) for line in lines[2 : 2 + len(usable)]}
        assert rows == set(usable)
    assert f"usable cpus ({format_cpu_list(usable)})" in lines[0]
    assert f"default -n: {default_nproc(layout)} (one worker per usable physical core of the biggest size)" in lines
    ranks = [line.split()[1:4] for line in lines if line.startswith("  rank ")]
    assert ranks == [[str(rank), "->", "cpu"] for rank in range(n)]
    plan = pin_plan(n, layout)
    assert [int(line.split()[4]) for line in lines if line.startswith("  rank ")] == list(plan.cpus)
    assert f"warning: -n {n} is more than the {len(usable)} usable cpus; workers will share cpus" in lines


@pytest.mark.parametrize("args", [[], ["-n", "2"]])
def test_launch_without_script_or_print_layout_is_a_usage_error(args):
    result = CliRunner().invoke(main, ["launch", *args])
    assert result.exit_code == 2 and "Missing argument 'SCRIPT'." in result.output
