"""The lock file: every package tools/install.sh names is pinned, and check_constraints sees drift."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import check_constraints  # noqa: E402


def test_every_installed_package_is_pinned():
    pins = check_constraints.pinned_versions(ROOT / "constraints.txt")
    script = (ROOT / "tools" / "install.sh").read_text()
    named, continued = set(), False
    for line in script.splitlines():
        code = line.split("#", 1)[0]
        if '"${PIP[@]}"' in code or continued:
            for word in code.replace('"${PIP[@]}"', "").split():
                word = word.strip("'\"")
                match = re.match(r"[A-Za-z][A-Za-z0-9_.-]*", word)
                if match and not word.startswith("-"):
                    named.add(match.group(0))
        continued = code.rstrip().endswith("\\")
    named -= {"install"}
    assert {"pytest", "transformers", "numpy", "datasets"} <= named  # the parse above found the list
    missing = sorted(name for name in named if check_constraints.normalize(name) not in pins)
    assert not missing, f"install.sh installs unpinned packages: {missing}"
    assert "torch" not in pins  # pinned by MEGAPHI_TORCH_SPEC instead


def test_drift_is_reported(tmp_path):
    import pytest as installed_pytest

    lock = tmp_path / "constraints.txt"
    lock.write_text(f"# comment\npytest=={installed_pytest.__version__}\n\nno-such-package-xyz==1.0\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_constraints.py"), str(lock)], capture_output=True, text=True
    )
    assert run.returncode == 1 and "no-such-package-xyz missing (pinned 1.0)" in run.stderr
    assert run.stderr.startswith("1 package(s) differ")  # pytest matches its pin
    lock.write_text(f"pytest=={installed_pytest.__version__}\n")
    assert subprocess.run([sys.executable, str(ROOT / "tools" / "check_constraints.py"), str(lock)]).returncode == 0


def test_malformed_line_names_file_and_line(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("pytest>=8\n")
    with pytest.raises(SystemExit, match=r"constraints.txt:1: expected 'name==version'"):
        check_constraints.pinned_versions(lock)
