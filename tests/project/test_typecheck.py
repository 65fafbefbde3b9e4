"""The type checker runs with the tests (README's test command is what CI runs): mypy, configured in
pyproject.toml ([tool.mypy] names the packages it checks)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_finds_nothing():
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed: bash tools/install.sh installs it (pinned in constraints.txt)")
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
