"""Resharding training checkpoints between TP sizes (1 <-> 2 <-> 4): same logits, DeepSpeed loads the
result, megaphi-to-hf reads any TP size, and bad TP sizes fail with clear errors."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from dist_utils import run_distributed
from megaphi.config import PhiConfig
from megaphi.model import PhiForCausalLM
from megaphi.checkpoint.layout import resolve_tag_dir
from megaphi.checkpoint.reshard import TensorParallelMismatchError, check_tensor_parallel_size, read_training_checkpoint
from megaphi.parallel import pad_vocab_size

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megaphi.cli import convert_checkpoint  # noqa: E402

CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    rotary_dim=16,
    max_position_embeddings=32,
    attention_dropout=0.0,
    resid_dropout=0.0,
    embd_dropout=0.0,
)
IDS = torch.arange(24).view(2, 12) * 7 % 256


def _engine(model, tp):
    import deepspeed
    from megaphi.parallel import mpu

    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu, config=cfg, dist_init_required=False)
    return engine


def save_worker(rank, world, save_dir, logits_path):
    """TP=2: one optimizer step (so the weights are no longer the seeded init), then the trainer's save."""
    from megaphi.parallel import state
    from megaphi.checkpoint.training_state import save_checkpoint

    state.initialize_model_parallel(world)
    engine = _engine(PhiForCausalLM(PhiConfig(**CONFIG), init_seed=5), world)
    loss, _ = engine(IDS, labels=IDS)
    engine.backward(loss)
    engine.step()
    args = types.SimpleNamespace(
        world_size=world, tensor_model_parallel_size=world, zero_stage=1, seed=5, tokenizer=None
    )
    save_checkpoint(
        engine, save_dir, iteration=1, consumed_samples=2, consumed_tokens=24, args=args, export_model=False
    )
    engine.module.eval()
    with torch.no_grad():
        logits = engine.module(IDS)
    if rank == 0:
        torch.save(logits, logits_path)


def load_worker(rank, world, ckpt_dir, logits_path):
    """TP=4: DeepSpeed loads the resharded module states; logits equal the TP=2 run's."""
    from megaphi.parallel import state

    state.initialize_model_parallel(world)
    tag_dir = resolve_tag_dir(ckpt_dir)
    check_tensor_parallel_size(tag_dir, world)
    engine = _engine(PhiForCausalLM(PhiConfig(**CONFIG), init_seed=77), world)
    # what the trainer does for "optimizer_states": false: ZeRO rebuilds its fp32 state from the weights
    path, client = engine.load_checkpoint(
        ckpt_dir, tag=os.path.basename(tag_dir), load_optimizer_states=False, load_lr_scheduler_states=False
    )
    assert client["megaphi"]["iteration"] == 1 and engine.global_steps == 1
    assert path is not None and path.endswith(f"mp_rank_{rank:02d}_model_states.pt")
    engine.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(engine.module(IDS), torch.load(logits_path), rtol=0, atol=1e-5)


def _tp1_logits(ckpt):
    config, full, meta, _ = read_training_checkpoint(ckpt, PhiForCausalLM)
    model = PhiForCausalLM(config, initialize=False)
    model.load_state_dict(full)
    with torch.no_grad():
        return model.eval()(IDS), meta


@pytest.mark.distributed
def test_reshard_between_tp_sizes(tmp_path):
    tp2, logits_path = str(tmp_path / "tp2"), str(tmp_path / "logits.pt")
    run_distributed(save_worker, 2, tp2, logits_path)
    expected = torch.load(logits_path)
    tag_dir = resolve_tag_dir(tp2)
    assert json.load(open(os.path.join(tag_dir, "megaphi_meta.json")))["tensor_model_parallel_size"] == 2

    # megaphi-to-hf / load_megaphi_state read a TP=2 training checkpoint directly
    logits, _ = _tp1_logits(tp2)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    # 2 -> 1 (through the command line) and 2 -> 4
    tp1, tp4 = str(tmp_path / "tp1"), str(tmp_path / "tp4")
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "reshard", tp2, tp1, "--tp", "1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "TP 2 -> 1" in out.stdout
    convert_checkpoint.reshard(tp2, tp4, 4)
    assert sorted(os.listdir(resolve_tag_dir(tp4))) == ["megaphi_meta.json"] + [
        f"mp_rank_{r:02d}_model_states.pt" for r in range(4)
    ]
    logits1, meta1 = _tp1_logits(tp1)
    torch.testing.assert_close(logits1, expected, rtol=0, atol=1e-5)
    assert meta1["tensor_model_parallel_size"] == 1 and meta1["optimizer_states"] is False
    assert meta1["iteration"] == 1 and meta1["consumed_samples"] == 2
    run_distributed(load_worker, 4, tp4, logits_path)

    # 4 -> 2 gives back the original shards bit for bit
    back = str(tmp_path / "back2")
    convert_checkpoint.reshard(tp4, back, 2)
    for r in range(2):
        original = torch.load(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"), weights_only=False)["module"]
        again = torch.load(os.path.join(resolve_tag_dir(back), f"mp_rank_{r:02d}_model_states.pt"))["module"]
        assert set(original) == set(again) and all(torch.equal(original[n], again[n]) for n in original)

    # megaphi-to-hf accepts the TP=4 checkpoint; transformers computes the same logits
    transformers = pytest.importorskip("transformers")
    hf_dir = str(tmp_path / "hf")
    convert_checkpoint.megaphi_to_hf(tp4, hf_dir)
    hf = transformers.PhiForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, expected, rtol=0, atol=1e-4)

    # bad TP sizes and inputs: clear errors
    with pytest.raises(
        TensorParallelMismatchError, match=r"saved with --tensor-model-parallel-size 2, this run uses 4.*reshard"
    ):
        check_tensor_parallel_size(tag_dir, 4)
    with pytest.raises(
        TensorParallelMismatchError, match="num_attention_heads=4 is not divisible by tensor-model-parallel size 3"
    ):
        convert_checkpoint.reshard(tp2, str(tmp_path / "tp3"), 3)
    assert not os.path.exists(tmp_path / "tp3")
    with pytest.raises(FileExistsError):
        convert_checkpoint.reshard(tp2, tp4, 4)
    model_dir = str(tmp_path / "folder")
    PhiForCausalLM(PhiConfig(**CONFIG), init_seed=1).save_pretrained(model_dir)
    with pytest.raises(ValueError, match="TP-independent"):
        convert_checkpoint.reshard(model_dir, str(tmp_path / "x"), 2)
    os.remove(os.path.join(tag_dir, "mp_rank_01_model_states.pt"))
    with pytest.raises(TensorParallelMismatchError, match=r"records tensor_model_parallel_size 2 .* TP ranks \[0\]"):
        read_training_checkpoint(tp2, PhiForCausalLM)


def test_vocab_padding_rule():
    for tp in (1, 2, 4, 8):
        assert pad_vocab_size(51200, 128, tp) == 51200  # phi-1's vocabulary splits up to TP 8 unchanged
    assert pad_vocab_size(50295, 128, 1) == 50304
    assert pad_vocab_size(50295, 128, 2) == 50432 and 50432 % (128 * 2) == 0
    with pytest.raises(ValueError, match="vocab_size=50295 is not divisible by tensor-model-parallel size 2"):
        PhiConfig(vocab_size=50295).check_tensor_parallel(2)
