"""Run setup decisions (vocabulary rows, data, tokenizer, tensor-parallel checks) that need no training step."""

import argparse
import json
import os

import pytest
import torch

from megaphi.checkpoint.reshard import TensorParallelMismatchError
from megaphi.training.model_flags import model_vocab_size
from megaphi.tokenizer import load_tokenizer
from megaphi.checkpoint import training_state
from test_resume import TINY_MODEL


def _args(model, divisible_by=128, tp=1):
    return argparse.Namespace(model=model, make_vocab_size_divisible_by=divisible_by, tensor_model_parallel_size=tp)


def test_phi_presets_keep_51200_rows_with_the_codegen_tokenizer(codegen_tokenizer_dir):
    tok = load_tokenizer(str(codegen_tokenizer_dir))
    assert tok.vocab_size == 50295
    # 51200 is the embedding of the released phi-1 checkpoints; Megatron's rule alone would give 50304.
    assert model_vocab_size(_args("phi-1"), tok) == 51200
    assert model_vocab_size(_args("phi-1-small"), tok) == 51200
    assert model_vocab_size(_args("phi-1", tp=8), tok) == 51200  # 51200 = 50 x 1024


def test_tokenizer_padding_when_the_preset_does_not_fit(codegen_tokenizer_dir):
    tok = load_tokenizer(str(codegen_tokenizer_dir), 128, 1)
    # tiny's 512 rows cannot hold 50295 tokens: the tokenizer's size padded to 128 (by hand: 393 x 128).
    assert model_vocab_size(_args("tiny"), tok) == 50304
    # a padding multiple that 51200 does not satisfy: padded from the tokenizer instead (51 x 1000).
    tok_1000 = load_tokenizer(str(codegen_tokenizer_dir), 1000, 1)
    assert model_vocab_size(_args("phi-1", divisible_by=1000), tok_1000) == 51000


def _fake_checkpoint(tmp_path, tp):
    tag = "iter_0000002"
    tag_dir = tmp_path / tag
    tag_dir.mkdir()
    for rank in range(tp):
        torch.save({"module": {}}, tag_dir / f"mp_rank_{rank:02d}_model_states.pt")
    (tag_dir / "megaphi_meta.json").write_text(
        json.dumps({"iteration": 2, "consumed_samples": 8, "consumed_tokens": 512, "tensor_model_parallel_size": tp})
    )
    (tmp_path / "latest").write_text(tag + "\n")
    return tag


class _EngineThatMustNotLoad:
    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("the TP size must be checked before DeepSpeed loads anything")


def test_resume_at_another_tp_size_points_at_reshard(tmp_path):
    _fake_checkpoint(tmp_path, tp=2)
    with pytest.raises(TensorParallelMismatchError) as err:
        training_state.load_checkpoint(_EngineThatMustNotLoad(), str(tmp_path))  # this process: TP=1
    message = str(err.value)
    assert "--tensor-model-parallel-size 2" in message and "uses 1" in message
    assert "convert_checkpoint.py reshard" in message and "--tp 1" in message
    assert os.path.isfile(tmp_path / "latest")  # nothing was touched


def _data_args(tmp_path, data_path, *extra, train_iters=2):
    from megaphi.training.config import RunConfig

    return RunConfig.from_flags(
        [
            "--model",
            "tiny",
            *TINY_MODEL,
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--train-iters",
            str(train_iters),
            "--lr",
            "1e-3",
            "--eval-iters",
            "1",
            "--data-cache-path",
            str(tmp_path / "cache"),
            "--data-path",
            *data_path,
            *extra,
        ],
        world_size=1,
    )


def test_small_file_trains_with_the_default_split(tmp_path):
    from test_resume import make_token_file
    from megaphi.training.data_sources import build_data

    # 300 documents: the default --split 969,30,1 gives the test split no document; the trainer never
    # reads it, so it must not be built
    prefix = make_token_file(str(tmp_path / "toy"), docs=300)
    make_train, make_valid = build_data(_data_args(tmp_path, [prefix]), 0, 1)
    assert next(make_train(0))["tokens"].shape == (2, 32)
    assert next(make_valid())["tokens"].shape == (2, 32)
    # no evaluation: the validation split is not built either (here it has no documents: split 100,1 of
    # 10 documents)
    tiny = make_token_file(str(tmp_path / "tiny"), docs=10)
    _, make_valid = build_data(_data_args(tmp_path, [tiny], "--split", "100,1", "--eval-iters", "0"), 0, 1)
    assert make_valid is None


def test_too_little_data_is_a_clear_error_before_training(tmp_path):
    from test_resume import make_token_file
    from megaphi.training.data_sources import build_data
    from megaphi.training.arguments import ArgumentError

    a = make_token_file(str(tmp_path / "a"), docs=20, seed=1)
    b = make_token_file(str(tmp_path / "b"), docs=20, seed=2)
    # unweighted prefixes are blended one epoch each (Megatron): fewer samples than 50 x 4
    with pytest.raises(
        ArgumentError,
        match=r"--data-path .*holds \d+ samples but --train-iters 50 x "
        r"--global-batch-size 4 needs 200",
    ):
        build_data(_data_args(tmp_path, [a, b], "--split", "100,0,0", train_iters=50), 0, 1)
    # weighted: as many samples as needed
    make_train, _ = build_data(_data_args(tmp_path, ["1", a, "1", b], "--split", "100,0,0", train_iters=50), 0, 1)
    # a checkpoint that consumed more samples than this run's data holds (resume with a smaller --train-iters)
    with pytest.raises(ArgumentError, match=r"--data-path .*consumed 4000 samples .*holds only \d+"):
        build_data(_data_args(tmp_path, [a], "--split", "100,0,0"), 0, 1, consumed_samples=4000)


def test_unwritable_index_cache_names_the_flag(tmp_path):
    from test_resume import make_token_file
    from megaphi.training.data_sources import build_data
    from megaphi.training.arguments import ArgumentError

    prefix = make_token_file(str(tmp_path / "toy"), docs=30)
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(ArgumentError, match="--data-cache-path"):
        build_data(_data_args(tmp_path, [prefix], "--split", "100,0,0"), 0, 1)


def test_bad_tokenizer_is_an_argument_error(tmp_path, monkeypatch):
    from megaphi.training.model_flags import load_run_tokenizer
    from megaphi.training.arguments import ArgumentError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(tokenizer="mytok/dir", make_vocab_size_divisible_by=128, tensor_model_parallel_size=1)
    with pytest.raises(ArgumentError, match="--tokenizer mytok/dir"):
        load_run_tokenizer(args)
