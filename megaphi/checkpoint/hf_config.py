"""PhiConfig <-> Hugging Face config.json (model_type "phi", and the original MixFormer configs).

Model folders megaphi writes carry a transformers PhiConfig (built by transformers itself) plus megaphi's
own keys (megaphi_keys()), and a generation_config.json; reading needs no transformers."""

import dataclasses

from megaphi.config import PhiConfig

MIXFORMER_MODEL_TYPES = ("mixformer-sequential", "phi-msft")


# PhiConfig fields that HF's PhiConfig expresses under its own names; every other field is one of
# megaphi's own keys (rotary_dim too: HF's partial_rotary_factor x head_dim; the reader checks they agree).
_HF_EXPRESSED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "layer_norm_eps",
    "rope_theta",
    "attention_dropout",
    "resid_dropout",
    "embd_dropout",
    "initializer_range",
    "hidden_act",
)


def megaphi_keys():
    """megaphi's own config.json keys: the PhiConfig fields transformers' PhiConfig has no key for."""
    return tuple(f.name for f in dataclasses.fields(PhiConfig) if f.name not in _HF_EXPRESSED)


# Always written, also when equal to transformers' defaults (readable files; older transformers read them).
_ALWAYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "layer_norm_eps",
    "hidden_act",
    "resid_pdrop",
    "embd_pdrop",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
)
# <|endoftext|> of phi-1's tokenizer (codegen-350M-mono): the bos/eos id when no tokenizer says otherwise.
PHI1_EOS_TOKEN_ID = 50256


def default_token_ids(config, bos_token_id=None, eos_token_id=None):
    """(bos, eos): the given ids, else phi-1's <|endoftext|> when it is inside the vocabulary, else None."""
    fallback = PHI1_EOS_TOKEN_ID if config.vocab_size > PHI1_EOS_TOKEN_ID else None
    eos = fallback if eos_token_id is None else eos_token_id
    return (eos if bos_token_id is None else bos_token_id), eos


def hf_phi_config(config, dtype="float32", bos_token_id=None, eos_token_id=None):
    """transformers.PhiConfig equal to megaphi's config (megaphi's own keys ride along as attributes)."""
    from transformers import PhiConfig as HFPhiConfig

    bos, eos = default_token_ids(config, bos_token_id, eos_token_id)
    factor = config.rotary_dim / config.head_dim
    return HFPhiConfig(
        architectures=["PhiForCausalLM"],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="gelu_new",
        resid_pdrop=config.resid_dropout,
        embd_pdrop=config.embd_dropout,
        attention_dropout=config.attention_dropout,
        initializer_range=config.initializer_range,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(config.rope_theta),
            "partial_rotary_factor": factor,
        },
        qk_layernorm=False,
        tie_word_embeddings=False,
        use_cache=True,
        bos_token_id=bos,
        eos_token_id=eos,
        dtype=dtype,
        **{k: getattr(config, k) for k in megaphi_keys()},
    )


def config_to_hf_dict(config, dtype="float32", bos_token_id=None, eos_token_id=None):
    """config.json of a model folder: a transformers PhiConfig (AutoConfig / AutoModelForCausalLM load
    it) plus megaphi's own keys. `partial_rotary_factor` and `rope_theta` are also written at the top
    level, where transformers 4.x reads them (5.x reads rope_parameters)."""
    hf = hf_phi_config(config, dtype, bos_token_id, eos_token_id)
    full = hf.to_dict()
    d = {"architectures": full["architectures"], "model_type": full["model_type"]}
    d.update({k: full[k] for k in _ALWAYS})
    d.update(hf.to_diff_dict())
    d["partial_rotary_factor"] = full["rope_parameters"]["partial_rotary_factor"]
    d["rope_theta"] = full["rope_parameters"]["rope_theta"]
    d.update({k: getattr(config, k) for k in megaphi_keys()})
    return d


def generation_config_dict(config, bos_token_id=None, eos_token_id=None):
    """generation_config.json of a model folder (transformers.GenerationConfig)."""
    from transformers import GenerationConfig

    bos, eos = default_token_ids(config, bos_token_id, eos_token_id)
    return GenerationConfig(bos_token_id=bos, eos_token_id=eos).to_diff_dict()


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
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d.get("n_inner") or 4 * hidden,
            num_hidden_layers=d["n_layer"],
            num_attention_heads=d["n_head"],
            rotary_dim=d.get("rotary_dim", 32),
            max_position_embeddings=d.get("n_positions", 2048),
            layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            attention_dropout=d.get("attn_pdrop", 0.0) or 0.0,
            resid_dropout=d.get("resid_pdrop", 0.0) or 0.0,
            embd_dropout=d.get("embd_pdrop", 0.0) or 0.0,
            initializer_range=d.get("initializer_range", 0.02),
            hidden_act=d.get("activation_function", "gelu_new"),
        )
    if model_type not in (None, "phi"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a Phi model")
    heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, heads):
        raise ValueError(
            f"{source}: num_key_value_heads {d['num_key_value_heads']} != num_attention_heads (unsupported)"
        )
    if d.get("qk_layernorm"):
        raise ValueError(f"{source}: qk_layernorm=true is not supported")
    if d.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings=true is not supported (phi's lm_head is untied)")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
        raise ValueError(f"{source}: only default rotary embeddings are supported")
    factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    hidden = d["hidden_size"]
    rotary_dim = _rotary_dim(hidden // heads, factor, source)
    if "rotary_dim" in d and d["rotary_dim"] != rotary_dim:
        raise ValueError(
            f"{source}: rotary_dim {d['rotary_dim']} disagrees with partial_rotary_factor {factor} "
            f"x head_dim {hidden // heads} = {rotary_dim}"
        )
    extras = {
        k: d[k] for k in megaphi_keys() if k in d and k != "rotary_dim"
    }  # megaphi's own keys, when megaphi wrote the file
    return PhiConfig(
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        rotary_dim=rotary_dim,
        **extras,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        attention_dropout=d.get("attention_dropout", 0.0) or 0.0,
        resid_dropout=d.get("resid_pdrop", 0.0) or 0.0,
        embd_dropout=d.get("embd_pdrop", 0.0) or 0.0,
        initializer_range=d.get("initializer_range", 0.02),
        hidden_act=d.get("hidden_act", "gelu_new"),
    )
