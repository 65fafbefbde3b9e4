"""PhiConfig <-> Hugging Face config.json (model_type "phi", and the original MixFormer configs)."""
from megaphi.config import PhiConfig

MIXFORMER_MODEL_TYPES = ("mixformer-sequential", "phi-msft")


def config_to_hf_dict(config, dtype="float32"):
    """An HF PhiConfig dict (transformers' PhiForCausalLM loads it)."""
    factor = config.rotary_dim / config.head_dim
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": "gelu_new",
        "partial_rotary_factor": factor,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": factor},
        "attention_dropout": config.attention_dropout,
        "resid_pdrop": config.resid_dropout,
        "embd_pdrop": config.embd_dropout,
        "initializer_range": config.initializer_range,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def _rotary_dim(head_dim, factor, source):
    rotary = head_dim * factor
    if abs(rotary - round(rotary)) > 1e-6:
        raise ValueError(f"{source}: partial_rotary_factor {factor} x head_dim {head_dim} is not an integer")
    return int(round(rotary))


def config_from_hf_dict(d, source="config.json"):
    """PhiConfig from an HF Phi or MixFormer config dict; unsupported variants raise naming the field."""
    model_type = d.get("model_type")
    if model_type in MIXFORMER_MODEL_TYPES or ("n_embd" in d and "hidden_size" not in d):
        hidden = d["n_embd"]
        return PhiConfig(
            vocab_size=d["vocab_size"], hidden_size=hidden, intermediate_size=d.get("n_inner") or 4 * hidden,
            num_hidden_layers=d["n_layer"], num_attention_heads=d["n_head"], rotary_dim=d.get("rotary_dim", 32),
            max_position_embeddings=d.get("n_positions", 2048), layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            attention_dropout=d.get("attn_pdrop", 0.0) or 0.0, resid_dropout=d.get("resid_pdrop", 0.0) or 0.0,
            embd_dropout=d.get("embd_pdrop", 0.0) or 0.0, initializer_range=d.get("initializer_range", 0.02),
            hidden_act=d.get("activation_function", "gelu_new"))
    if model_type not in (None, "phi"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a Phi model")
    heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, heads):
        raise ValueError(f"{source}: num_key_value_heads {d['num_key_value_heads']} != num_attention_heads (unsupported)")
    if d.get("qk_layernorm"):
        raise ValueError(f"{source}: qk_layernorm=true is not supported")
    if d.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings=true is not supported (phi's lm_head is untied)")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
        raise ValueError(f"{source}: only default rotary embeddings are supported")
    factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    hidden = d["hidden_size"]
    return PhiConfig(
        vocab_size=d["vocab_size"], hidden_size=hidden, intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
        rotary_dim=_rotary_dim(hidden // heads, factor, source),
        max_position_embeddings=d.get("max_position_embeddings", 2048), layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        attention_dropout=d.get("attention_dropout", 0.0) or 0.0, resid_dropout=d.get("resid_pdrop", 0.0) or 0.0,
        embd_dropout=d.get("embd_pdrop", 0.0) or 0.0, initializer_range=d.get("initializer_range", 0.02),
        hidden_act=d.get("hidden_act", "gelu_new"))
