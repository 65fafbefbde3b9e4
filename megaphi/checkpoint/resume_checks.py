"""Resuming with a changed setup: compare the checkpoint's metadata with this run before loading.

Each difference is either adopted (said in one line) or refused with one CheckpointError line that
names the flag to pass:

- vocabulary rows: adopted when the run derives them from --tokenizer (the checkpoint's padded rows
  still hold the tokenizer; e.g. 50432 rows of a TP-2 run resumed at TP 1 after `reshard --tp 1`);
  with an explicit --vocab-size a difference is refused unless --use-checkpoint-args.
- architecture (layers, hidden, MLP, heads, rotary dim, positions): refused unless
  --use-checkpoint-args, which takes them from the checkpoint.
- ZeRO stage / data-parallel size: ZeRO-0 (whole optimizer in the module-states file), ZeRO-1/2
  (optimizer partitioned per DP rank) and ZeRO-3 keep their optimizer state in different files, and
  ZeRO >= 1 partitions it by DP size: refused unless --no-load-optim (fresh Adam moments and fp32
  master weights taken from the loaded weights; iteration, lr schedule position and data kept). A run
  whose stage is only a default takes the checkpoint's instead (training.config.zero_stage_for_resume).
- lr schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters, --lr-decay-style): refused unless
  --override-opt_param-scheduler (the new flags shape the schedule from the resumed position on) or
  --use-checkpoint-opt_param-scheduler (the checkpoint's values are adopted).
- data order (--seed, --seq-length, --global-batch-size): the data position is kept as a count of
  consumed samples, and each of these changes which samples that count leads to (the shuffle, the
  sample boundaries, the number of samples the indices are built for): refused unless
  --override-data-order.
"""

import os

from . import layout, training_state
from .layout import CheckpointError
from .model_folder import ARCH_FIELDS

# model config field -> argparse dest
ARCH_ARGS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "rotary_dim": "rotary_dim",
    "max_position_embeddings": "max_position_embeddings",
}
SCHEDULE_ARGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style")
DATA_ORDER_ARGS = ("seed", "seq_length", "global_batch_size")


def _flag(dest):
    return "--" + dest.replace("_", "-")


def _zero_family(stage):
    return None if stage is None else (0 if stage == 0 else 3 if stage == 3 else 1)


def adopt_checkpoint_args(args, meta):
    """--use-checkpoint-args: (the architecture (and, without --tokenizer, vocabulary) values to take from
    the checkpoint, the line that says so). `args` is read, not changed."""
    config = meta.get("model_config") or {}
    values, changed = {}, []
    for field, dest in ARCH_ARGS.items():
        if field in config and getattr(args, dest, None) != config[field]:
            changed.append(f"{_flag(dest)} {getattr(args, dest, None)} -> {config[field]}")
            values[dest] = config[field]
    if "vocab_size" in config and not getattr(args, "tokenizer", None) and args.vocab_size != config["vocab_size"]:
        changed.append(f"--vocab-size {args.vocab_size} -> {config['vocab_size']}")
        values["vocab_size"] = config["vocab_size"]
    max_positions = values.get("max_position_embeddings", args.max_position_embeddings)
    if args.seq_length > max_positions:
        values["seq_length"] = max_positions
    return values, "--use-checkpoint-args: " + (
        ", ".join(changed) if changed else "the flags already match the checkpoint"
    )


def adopt_checkpoint_schedule(args, meta):
    """--use-checkpoint-opt_param-scheduler: (the checkpoint's lr schedule values, the line saying so)."""
    saved = meta.get("args") or {}
    changed = [
        f"{_flag(k)} {getattr(args, k)} -> {saved[k]}"
        for k in SCHEDULE_ARGS
        if k in saved and getattr(args, k) != saved[k]
    ]
    values = {k: saved[k] for k in SCHEDULE_ARGS if k in saved}
    return values, "--use-checkpoint-opt_param-scheduler: " + (", ".join(changed) if changed else "same schedule")


def resume_vocab_rows(meta, run_rows, tokenizer_size, tp, multiple):
    """Rows the resumed model must have: the checkpoint's, when the run derives its rows from a
    tokenizer and the checkpoint's still fit it (any TP padding is kept), else the run's."""
    saved = (meta.get("model_config") or {}).get("vocab_size")
    if saved is None or saved == run_rows or tokenizer_size is None:
        return run_rows
    if saved >= tokenizer_size and saved % tp == 0:
        return saved
    return run_rows


def _pipeline_layout(values):
    """(stages, chunks per stage, explicit layer counts or None) of a run's flags (a namespace or a dict)."""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    counts = get("pipeline_layers_per_stage")
    return (
        int(get("pipeline_model_parallel_size", 1) or 1),
        int(get("virtual_pipeline_stages", 1) or 1),
        None if counts is None else [int(c) for c in counts],
    )


def check_pipeline_layout(args, saved_args, where):
    """Each stage's file holds its own layers: a checkpoint resumes only with the pipeline layout it
    was saved with (stages, virtual stages, layer split)."""
    saved, mine = _pipeline_layout(saved_args), _pipeline_layout(args)
    if saved != mine:
        raise CheckpointError(
            f"{where}: saved with --pipeline-model-parallel-size {saved[0]} ({saved[1]} chunk(s) per stage, "
            f"split {saved[2] or 'even'}), this run uses {mine[0]} ({mine[1]}, split {mine[2] or 'even'}); "
            f"resume with the checkpoint's pipeline flags (converting between pipeline layouts is not supported yet)"
        )


def conflicting_zero_stage(args, meta, zero_stage):
    """The checkpoint's ZeRO stage when this run would load its optimizer state and `zero_stage` keeps
    that state in another layout (family 0 / 1-2 / 3), else None."""
    if not meta.get("optimizer_states", True) or getattr(args, "no_load_optim", False):
        return None
    saved = meta.get("zero_stage", (meta.get("args") or {}).get("zero_stage"))
    return None if saved is None or _zero_family(saved) == _zero_family(zero_stage) else saved


def check_resume_setup(args, meta, model_config, zero_stage, load_dir):
    """Raise CheckpointError (one line) for a difference this run cannot take silently."""
    where = f"--load {load_dir}/{meta.get('tag', '')}".rstrip("/")
    config = meta.get("model_config") or {}
    mine = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(vars(model_config))
    diffs = [f"{k} {config[k]} vs {mine[k]}" for k in ARCH_FIELDS if k in config and k in mine and config[k] != mine[k]]
    if diffs:
        hint = "--vocab-size" if all(d.startswith("vocab_size") for d in diffs) else "model flags"
        raise CheckpointError(
            f"{where}: the architecture differs from this run (checkpoint vs run: {'; '.join(diffs)}); "
            f"pass the checkpoint's {hint} or --use-checkpoint-args"
        )

    saved_args = meta.get("args") or {}
    check_pipeline_layout(args, saved_args, where)
    if meta.get("optimizer_states", True) and not getattr(args, "no_load_optim", False):
        saved_stage = meta.get("zero_stage", saved_args.get("zero_stage"))
        if conflicting_zero_stage(args, meta, zero_stage) is not None:
            forced = bool(getattr(args, "bf16", False)) and saved_stage == 0
            alt = "" if forced else f", or resume with --zero-stage {saved_stage}"
            why = " (bf16 runs use ZeRO >= 1 for fp32 gradient accumulation)" if forced else ""
            raise CheckpointError(
                f"{where}: saved with ZeRO stage {saved_stage}, this run uses stage {zero_stage}{why}; "
                f"the optimizer state does not carry across these stages: pass --no-load-optim "
                f"(weights, lr schedule and data position kept; Adam moments restart){alt}"
            )
        saved_dp = saved_args.get("data_parallel_size")
        if (
            zero_stage
            and saved_stage
            and saved_dp is not None
            and saved_dp != getattr(args, "data_parallel_size", saved_dp)
        ):
            raise CheckpointError(
                f"{where}: ZeRO optimizer state saved for {saved_dp} data-parallel ranks, this run has "
                f"{args.data_parallel_size}; pass --no-load-optim (Adam moments restart) or resume "
                f"with the same world size"
            )

    if not getattr(args, "override_opt_param_scheduler", False):
        diffs = [
            f"{_flag(k)} {saved_args[k]} vs {getattr(args, k)}"
            for k in SCHEDULE_ARGS
            if k in saved_args and getattr(args, k, None) != saved_args[k]
        ]
        if diffs:
            raise CheckpointError(
                f"{where}: the lr schedule differs from the checkpoint's (checkpoint vs run: {'; '.join(diffs)}; "
                f"--lr-decay-iters defaults to --train-iters); pass the checkpoint's values, "
                f"--use-checkpoint-opt_param-scheduler to adopt them, or --override-opt_param-scheduler to "
                f"continue with the new schedule from iteration {meta.get('iteration')}"
            )


def check_data_order(args, meta, load_dir, say=print):
    """Refuse (one line) a resume whose --seed, --seq-length or --global-batch-size differs from the
    checkpoint's, unless --override-data-order (then said in one line)."""
    saved = meta.get("args") or {}
    diffs = "; ".join(
        f"{_flag(k)} {saved[k]} vs {getattr(args, k, None)}"
        for k in DATA_ORDER_ARGS
        if k in saved and getattr(args, k, None) != saved[k]
    )
    if not diffs:
        return
    if getattr(args, "override_data_order", False):
        say(
            f"--override-data-order: continuing with the new data order (checkpoint vs run: {diffs}) from "
            f"iteration {meta.get('iteration')}"
        )
        return
    where = f"--load {load_dir}/{meta.get('tag', '')}".rstrip("/")
    raise CheckpointError(
        f"{where}: the data order differs from the checkpoint's (checkpoint vs run: {diffs}): it "
        f"changes which samples are read after iteration {meta.get('iteration')} (the data "
        f"position is kept as {meta.get('consumed_samples')} consumed samples); pass the "
        f"checkpoint's values, or --override-data-order to continue with the new ones"
    )


def resume_point(args):
    """(tag, metadata) of the checkpoint --load resumes (`latest`), read without verifying its files, or
    None (no --load, finetuning, or no `latest`). Read-only: run configuration is resolved from it."""
    if not args.load or args.finetune:
        return None
    if os.path.exists(args.load) and not os.path.isdir(args.load):
        raise CheckpointError(f"--load {args.load} is a file, not a checkpoint folder")
    tag = layout.read_pointer(args.load) if os.path.isdir(args.load) else None
    if tag is None:
        return None
    meta = training_state.read_meta(args.load, tag)
    meta["tag"] = tag
    return tag, meta


def resume_adoptions(args, meta, tokenizer_size, padded_vocab):
    """What a resume takes from the checkpoint: --use-checkpoint-args, the checkpoint's schedule, its
    vocabulary rows; a changed data order refused (unless --override-data-order). Returns (values by
    flag name, lines to say); `args` is read, not changed."""
    values, lines = {}, []
    if args.use_checkpoint_args:
        adopted, line = adopt_checkpoint_args(args, meta)
        values.update(adopted)
        lines.append(line)
    if getattr(args, "use_checkpoint_opt_param_scheduler", False):
        adopted, line = adopt_checkpoint_schedule(args, meta)
        values.update(adopted)
        lines.append(line)
    check_data_order(args, meta, args.load, say=lines.append)
    if tokenizer_size is None:
        values.setdefault("vocab_size", args.vocab_size)
        return values, lines
    rows = resume_vocab_rows(
        meta, padded_vocab, tokenizer_size, args.tensor_model_parallel_size, args.make_vocab_size_divisible_by
    )
    if rows != padded_vocab:
        lines.append(
            f"resuming with the checkpoint's {rows} vocabulary rows (this run alone would pad "
            f"{tokenizer_size} tokens to {padded_vocab})"
        )
    values["vocab_size"] = rows
    return values, lines


def prepare_resume(args, say=print):
    """Before the model is built, holding the --save lock: set aside the --save folder's interrupted
    saves, refuse iter_* folders without `latest` (unless --start-over), verify the --load checkpoint
    (checksums, metadata). Returns verify_checkpoint's (tag, meta) or None. Also warns when nothing
    will be saved."""
    if not args.save:
        if not getattr(args, "skip_train", False):  # an evaluation saves nothing anyway
            say(
                "warning: no --save: this run saves no checkpoint; a crash, SIGTERM or the end of the run keeps "
                "nothing but the metrics"
            )
    else:  # the run holds the folder's lock: its interrupted saves are its own
        training_state.set_aside_incomplete(args.save, owned=True, say=say)
        latest = os.path.join(args.save, layout.LATEST_NAME)
        if os.path.lexists(latest) and not os.path.isfile(latest):
            layout.read_pointer(args.save)  # refused now rather than at the first save (one line)
    verified = None
    if args.load and not args.finetune:
        if os.path.exists(args.load) and not os.path.isdir(args.load):
            raise CheckpointError(f"--load {args.load} is a file, not a checkpoint folder")
        if not args.save or os.path.realpath(args.load) != os.path.realpath(args.save):
            training_state.set_aside_incomplete(args.load, owned=False, say=say)
        training_state.check_no_orphan_checkpoints(args.load, args.start_over, "--load")
        verified = training_state.verify_checkpoint(args.load)
    if verified is None and args.save and not args.finetune and args.save != args.load:
        training_state.check_no_orphan_checkpoints(args.save, args.start_over, "--save")
    return verified
