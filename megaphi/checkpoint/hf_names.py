"""The mapping between the model's parameters and Hugging Face PhiForCausalLM tensor names.

Model folders hold HF Phi names (q_proj/k_proj/v_proj separate). In the model, q/k/v are one fused
column layer laid out per head ([q_h; k_h; v_h] for each head h), which is what fuse_qkv/split_qkv
convert. Training checkpoints hold the model's own names (reshard.py).
"""

import torch

from megaphi.parallel.layers import full_shape, shard_of
from megaphi.parallel.mappings import gather_shards
from megaphi.parallel.state import get_tensor_model_parallel_world_size
from megaphi.parallel.utils import is_tensor_model_parallel_param

_QKV = ("q_proj", "k_proj", "v_proj")


def fuse_qkv(q, k, v, num_heads):
    """[h(, in)] x3 in HF layout -> [3h(, in)] laid out head by head as [q_h; k_h; v_h]."""
    rest = q.shape[1:]
    parts = [t.reshape(num_heads, -1, *rest) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * q.shape[0], *rest)


def split_qkv(fused, num_heads):
    """Inverse of fuse_qkv: -> (q, k, v) in HF layout (contiguous)."""
    rest = fused.shape[1:]
    per_head = fused.reshape(num_heads, 3, -1, *rest)
    return tuple(per_head[:, i].reshape(-1, *rest).contiguous() for i in range(3))


def expected_hf_shapes(config):
    """HF PhiForCausalLM tensor name -> shape for config."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.final_layernorm.weight": (h,),
        "model.final_layernorm.bias": (h,),
        "lm_head.weight": (v, h),
        "lm_head.bias": (v,),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "input_layernorm.bias"] = (h,)
        for name in _QKV + ("dense",):
            shapes[p + f"self_attn.{name}.weight"], shapes[p + f"self_attn.{name}.bias"] = (h, h), (h,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (f, h), (f,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (h, f), (h,)
    return shapes


def check_hf_state(hf_state, config, source):
    """Raise a ValueError naming the first missing, unexpected or wrongly shaped tensor."""
    expected = expected_hf_shapes(config)
    missing = [n for n in expected if n not in hf_state]
    unexpected = [n for n in hf_state if n not in expected]
    if missing:
        raise ValueError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} for this config ({len(unexpected)} in all)")
    for name, shape in expected.items():
        if tuple(hf_state[name].shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(hf_state[name].shape)}, the config expects {shape}"
            )


def hf_to_model_names(hf_state, config):
    """HF names -> the model's (unsharded) parameter names, fusing q/k/v."""
    out = {}
    for name, tensor in hf_state.items():
        if ".self_attn." in name and any(f".{p}." in name for p in _QKV):
            continue
        out[name] = tensor
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            q, k, v = (hf_state[f"{p}{n}.{kind}"] for n in _QKV)
            out[f"{p}query_key_value.{kind}"] = fuse_qkv(q, k, v, config.num_attention_heads)
    return out


def model_to_hf_names(state, config):
    """The model's full parameter names -> HF names, splitting the fused q/k/v."""
    out = {}
    for name, tensor in state.items():
        if ".query_key_value." in name:
            prefix, kind = name.split(".query_key_value.")
            for part, t in zip(_QKV, split_qkv(tensor, config.num_attention_heads)):
                out[f"{prefix}.{part}.{kind}"] = t
        else:
            out[name] = tensor
    return out


@torch.no_grad()
def load_hf_state_into(model, hf_state, source="state dict"):
    """Copy an HF-named full state dict into model (each TP rank takes its shard), checking names and shapes."""
    check_hf_state(hf_state, model.config, source)
    full = hf_to_model_names(hf_state, model.config)
    for name, param in model.named_parameters():
        tensor = full[name]
        if list(tensor.shape) != full_shape(param):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {full_shape(param)}")
        param.copy_(shard_of(tensor, param))


@torch.no_grad()
def model_to_hf_state(model):
    """Full (TP-gathered) HF-named state dict on CPU; a collective when TP > 1."""
    state = {}
    for name, param in model.named_parameters():
        t = param.detach()
        if is_tensor_model_parallel_param(param) and get_tensor_model_parallel_world_size() > 1:
            t = gather_shards(t, param.partition_dim)
        state[name] = t.cpu().contiguous()
    return model_to_hf_names(state, model.config)
