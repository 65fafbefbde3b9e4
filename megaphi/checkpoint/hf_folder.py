"""Reading Hugging Face phi folders: HF Phi names or the original MixFormer names, safetensors or .bin,
sharded (index json) or not. model_folder.load_megaphi_state dispatches here, so every place that takes a
model folder (PhiForCausalLM.from_pretrained, --finetune --load, tools/generate.py, tools/eval_humaneval.py)
takes these folders too; megaphi's own model folders are HF folders and load through here as well.
"""

import glob
import json
import os
import re

import torch
from safetensors.torch import load_file

from .hf_config import config_from_hf_dict
from .hf_names import check_hf_state
from .layout import CONFIG_NAME

NOT_JSON = object()  # read_config_probe: the file exists but does not parse


def read_config_probe(path):
    """What a folder probe needs of a config.json: None when there is no such file, NOT_JSON when it
    does not parse (the reader that claims it reports the error), else the parsed value."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return NOT_JSON


def _load_weight_file(path):
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_weights(hf_dir):
    """All tensors of an HF folder: single or sharded (index json), safetensors or .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(hf_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            state = {}
            for shard in sorted(set(weight_map.values())):
                tensors = _load_weight_file(os.path.join(hf_dir, shard))
                for name in tensors:
                    if weight_map.get(name) not in (None, shard):
                        raise ValueError(
                            f"{hf_dir}/{shard}: tensor {name!r} is mapped to {weight_map[name]} by {index_name}"
                        )
                state.update(tensors)
            return state
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(hf_dir, single)):
            return _load_weight_file(os.path.join(hf_dir, single))
    found = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")) + glob.glob(os.path.join(hf_dir, "*.bin")))
    if len(found) == 1:
        return _load_weight_file(found[0])
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors, pytorch_model.bin or index json found")


_MIXFORMER_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_MSFT_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "ln": "input_layernorm",
    "mixer.out_proj": "self_attn.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _block_tensors(i, rest, tensor, source, original):
    """HF (name, tensor) pairs for tensor `rest` (e.g. 'mixer.Wqkv.weight') of MixFormer block i."""
    module, kind = rest.rsplit(".", 1)
    prefix = f"model.layers.{i}."
    if module == "mixer.Wqkv":  # rows [Q; K; V]
        return [
            (f"{prefix}self_attn.{part}.{kind}", t.contiguous())
            for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0))
        ]
    if module in _BLOCK_RENAMES:
        return [(f"{prefix}{_BLOCK_RENAMES[module]}.{kind}", tensor)]
    raise ValueError(f"{source}: unknown MixFormer tensor {original!r}")


def mixformer_to_hf(state, num_layers, source="checkpoint"):
    """Rename original phi-1 MixFormer tensors (layers.N.* or transformer.h.N.*) to HF Phi names."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("inv_freq"):
            continue  # rotary buffers, recomputed by the model
        kind = name.rsplit(".", 1)[1]
        m, ms = _MIXFORMER_LAYER.match(name), _MSFT_LAYER.match(name)
        last = m is not None and int(m.group(1)) == num_layers + 1
        if name in ("layers.0.wte.weight", "transformer.embd.wte.weight"):
            out["model.embed_tokens.weight"] = tensor
        elif name.startswith("lm_head.ln.") or (last and m.group(2).startswith("ln.")):
            out["model.final_layernorm." + kind] = tensor
        elif name.startswith("lm_head.linear.") or (last and m.group(2).startswith("linear.")):
            out["lm_head." + kind] = tensor
        elif m and 1 <= int(m.group(1)) <= num_layers:
            out.update(_block_tensors(int(m.group(1)) - 1, m.group(2), tensor, source, name))
        elif ms:
            out.update(_block_tensors(int(ms.group(1)), ms.group(2), tensor, source, name))
        else:
            raise ValueError(f"{source}: unknown MixFormer tensor {name!r}")
    return out


def _is_mixformer_state(state):
    return any(n.startswith(("layers.", "transformer.")) for n in state)


def read_hf_checkpoint(hf_dir):
    """(PhiConfig, HF-named state dict) from a Hugging Face Phi or MixFormer folder."""
    config_path = os.path.join(hf_dir, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found")
    try:
        with open(config_path) as f:
            d = json.load(f)
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    config = config_from_hf_dict(d, source=config_path)
    state = load_hf_weights(hf_dir)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if _is_mixformer_state(state):
        state = mixformer_to_hf(state, config.num_hidden_layers, source=hf_dir)
    check_hf_state(state, config, hf_dir)
    return config, state


def is_hf_folder(path):
    """A folder whose config.json names a model_type (or is a MixFormer config): an HF folder, read by
    read_hf_checkpoint (which explains what is wrong when it is not a phi model)."""
    d = read_config_probe(os.path.join(path, CONFIG_NAME))
    if d is None:
        return False
    if d is NOT_JSON:
        return True  # read_hf_checkpoint names the file and the JSON error
    return not isinstance(d, dict) or "model_type" in d or "n_embd" in d


def hf_token_ids(path):
    """(bos_token_id, eos_token_id) from an HF folder's config.json (None where absent)."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        d = json.load(f)
    return d.get("bos_token_id"), d.get("eos_token_id")
