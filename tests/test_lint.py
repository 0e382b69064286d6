"""Lint, format and types as part of the README's test command (issue 11): `ruff check` and `ruff format --check`
over the code and `mypy` over the packages pyproject.toml's [tool.mypy] lists (mpnn/comm, mpnn/launch so far).
Both come with the `test` extra. They run as subprocesses with their configuration from pyproject.toml; a failure
shows the tool's own report. Neither writes a cache into the working tree (ruff --no-cache; mypy's cache in a temp
dir)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mpnn

REPO = Path(__file__).resolve().parents[1]
LINTED = ["mpnn", "tests", "benchmarks", "launch"]
TYPED = ["mpnn/comm", "mpnn/launch"]
TIMEOUT_S = 120  # a cold mypy run takes ~10 s on the 2-core dev machine; ruff well under 1 s


def run_tool(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)


def tool(module: str, executable: str) -> list[str]:
    """`python -m <module>` when importable in this interpreter (the `test` extra installs it), else the
    executable on PATH; skip when neither is there (an install without the `test` extra)."""
    try:
        importlib.metadata.version(module)
        return [sys.executable, "-m", module]
    except importlib.metadata.PackageNotFoundError:
        found = shutil.which(executable)
        if found is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[test]'")
        return [found]


def test_ruff_check():
    result = run_tool(tool("ruff", "ruff") + ["check", "--no-cache", "--output-format", "concise", *LINTED])
    if result.returncode != 0:
        pytest.fail(f"ruff check {' '.join(LINTED)} found problems:\n{result.stdout}{result.stderr}", pytrace=False)


def test_ruff_format():
    result = run_tool(tool("ruff", "ruff") + ["format", "--check", "--no-cache", *LINTED])
    if result.returncode != 0:
        pytest.fail(
            f"ruff format --check {' '.join(LINTED)}: run `ruff format {' '.join(LINTED)}`:\n"
            f"{result.stdout}{result.stderr}",
            pytrace=False,
        )


def test_mypy(tmp_path):
    result = run_tool(
        tool("mypy", "mypy")
        + ["--cache-dir", str(tmp_path / "mypy"), "--no-error-summary", "--hide-error-context", *TYPED]
    )
    if result.returncode != 0:
        pytest.fail(f"mypy {' '.join(TYPED)} found problems:\n{result.stdout}{result.stderr}", pytrace=False)


def test_one_version_source():
    """mpnn/_version.py is the one place the version is written: the package and the installed metadata (which
    pyproject.toml's dynamic version reads from it) agree, and pyproject.toml does not repeat it."""
    from mpnn._version import __version__

    assert mpnn.__version__ == __version__ == importlib.metadata.version("mpnn")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and f'"{__version__}"' not in pyproject
