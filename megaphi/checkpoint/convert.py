"""Conversions between Hugging Face phi folders and megaphi checkpoints (`megaphi-convert`).

Tensors are copied bit for bit unless a dtype is asked for. Output folders are written under a
temporary name and renamed when complete (atomic.write_folder_atomic). Resharding a training
checkpoint is reshard.reshard.
"""

import os
import shutil

import torch

from .atomic import write_folder_atomic
from .hf_folder import hf_token_ids, read_hf_checkpoint
from .layout import CONFIG_NAME
from .model_folder import load_megaphi_state, save_megaphi_folder

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cast_state(state, dtype_name):
    if dtype_name in (None, "keep"):
        return state
    return {k: v.to(DTYPES[dtype_name]) for k, v in state.items()}


def hf_to_megaphi(hf_dir, out_dir, dtype=None, overrides=None):
    """A Hugging Face phi folder -> a megaphi model folder; `overrides`: PhiConfig fields to replace."""
    config, state = read_hf_checkpoint(hf_dir)
    if overrides:
        config = config.replace(**overrides)
    state = cast_state(state, dtype)
    bos, eos = hf_token_ids(hf_dir)
    write_folder_atomic(out_dir, lambda tmp: save_megaphi_folder(tmp, config, state, bos, eos))
    return config


def megaphi_to_hf(ckpt, out_dir, tokenizer_dir=None, dtype=None):
    """A model folder or training checkpoint (any TP size) -> a Hugging Face folder, tokenizer files copied in."""
    from megaphi.model.phi import PhiForCausalLM

    config, state = load_megaphi_state(ckpt, PhiForCausalLM)
    state = cast_state(state, dtype)

    token_ids = hf_token_ids(ckpt) if os.path.isfile(os.path.join(ckpt, CONFIG_NAME)) else (None, None)

    def fill(tmp):
        save_megaphi_folder(tmp, config, state, *token_ids)  # an HF folder (config + generation config)
        if tokenizer_dir:
            copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
            if not copied:
                raise FileNotFoundError(f"--tokenizer {tokenizer_dir}: none of {TOKENIZER_FILES} found")
            for name in copied:
                shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))

    write_folder_atomic(out_dir, fill)
    return config
