import pytest
import torch

from megaphi.config import PhiConfig, get_preset, num_parameters


def test_presets_shapes():
    phi1, small = get_preset("phi-1"), get_preset("phi-1-small")
    assert (phi1.num_hidden_layers, phi1.hidden_size, phi1.intermediate_size, phi1.num_attention_heads) == (
        24,
        2048,
        8192,
        32,
    )
    assert (small.num_hidden_layers, small.hidden_size, small.intermediate_size, small.num_attention_heads) == (
        20,
        1024,
        4096,
        16,
    )
    for c in (phi1, small):
        assert (c.vocab_size, c.head_dim, c.rotary_dim, c.max_position_embeddings, c.layer_norm_eps) == (
            51200,
            64,
            32,
            2048,
            1e-5,
        )
        assert (c.attention_dropout, c.resid_dropout, c.embd_dropout) == (0.1, 0.1, 0.0)
    assert get_preset("tiny", num_hidden_layers=3).num_hidden_layers == 3


@pytest.mark.parametrize("name,expected", [("phi-1", 1_418_270_720), ("phi-1-small", 356_794_368)])
def test_parameter_count_from_config_and_meta_model(name, expected):
    from megaphi.model import PhiForCausalLM

    config = get_preset(name)
    assert num_parameters(config) == expected
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_dict_round_trip_and_errors():
    c = get_preset("phi-1-small", rope_theta=500.0)
    assert PhiConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown PhiConfig field.*n_embd"):
        PhiConfig.from_dict({**c.to_dict(), "n_embd": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("phi-2")
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        PhiConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        PhiConfig(rotary_dim=80)
    with pytest.raises(ValueError, match="hidden_act"):
        PhiConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="vocab_size=50295 is not divisible by tensor-model-parallel size 2"):
        PhiConfig(vocab_size=50295).check_tensor_parallel(2)
    get_preset("phi-1").check_tensor_parallel(8)
