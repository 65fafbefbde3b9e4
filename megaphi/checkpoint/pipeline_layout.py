"""Pipelined training checkpoints (--pipeline-model-parallel-size P > 1): read and write their stage files.

A pipelined tag folder holds one `pp_rank_PP_mp_rank_TT_model_states.pt` per (stage, TP rank) whose
"module" is that stage's TP shard in the unsplit model's parameter names (written by
megaphi/training/pipeline_trainer.py), plus, with ZeRO-1, `..._dp_rank_DDD_optim_states.pt` shares
of the AdamW state. Which stage holds a parameter follows from its name and the layer split
(megaphi.parallel.pipeline.split_layers): the embedding on virtual stage 0, decoder layer i on the
virtual stage whose range holds i, the final LayerNorm and lm_head on the last; virtual stage s lives
on pipeline rank s mod P.
"""

import glob
import os
import re

import torch

STAGE_STATES_RE = re.compile(r"^pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def stage_state_files(tag_dir):
    """{(pipeline rank, TP rank): path} of a pipelined tag folder ({} for any other)."""
    files = {}
    for path in glob.glob(os.path.join(tag_dir, "pp_rank_*_mp_rank_*_model_states.pt")):
        match = STAGE_STATES_RE.match(os.path.basename(path))
        if match:
            files[(int(match.group(1)), int(match.group(2)))] = path
    return files


def pipeline_layout_of(meta):
    """(P, virtual stages per rank, explicit layer counts or None) recorded in a checkpoint's metadata."""
    args = meta.get("args") or {}
    counts = args.get("pipeline_layers_per_stage")
    return (
        int(args.get("pipeline_model_parallel_size") or 1),
        int(args.get("virtual_pipeline_stages") or 1),
        None if counts is None else [int(c) for c in counts],
    )


def read_stage_shards(tag_dir, tp):
    """[state dict of TP rank t over the whole model] gathered from the stage files of a pipelined folder."""
    files = stage_state_files(tag_dir)
    stages = sorted({p for p, _ in files})
    if stages != list(range(len(stages))) or sorted(files) != [(p, t) for p in stages for t in range(tp)]:
        raise ValueError(f"{tag_dir}: stage files {sorted(files)} do not cover {len(stages)} stages x TP {tp}")
    shards = [{} for _ in range(tp)]
    for (p, t), path in sorted(files.items()):
        state = torch.load(path, map_location="cpu", weights_only=False)
        module = state.get("module") if isinstance(state, dict) else None
        if not module:
            raise ValueError(f"{path}: no 'module' state dict")
        overlap = set(module) & set(shards[t])
        if overlap:
            raise ValueError(f"{path}: tensor {sorted(overlap)[0]!r} is also held by another stage")
        shards[t].update(module)
    return shards


def stage_of_parameter(name, num_layers, pipeline_size, num_chunks=1, layers_per_stage=None):
    """The pipeline rank holding parameter `name` under a layer split."""
    from megaphi.parallel.pipeline.split import split_layers

    bounds = split_layers(num_layers, pipeline_size, num_chunks, layers_per_stage)
    match = _LAYER_RE.match(name)
    if match:
        layer = int(match.group(1))
        virtual = next(v for v, (start, end) in enumerate(bounds) if start <= layer < end)
    elif name.startswith("model.embed_tokens."):
        virtual = 0
    else:  # final LayerNorm, lm_head
        virtual = len(bounds) - 1
    return virtual % pipeline_size


def write_stage_files(tag_dir, shards, config, pipeline_size, extras):
    """pp_rank_PP_mp_rank_TT_model_states.pt for an even split over `pipeline_size` stages (model
    weights only, no optimizer state; `extras`: lr schedule state and megaphi's counters)."""
    for t, shard in enumerate(shards):
        per_stage = [{} for _ in range(pipeline_size)]
        for name, tensor in shard.items():
            per_stage[stage_of_parameter(name, config.num_hidden_layers, pipeline_size)][name] = tensor
        for p, module in enumerate(per_stage):
            payload = {
                **extras,
                "module": module,
                "optimizer": None,
                "main_weights": None,
                "loss_scale": None,
                "pipeline_model_parallel_size": pipeline_size,
            }
            torch.save(payload, os.path.join(tag_dir, f"pp_rank_{p:02d}_mp_rank_{t:02d}_model_states.pt"))
