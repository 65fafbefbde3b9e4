"""The run configuration: resolved once from the parsed flags, frozen afterwards, the parsed flags left as
they were; and the package's import graph has no cycle."""

import ast
import copy
import dataclasses
import json
from pathlib import Path

import pytest

from megaphi.training.argument_error import ArgumentError, FlagError
from megaphi.training.arguments import parse_flags
from megaphi.training.config import RunConfig, resolve_config

REPO = Path(__file__).resolve().parents[2]
BASE = ["--model", "tiny", "--mock-data", "--micro-batch-size", "2", "--lr", "1e-3"]
MOCK = BASE + ["--train-iters", "5"]


def test_every_section_is_frozen():
    config = RunConfig.from_flags(MOCK + ["--bf16"], world_size=1)
    sections = [getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "flags"]
    assert len(sections) == 9
    for section in [config, *sections]:
        name = dataclasses.fields(section)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, None)
    with pytest.raises(TypeError):
        config.flags["lr"] = 1.0  # a read-only mapping
    assert isinstance(config.data.data_prefixes, tuple)
    # a namespace handed out is a copy: changing it changes nothing in the config
    flags = config.flag_namespace()
    flags.lr = 5.0
    assert config.optimizer.lr == config.flags["lr"] == 1e-3


def test_resolution_leaves_the_parsed_flags_unchanged(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}))
    args = parse_flags(
        BASE
        + [
            "--train-samples",
            "8",
            "--bf16",
            "--lr-warmup-fraction",
            "0.5",
            "--deepspeed-config",
            str(user),
            "--deepspeed",
        ]
    )
    before = copy.deepcopy(vars(args))
    config = resolve_config(args, world_size=1)
    assert vars(args) == before
    # what resolution settled, from the flags and the JSON, is in the config
    assert config.training.train_iters == 4  # 8 samples / global batch 2
    assert config.optimizer.lr_warmup_iters == 2 and config.optimizer.lr_decay_iters == 4
    # the JSON's ZeRO 2 runs as ZeRO 1 for bf16 on one data-parallel rank, and says so at start-up
    assert (config.parallel.zero_stage, config.optimizer.clip_grad) == (1, 0.5)
    source = f"lowered from 2 (zero_optimization.stage in {user}) for bf16 on 1 data-parallel rank"
    assert config.parallel.zero_stage_source == source
    assert any(line.startswith(f"ZeRO stage 1 ({source})") for line in config.logging.messages)
    assert config.optimizer.clip_grad_source == f"gradient_clipping in {user}"
    assert config.parallel.deepspeed_config()["zero_optimization"]["stage"] == 1
    assert config.logging.notes and config.logging.peak_tflops_text.startswith("MFU")
    # resolving the same flags again gives the same values
    again = resolve_config(args, world_size=1)
    assert dataclasses.replace(again, training=config.training, flags=config.flags) == config


def test_flag_errors_and_file_errors_are_told_apart(tmp_path):
    with pytest.raises(FlagError, match="--lr is required"):
        resolve_config(parse_flags([a for a in MOCK if a not in ("--lr", "1e-3")]), world_size=1)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 3}))
    with pytest.raises(ArgumentError, match="train_batch_size=3 contradicts --global-batch-size") as error:
        resolve_config(parse_flags(MOCK + ["--deepspeed-config", str(bad)]), world_size=1)
    assert not isinstance(error.value, FlagError)  # exit status 1, as before: the file, not the command line


def _module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(modules):
    """{module: megaphi modules it imports anywhere in its code (functions included)}."""

    def known(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                target = known(target) if target.startswith("megaphi") else ""
                # a module's own package (its __init__ runs first anyway) is not an edge of the graph
                if target and target != name and not name.startswith(target + "."):
                    found.add(target)
        graph[name] = found
    return graph


def test_no_import_cycle_in_megaphi():
    modules = {_module_name(p): p for p in (REPO / "megaphi").rglob("*.py")}
    graph = _imports(modules)
    assert graph["megaphi.pretrain"] >= {"megaphi.training.config", "megaphi.training.trainer"}  # edges are seen
    cycles, done = [], set()

    def visit(node, path):
        if node in path:
            cycles.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert cycles == []


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "megaphi"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from megaphi import b\n")
    (package / "b.py").write_text("from . import a\n")
    modules = {".".join(p.relative_to(tmp_path).with_suffix("").parts): p for p in package.glob("[ab].py")}
    graph = _imports(modules)
    assert graph == {"megaphi.a": {"megaphi.b"}, "megaphi.b": {"megaphi.a"}}
