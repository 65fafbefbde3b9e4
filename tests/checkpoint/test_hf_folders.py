"""Model folders are Hugging Face folders: transformers' Auto classes load what megaphi writes (giving
megaphi's logits), and every megaphi entry point takes what transformers writes (HF names or the
original MixFormer names, safetensors or .bin). Reference values come from transformers."""

import importlib
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from megaphi.config import get_preset  # noqa: E402
from megaphi.model import PhiForCausalLM  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
EOD = 256  # <|endoftext|> of the byte-level test tokenizer (ids 0..255 are bytes)


def _tool(name):
    """The command behind tools/NAME.py."""
    return importlib.import_module(f"megaphi.cli.{name}")


def _ids(vocab, seq=12):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


def _spread(model, seed):
    """Weights of std 0.1 (not 0.02): logits large enough that a wrong rotary split shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _read(path):
    return json.loads(pathlib.Path(path).read_text())


# -- megaphi folder -> transformers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,token_ids",
    [
        (get_preset("tiny"), {}),
        (
            get_preset("tiny", vocab_size=300, intermediate_size=256, rotary_dim=16, rope_theta=500.0),
            {"eos_token_id": 7},
        ),
    ],
    ids=["tiny", "rotary16_head64"],
)
def test_auto_classes_load_megaphi_folder(config, token_ids, tmp_path):
    model = _spread(PhiForCausalLM(config, initialize=False), seed=3).eval()
    model.save_pretrained(tmp_path, **token_ids)

    d = _read(tmp_path / "config.json")
    assert d["model_type"] == "phi" and d["architectures"] == ["PhiForCausalLM"]
    assert d["dtype"] == "float32" and "torch_dtype" not in d
    assert d["partial_rotary_factor"] == config.rotary_dim / config.head_dim and d["rotary_dim"] == config.rotary_dim
    eos = token_ids.get("eos_token_id")  # vocabularies this small hold no phi-1 <|endoftext|> (50256)
    assert d["bos_token_id"] == d["eos_token_id"] == eos
    assert _read(tmp_path / "generation_config.json").get("eos_token_id") == eos

    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf_config) is transformers.PhiConfig
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf) is transformers.PhiForCausalLM
    x = _ids(config.vocab_size)
    with torch.no_grad():
        reference = hf(x).logits
        assert (model(x) - reference).abs().max() <= 1e-5
    if config.rotary_dim != config.head_dim // 2:  # what a config without partial_rotary_factor gave
        hf_config.rope_parameters["partial_rotary_factor"] = 0.5
        wrong = transformers.PhiForCausalLM(hf_config).eval()
        wrong.load_state_dict(hf.state_dict())
        with torch.no_grad():
            assert (wrong(x).logits - reference).abs().max() > 1e-3

    again = PhiForCausalLM.from_pretrained(tmp_path)  # megaphi reads its folder back, rotary_dim included
    assert again.config == config
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))


def test_token_ids_default_to_phi1_endoftext():
    from megaphi.checkpoint.hf_config import default_token_ids, generation_config_dict

    assert default_token_ids(get_preset("phi-1")) == (50256, 50256)  # codegen-350M-mono's <|endoftext|>
    assert default_token_ids(get_preset("tiny")) == (None, None)  # not inside a 512-row vocabulary
    assert default_token_ids(get_preset("tiny"), eos_token_id=3) == (3, 3)
    assert generation_config_dict(get_preset("phi-1"))["eos_token_id"] == 50256


def test_old_format_megaphi_folder_still_loads(tmp_path):
    config = get_preset("tiny", rotary_dim=16)
    model = PhiForCausalLM(config, init_seed=5).eval()
    save_file(model.hf_state_dict(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))  # the format before model_type
    loaded = PhiForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == config
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))


def test_inconsistent_rotary_dim_is_a_one_line_error(tmp_path):
    PhiForCausalLM(get_preset("tiny", rotary_dim=16), init_seed=1).save_pretrained(tmp_path)
    d = _read(tmp_path / "config.json")
    d["rotary_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json: rotary_dim 32 disagrees with partial_rotary_factor 0\.25"):
        PhiForCausalLM.from_pretrained(tmp_path)


def test_unusable_config_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(SystemExit, match=r"error: .*config\.json: model_type 'llama' is not a Phi model$"):
        _tool("generate").main(["--checkpoint", str(tmp_path), "--prompt", "x", "--device", "cpu"])
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        PhiForCausalLM.from_pretrained(tmp_path)


# -- transformers folder -> megaphi's entry points ----------------------------------------------------


def _byte_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = EOD
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(pathlib.Path(folder) / "tokenizer.json"))
    return tok


def _hf_model(vocab, hidden, heads, factor, seed):
    config = transformers.PhiConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        partial_rotary_factor=factor,
        max_position_embeddings=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        bos_token_id=EOD,
        eos_token_id=EOD,
    )
    torch.manual_seed(seed)
    return _spread(transformers.PhiForCausalLM(config), seed).eval()


@pytest.fixture(scope="module")
def hf_phi(tmp_path_factory):
    """A tiny random HF PhiForCausalLM (head_dim 32, rotary 8) saved by transformers, with a tokenizer."""
    model = _hf_model(vocab=EOD + 1, hidden=64, heads=2, factor=0.25, seed=11)
    folder = tmp_path_factory.mktemp("hf_phi")
    model.save_pretrained(folder)
    _byte_tokenizer(folder)
    return model, folder


def _mixformer_folder(model, folder):
    """The original phi-1 layout (mixformer-sequential config, layers.N.* names), from HF's tensors."""
    c, s, n = model.config, model.state_dict(), model.config.num_hidden_layers
    state = {"layers.0.wte.weight": s["model.embed_tokens.weight"]}
    for kind in ("weight", "bias"):
        state[f"layers.{n + 1}.ln.{kind}"] = s[f"model.final_layernorm.{kind}"]
        state[f"layers.{n + 1}.linear.{kind}"] = s[f"lm_head.{kind}"]
        for i in range(n):
            hf, mf = f"model.layers.{i}.", f"layers.{i + 1}."
            state[mf + f"ln.{kind}"] = s[hf + f"input_layernorm.{kind}"]
            state[mf + f"mixer.Wqkv.{kind}"] = torch.cat([s[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            state[mf + f"mixer.out_proj.{kind}"] = s[hf + f"self_attn.dense.{kind}"]
            for fc in ("fc1", "fc2"):
                state[mf + f"mlp.{fc}.{kind}"] = s[hf + f"mlp.{fc}.{kind}"]
    folder.mkdir()
    torch.save({k: v.clone() for k, v in state.items()}, folder / "pytorch_model.bin")
    head_dim = c.hidden_size // c.num_attention_heads
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mixformer-sequential",
                "vocab_size": c.vocab_size,
                "n_embd": c.hidden_size,
                "n_inner": c.intermediate_size,
                "n_layer": n,
                "n_head": c.num_attention_heads,
                "n_positions": 128,
                "rotary_dim": int(head_dim * c.rope_parameters["partial_rotary_factor"]),
            }
        )
    )
    return folder


@pytest.mark.parametrize("layout", ["safetensors", "bin", "mixformer"])
def test_from_pretrained_reads_hf_folders(hf_phi, layout, tmp_path):
    hf, folder = hf_phi
    if layout == "bin":
        folder = tmp_path / "bin"
        folder.mkdir()
        (folder / "config.json").write_text((hf_phi[1] / "config.json").read_text())
        torch.save({k: v.clone() for k, v in hf.state_dict().items()}, folder / "pytorch_model.bin")
    elif layout == "mixformer":
        folder = _mixformer_folder(hf, tmp_path / "mixformer")
    model = PhiForCausalLM.from_pretrained(folder).eval()
    x = _ids(hf.config.vocab_size)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-5


def test_generate_tool_on_hf_folder(hf_phi, capsys):
    hf, folder = hf_phi
    prompt = "def add(a, b):\n"
    _tool("generate").main(
        [
            "--checkpoint",
            str(folder),
            "--prompt",
            prompt,
            "--greedy",
            "--max-new-tokens",
            "6",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    tok = _byte_tokenizer(folder)
    with torch.no_grad():
        out = hf.generate(torch.tensor([tok.encode(prompt).ids]), max_new_tokens=6, do_sample=False)
    expected = tok.decode(out[0].tolist(), skip_special_tokens=True)
    printed = capsys.readouterr().out
    assert printed.split("===\n", 1)[1].rstrip("\n") == expected


def test_eval_humaneval_tool_on_hf_folder(hf_phi, tmp_path, capsys):
    _, folder = hf_phi
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
    _tool("eval_humaneval").main(
        [
            "--checkpoint",
            str(folder),
            "--problems",
            str(problems),
            "--greedy",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--workers",
            "1",
            "--output",
            str(tmp_path / "results.jsonl"),
        ]
    )
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["Toy/0"]
    assert "pass@1" in capsys.readouterr().out


def test_finetune_loads_hf_folder(tmp_path):
    from megaphi.checkpoint.model_folder import load_megaphi_state
    from test_resume import make_token_file, run_pretrain, tiny_flags

    hf = _hf_model(vocab=256, hidden=64, heads=2, factor=0.5, seed=12)  # tiny_flags' shapes, rotary 16
    hf.save_pretrained(tmp_path / "hf")
    prefix = make_token_file(str(tmp_path / "toy"))
    out = tmp_path / "ft"
    proc = run_pretrain(
        tiny_flags(prefix, 1)
        + [
            "--rotary-dim",
            "16",
            "--finetune",
            "--load",
            str(tmp_path / "hf"),
            "--lr",
            "0",
            "--eval-iters",
            "0",
            "--save",
            str(out),
            "--no-export-model",
        ]
    )
    assert f"finetuning from weights in {tmp_path / 'hf'}" in proc.stdout
    _, saved = load_megaphi_state(out, PhiForCausalLM)  # the training checkpoint's weights; lr 0: the loaded ones
    reference = hf.state_dict()
    assert set(saved) == set(reference)
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
