"""Model folders: writing them, and reading a model's weights from whatever a path holds.

A megaphi model folder is a Hugging Face folder: `config.json` (a transformers PhiConfig plus megaphi's
own keys, hf_config.py) + `generation_config.json` + `model.safetensors` with HF Phi names
(hf_names.py). Folders written before that (config.json = PhiConfig.to_dict(), no model_type) still
load.

`load_megaphi_state(path, model_class)` returns (PhiConfig, HF-named state dict) and dispatches on what is on disk,
in this order: a training checkpoint (DIR with `latest`, or DIR/<tag>: reshard.py merges its TP
shards), a model folder of the older megaphi format, a Hugging Face phi folder (hf_folder.py: HF or
MixFormer names; megaphi's own folders load through it too).
"""

import os

from safetensors.torch import load_file, save_file

from megaphi.config import PhiConfig

from .atomic import write_atomic, write_json_atomic
from .hf_config import config_to_hf_dict, generation_config_dict
from .hf_folder import is_hf_folder, read_config_probe, read_hf_checkpoint
from .hf_names import check_hf_state, model_to_hf_names
from .layout import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    LATEST_NAME,
    MODEL_SUBDIR,
    WEIGHTS_NAME,
    CheckpointError,
    read_pointer,
)
from .reshard import is_training_checkpoint, read_training_checkpoint
from .training_state import module_config_dict, verify_checkpoint

# the fields a model folder's weights must agree with the run's flags on
ARCH_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "rotary_dim",
    "vocab_size",
)


# -- writing --------------------------------------------------------------------------------------


def save_safetensors(path, state, metadata=None):
    state = {k: v.contiguous() for k, v in state.items()}
    write_atomic(path, lambda tmp: save_file(state, tmp, metadata=metadata or {"format": "pt"}))


def save_megaphi_folder(path, config, hf_state, bos_token_id=None, eos_token_id=None):
    """model.safetensors + config.json + generation_config.json (token ids: hf_config.default_token_ids)."""
    os.makedirs(path, exist_ok=True)
    check_hf_state(hf_state, config, f"saving to {path}")
    dtype = str(next(iter(hf_state.values())).dtype).replace("torch.", "")
    save_safetensors(os.path.join(path, WEIGHTS_NAME), hf_state)
    write_json_atomic(
        os.path.join(path, GENERATION_CONFIG_NAME), generation_config_dict(config, bos_token_id, eos_token_id)
    )
    write_json_atomic(os.path.join(path, CONFIG_NAME), config_to_hf_dict(config, dtype, bos_token_id, eos_token_id))


# -- reading --------------------------------------------------------------------------------------


def is_megaphi_folder(path):
    """A model folder in the format before megaphi wrote HF configs (config.json without model_type)."""
    config = read_config_probe(os.path.join(path, CONFIG_NAME))  # not JSON: the HF folder reader reports it
    return (
        os.path.isfile(os.path.join(path, WEIGHTS_NAME))
        and isinstance(config, dict)
        and "model_type" not in config
        and "hidden_size" in config
    )


def load_megaphi_folder(path):
    config = PhiConfig.from_json_file(os.path.join(path, CONFIG_NAME))
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    check_hf_state(state, config, os.path.join(path, WEIGHTS_NAME))
    return config, state


def is_model_folder(path):
    """A model folder: megaphi's (current or older format) or a Hugging Face phi folder."""
    return os.path.isdir(path) and (is_megaphi_folder(path) or is_hf_folder(path))


def load_megaphi_state(path, model_class):
    """(PhiConfig, HF-named state dict) from a training checkpoint or a model folder (see the module doc).
    model_class (e.g. PhiForCausalLM) says how a training checkpoint's tensor-parallel shards are split."""
    path = str(path)
    if is_training_checkpoint(path):
        config, full, _, _ = read_training_checkpoint(path, model_class)
        return config, model_to_hf_names(full, config)
    if is_megaphi_folder(path):
        return load_megaphi_folder(path)
    if is_hf_folder(path):
        return read_hf_checkpoint(path)
    raise ValueError(
        f"{path}: neither a model folder (megaphi or Hugging Face phi: {CONFIG_NAME} + "
        f"{WEIGHTS_NAME} or pytorch_model.bin) nor a megaphi training checkpoint"
    )


# -- weights for --finetune / --skip-train --------------------------------------------------------


def finetune_weights_source(load_dir):
    """Where --finetune --load DIR takes its weights from: ("folder", path) for a model folder (megaphi or
    Hugging Face phi; or a training checkpoint's exported DIR/<tag>/model), ("deepspeed", tag) otherwise."""
    if is_model_folder(load_dir):
        return "folder", load_dir
    tag = read_pointer(load_dir)
    if tag is None:
        raise CheckpointError(
            f"--load {load_dir}: neither a model folder (megaphi or Hugging Face phi: config.json "
            f"+ weights) nor a training checkpoint ({LATEST_NAME} file missing)"
        )
    exported = os.path.join(load_dir, tag, MODEL_SUBDIR)
    if is_model_folder(exported):
        verify_checkpoint(load_dir, select=lambda rel: rel.startswith(MODEL_SUBDIR + "/"))  # the files read
        return "folder", exported
    verify_checkpoint(load_dir, select=lambda rel: rel.endswith("_model_states.pt"))
    return "deepspeed", tag


def load_weights_from_folder(model, folder):
    """Copy the weights of a model folder (megaphi or Hugging Face phi) into `model` (same architecture, checked)."""
    try:
        config, hf_state = load_megaphi_state(folder, type(model))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--load {folder}: {e}") from None
    saved = config.to_dict()
    mine = module_config_dict(model) or {}
    diffs = [
        f"{k}: checkpoint {saved.get(k)} vs run {mine.get(k)}"
        for k in ARCH_FIELDS
        if k in saved and k in mine and saved[k] != mine[k]
    ]
    if diffs:
        raise CheckpointError(f"--load {folder}: architecture differs from the flags ({'; '.join(diffs)})")
    try:
        model.load_hf_state_dict(hf_state, source=folder)
    except ValueError as e:
        raise CheckpointError(f"--load {e}") from None
