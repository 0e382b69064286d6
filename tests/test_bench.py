"""mpnn bench allreduce: size parsing (good and bad values), the timing protocol against a fake communicator, and
the command end to end on real workers, its figures checked against each other (bandwidth = bytes / time)."""

import json
import re

import pytest
from click.testing import CliRunner

from mpnn.bench import auto_iters, format_size, parse_size, parse_sizes, time_allreduce
from mpnn.bench_cli import bench

KB, MB, GB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("4KB", 4 * KB),
        ("1MB", MB),
        ("16mb", 16 * MB),
        ("64MB", 64 * MB),
        ("1GB", GB),
        ("512B", 512),
        ("512", 512),
        ("1.5KB", 1536),
        (" 2 kb ", 2 * KB),
        (".5MB", MB // 2),
        ("3.KB", 3 * KB),
    ],
)
def test_parse_size_accepts_units_in_powers_of_1024(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "KB", "4XB", "4 K B", "-1KB", "1e3", "4KB5", "0", "0KB", "0.3B", "1.1B", "four"])
def test_parse_size_rejects_garbage_naming_it(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_size(text)


def test_parse_sizes_splits_on_commas_and_names_the_bad_entry():
    assert parse_sizes("4KB,1MB,16MB,64MB") == [4 * KB, MB, 16 * MB, 64 * MB]
    with pytest.raises(ValueError, match="'oops'"):
        parse_sizes("4KB,oops,1MB")
    with pytest.raises(ValueError, match="''"):
        parse_sizes("4KB,,1MB")


@pytest.mark.parametrize(
    "nbytes, text",
    [(512, "512B"), (4 * KB, "4KB"), (1536, "1.5KB"), (MB, "1MB"), (64 * MB, "64MB"), (2 * GB, "2GB"), (1000, "1000B")],
)
def test_format_size_is_exact_and_parses_back(nbytes, text):
    assert format_size(nbytes) == text
    assert parse_size(text) == nbytes


def test_auto_iters_moves_about_a_gigabyte_within_bounds():
    assert [auto_iters(n) for n in (4 * KB, MB, 16 * MB, 64 * MB, GB)] == [200, 200, 64, 16, 10]


class FakeComm:
    """Records the collectives called, so the timing protocol can be checked without workers."""

    def __init__(self):
        self.calls = []

    def barrier(self):
        self.calls.append(("barrier",))

    def allreduce(self, a, op="sum"):
        assert (a == 1).all(), "every all-reduce must start from freshly filled ones"
        self.calls.append(("allreduce", a.size, a.dtype.name, op))
        a *= 2
        return a


def test_time_allreduce_warms_up_then_times_each_call_after_a_barrier():
    comm = FakeComm()
    timings = time_allreduce(comm, [64, 4 * KB], dtype="float64", op="max", iters=4, warmup=2)
    assert [count for count, _ in timings] == [4, 4]
    assert all(seconds > 0 for _, seconds in timings)
    expected = []
    for elements in (8, 512):
        expected += [("allreduce", elements, "float64", "max")] * 2
        expected += [("barrier",), ("allreduce", elements, "float64", "max")] * 4
    assert comm.calls == expected


def invoke(*args):
    return CliRunner().invoke(bench, ["allreduce", *args])


@pytest.mark.parametrize(
    "args, named",
    [
        (["--sizes", "4KB,1XB"], "'1XB'"),
        (["--sizes", "-4KB"], "'-4KB'"),
        (["--sizes", "3B"], "3B"),
        (["--dtype", "int32", "--op", "mean"], "'int32'"),
        (["--dtype", "complex64"], "'complex64'"),
    ],
)
def test_bad_arguments_end_in_one_error_line_naming_the_value(args, named):
    result = invoke("-n", "2", *args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and named in errors[0], result.output


def test_table_end_to_end_on_two_workers():
    result = invoke("-n", "2", "--sizes", "1KB,64KB", "--iters", "5", "--warmup", "1")
    assert result.exit_code == 0, result.output
    header, columns, *rows = result.stdout.splitlines()
    assert header.startswith("all-reduce: 2 ranks, float32 sum")
    assert columns.split() == ["size", "elements", "iters", "median", "us", "algbw", "GB/s", "busbw", "GB/s"]
    assert [row.split()[0] for row in rows] == ["1KB", "64KB"]
    for row, nbytes in zip(rows, (KB, 64 * KB)):
        _, elements, iters, micros, algbw, busbw = row.split()
        assert (int(elements), int(iters)) == (nbytes // 4, 5)
        assert float(micros) > 0
        # GB/s printed to 3 decimals, microseconds to 1: allow for the rounding of both
        expected = nbytes / (float(micros) * 1e-6) / 1e9
        # half a unit of the last printed digit of algbw, plus the relative error of micros' rounding
        tolerance = 5e-4 + expected * 0.05 / float(micros) + 1e-9
        assert abs(float(algbw) - expected) <= tolerance, (algbw, expected)
        assert float(busbw) == float(algbw)  # 2(n-1)/n = 1 for two ranks


def test_json_end_to_end_on_three_workers_has_consistent_bandwidths():
    result = invoke("-n", "3", "--sizes", "4KB,64KB", "--iters", "3", "--dtype", "float64", "--op", "mean", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {k: record[k] for k in ("collective", "world_size", "dtype", "op")} == {
        "collective": "allreduce",
        "world_size": 3,
        "dtype": "float64",
        "op": "mean",
    }
    assert [r["bytes"] for r in record["results"]] == [4 * KB, 64 * KB]
    assert [r["size"] for r in record["results"]] == ["4KB", "64KB"]
    for r in record["results"]:
        assert r["elements"] == r["bytes"] // 8 and r["iters"] == 3
        assert r["median_s"] > 0
        assert r["algbw_bytes_per_s"] == pytest.approx(r["bytes"] / r["median_s"], rel=1e-12)
        assert r["busbw_bytes_per_s"] == pytest.approx(r["algbw_bytes_per_s"] * 4 / 3, rel=1e-12)
