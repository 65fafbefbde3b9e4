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

    # lr 0: the weights after finetuning must equal the loaded ones exactly
    ft_flags = tiny_flags(prefix, 2) + ["--finetune", "--lr", "0", "--save-interval", "1", "--eval-interval", "1",
                                        "--weight-decay", "0.01"]
    for source, out in ((pre, str(tmp_path / "ft_ds")), (pretrained_folder, str(tmp_path / "ft_folder"))):
        proc = run_pretrain(ft_flags + ["--load", source, "--save", out])
        assert "finetuning from weights in" in proc.stdout
        train = [r for r in read_metrics(out) if "loss" in r]
        assert [r["iteration"] for r in train] == [1, 2] and train[0]["consumed_samples"] == 4  # fresh start
        assert _weights(os.path.join(out, "iter_0000002", "model")) == _weights(pretrained_folder)
        vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
        assert len(vals) == 2 and vals[0] == vals[1]   # same weights -> same validation loss
        assert open(os.path.join(out, "best")).read().strip() == "iter_0000001"  # first of the equal best
        meta = json.load(open(os.path.join(out, "iter_0000002", "megaphi_meta.json")))
        assert meta["state"]["best_iteration"] == 1 and meta["iteration"] == 2


def test_finetune_rejects_other_architecture(tmp_path):
    import pytest
    from megaphi.model import PhiForCausalLM, get_preset
    from megaphi.training.checkpointing import CheckpointError, load_weights_from_folder

    small = get_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=2)
    PhiForCausalLM(small).save_pretrained(str(tmp_path / "m"))
    other = PhiForCausalLM(get_preset("tiny", vocab_size=256, hidden_size=128, intermediate_size=128,
                                      num_attention_heads=2))
    with pytest.raises(CheckpointError, match="architecture differs.*hidden_size: checkpoint 64 vs run 128"):
        load_weights_from_folder(other, str(tmp_path / "m"))
