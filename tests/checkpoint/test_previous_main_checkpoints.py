"""Checkpoints and model folders written by an earlier megaphi (tests/fixtures/previous_main, see its
README) still verify, load with the weights their files hold, generate what that version generated,
and resume a training run on the same loss curve."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_resume import run_pretrain

from megaphi.checkpoint import layout, model_folder, training_state
from megaphi.generation import GenerationConfig, generate_tokens
from megaphi.model import PhiForCausalLM

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "previous_main")
TRAINING_CHECKPOINT = os.path.join(FIXTURES, "training_checkpoint")
MODEL_FOLDER = os.path.join(FIXTURES, "model_folder")
TAG = "iter_0000002"
FLAGS = [
    "--model",
    "tiny",
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--ffn-hidden-size",
    "64",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "16",
    "--max-position-embeddings",
    "16",
    "--vocab-size",
    "128",
    "--mock-data",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "2",
    "--lr-decay-iters",
    "10",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
    "--log-interval",
    "1",
    "--eval-iters",
    "0",
    "--seed",
    "1234",
]


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURES, "expected.json")) as f:
        return json.load(f)


def test_the_training_checkpoint_verifies():
    tag, meta = training_state.verify_checkpoint(TRAINING_CHECKPOINT)  # checksums, seal, DeepSpeed's record
    assert tag == TAG and meta["sealed"] and meta["iteration"] == 2 and meta["consumed_samples"] == 4
    assert len(meta["files"]) == 5  # the module states, the RNG states and the three files of model/


def test_the_model_folder_loads_the_weights_its_file_holds():
    model = PhiForCausalLM.from_pretrained(MODEL_FOLDER)
    on_disk = load_file(os.path.join(MODEL_FOLDER, layout.WEIGHTS_NAME))
    loaded = model.hf_state_dict()
    assert sorted(loaded) == sorted(on_disk) and len(on_disk) == 33  # q, k, v apart
    for name, tensor in on_disk.items():
        assert torch.equal(loaded[name], tensor), name


def test_the_training_checkpoint_loads_the_weights_deepspeed_saved():
    model = PhiForCausalLM.from_pretrained(TRAINING_CHECKPOINT)
    saved = torch.load(
        os.path.join(TRAINING_CHECKPOINT, TAG, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False
    )["module"]
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor), name
    # its exported model folder holds the same weights, and --finetune reads that folder (verified)
    exported = PhiForCausalLM.from_pretrained(os.path.join(TRAINING_CHECKPOINT, TAG, layout.MODEL_SUBDIR))
    for name, tensor in exported.named_parameters():
        assert torch.equal(tensor, params[name]), name
    assert model_folder.finetune_weights_source(TRAINING_CHECKPOINT) == (
        "folder",
        os.path.join(TRAINING_CHECKPOINT, TAG, layout.MODEL_SUBDIR),
    )


@pytest.mark.parametrize("path", [MODEL_FOLDER, TRAINING_CHECKPOINT])
def test_generation_matches_the_earlier_version(path, expected):
    model = PhiForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    new = generate_tokens(model, [expected["prompt"]], GenerationConfig(max_new_tokens=8, stop_at_eod=False))
    assert new == [expected["greedy_new_tokens"]]


def test_the_training_checkpoint_resumes_on_the_same_curve(tmp_path, expected):
    run = str(tmp_path / "run")
    shutil.copytree(TRAINING_CHECKPOINT, run)  # the committed fixture stays as it was written
    proc = run_pretrain(FLAGS + ["--train-iters", "4", "--load", run, "--save", run])
    assert f"resumed from {run}/{TAG} at iteration 2" in proc.stdout, proc.stdout[-2000:]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        resumed = [json.loads(line) for line in f]
    assert [r["iteration"] for r in resumed] == [3, 4]
    for got, want in zip(resumed, expected["uninterrupted_run"][2:]):
        assert got["consumed_samples"] == want["consumed_samples"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    # the new save is complete and passes the integrity checks a further resume makes
    assert layout.read_pointer(run) == "iter_0000004"
    tag, meta = training_state.verify_checkpoint(run)
    assert tag == "iter_0000004" and meta["sealed"] and meta["consumed_samples"] == 8
