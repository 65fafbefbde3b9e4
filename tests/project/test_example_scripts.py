"""examples/*.sh: environment overrides reach megaphi.pretrain, the flags they produce pass its
validation, and relative paths are taken from the caller's directory. The scripts run with a stand-in
`python` / `deepspeed` that records the command and validates the pretrain flags with parse_args
(no training: fast on any machine)."""

import os
import shlex
import stat
import subprocess
import sys

import pytest

from test_resume import make_token_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Stand-in for python (quickstart) and deepspeed (the paper scripts): log the command; validate the
# arguments of megaphi.pretrain with the real parser; every other step succeeds without doing anything.
FAKE = """#!/usr/bin/env bash
printf '%s\\n' "$(printf '%q ' "$@")" >> "$FAKE_LOG"
while [[ $# -gt 0 && "$1" != megaphi.pretrain ]]; do
    [[ "$1" == -c && "$2" == *cuda* ]] && exit 1    # no GPU here
    shift
done
[[ $# -eq 0 ]] && exit 0
shift
exec {python} -c 'import os, sys; from megaphi.training.arguments import parse_args; parse_args(sys.argv[1:], world_size=int(os.environ["FAKE_WORLD"]))' "$@"
"""


def _fake(tmp_path, name):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(FAKE.format(python=shlex.quote(sys.executable)))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _run(tmp_path, script, env, world):
    log = tmp_path / "commands.log"
    full = dict(os.environ, FAKE_LOG=str(log), FAKE_WORLD=str(world), **env)
    full["PATH"] = f"{tmp_path / 'bin'}:{full['PATH']}"
    caller = tmp_path / "caller"
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "examples", script)],
        cwd=caller,
        env=full,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [shlex.split(line) for line in log.read_text().splitlines()]
    return next(c for c in commands if "megaphi.pretrain" in c)


def _flag(command, name):
    return command[command.index(name) + 1]


def test_quickstart_train_iters_20_with_relative_work_dir(tmp_path):
    caller = tmp_path / "caller"
    work = caller / "qs"
    (work / "data").mkdir(parents=True)
    (work / "corpus.jsonl").write_text("{}\n")
    (work / "tokenizer").mkdir()
    (work / "tokenizer" / "tokenizer.json").write_text("{}")
    make_token_file(str(work / "data" / "stdlib_text_document"))
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "latest").write_text("iter_0000020")
    python = _fake(tmp_path, "python")
    command = _run(
        tmp_path,
        "quickstart.sh",
        {
            "PYTHON": python,
            "WORK_DIR": "qs",
            "TRAIN_ITERS": "20",
            "SEQ_LENGTH": "128",
            "MICRO_BATCH": "2",
            "GLOBAL_BATCH": "4",
            "LR": "1e-3",
        },
        world=1,
    )
    assert _flag(command, "--train-iters") == "20" and _flag(command, "--lr-warmup-fraction") == "0.075"
    assert (
        _flag(command, "--seq-length"),
        _flag(command, "--micro-batch-size"),
        _flag(command, "--global-batch-size"),
        _flag(command, "--lr"),
        _flag(command, "--min-lr"),
    ) == ("128", "2", "4", "1e-3", "0.0001")
    assert _flag(command, "--save") == str(work / "checkpoints")  # WORK_DIR=qs is the caller's ./qs
    assert _flag(command, "--data-path") == str(work / "data" / "stdlib_text_document")


@pytest.mark.parametrize(
    "script, model",
    [
        ("pretrain_phi1.sh", "phi-1-small"),
        ("finetune_phi1.sh", "phi-1-small"),
        ("pretrain_phi1_small.sh", "phi-1-small"),
    ],
)
def test_paper_scripts_scale_down(tmp_path, script, model):
    caller = tmp_path / "caller"
    (caller / "data").mkdir(parents=True)
    make_token_file(str(caller / "data" / "a"))
    make_token_file(str(caller / "data" / "b"))
    (caller / "base").mkdir()
    _fake(tmp_path, "deepspeed")
    env = {
        "MODEL": model,
        "DATA_PATH": "0.3 data/a 0.7 data/b",
        "CHECKPOINT_DIR": "ck",
        "PRETRAINED": "base",
        "SEQ_LENGTH": "512",
        "GLOBAL_BATCH": "32",
        "MICRO_BATCH": "2",
        "TRAIN_ITERS": "20",
        "LR": "5e-4",
        "GPUS_PER_NODE": "2",
    }
    command = _run(tmp_path, script, env, world=2)
    assert (
        _flag(command, "--model"),
        _flag(command, "--seq-length"),
        _flag(command, "--global-batch-size"),
        _flag(command, "--train-iters"),
        _flag(command, "--lr-decay-iters"),
        _flag(command, "--lr"),
    ) == (model, "512", "32", "20", "20", "5e-4")
    assert int(_flag(command, "--lr-warmup-iters")) <= 20
    data = command[command.index("--data-path") + 1 : command.index("--data-path") + 5]
    assert data == ["0.3", str(caller / "data" / "a"), "0.7", str(caller / "data" / "b")]
    assert _flag(command, "--save") == str(caller / "ck")
    if script == "finetune_phi1.sh":
        assert _flag(command, "--load") == str(caller / "base")
