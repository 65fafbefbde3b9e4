"""Training checkpoints: DeepSpeed's checkpoint + megaphi metadata, RNG states and a model folder.

Layout of --save DIR:
    DIR/latest                         text: the newest complete tag (written last, atomically)
    DIR/best                           text: the best tag so far, then the metric that chose it:
                                       "val_loss 2.345678" (lowest) or, with --eval-humaneval,
                                       "humaneval_pass@1 0.312500" (highest)
    DIR/<tag>/                         DeepSpeed checkpoint (module, optimizer, lr schedule); with
                                       --no-save-optim the module-states files only (save_weights_only)
    DIR/<tag>/megaphi_meta.json        iteration, consumed samples/tokens, model config, tokenizer, flags,
                                       "files": size + CRC-32 of every other file of DIR/<tag>,
                                       "metadata_sha256": its own checksum (integrity.py:
                                       all verified by --load before anything loads)
    DIR/<tag>/rng_state_rank<R>.pt     python / numpy / torch / cuda / TP-tracker RNG states of rank R
    DIR/<tag>/model/                   config.json + model.safetensors (PhiForCausalLM.save_pretrained)
                                       + tokenizer.json (when --tokenizer is given),
                                       loadable by tools/generate.py and tools/convert_checkpoint.py
The data order needs no state of its own: it is a function of --seed and the consumed samples.

Save order (durability): data files -> checksums (each file fsynced) -> folders fsynced -> metadata
(fsynced) -> `best` -> `latest` (fsynced with its folder). A crash or power cut at any point leaves
`latest` on the previous complete checkpoint. A failed save removes its partial folder
(save_failures). A tag folder without metadata is the leftover of an interrupted save: it never
counts as a checkpoint, and the run that owns the folder sets it aside (set_aside_incomplete).
"""

import contextlib
import json
import os
import shutil
import sys
import time

import torch

from . import integrity, save_failures
from .atomic import write_atomic, write_text_atomic
from .collective import barrier, broadcast_from_rank0, global_rank
from .layout import (
    BEST_NAME,
    LATEST_NAME,
    META_NAME,
    MODEL_SUBDIR,
    CheckpointError,
    complete_tags,
    is_complete,
    iteration_tags,
    pointer_or_none,
    pointer_text,
    protected_tags,
    read_pointer,
    rng_state_path,
    tag_for,
)
from .rng_state import rng_states, set_rng_states

FORMAT = integrity.SEALED_FORMAT


def set_aside_incomplete(directory, owned, say):
    """Collective. iter_* folders without metadata (a killed save), except one a pointer names (that is
    a broken checkpoint, reported at load): renamed to <tag>.incomplete-<n> when this run owns the folder
    (its --save, locked), only reported otherwise (another job may be writing it)."""
    if global_rank() == 0 and os.path.isdir(directory):
        named = protected_tags(directory)
        for tag in iteration_tags(directory):
            tag_dir = os.path.join(directory, tag)
            if tag in named or is_complete(tag_dir):
                continue
            if not owned:
                say(f"ignoring {tag_dir}: incomplete (no {META_NAME}; a save was interrupted or is in progress)")
                continue
            n = 1
            while os.path.lexists(f"{tag_dir}.incomplete-{n}"):
                n += 1
            os.rename(tag_dir, f"{tag_dir}.incomplete-{n}")
            say(
                f"{tag_dir} is an incomplete checkpoint (no {META_NAME}: a save was interrupted); set aside as "
                f"{tag_dir}.incomplete-{n} ({save_failures.readable_size(_tree_size(tag_dir + f'.incomplete-{n}'))},"
                f" nothing in it can be loaded: delete it when it is not needed)"
            )
    barrier()


def _tree_size(path):
    return sum(os.lstat(os.path.join(root, f)).st_size for root, _, files in os.walk(path) for f in files)


def check_no_orphan_checkpoints(directory, flag_given, role):
    """A save folder with complete iter_* checkpoints but no `latest`: refuse to start over silently
    (the run would overwrite them) unless --start-over."""
    tags = complete_tags(directory)
    if not tags or read_pointer(directory) is not None:
        return
    if flag_given:
        print(
            f"[megaphi] --start-over: ignoring {len(tags)} checkpoint(s) in {directory} without a "
            f"'{LATEST_NAME}' file ({tags[-1]} newest); they are overwritten as the run reaches them",
            flush=True,
        )
        return
    raise CheckpointError(
        f"{role} {directory} holds {len(tags)} checkpoint(s) ({tags[0]} .. {tags[-1]}) but no "
        f"'{LATEST_NAME}' file: restore it (echo {tags[-1]} > {os.path.join(directory, LATEST_NAME)}) "
        f"to resume, or pass --start-over to train from iteration 0 and overwrite them"
    )


def module_config_dict(module):
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
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with gather:
        module.save_pretrained(tmp, eos_token_id=None if tokenizer is None else tokenizer.eod)
    barrier()
    if global_rank() == 0:
        if tokenizer is not None:
            tokenizer.save(tmp)  # tools/generate.py picks it up from the folder
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()


def save_checkpoint(
    engine,
    save_dir,
    iteration,
    consumed_samples,
    consumed_tokens,
    args,
    state=None,
    export_model=True,
    is_best=False,
    tokenizer=None,
    best_metric=None,
):
    """Collective. `state` holds extra train-loop fields (best val loss, ...) kept in the metadata.
    Any failure: CheckpointError (one line), the partial folder removed, `latest` unchanged."""
    tag = tag_for(iteration)
    rank = global_rank()
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
        "model_config": module_config_dict(engine.module),
        "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
        "state": state or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_optim = not getattr(args, "no_save_optim", False)
    if not save_optim:
        meta["optimizer_states"] = False  # as a resharded checkpoint's; resuming asks for --no-load-optim
    tag_dir = os.path.join(save_dir, tag)
    failure = None
    if rank == 0:  # every rank learns whether the folder could be prepared, so none waits for the others
        try:
            _prepare_tag_dir(save_dir, tag)
        except Exception as e:
            if not save_failures.is_save_failure(e):
                raise
            failure = _discard_partial_save(save_dir, tag, e)
    failure = broadcast_from_rank0(failure)
    if failure:
        raise CheckpointError(failure)
    try:
        client_state = {"megaphi": {k: meta[k] for k in ("iteration", "consumed_samples", "consumed_tokens")}}
        if save_optim:  # save_latest=False: DeepSpeed's own pointer would be written before our metadata exists
            engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
        else:
            save_weights_only(engine, tag_dir, client_state)
        states = rng_states()
        write_atomic(rng_state_path(tag_dir, rank), lambda tmp: torch.save(states, tmp))
        if export_model:
            export_model_folder(engine, os.path.join(tag_dir, MODEL_SUBDIR), getattr(args, "zero_stage", 0), tokenizer)
        barrier()
        meta["files"] = integrity.checksum_and_sync(tag_dir, META_NAME)  # collective; fsyncs data and folders
        meta["checksum"] = integrity.HASH_NAME
        if rank == 0:
            write_text_atomic(
                os.path.join(tag_dir, META_NAME), json.dumps(integrity.seal_metadata(meta), indent=2, sort_keys=True)
            )
            if is_best:
                write_text_atomic(os.path.join(save_dir, BEST_NAME), pointer_text(tag, best_metric))
            write_text_atomic(os.path.join(save_dir, LATEST_NAME), pointer_text(tag))  # last: marks it complete
    except Exception as e:
        if not save_failures.is_save_failure(e):
            raise
        raise CheckpointError(_discard_partial_save(save_dir, tag, e)) from None
    barrier()
    keep_last = getattr(args, "keep_last", None)
    if rank == 0 and keep_last:
        prune_checkpoints(save_dir, keep_last)
    return tag


def save_weights_only(engine, tag_dir, client_state):
    """--no-save-optim (Megatron's flag): DeepSpeed's module-states file of each TP rank (written by
    data-parallel rank 0) with the weights, lr schedule and step counters but no optimizer state, and
    none of ZeRO's per-rank optimizer files. DeepSpeed's save_checkpoint has no switch to leave the
    optimizer state out (ZeRO 0 puts it into this very file), so the file is written here, in the
    layout DeepSpeed's load_checkpoint reads (that of a resharded checkpoint). A run resumes it with
    --no-load-optim: ZeRO and the bf16 optimizer rebuild their fp32 master weights from these weights.
    ZeRO 3 (partitioned weights) is refused when the engine is built."""
    from megaphi.parallel import get_data_parallel_rank, get_tensor_model_parallel_rank

    if get_data_parallel_rank() != 0:
        return  # the other data-parallel ranks hold the same weights
    scheduler = engine.lr_scheduler
    state = {
        "module": engine.module_state_dict(),
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": None,
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": engine.skipped_steps,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "dp_world_size": engine.seq_dp_world_size,  # what DeepSpeed records
        "mp_world_size": engine.mp_world_size,
        **client_state,
    }
    path = os.path.join(tag_dir, f"mp_rank_{get_tensor_model_parallel_rank():02d}_model_states.pt")
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _prepare_tag_dir(save_dir, tag):
    """Rank 0, before anything is written: the save folder and an empty-of-stale-files tag folder."""
    os.makedirs(save_dir, exist_ok=True)
    tag_dir = os.path.join(save_dir, tag)
    if os.path.lexists(tag_dir) and not os.path.isdir(tag_dir):
        raise save_failures.InTheWay(tag_dir)
    if os.path.isdir(tag_dir):
        integrity.remove_temporaries(tag_dir)  # leftovers of a killed save of the same iteration
        if tag not in protected_tags(save_dir):
            with contextlib.suppress(FileNotFoundError):  # an older save's metadata would vouch for new data
                os.unlink(os.path.join(tag_dir, META_NAME))
    os.makedirs(tag_dir, exist_ok=True)


def _discard_partial_save(save_dir, tag, error):
    """Remove the folder of a failed save (never the one `latest` or `best` names); the one-line message."""
    return save_failures.discard(
        save_dir,
        tag,
        error,
        protected_tags(save_dir),
        pointer_or_none(save_dir, LATEST_NAME),
        os.path.lexists(os.path.join(save_dir, LATEST_NAME)),
    )


def prune_checkpoints(save_dir, keep_last):
    """Delete iter_* checkpoints older than the newest `keep_last`, never the one `latest` or `best`
    names. Returns the deleted tags."""
    protected = protected_tags(save_dir)
    tags = iteration_tags(save_dir)
    doomed = [t for t in tags[: max(len(tags) - keep_last, 0)] if t not in protected]
    for tag in doomed:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
    if doomed:
        print(f"[megaphi] --keep-last {keep_last}: deleted {', '.join(doomed)}", flush=True)
    return doomed


def _jsonable(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def read_meta(load_dir, tag):
    """The tag's megaphi_meta.json, checked (JSON, types, its own checksum): one CheckpointError line
    naming the file otherwise. meta["sealed"]: whether it carries its own checksum."""
    path = os.path.join(load_dir, tag, META_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} is missing: {os.path.join(load_dir, LATEST_NAME)} points to an "
            f"incomplete or non-megaphi checkpoint"
        )
    try:
        return integrity.read_metadata(path)
    except integrity.IntegrityError as e:
        raise CheckpointError(str(e)) from None


def verify_checkpoint(load_dir, select=None):
    """Collective. (tag, metadata) of the checkpoint `latest` names, every file (or those whose relative
    path `select` accepts) checked against the checksums recorded at save; None when load_dir holds
    no checkpoint. Any problem: CheckpointError."""
    tag = read_pointer(load_dir)
    if tag is None:
        return None
    meta = read_meta(load_dir, tag)
    tag_dir = os.path.join(load_dir, tag)
    path = os.path.join(tag_dir, META_NAME)
    if not meta["sealed"] and global_rank() == 0:
        print(
            f"[megaphi] warning: {path} has no checksum of its own (saved by an older megaphi): it is checked "
            f"against its folder's name and DeepSpeed's record only",
            file=sys.stderr,
            flush=True,
        )
    try:
        integrity.check_tag_name(meta, tag, path)
        if meta.get("files") is None:
            print(
                f"[megaphi] warning: {path} records no checksums (saved by an older megaphi or converted): its "
                f"files are not verified",
                file=sys.stderr,
                flush=True,
            )
        else:
            files = meta["files"]
            integrity.check_coverage(tag_dir, files, META_NAME, select)  # every file a loader may read is listed
            if select is not None:
                files = {rel: entry for rel, entry in files.items() if select(rel)}
            integrity.verify_files(tag_dir, files)
        if select is None or select("mp_rank_00_model_states.pt"):
            integrity.check_deepspeed_record(tag_dir, meta, path, meta["sealed"])
    except integrity.IntegrityError as e:
        raise CheckpointError(str(e)) from None
    meta["tag"] = tag
    return tag, meta


def load_checkpoint(engine, load_dir, verified=None, load_optim=True, load_rng=True):
    """Resume: module, optimizer, lr schedule, RNG states. Returns the metadata, or None when load_dir
    holds no checkpoint yet (a fresh run that saves into the same folder). `verified`: what
    verify_checkpoint returned (verified here otherwise)."""
    verified = verified if verified is not None else verify_checkpoint(load_dir)
    if verified is None:
        return None
    tag, meta = verified
    tag_dir = os.path.join(load_dir, tag)
    check_checkpoint_tensor_parallel_size(load_dir, tag)
    if load_optim and (meta.get("args") or {}).get("no_save_optim"):  # Megatron asks for the flag too
        raise CheckpointError(
            f"{tag_dir} was saved with --no-save-optim (no optimizer state): resume it with --no-load-optim"
        )
    # A resharded checkpoint carries no optimizer state: ZeRO rebuilds it from the module weights.
    load_optim = load_optim and meta.get("optimizer_states", True)
    try:
        path, _ = engine.load_checkpoint(
            load_dir, tag=tag, load_optimizer_states=load_optim, load_lr_scheduler_states=True
        )
    except Exception as e:  # unverified (older) checkpoints: name the folder, not a traceback
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it ({type(e).__name__}: {first})") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    if not load_optim and engine.zero_optimization_stage() == 0 and hasattr(engine.optimizer, "refresh_fp32_params"):
        # fp16 at ZeRO 0: the optimizer's fp32 master copy would still hold the initial weights (DeepSpeed
        # refreshes it after a weights-only load, not after load_optimizer_states=False); ZeRO rebuilds its own
        engine.optimizer.refresh_fp32_params()
    rng_path = rng_state_path(tag_dir, global_rank())
    if not load_rng:
        print(f"[megaphi] --no-load-rng: RNG states of {tag_dir} not restored", flush=True)
    elif os.path.isfile(rng_path):
        try:
            states = torch.load(rng_path, weights_only=False)
            set_rng_states(states)
        except Exception as e:
            raise CheckpointError(f"{rng_path}: cannot be loaded ({type(e).__name__}: {str(e)[:120]})") from None
    else:
        print(
            f"[megaphi] warning: {rng_path} not found (different world size?): RNG states not restored; "
            f"dropout masks will differ from an uninterrupted run",
            flush=True,
        )
    return meta


def check_checkpoint_tensor_parallel_size(load_dir, tag):
    """A DeepSpeed checkpoint holds one model shard per TP rank: loading it at another TP size must
    fail clearly (pointing at `convert_checkpoint.py reshard`), not deep inside DeepSpeed."""
    from megaphi.parallel import get_tensor_model_parallel_world_size

    from .reshard import check_tensor_parallel_size

    check_tensor_parallel_size(os.path.join(load_dir, tag), get_tensor_model_parallel_world_size())
