"""Architecture vs runtime: PhiConfig is what a model folder records; ModelRuntime (recompute, loss
chunking, attention backend, sequence parallel, compile) is chosen by whoever builds the model, is never
exported, and changes no result. Folders whose config.json still carries runtime keys load and run plain."""

import dataclasses
import json
import os

import pytest
import torch

from megaphi.config import LEGACY_RUNTIME_KEYS, PhiConfig, get_preset
from megaphi.model import ModelRuntime, PhiForCausalLM, apply_runtime

CONFIG = get_preset(
    "tiny",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    rotary_dim=8,
    max_position_embeddings=32,
    attention_dropout=0.0,
    resid_dropout=0.0,
)
# What config.json and checkpoint metadata held before the split, with every switch away from plain.
LEGACY_RUNTIME = {
    "recompute": True,
    "recompute_granularity": "selective",
    "recompute_num_layers": 1,
    "loss_chunk_tokens": 8,
    "use_flash_attn": False,
    "attention_backend": "math",
    "sequence_parallel": True,
}


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 13), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _losses_and_grads(model):
    ids, labels = _batch()
    token_losses, _ = model(ids, labels=labels, reduction="none")
    token_losses.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return token_losses.detach(), grads


RUNTIMES = {
    "selective": ModelRuntime(recompute="selective"),
    "full": ModelRuntime(recompute="full"),
    "full-first-layer": ModelRuntime(recompute="full", recompute_num_layers=1),
    "loss-chunk": ModelRuntime(loss_chunk_tokens=5),
    "math": ModelRuntime(attention_backend="math"),
    "sequence-parallel-tp1": ModelRuntime(sequence_parallel=True),
    "all": ModelRuntime(recompute="full", loss_chunk_tokens=7, attention_backend="math", sequence_parallel=True),
}


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_each_runtime_computes_what_the_plain_model_does(name):
    """float64: the same losses and gradients as plain up to summation order, whether the runtime is given
    at build time or applied to a built model."""
    want = _losses_and_grads(PhiForCausalLM(CONFIG, init_seed=2).double().train())
    built = PhiForCausalLM(CONFIG, init_seed=2, runtime=RUNTIMES[name]).double().train()
    applied = apply_runtime(PhiForCausalLM(CONFIG, init_seed=2).double().train(), RUNTIMES[name])
    for model in (built, applied):
        assert model.runtime == RUNTIMES[name]
        assert all(layer.self_attn.runtime is model.runtime for layer in model.model.layers)
        losses, grads = _losses_and_grads(model)
        torch.testing.assert_close(losses, want[0], rtol=0, atol=1e-12)
        for n, g in want[1].items():
            torch.testing.assert_close(grads[n], g, rtol=0, atol=1e-12, msg=n)


def _count_runtime_paths(monkeypatch):
    """Counts of the checkpointed (recompute) and chunked-loss calls the model makes."""
    import megaphi.model.phi as phi

    seen = {"checkpoint": 0, "chunked_loss": 0}

    def counting(key, fn):
        def call(*args, **kwargs):
            seen[key] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(phi, "checkpoint", counting("checkpoint", phi.checkpoint))
    monkeypatch.setattr(phi, "chunked_linear_cross_entropy", counting("chunked_loss", phi.chunked_linear_cross_entropy))
    return seen


def test_apply_runtime_switches_every_module_and_back(monkeypatch):
    seen = _count_runtime_paths(monkeypatch)
    model = PhiForCausalLM(CONFIG, init_seed=2).train()
    apply_runtime(model, ModelRuntime(recompute="selective", loss_chunk_tokens=4))
    _losses_and_grads(model)
    assert seen == {"checkpoint": CONFIG.num_hidden_layers, "chunked_loss": 1}
    apply_runtime(model, ModelRuntime())
    _losses_and_grads(model)
    assert seen == {"checkpoint": CONFIG.num_hidden_layers, "chunked_loss": 1}  # plain: neither path again
    with pytest.raises(TypeError, match="runtime must be a ModelRuntime"):
        apply_runtime(model, {"recompute": "full"})


def test_compiled_blocks_cannot_be_made_eager_again():
    from megaphi.model.compile import compile_decoder_layers

    model = compile_decoder_layers(PhiForCausalLM(CONFIG, init_seed=2))
    assert model.runtime.compile and model.model.layers[1].self_attn.runtime.compile
    with pytest.raises(ValueError, match="cannot be made eager again"):
        apply_runtime(model, ModelRuntime())
    apply_runtime(model, ModelRuntime(compile=True, recompute="full"))  # other switches still change
    assert model.runtime == ModelRuntime(compile=True, recompute="full")


def test_runtime_validation_is_one_line():
    for bad, match in (
        (dict(recompute=True), "recompute must be one of none, selective, full"),
        (dict(recompute_num_layers=-1), "recompute_num_layers"),
        (dict(attention_backend="xformers"), "attention_backend 'xformers' is not one of"),
        (dict(sequence_parallel=1), "sequence_parallel must be a bool"),
        (dict(compile="on"), "compile must be a bool"),
    ):
        with pytest.raises(ValueError, match=match) as error:
            ModelRuntime(**bad)
        assert "\n" not in str(error.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelRuntime().recompute = "full"


def test_config_has_no_runtime_fields_and_ignores_legacy_keys():
    fields = {f.name for f in dataclasses.fields(PhiConfig)}
    assert not fields & set(LEGACY_RUNTIME_KEYS)
    assert PhiConfig.from_dict({**CONFIG.to_dict(), **LEGACY_RUNTIME}) == CONFIG
    with pytest.raises(ValueError, match=r"unknown PhiConfig field\(s\) \['recompute_layers'\]"):
        PhiConfig.from_dict({**CONFIG.to_dict(), "recompute_layers": 1})
    with pytest.raises(TypeError):
        PhiConfig(**CONFIG.to_dict(), loss_chunk_tokens=8)


def _legacy_folders(tmp_path):
    """The same weights as folders of both earlier formats, their config.json carrying runtime keys."""
    model = PhiForCausalLM(CONFIG, init_seed=2)
    hf_format, plain_format = str(tmp_path / "hf_format"), str(tmp_path / "plain_format")
    for folder in (hf_format, plain_format):
        model.save_pretrained(folder)
    path = os.path.join(hf_format, "config.json")
    with open(path) as f:
        written = json.load(f)
    assert not set(written) & set(LEGACY_RUNTIME_KEYS)  # what megaphi writes now
    with open(path, "w") as f:
        json.dump({**written, **LEGACY_RUNTIME}, f)
    with open(os.path.join(plain_format, "config.json"), "w") as f:  # PhiConfig.to_dict(), no model_type
        json.dump({**CONFIG.to_dict(), **LEGACY_RUNTIME}, f)
    return model, (hf_format, plain_format)


def test_folders_with_runtime_keys_load_and_run_plain(tmp_path, monkeypatch):
    original, folders = _legacy_folders(tmp_path)
    want = _losses_and_grads(original.train())
    seen = _count_runtime_paths(monkeypatch)
    for folder in folders:
        model = PhiForCausalLM.from_pretrained(folder).train()
        assert model.config == CONFIG and model.runtime == ModelRuntime()
        losses, grads = _losses_and_grads(model)
        assert torch.equal(losses, want[0]) and all(torch.equal(grads[n], g) for n, g in want[1].items())
        again = str(tmp_path / (os.path.basename(folder) + "_saved"))
        model.save_pretrained(again)  # written again: the runtime keys are gone
        with open(os.path.join(again, "config.json")) as f:
            assert not set(json.load(f)) & set(LEGACY_RUNTIME_KEYS)
    assert seen == {"checkpoint": 0, "chunked_loss": 0}
    chosen = PhiForCausalLM.from_pretrained(folders[0], runtime=ModelRuntime(recompute="full"))
    assert chosen.runtime.recompute == "full"


def test_finetune_takes_the_runtime_from_its_flags_only(tmp_path):
    from megaphi.training.config import RunConfig

    _, (folder, _) = _legacy_folders(tmp_path)
    config = RunConfig.from_flags(
        [
            "--finetune",
            "--load",
            folder,
            "--mock-data",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "1",
            "--train-iters",
            "1",
            "--seq-length",
            "16",
            "--lr",
            "1e-3",
            "--torch-compile",
            "off",
        ],
        world_size=1,
    )
    assert config.model_runtime() == ModelRuntime()
    assert config.phi_config().hidden_size == CONFIG.hidden_size
    config = RunConfig.from_flags(
        [
            "--finetune",
            "--load",
            folder,
            "--mock-data",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "1",
            "--train-iters",
            "1",
            "--seq-length",
            "16",
            "--lr",
            "1e-3",
            "--torch-compile",
            "off",
            "--recompute",
            "--loss-chunk-tokens",
            "4",
        ],
        world_size=1,
    )
    assert config.model_runtime() == ModelRuntime(recompute="full", loss_chunk_tokens=4)


@pytest.mark.parametrize(
    "flags, runtime",
    [
        ([], ModelRuntime()),
        (["--recompute"], ModelRuntime(recompute="full")),
        (["--recompute-activations"], ModelRuntime(recompute="selective")),
        (
            ["--recompute-granularity", "full", "--recompute-num-layers", "1"],
            ModelRuntime(recompute="full", recompute_num_layers=1),
        ),
        (["--recompute", "--recompute-granularity", "selective"], ModelRuntime(recompute="selective")),
        (
            ["--loss-chunk-tokens", "64", "--attention-backend", "math"],
            ModelRuntime(loss_chunk_tokens=64, attention_backend="math"),
        ),
        (["--sequence-parallel"], ModelRuntime()),  # off at TP=1, as in Megatron-LM
        (["--torch-compile", "on"], ModelRuntime(compile=True)),
    ],
    ids=[
        "plain",
        "recompute",
        "recompute-activations",
        "full-first-layer",
        "selective",
        "chunk-math",
        "sp-tp1",
        "compile",
    ],
)
def test_runtime_from_training_flags(flags, runtime):
    from megaphi.training.config import RunConfig

    config = RunConfig.from_flags(
        [
            "--model",
            "tiny",
            "--mock-data",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "1",
            "--train-iters",
            "1",
            "--lr",
            "1e-3",
            "--torch-compile",
            "off",
            *flags,
        ],
        world_size=1,
    )
    assert config.model_runtime() == runtime


def test_training_with_runtime_flags_exports_architecture_only(tmp_path):
    """A run with recompute, loss-chunk, attention-backend and sequence-parallel flags: neither the exported
    folder's config.json nor the checkpoint's recorded model config holds a runtime key."""
    from test_resume import make_token_file, run_pretrain, tiny_flags

    prefix = make_token_file(str(tmp_path / "toy"))
    save = str(tmp_path / "ckpt")
    run_pretrain(
        tiny_flags(prefix, 2)
        + [
            "--save",
            save,
            "--eval-iters",
            "0",
            "--recompute-granularity",
            "full",
            "--recompute-num-layers",
            "1",
            "--loss-chunk-tokens",
            "8",
            "--attention-backend",
            "math",
            "--sequence-parallel",
        ]
    )
    tag = os.path.join(save, "iter_0000002")
    with open(os.path.join(tag, "model", "config.json")) as f:
        exported = json.load(f)
    with open(os.path.join(tag, "megaphi_meta.json")) as f:
        recorded = json.load(f)["model_config"]
    assert exported["hidden_size"] == recorded["hidden_size"] == 64
    assert not set(exported) & set(LEGACY_RUNTIME_KEYS), sorted(set(exported) & set(LEGACY_RUNTIME_KEYS))
    assert not set(recorded) & set(LEGACY_RUNTIME_KEYS), sorted(set(recorded) & set(LEGACY_RUNTIME_KEYS))
    assert PhiForCausalLM.from_pretrained(os.path.join(tag, "model")).runtime == ModelRuntime()
