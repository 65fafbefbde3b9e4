"""megaphi checkpoint folders and the mapping between the model and HF PhiForCausalLM tensor names.

A megaphi model folder is a Hugging Face folder: `config.json` (a transformers PhiConfig plus megaphi's
own keys, megaphi.model.hf_config) + `generation_config.json` + `model.safetensors` with HF Phi names
(q_proj/k_proj/v_proj separate). Folders written before that (config.json = PhiConfig.to_dict(), no
model_type) still load. In the model, q/k/v are one fused column layer laid out per head
([q_h; k_h; v_h] for each head h), which is what fuse_qkv/split_qkv convert.

`load_megaphi_state(path)` returns (PhiConfig, HF-named state dict) for anything a registered
loader recognises: these folders, HF phi folders (megaphi.model.hf_checkpoint) and training checkpoints
(megaphi.model.sharded_checkpoint) plug in with register_checkpoint_loader.
"""
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from megaphi.config import PhiConfig
from megaphi.parallel.layers import full_shape, shard_of
from megaphi.parallel.mappings import gather_shards as _gather
from megaphi.parallel.state import get_tensor_model_parallel_world_size
from megaphi.parallel.utils import is_tensor_model_parallel_param

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
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
    shapes = {"model.embed_tokens.weight": (v, h), "model.final_layernorm.weight": (h,),
              "model.final_layernorm.bias": (h,), "lm_head.weight": (v, h), "lm_head.bias": (v,)}
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
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(hf_state[name].shape)}, "
                             f"the config expects {shape}")


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
            t = _gather(t, param.partition_dim)
        state[name] = t.cpu().contiguous()
    return model_to_hf_names(state, model.config)


# -- folders --------------------------------------------------------------------------------------

def default_mode(is_dir):
    """What open()/mkdir() would give under the current umask: 0666 & ~umask (0777 for folders)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def apply_default_modes(root):
    """chmod a folder tree written through mkstemp/mkdtemp (0600/0700) to the umask's modes."""
    os.chmod(root, default_mode(True))
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), default_mode(True))
        for f in files:
            os.chmod(os.path.join(dirpath, f), default_mode(False))


def _atomic_write(path, write):
    """Write through a temporary name in the same folder, then rename (never a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode(False))  # mkstemp makes 0600: teammates must read checkpoints too
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    _atomic_write(path, write)


def save_safetensors(path, state, metadata=None):
    state = {k: v.contiguous() for k, v in state.items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata or {"format": "pt"}))


def save_megaphi_folder(path, config, hf_state, bos_token_id=None, eos_token_id=None):
    """model.safetensors + config.json + generation_config.json (token ids: hf_config.default_token_ids)."""
    from .hf_config import config_to_hf_dict, generation_config_dict
    os.makedirs(path, exist_ok=True)
    check_hf_state(hf_state, config, f"saving to {path}")
    dtype = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
    save_safetensors(os.path.join(path, WEIGHTS_NAME), hf_state)
    save_json(os.path.join(path, GENERATION_CONFIG_NAME), generation_config_dict(config, bos_token_id, eos_token_id))
    save_json(os.path.join(path, CONFIG_NAME), config_to_hf_dict(config, dtype, bos_token_id, eos_token_id))


def is_megaphi_folder(path):
    """A model folder in the format before megaphi wrote HF configs (config.json without model_type)."""
    return os.path.isfile(os.path.join(path, WEIGHTS_NAME)) and _is_megaphi_config(os.path.join(path, CONFIG_NAME))


NOT_JSON = object()  # read_config_probe: the file exists but does not parse


def read_config_probe(path):
    """What a folder probe needs of a config.json: None when there is no such file, NOT_JSON when it
    does not parse (the loader that claims it reports the error), else the parsed value."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return NOT_JSON


def _is_megaphi_config(path):
    d = read_config_probe(path)  # not JSON: the HF folder loader reports it
    return isinstance(d, dict) and "model_type" not in d and "hidden_size" in d


def load_megaphi_folder(path):
    config = PhiConfig.from_json_file(os.path.join(path, CONFIG_NAME))
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    check_hf_state(state, config, os.path.join(path, WEIGHTS_NAME))
    return config, state


_LOADERS = [(is_megaphi_folder, load_megaphi_folder)]


def register_checkpoint_loader(can_load, load, first=True):
    """Add a loader: can_load(path) -> bool, load(path) -> (PhiConfig, HF-named full state dict)."""
    _LOADERS.insert(0, (can_load, load)) if first else _LOADERS.append((can_load, load))


def load_megaphi_state(path):
    """(PhiConfig, HF-named state dict) from a megaphi checkpoint `path` (any registered format)."""
    path = str(path)
    for can_load, load in _LOADERS:
        if can_load(path):
            return load(path)
    raise ValueError(f"{path}: neither a model folder (megaphi or Hugging Face phi: {CONFIG_NAME} + "
                     f"{WEIGHTS_NAME} or pytorch_model.bin) nor a megaphi training checkpoint")
