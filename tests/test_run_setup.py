"""Run setup decisions in megaphi.pretrain that do not need a training step."""
import argparse
import json
import os

import pytest
import torch

from megaphi.model.sharded_checkpoint import TensorParallelMismatchError
from megaphi.pretrain import model_vocab_size
from megaphi.tokenizer import load_tokenizer
from megaphi.training import checkpointing


def _args(model, divisible_by=128, tp=1):
    return argparse.Namespace(model=model, make_vocab_size_divisible_by=divisible_by,
                              tensor_model_parallel_size=tp)


def test_phi_presets_keep_51200_rows_with_the_codegen_tokenizer(codegen_tokenizer_dir):
    tok = load_tokenizer(str(codegen_tokenizer_dir))
    assert tok.vocab_size == 50295
    # 51200 is the embedding of the released phi-1 checkpoints; Megatron's rule alone would give 50304.
    assert model_vocab_size(_args("phi-1"), tok) == 51200
    assert model_vocab_size(_args("phi-1-small"), tok) == 51200
    assert model_vocab_size(_args("phi-1", tp=8), tok) == 51200          # 51200 = 50 x 1024


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
    (tag_dir / "megaphi_meta.json").write_text(json.dumps(
        {"iteration": 2, "consumed_samples": 8, "consumed_tokens": 512, "tensor_model_parallel_size": tp}))
    (tmp_path / "latest").write_text(tag + "\n")
    return tag


class _EngineThatMustNotLoad:
    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("the TP size must be checked before DeepSpeed loads anything")


def test_resume_at_another_tp_size_points_at_reshard(tmp_path):
    _fake_checkpoint(tmp_path, tp=2)
    with pytest.raises(TensorParallelMismatchError) as err:
        checkpointing.load_checkpoint(_EngineThatMustNotLoad(), str(tmp_path))  # this process: TP=1
    message = str(err.value)
    assert "--tensor-model-parallel-size 2" in message and "uses 1" in message
    assert "convert_checkpoint.py reshard" in message and "--tp 1" in message
    assert os.path.isfile(tmp_path / "latest")  # nothing was touched
