"""Shared test setup: each test starts with the thread's default float environment (gradual underflow), even when
an earlier test in this process called mpnn.init(), which turns flush-to-zero on for its thread; and the test
process keeps glibc's default malloc thresholds (MPNN_KEEP_FREED_MEMORY=0), since mpnn.init() would otherwise pin
them for the whole process and later tests that judge this process's RSS (the watchdog's) would see earlier
tests' freed memory soak up their growth. tests/test_runtime.py checks the pinning in a process of its own."""

import os

import pytest

from mpnn.core.fpenv import set_flush_denormal

os.environ.setdefault("MPNN_KEEP_FREED_MEMORY", "0")


@pytest.fixture(autouse=True)
def gradual_underflow():
    set_flush_denormal(False)
    yield
    set_flush_denormal(False)
