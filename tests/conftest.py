"""Shared test setup: each test starts with the thread's default float environment (gradual underflow), even when
an earlier test in this process called mpnn.init(), which turns flush-to-zero on for its thread."""

import pytest

from mpnn.core.fpenv import set_flush_denormal


@pytest.fixture(autouse=True)
def gradual_underflow():
    set_flush_denormal(False)
    yield
    set_flush_denormal(False)
