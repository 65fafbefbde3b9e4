"""The tools as installed commands (pyproject.toml [project.scripts] -> megaphi/cli and megaphi.pretrain),
the tools/*.py files as thin wrappers that import and call the cli mains, and the plotter (matplotlib,
run-named title)."""

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def console_scripts():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_every_console_script_has_a_main_with_help(capsys):
    scripts = console_scripts()
    assert {
        "megaphi-train",
        "megaphi-preprocess",
        "megaphi-convert",
        "megaphi-generate",
        "megaphi-eval",
        "megaphi-plot",
    } <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name


def test_tools_are_thin_wrappers_without_sys_path_edits():
    for name in os.listdir(os.path.join(REPO, "tools")):
        if name.endswith(".py"):
            source = open(os.path.join(REPO, "tools", name)).read()
            assert "sys.path" not in source and "exec(" not in source, name
    for target in console_scripts().values():
        module = target.split(":")[0]
        if module.startswith("megaphi.cli."):
            source = open(os.path.join(REPO, *module.split(".")) + ".py").read()
            assert "sys.path" not in source, module
            wrapper = os.path.join(REPO, "tools", module.rsplit(".", 1)[1] + ".py")
            assert os.path.exists(wrapper) and f"from {module} import main\n" in open(wrapper).read(), wrapper


def test_tool_wrapper_runs_the_cli_main():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "merge_datasets.py"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("megaphi-merge-datasets "), out.stderr


def test_installed_commands_run():
    installed = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
    if "megaphi-plot" not in installed or shutil.which("megaphi-plot") is None:
        pytest.skip("megaphi is installed without the console scripts (reinstall: pip install -e .)")
    for name in ("megaphi-plot", "megaphi-convert", "megaphi-merge-datasets"):
        out = subprocess.run([name, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, name


def test_plot_title_names_the_run(tmp_path):
    from megaphi.cli.plot_metrics import run_name

    assert run_name(str(tmp_path / "runs" / "quickstart" / "checkpoints" / "metrics.jsonl")) == "quickstart"
    assert run_name(str(tmp_path / "checkpoints" / "phi-1-base" / "metrics.jsonl")) == "phi-1-base"


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    from megaphi.cli import plot_metrics

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "loss": 2.0, "lr": 1e-3}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot_metrics.main([str(tmp_path)])
    assert not (tmp_path / "curves.png").exists()
