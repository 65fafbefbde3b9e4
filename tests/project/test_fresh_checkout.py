"""A new user's first day beyond the documented commands (tests/project/test_docs_commands.py runs those):
a recipe on a fresh checkout names what is missing, docs/datasets.md's build_gpt_datasets snippet
runs on small files, and DeepSpeed's CPU comm extension stays out of megaphi's start-up."""

import os
import re
import subprocess

import pytest

from test_docs_commands import CODEGEN, REPO, Workspace


# ---------------------------------------------------------------------------------------------------
# A recipe on a fresh checkout: what is missing is named with the command that makes it.


def _bare_checkout(tmp_path):
    ws = Workspace(str(tmp_path))
    fake_bin = tmp_path / "fake_bin"  # a launcher that must not be reached
    fake_bin.mkdir()
    (fake_bin / "deepspeed").write_text("#!/bin/sh\necho deepspeed launched >&2\nexit 99\n")
    (fake_bin / "deepspeed").chmod(0o755)
    ws.env["PATH"] = f"{fake_bin}{os.pathsep}{ws.env['PATH']}"
    return ws


@pytest.mark.parametrize(
    "script, prefix", [("pretrain_phi1.sh", "data/codetextbook"), ("finetune_phi1.sh", "data/codeexercises")]
)
def test_recipe_without_its_data_names_the_command_that_makes_it(tmp_path, script, prefix):
    ws = _bare_checkout(tmp_path)
    proc = subprocess.run(
        ["bash", f"examples/{script}"],
        cwd=ws.repo,
        env=dict(ws.env, GPUS_PER_NODE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{prefix}_text_document.bin does not exist" in lines[0], lines
    assert "python tools/preprocess_data.py --input CORPUS.jsonl --tokenizer " in lines[0], lines
    assert f"--output-prefix {prefix} " in lines[0], lines
    if os.path.exists(CODEGEN):  # the tokenizer the recipe would use: the one beside the checkout
        assert "--tokenizer ../shared/tokenizers/codegen-350M-mono " in lines[0], lines


def test_finetune_without_pretrained_weights_names_the_commands(tmp_path):
    ws = _bare_checkout(tmp_path)
    from test_resume import make_token_file

    make_token_file(os.path.join(ws.repo, "data", "codeexercises_text_document"))
    proc = subprocess.run(
        ["bash", "examples/finetune_phi1.sh"],
        cwd=ws.repo,
        env=dict(ws.env, GPUS_PER_NODE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "checkpoints/phi-1-base/iter_0024000/model does not exist" in lines[0]
    assert "bash examples/pretrain_phi1.sh" in lines[0] and "convert_checkpoint.py hf-to-megaphi" in lines[0]


# ---------------------------------------------------------------------------------------------------
# docs/datasets.md's build_gpt_datasets snippet, on small files whose test split has no document.


def _python_blocks(path):
    with open(os.path.join(REPO, path)) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.M | re.S)


@pytest.mark.parametrize("test_samples", [0, None])
def test_datasets_snippet_runs_on_a_small_file(tmp_path, monkeypatch, test_samples):
    from test_resume import make_token_file

    snippet = next(b for b in _python_blocks("docs/datasets.md") if "build_gpt_datasets(" in b)
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    # 120 documents of 10-120 tokens: --split 969,30,1 leaves the test split [120, 120) empty
    make_token_file("data/code_text_document", docs=120, seed=1)
    make_token_file("data/book_text_document", docs=120, seed=2)
    loop_body = 'for batch in loader:  # {"tokens": int64 [8, 2048], "labels": int64 [8, 2048]}\n    ...\n'
    assert loop_body in snippet  # the loop reads one batch here, then stops
    code = snippet.replace(loop_body, "for batch in loader:\n    break\n").replace("seq_length=2048", "seq_length=64")
    assert "seq_length=64" in code
    scope = {
        "train_iters": 2,
        "global_batch": 8,
        "eval_samples": 8,
        "test_samples": test_samples,
        "consumed_samples": 0,
        "dp_rank": 0,
        "dp_size": 1,
    }
    exec(compile(code, "docs/datasets.md", "exec"), scope)
    train, valid, test = scope["train"], scope["valid"], scope["test"]
    # a blend of N samples at weights 0.7 / 0.3 holds ceil(0.7 N) + ceil(0.3 N) (docs/datasets.md)
    assert (len(train), len(valid), test) == (12 + 5, 6 + 3, None)
    assert scope["batch"]["tokens"].shape == (8, 64)


# ---------------------------------------------------------------------------------------------------
# Start-up: DeepSpeed's CPU comm extension is neither built nor loaded by megaphi's runs (the doc
# commands above run with an empty TORCH_EXTENSIONS_DIR and check it stays empty). The hook it uses:


def test_deepspeed_shm_comm_hook_is_where_megaphi_expects_it():
    import importlib
    import inspect

    from megaphi.training.engine import skip_shm_comm_extension

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    assert callable(ds_torch_comm.build_shm_op)
    init = inspect.getsource(ds_torch_comm.TorchBackend.__init__)
    assert "self.shm_comm_op = build_shm_op()" in init  # looked up in the module at call time
    assert "if self.shm_comm_op != None" in init or "if self.shm_comm_op is not None" in init
    skip_shm_comm_extension()
    skip_shm_comm_extension()  # idempotent
    assert ds_torch_comm.build_shm_op() is None
    # without the extension, DeepSpeed's only user of it falls back to torch.distributed
    assert "torch.distributed.all_reduce" in inspect.getsource(ds_torch_comm.TorchBackend.inference_all_reduce)
