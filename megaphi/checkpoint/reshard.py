"""Tensor-parallel shards of training checkpoints: merge, split, reshard, TP-size checks.

A training checkpoint tag folder (DIR/<tag>/, written by DeepSpeed's save_checkpoint with megaphi's
mpu) holds one `mp_rank_XX_model_states.pt` per TP rank, whose "module" entry is that rank's
state dict (the model's own parameter names, fused per-head query_key_value), and
`megaphi_meta.json` with `tensor_model_parallel_size` and `model_config`. Which dim a parameter is
split on is read from the model itself (the `tensor_model_parallel` / `partition_dim` attributes
the parallel layers set), so new TP layers need no table here. The model class is given by the caller
(`model_class`, e.g. PhiForCausalLM): the model's from_pretrained reads checkpoints through this module,
so importing the model here would make an import cycle.

Resharding keeps the model weights only: ZeRO optimizer state (fp32 master weights, Adam moments)
is partitioned by TP and DP rank and is dropped, like Megatron's checkpoint-resharding tools; a run
resumed from a resharded checkpoint restarts the optimizer. `megaphi_meta.json` of the output says
so ("optimizer_states": false).
"""

import glob
import json
import os
import shutil

import torch

from megaphi.config import PhiConfig

from .atomic import write_folder_atomic, write_json_atomic
from .integrity import HASH_NAME, checksum_and_sync, seal_metadata
from .pipeline_layout import pipeline_layout_of, read_stage_shards, stage_state_files, write_stage_files
from .layout import (
    CONFIG_NAME,
    LATEST_NAME,
    META_NAME,
    MODEL_STATES_RE,
    MODEL_SUBDIR,
    WEIGHTS_NAME,
    pointer_text,
    resolve_tag_dir,
)


class TensorParallelMismatchError(ValueError):
    """A checkpoint's TP size differs from the run's (or its shards are inconsistent)."""


def partition_dims(config, model_class):
    """{parameter name: partition dim, or None when replicated}, from a meta-device `model_class(config)`."""
    # The attributes do not depend on the TP size of the calling process (only shard shapes do).
    model = model_class(config, initialize=False, device="meta")
    return {
        name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
        for name, p in model.named_parameters()
    }


def merge_shards(shards, config, model_class, source="checkpoint"):
    """[state dict of TP rank r] -> the full (TP=1) state dict in the model's parameter names."""
    dims = partition_dims(config, model_class)
    full = {}
    for name, dim in dims.items():
        missing = [r for r, s in enumerate(shards) if name not in s]
        if missing:
            raise ValueError(f"{source}: tensor {name!r} is missing from TP rank {missing[0]}'s shard")
        parts = [s[name] for s in shards]
        if dim is None:
            for r, p in enumerate(parts[1:], 1):
                if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                    raise TensorParallelMismatchError(
                        f"{source}: replicated tensor {name!r} differs between TP rank 0 and TP rank {r}"
                    )
            full[name] = parts[0]
        else:
            full[name] = torch.cat(parts, dim=dim)
    unexpected = sorted(set(shards[0]) - set(dims))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r} for this config")
    return full


def split_state(full, config, tp, model_class, source="checkpoint"):
    """Full state dict -> [state dict of TP rank r for r in range(tp)] (contiguous clones)."""
    try:
        config.check_tensor_parallel(tp)
    except ValueError as e:
        raise TensorParallelMismatchError(f"{source}: cannot split for --tp {tp}: {e}") from None
    shards = [{} for _ in range(tp)]
    for name, dim in partition_dims(config, model_class).items():
        tensor = full[name]
        for r in range(tp):
            shards[r][name] = (tensor if dim is None else tensor.chunk(tp, dim=dim)[r]).clone().contiguous()
    return shards


# -- training checkpoint folders -------------------------------------------------------------------


def model_state_files(tag_dir):
    """{tp rank: path} of the mp_rank_XX_model_states.pt files in tag_dir."""
    files = {}
    for p in glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")):
        m = MODEL_STATES_RE.match(os.path.basename(p))
        if m:
            files[int(m.group(1))] = p
    return files


def is_training_checkpoint(path):
    tag_dir = resolve_tag_dir(path)
    has_states = bool(model_state_files(tag_dir)) or bool(stage_state_files(tag_dir))
    return os.path.isfile(os.path.join(tag_dir, META_NAME)) and has_states


def read_tag_meta(tag_dir):
    """megaphi_meta.json of a tag folder as written (the resharder copies it; a run's --load verifies it
    through training_state.verify_checkpoint)."""
    path = os.path.join(tag_dir, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a megaphi training checkpoint folder")
    with open(path) as f:
        return json.load(f)


def checkpoint_tensor_parallel_size(tag_dir):
    """TP size a training checkpoint was saved with (megaphi_meta.json, checked against its files)."""
    meta = read_tag_meta(tag_dir)
    files = model_state_files(tag_dir)
    tp = int(meta.get("tensor_model_parallel_size", len(files) or 1))
    if files and sorted(files) != list(range(tp)):
        raise TensorParallelMismatchError(
            f"{tag_dir}: megaphi_meta.json records tensor_model_parallel_size {tp} but the folder holds "
            f"model shards for TP ranks {sorted(files)}"
        )
    return tp


def check_tensor_parallel_size(tag_dir, tp):
    """Raise TensorParallelMismatchError pointing at reshard when the checkpoint's TP size != tp."""
    saved = checkpoint_tensor_parallel_size(tag_dir)
    if saved != tp:
        raise TensorParallelMismatchError(
            f"checkpoint {tag_dir} was saved with --tensor-model-parallel-size {saved}, this run uses {tp}; "
            f"convert it first: python tools/convert_checkpoint.py reshard {tag_dir} NEW_DIR --tp {tp}"
        )
    return saved


def read_training_checkpoint(path, model_class):
    """(PhiConfig, full state dict in model names, meta, tag_dir) from a training checkpoint of any TP size."""
    tag_dir = resolve_tag_dir(path)
    meta = read_tag_meta(tag_dir)
    if not meta.get("model_config"):
        raise ValueError(f"{os.path.join(tag_dir, META_NAME)}: no model_config recorded")
    config = PhiConfig.from_dict(meta["model_config"], source=os.path.join(tag_dir, META_NAME))
    tp = checkpoint_tensor_parallel_size(tag_dir)
    if stage_state_files(tag_dir):  # pipelined: each TP rank's shard gathered from the stages
        return config, merge_shards(read_stage_shards(tag_dir, tp), config, model_class, source=tag_dir), meta, tag_dir
    files = model_state_files(tag_dir)
    shards = []
    for r in range(tp):
        state = torch.load(files[r], map_location="cpu", weights_only=False)
        module = state.get("module") if isinstance(state, dict) else None
        if not module:
            raise ValueError(
                f"{files[r]}: no 'module' state dict (was the model saved with ZeRO stage 3? "
                f"use the exported {os.path.join(tag_dir, MODEL_SUBDIR)} folder instead)"
            )
        shards.append(module)
    return config, merge_shards(shards, config, model_class, source=tag_dir), meta, tag_dir


# Per-rank layout entries that describe the source run's parallel layout (rewritten, not carried over).
_LAYOUT_KEYS = (
    "module",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "frozen_param_fragments",
    "shared_params",
    "buffer_names",
    "mp_world_size",
    "dp_world_size",
    "ds_config",
    "checkpoint_parallel_dimensions",
    "ds_version",
    "main_weights",
    "loss_scale",
    "pipeline_model_parallel_size",
)


def training_state_extras(tag_dir):
    """TP-independent entries of TP rank 0's model-states file (lr scheduler state, step and sample
    counters, client state), carried into a resharded checkpoint so a resumed run keeps its schedule."""
    files = model_state_files(tag_dir) or stage_state_files(tag_dir)
    state = torch.load(files[min(files)], map_location="cpu", weights_only=False)
    return {k: v for k, v in state.items() if k not in _LAYOUT_KEYS}


def write_training_checkpoint(out_dir, tag, shards, meta, extras=None):
    """OUT/<tag>/mp_rank_XX_model_states.pt (DeepSpeed's module-state layout: model weights, no
    optimizer; `extras` from training_state_extras), OUT/<tag>/megaphi_meta.json, then OUT/latest.
    The caller writes into a temporary folder (atomic.write_folder_atomic)."""
    tag_dir = os.path.join(out_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    defaults = {
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": meta.get("iteration", 0),
        "global_samples": meta.get("consumed_samples", 0),
        "megaphi": {k: meta.get(k) for k in ("iteration", "consumed_samples", "consumed_tokens")},
    }
    for r, shard in enumerate(shards):
        torch.save(
            {
                **defaults,
                **(extras or {}),
                "module": shard,
                "buffer_names": [],
                "optimizer": None,
                "param_shapes": None,
                "frozen_param_shapes": None,
                "shared_params": {},
                "frozen_param_fragments": None,
                "mp_world_size": len(shards),
                "dp_world_size": 1,
            },
            os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"),
        )
    with open(os.path.join(tag_dir, META_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, LATEST_NAME), "w") as f:
        f.write(pointer_text(tag))


def reshard(ckpt, out_dir, tp, model_class, pp=1):
    """Re-split a training checkpoint's model weights for `tp` TP ranks and `pp` pipeline stages (an
    even layer split; optimizer state dropped). Returns (PhiConfig, the source's TP size)."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got {tp} and {pp}")
    if not is_training_checkpoint(ckpt):
        if os.path.isfile(os.path.join(ckpt, CONFIG_NAME)) and os.path.isfile(os.path.join(ckpt, WEIGHTS_NAME)):
            raise ValueError(
                f"{ckpt} is a megaphi model folder: its tensors are full (TP-independent) and load at "
                f"any --tensor-model-parallel-size; reshard takes training checkpoints"
            )
        raise ValueError(
            f"{ckpt}: not a megaphi training checkpoint (expected a `latest` file or "
            f"{META_NAME} with mp_rank_XX_model_states.pt files)"
        )
    config, full, meta, tag_dir = read_training_checkpoint(ckpt, model_class)
    source_tp = meta.get("tensor_model_parallel_size", 1)
    if config.num_hidden_layers % pp:
        raise ValueError(f"--pp {pp} does not divide the checkpoint's {config.num_hidden_layers} layers")
    shards = split_state(full, config, tp, model_class, source=tag_dir)
    new_meta = dict(meta)
    source_pp = pipeline_layout_of(meta)[0]
    new_meta.update(
        {
            "tensor_model_parallel_size": tp,
            "optimizer_states": False,
            "resharded_from": {
                "path": tag_dir,
                "tensor_model_parallel_size": source_tp,
                "pipeline_model_parallel_size": source_pp,
            },
        }
    )
    new_meta.pop("files", None)  # the source's checksums; the output's are recorded below
    if isinstance(new_meta.get("args"), dict):
        pipeline = {
            "pipeline_model_parallel_size": pp,
            "virtual_pipeline_stages": 1,
            "num_layers_per_virtual_pipeline_stage": None,
            "pipeline_layers_per_stage": None,
        }
        new_meta["args"] = {**new_meta["args"], "tensor_model_parallel_size": tp, **pipeline}
    tag = os.path.basename(tag_dir.rstrip(os.sep))

    def fill(tmp):
        if pp == 1:
            write_training_checkpoint(tmp, tag, shards, new_meta, training_state_extras(tag_dir))
        else:
            os.makedirs(os.path.join(tmp, tag))
            write_stage_files(os.path.join(tmp, tag), shards, config, pp, training_state_extras(tag_dir))
            with open(os.path.join(tmp, LATEST_NAME), "w") as f:
                f.write(pointer_text(tag))
        exported = os.path.join(tag_dir, MODEL_SUBDIR)  # the full-tensor model folder, if the run wrote one
        if os.path.isdir(exported):
            shutil.copytree(exported, os.path.join(tmp, tag, MODEL_SUBDIR))
        # checksums of the new files, so a run resuming from OUT verifies them like any checkpoint
        new_meta["files"] = checksum_and_sync(os.path.join(tmp, tag), META_NAME)
        new_meta["checksum"] = HASH_NAME
        write_json_atomic(os.path.join(tmp, tag, META_NAME), seal_metadata(new_meta))  # its own checksum, recomputed

    write_folder_atomic(out_dir, fill)
    return config, source_tp
