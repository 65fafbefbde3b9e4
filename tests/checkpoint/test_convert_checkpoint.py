"""megaphi-convert (tools/convert_checkpoint.py) against transformers' own save/load."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from megaphi.checkpoint.hf_config import config_from_hf_dict  # noqa: E402
from megaphi.model import PhiForCausalLM  # noqa: E402

from megaphi.cli import convert_checkpoint as convert  # noqa: E402

HIDDEN, LAYERS, VOCAB = 128, 2, 256


@pytest.fixture(scope="module")
def hf_model():
    config = transformers.PhiConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        partial_rotary_factor=0.5,
        max_position_embeddings=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = transformers.PhiForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(d)
    return d


def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def assert_same_tensors(a, b):
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


def _one_line_error(capsys, argv):
    """convert.main(argv) stops with exit 2 and one line on stderr (no traceback); returns the line."""
    capsys.readouterr()  # what ran before (progress bars)
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_hf_to_megaphi_to_hf_round_trip(hf_model, hf_dir, tmp_path, capsys):
    convert.main(["hf-to-megaphi", str(hf_dir), str(tmp_path / "mp")])
    ours = PhiForCausalLM.from_pretrained(tmp_path / "mp").eval()
    with torch.no_grad():
        reference = hf_model(ids()).logits
        assert (ours(ids()) - reference).abs().max() <= 1e-5
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"stand-in": true}')
    convert.main(["megaphi-to-hf", str(tmp_path / "mp"), str(tmp_path / "hf_out"), "--tokenizer", str(tok)])
    assert (tmp_path / "hf_out" / "tokenizer.json").read_text() == '{"stand-in": true}'
    hf_config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert hf_config["model_type"] == "phi" and hf_config["architectures"] == ["PhiForCausalLM"]
    assert_same_tensors(load_file(tmp_path / "hf_out" / "model.safetensors"), load_file(hf_dir / "model.safetensors"))
    reloaded = transformers.PhiForCausalLM.from_pretrained(tmp_path / "hf_out").eval()
    with torch.no_grad():
        assert (reloaded(ids()).logits - reference).abs().max() <= 1e-5
    line = _one_line_error(capsys, ["megaphi-to-hf", str(tmp_path / "mp"), str(tmp_path / "hf_out")])
    assert line == f"megaphi-convert megaphi-to-hf: error: {tmp_path / 'hf_out'} already exists and is not empty"


def test_bf16_megaphi_round_trip_is_bit_identical(tmp_path):
    model = PhiForCausalLM(
        config_from_hf_dict(
            json.loads(
                json.dumps(
                    {
                        "model_type": "phi",
                        "vocab_size": VOCAB,
                        "hidden_size": HIDDEN,
                        "intermediate_size": 256,
                        "num_hidden_layers": LAYERS,
                        "num_attention_heads": 2,
                        "partial_rotary_factor": 0.5,
                    }
                )
            )
        ),
        init_seed=4,
    )
    model.to(torch.bfloat16).save_pretrained(tmp_path / "a")
    convert.main(["megaphi-to-hf", str(tmp_path / "a"), str(tmp_path / "hf")])
    convert.main(["hf-to-megaphi", str(tmp_path / "hf"), str(tmp_path / "b")])
    assert_same_tensors(
        load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    )
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        (tmp_path / "b" / "config.json").read_text()
    )


def test_sharded_bin_checkpoint(hf_model, hf_dir, tmp_path):
    state = hf_model.state_dict()
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    src = tmp_path / "sharded"
    src.mkdir()
    (src / "config.json").write_text((hf_dir / "config.json").read_text())
    for file, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, src / file)
    (src / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}})
    )
    convert.main(["hf-to-megaphi", str(src), str(tmp_path / "mp")])
    assert_same_tensors(load_file(tmp_path / "mp" / "model.safetensors"), load_file(hf_dir / "model.safetensors"))


def _mixformer_state(hf_state, layers):
    """The original phi-1 layout, built by hand from the HF tensors."""
    out = {
        "layers.0.wte.weight": hf_state["model.embed_tokens.weight"],
        f"layers.{layers + 1}.ln.weight": hf_state["model.final_layernorm.weight"],
        f"layers.{layers + 1}.ln.bias": hf_state["model.final_layernorm.bias"],
        f"layers.{layers + 1}.linear.weight": hf_state["lm_head.weight"],
        f"layers.{layers + 1}.linear.bias": hf_state["lm_head.bias"],
    }
    for i in range(layers):
        hf, mf = f"model.layers.{i}.", f"layers.{i + 1}."
        for kind in ("weight", "bias"):
            out[mf + f"ln.{kind}"] = hf_state[hf + f"input_layernorm.{kind}"]
            out[mf + f"mixer.Wqkv.{kind}"] = torch.cat([hf_state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[mf + f"mixer.out_proj.{kind}"] = hf_state[hf + f"self_attn.dense.{kind}"]
            out[mf + f"mlp.fc1.{kind}"] = hf_state[hf + f"mlp.fc1.{kind}"]
            out[mf + f"mlp.fc2.{kind}"] = hf_state[hf + f"mlp.fc2.{kind}"]
        out[mf + "mixer.rotary_emb.inv_freq"] = torch.ones(16)
    return out


def test_mixformer_names(hf_model, tmp_path):
    hf_state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    src = tmp_path / "mixformer"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in _mixformer_state(hf_state, LAYERS).items()}, src / "model.safetensors")
    (src / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mixformer-sequential",
                "vocab_size": VOCAB,
                "n_embd": HIDDEN,
                "n_inner": 256,
                "n_layer": LAYERS,
                "n_head": 2,
                "rotary_dim": 32,
                "n_positions": 64,
                "layer_norm_epsilon": 1e-5,
                "activation_function": "gelu_new",
            }
        )
    )
    convert.main(["hf-to-megaphi", str(src), str(tmp_path / "mp")])
    assert_same_tensors(load_file(tmp_path / "mp" / "model.safetensors"), hf_state)


def test_mismatches_name_the_tensor(hf_dir, tmp_path, capsys):
    state = load_file(hf_dir / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    wrong = dict(state)
    wrong["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    save_file(wrong, bad / "model.safetensors")
    assert "'model.layers.1.self_attn.k_proj.weight' has shape" in _one_line_error(
        capsys, ["hf-to-megaphi", str(bad), str(tmp_path / "out1")]
    )
    missing = dict(state)
    del missing["model.layers.0.mlp.fc2.bias"]
    save_file(missing, bad / "model.safetensors")
    assert "'model.layers.0.mlp.fc2.bias' is missing" in _one_line_error(
        capsys, ["hf-to-megaphi", str(bad), str(tmp_path / "out2")]
    )
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    (tmp_path / "empty").mkdir()
    assert "neither a model folder" in _one_line_error(
        capsys, ["megaphi-to-hf", str(tmp_path / "empty"), str(tmp_path / "out3")]
    )
