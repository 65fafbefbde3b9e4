"""Training checkpoints: DeepSpeed's checkpoint + megaphi metadata, RNG states and a model folder.

Layout of --save DIR:
    DIR/latest                         text: the newest complete tag (written last, atomically)
    DIR/best                           text: the best tag so far, then the metric that chose it:
                                       "val_loss 2.345678" (lowest) or, with --eval-humaneval,
                                       "humaneval_pass@1 0.312500" (highest)
    DIR/<tag>/                         DeepSpeed checkpoint (module, optimizer, lr schedule)
    DIR/<tag>/megaphi_meta.json        iteration, consumed samples/tokens, model config, tokenizer, flags
    DIR/<tag>/rng_state_rank<R>.pt     python / numpy / torch / cuda / TP-tracker RNG states of rank R
    DIR/<tag>/model/                   config.json + model.safetensors (PhiForCausalLM.save_pretrained)
                                       + tokenizer.json (when --tokenizer is given),
                                       loadable by tools/generate.py and tools/convert_checkpoint.py
The data order needs no state of its own: it is a function of --seed and the consumed samples.
"""
import contextlib
import json
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

META_NAME = "megaphi_meta.json"
LATEST_NAME = "latest"
BEST_NAME = "best"
MODEL_SUBDIR = "model"
FORMAT = "megaphi-train-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def tag_for(iteration):
    return f"iter_{iteration:07d}"


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def write_text_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_pointer(directory, name=LATEST_NAME):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise CheckpointError(f"{path} is empty")
    return tag


def rng_states():
    from megaphi.parallel.random import get_rng_tracker

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    from megaphi.parallel.random import get_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_rng_tracker().set_states(states["tracker"])


def _module_config_dict(module):
    config = getattr(module, "config", None)
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def export_model_folder(engine, out_dir, zero_stage, tokenizer=None):
    """Write config.json + model.safetensors of the engine's module to out_dir.

    Collective: every rank calls it (ZeRO-3 gathers the parameters, and save_pretrained gathers
    tensor-parallel shards); save_pretrained writes on rank 0 only."""
    module = engine.module
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    tmp = out_dir + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    with gather:
        module.save_pretrained(tmp, eos_token_id=None if tokenizer is None else tokenizer.eod)
    _barrier()
    if _rank() == 0:
        if tokenizer is not None:
            tokenizer.save(tmp)  # tools/generate.py picks it up from the folder
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    _barrier()


def save_checkpoint(engine, save_dir, iteration, consumed_samples, consumed_tokens, args, state=None,
                    export_model=True, is_best=False, tokenizer=None, best_metric=None):
    """Collective. `state` holds extra train-loop fields (best val loss, ...) kept in the metadata."""
    tag = tag_for(iteration)
    rank = _rank()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
    _barrier()
    meta = {
        "format": FORMAT,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "consumed_tokens": consumed_tokens,
        "world_size": getattr(args, "world_size", 1),
        "tensor_model_parallel_size": getattr(args, "tensor_model_parallel_size", 1),
        "sequence_parallel": bool(getattr(args, "sequence_parallel", False)),
        "zero_stage": getattr(args, "zero_stage", None),
        "seed": getattr(args, "seed", None),
        "tokenizer": getattr(args, "tokenizer", None),
        "model_config": _module_config_dict(engine.module),
        "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
        "state": state or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # save_latest=False: DeepSpeed's own pointer would be written before our metadata exists.
    engine.save_checkpoint(save_dir, tag=tag, client_state={"megaphi": {k: meta[k] for k in
                           ("iteration", "consumed_samples", "consumed_tokens")}}, save_latest=False)
    tag_dir = os.path.join(save_dir, tag)
    rng_path = os.path.join(tag_dir, f"rng_state_rank{rank}.pt")
    torch.save(rng_states(), rng_path + ".tmp")
    os.replace(rng_path + ".tmp", rng_path)
    if export_model:
        export_model_folder(engine, os.path.join(tag_dir, MODEL_SUBDIR), getattr(args, "zero_stage", 0), tokenizer)
    _barrier()
    if rank == 0:
        write_text_atomic(os.path.join(tag_dir, META_NAME), json.dumps(meta, indent=2, sort_keys=True))
        if is_best:
            write_text_atomic(os.path.join(save_dir, BEST_NAME), tag + "\n" + (f"{best_metric}\n" if best_metric else ""))
        write_text_atomic(os.path.join(save_dir, LATEST_NAME), tag + "\n")  # last: marks it complete
    _barrier()
    return tag


def _jsonable(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def read_meta(load_dir, tag):
    path = os.path.join(load_dir, tag, META_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {os.path.join(load_dir, LATEST_NAME)} points to an "
                           f"incomplete or non-megaphi checkpoint")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(engine, load_dir):
    """Resume: module, optimizer, lr schedule, RNG states. Returns the metadata, or None when load_dir
    holds no checkpoint yet (a fresh run that saves into the same folder)."""
    tag = read_pointer(load_dir)
    if tag is None:
        return None
    meta = read_meta(load_dir, tag)
    check_checkpoint_tensor_parallel_size(load_dir, tag)
    # A resharded checkpoint carries no optimizer state: ZeRO rebuilds it from the module weights.
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=meta.get("optimizer_states", True),
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {os.path.join(load_dir, tag)}")
    rng_path = os.path.join(load_dir, tag, f"rng_state_rank{_rank()}.pt")
    if os.path.isfile(rng_path):
        set_rng_states(torch.load(rng_path, weights_only=False))
    else:
        print(f"[megaphi] warning: {rng_path} not found (different world size?): RNG states not restored; "
              f"dropout masks will differ from an uninterrupted run", flush=True)
    meta["tag"] = tag
    return meta


def check_checkpoint_tensor_parallel_size(load_dir, tag):
    """A DeepSpeed checkpoint holds one model shard per TP rank: loading it at another TP size must
    fail clearly (pointing at `convert_checkpoint.py reshard`), not deep inside DeepSpeed."""
    from megaphi.model.sharded_checkpoint import check_tensor_parallel_size
    from megaphi.parallel import get_tensor_model_parallel_world_size

    check_tensor_parallel_size(os.path.join(load_dir, tag), get_tensor_model_parallel_world_size())


def is_model_folder(path):
    """A model folder: megaphi's (current or older format) or a Hugging Face phi folder."""
    from megaphi.model.checkpoint import is_megaphi_folder
    from megaphi.model.hf_checkpoint import is_hf_folder
    return os.path.isdir(path) and (is_megaphi_folder(path) or is_hf_folder(path))


def finetune_weights_source(load_dir):
    """Where --finetune --load DIR takes its weights from: ("folder", path) for a model folder (megaphi or
    Hugging Face phi; or a training checkpoint's exported DIR/<tag>/model), ("deepspeed", tag) otherwise."""
    if is_model_folder(load_dir):
        return "folder", load_dir
    tag = read_pointer(load_dir)
    if tag is None:
        raise CheckpointError(f"--load {load_dir}: neither a model folder (megaphi or Hugging Face phi: config.json "
                           f"+ weights) nor a training checkpoint ({LATEST_NAME} file missing)")
    exported = os.path.join(load_dir, tag, MODEL_SUBDIR)
    if is_model_folder(exported):
        return "folder", exported
    return "deepspeed", tag


ARCH_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "rotary_dim", "vocab_size")


def load_weights_from_folder(model, folder):
    """Copy the weights of a model folder (megaphi or Hugging Face phi) into `model` (same architecture, checked)."""
    from megaphi.model.checkpoint import load_megaphi_state

    try:
        config, hf_state = load_megaphi_state(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--load {folder}: {e}") from None
    saved = config.to_dict()
    mine = _module_config_dict(model) or {}
    diffs = [f"{k}: checkpoint {saved.get(k)} vs run {mine.get(k)}" for k in ARCH_FIELDS
             if k in saved and k in mine and saved[k] != mine[k]]
    if diffs:
        raise CheckpointError(f"--load {folder}: architecture differs from the flags ({'; '.join(diffs)})")
    try:
        model.load_hf_state_dict(hf_state, source=folder)
    except ValueError as e:
        raise CheckpointError(f"--load {e}") from None
