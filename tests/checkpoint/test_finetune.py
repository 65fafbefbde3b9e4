"""--finetune --load: weights only (fresh optimizer, schedule, iteration), from a training checkpoint
or a megaphi model folder; the `best` pointer follows the lowest validation loss."""

import json
import os
import shutil

from test_resume import make_token_file, read_metrics, run_pretrain, tiny_flags


def _weights(folder):
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return f.read()


def test_finetune_from_checkpoint_and_model_folder(tmp_path):
    prefix = make_token_file(str(tmp_path / "toy"))
    pre = str(tmp_path / "pre")
    run_pretrain(tiny_flags(prefix, 2) + ["--save", pre, "--eval-iters", "0"])
    pretrained_folder = str(tmp_path / "pretrained_model")
    shutil.copytree(os.path.join(pre, "iter_0000002", "model"), pretrained_folder)
    # leave only the DeepSpeed files, so the first finetune takes DeepSpeed's module-only load path
    shutil.rmtree(os.path.join(pre, "iter_0000002", "model"))

    # from the DeepSpeed checkpoint with a nonzero lr: the first updates follow a fresh warmup
    # (lr x k / warmup), not the pretraining schedule (which ended at lr 0), and the iteration restarts at 1
    ft_ds = str(tmp_path / "ft_ds")
    proc = run_pretrain(
        tiny_flags(prefix, 2)
        + [
            "--finetune",
            "--load",
            pre,
            "--save",
            ft_ds,
            "--lr",
            "2e-3",
            "--lr-warmup-iters",
            "4",
            "--lr-decay-iters",
            "8",
            "--eval-iters",
            "0",
        ]
    )
    assert "finetuning from weights in" in proc.stdout
    train = [r for r in read_metrics(ft_ds) if "loss" in r]
    assert [r["iteration"] for r in train] == [1, 2] and train[0]["consumed_samples"] == 4  # fresh start
    assert [r["lr"] for r in train] == [2e-3 * 1 / 4, 2e-3 * 2 / 4]
    assert _weights(os.path.join(ft_ds, "iter_0000002", "model")) != _weights(pretrained_folder)

    # from a model folder with lr 0: the weights after finetuning must equal the loaded ones exactly
    out = str(tmp_path / "ft_folder")
    proc = run_pretrain(
        tiny_flags(prefix, 2)
        + [
            "--finetune",
            "--lr",
            "0",
            "--save-interval",
            "1",
            "--eval-interval",
            "1",
            "--weight-decay",
            "0.01",
            "--load",
            pretrained_folder,
            "--save",
            out,
        ]
    )
    assert "finetuning from weights in" in proc.stdout
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["iteration"] for r in train] == [1, 2] and train[0]["consumed_samples"] == 4  # fresh start
    assert _weights(os.path.join(out, "iter_0000002", "model")) == _weights(pretrained_folder)
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(vals) == 2 and vals[0] == vals[1]  # same weights -> same validation loss
    best_tag, best_metric = open(os.path.join(out, "best")).read().split("\n")[:2]
    assert best_tag == "iter_0000001" and best_metric.startswith("val_loss ")  # first of the equal best
    meta = json.load(open(os.path.join(out, "iter_0000002", "megaphi_meta.json")))
    assert meta["state"]["best_iteration"] == 1 and meta["iteration"] == 2


def test_finetune_rejects_other_architecture(tmp_path):
    import pytest
    from megaphi.model import PhiForCausalLM, get_preset
    from megaphi.checkpoint.layout import CheckpointError
    from megaphi.checkpoint.model_folder import load_weights_from_folder

    small = get_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=2)
    PhiForCausalLM(small).save_pretrained(str(tmp_path / "m"))
    other = PhiForCausalLM(
        get_preset("tiny", vocab_size=256, hidden_size=128, intermediate_size=128, num_attention_heads=2)
    )
    with pytest.raises(CheckpointError, match="architecture differs.*hidden_size: checkpoint 64 vs run 128"):
        load_weights_from_folder(other, str(tmp_path / "m"))


def test_humaneval_hook_logs_pass_at_1_without_perturbing_training(tmp_path):
    import subprocess
    import sys

    prefix = make_token_file(str(tmp_path / "toy"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def add(a, b):\n    return a + b\n\n\ndef double(x):\n    return 2 * x\n" * 20)
    subprocess.run(
        [
            sys.executable,
            "tools/train_tokenizer.py",
            "--input",
            str(src),
            "--output-dir",
            str(tmp_path / "tok"),
            "--vocab-size",
            "300",
            "--quiet",
        ],
        check=True,
        timeout=120,
    )
    problems = tmp_path / "problems.jsonl"
    problems.write_text(
        json.dumps(
            {
                "task_id": "Toy/0",
                "prompt": "def add(a, b):\n",
                "entry_point": "add",
                "canonical_solution": "    return a + b\n",
                "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
            }
        )
        + "\n"
    )
    flags = tiny_flags(prefix, 2) + ["--tokenizer", str(tmp_path / "tok"), "--eval-iters", "0"]
    flags = flags[: flags.index("--vocab-size")] + flags[flags.index("--vocab-size") + 2 :]
    run_pretrain(flags + ["--log-dir", str(tmp_path / "plain")])
    run_pretrain(
        flags
        + [
            "--log-dir",
            str(tmp_path / "he"),
            "--eval-humaneval",
            str(problems),
            "--eval-humaneval-interval",
            "1",
            "--humaneval-max-new-tokens",
            "4",
        ]
    )
    he = read_metrics(str(tmp_path / "he"))
    assert [r["iteration"] for r in he if "humaneval_pass@1" in r] == [1, 2]
    assert all(0.0 <= r["humaneval_pass@1"] <= 1.0 for r in he if "humaneval_pass@1" in r)
    # generation (with dropout on during training) must not shift the training RNG streams
    assert [r["loss"] for r in he if "loss" in r] == [r["loss"] for r in read_metrics(str(tmp_path / "plain"))]
