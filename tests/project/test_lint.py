"""Lint runs with the tests (the README's test command is what CI runs): ruff, configured in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: bash tools/install.sh installs it (pinned in constraints.txt)")
    run = subprocess.run(
        [ruff, "check", "megaphi", "tests", "tools", "benchmarks", "setup.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_tree_is_formatted():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: bash tools/install.sh installs it (pinned in constraints.txt)")
    run = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, "run `ruff format .`: " + run.stdout[-4000:] + run.stderr[-2000:]
