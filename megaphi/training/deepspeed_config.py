"""The DeepSpeed config generated from the flags, with a user JSON merged over it."""

import copy
import math
from typing import NamedTuple

from .argument_error import ArgumentError


def generate_config(args):
    config = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 2**31 - 1,  # megaphi logs its own metrics
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) waits for the device (cudaDeviceSynchronize) at
        # the start and end of every micro-batch, only to print samples/s; megaphi measures its own.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    config["zero_optimization"].update(_zero_settings(args, args.zero_stage))
    if args.fp16:
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": int(round(math.log2(args.initial_loss_scale))),
            "loss_scale_window": args.loss_scale_window,
            "hysteresis": args.hysteresis,
            "min_loss_scale": args.min_loss_scale,
        }
    elif args.bf16:
        # DeepSpeed's BF16 optimizer (bf16 at ZeRO 1, see zero_stage_for_precision) adds
        # each parameter's bf16 gradient into its fp32 accumulator as soon as autograd has produced
        # it and frees the bf16 one, instead of keeping all of them (2 bytes per parameter) alive
        # next to the fp32 buffer until the next backward; the sums are the same additions.
        config["bf16"] = {"enabled": True, "immediate_grad_update": True}
    return config


def _zero_settings(args, stage):
    """The zero_optimization keys generated for a stage (none for ZeRO 0). ZeRO 2/3 reduce gradient
    buckets while backward runs; ZeRO 1 when --overlap-grad-reduce asks."""
    if stage == 0:
        return {}
    return {
        "contiguous_gradients": True,
        "overlap_comm": stage >= 2 or bool(getattr(args, "overlap_grad_reduce", False)),
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }


def merge(base, override):
    """Recursive dict merge; values in override win."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_BATCH_KEYS = {
    "train_batch_size": ("global_batch_size", "--global-batch-size"),
    "train_micro_batch_size_per_gpu": ("micro_batch_size", "--micro-batch-size"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "--global-batch-size / (--micro-batch-size x DP)"),
}


def _batch_value(args, key):
    value = args.deepspeed_config_dict[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        value = None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise ArgumentError(
            f'--deepspeed-config: {getattr(args, "deepspeed_config", None)}: {key} must be an integer or "auto", '
            f"got {args.deepspeed_config_dict[key]!r}"
        )
    return int(number)


class DeepSpeedSettings(NamedTuple):
    """The DeepSpeed config of a run and what it settles of the flags (with where each value comes from)."""

    config: dict
    zero_stage: int
    zero_stage_source: str
    clip_grad: float
    clip_grad_source: str
    notes: tuple = ()  # start-up lines: why the stage differs from the one asked for (or should)
    zero_stage_defaulted: bool = False  # no --zero-stage, --use-distributed-optimizer or JSON stage chose it


def resolve_deepspeed(args):
    """Generated config + the --deepspeed-config JSON (args.deepspeed_config_dict) as DeepSpeedSettings;
    `args` (resolved flags) is read, not changed. The batch geometry and precision are owned by the
    flags (the data loader and schedule depend on them): the file may repeat them, not change them."""
    user = getattr(args, "deepspeed_config_dict", {}) or {}
    for key, (attr, flag) in _BATCH_KEYS.items():
        if key in user and user[key] != "auto" and _batch_value(args, key) != getattr(args, attr):
            raise ArgumentError(
                f"--deepspeed-config: {key}={user[key]} contradicts {flag} "
                f"(= {getattr(args, attr)}); set the batch with the flags"
            )
    for key, flag in (("fp16", "--fp16"), ("bf16", "--bf16")):
        if key in user and isinstance(user[key], dict) and "enabled" in user[key]:
            if bool(user[key]["enabled"]) != bool(getattr(args, key)):
                raise ArgumentError(
                    f"--deepspeed-config: {key}.enabled={user[key]['enabled']} contradicts "
                    f"{flag} {'given' if getattr(args, key) else 'not given'}"
                )
    user = {k: v for k, v in user.items() if v != "auto"}
    clip_grad, clip_source, stage_source = _settle_with_flags(args, user)
    defaulted = stage_source.startswith("default")
    config = merge(generate_config(args), user)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ArgumentError(f"--deepspeed-config: zero_optimization.stage must be 0..3, got {stage}")
    notes = []
    if config.get("bf16", {}).get("enabled"):
        requested = stage
        stage = accumulate_bf16_gradients_in_fp32(config, stage)
        if stage != requested:
            stage_source = f"raised from {requested} ({stage_source}) for bf16's fp32 gradient accumulation"
            notes.append(
                f"ZeRO stage {stage} ({stage_source}): DeepSpeed accumulates and reduces bf16 gradients in "
                f"fp32 only with ZeRO >= 1 (one data-parallel rank partitions nothing)"
            )
    stage, stage_source, stage_notes = zero_stage_for_precision(args, config, user, stage, stage_source)
    notes += stage_notes
    if "optimizer" in user or "scheduler" in user:
        raise ArgumentError(
            "--deepspeed-config: 'optimizer'/'scheduler' sections are not used; megaphi builds "
            "AdamW and the lr schedule from the flags (--lr, --weight-decay, ...)"
        )
    return DeepSpeedSettings(config, stage, stage_source, clip_grad, clip_source, tuple(notes), defaulted)


def build_deepspeed_config(args):
    """The DeepSpeed config dict of resolve_deepspeed."""
    return resolve_deepspeed(args).config


def _settle_with_flags(args, user):
    """The JSON's gradient_clipping and zero_optimization.stage against the flags: a flag given and a
    different value in the file is an error; a value only the file gives is taken, and credited to it.
    Returns (clip, where it comes from, where the ZeRO stage comes from)."""
    path = getattr(args, "deepspeed_config", None)
    clip = args.clip_grad
    clip_source = "--clip-grad" if getattr(args, "clip_grad_given", True) else "default"
    stage_source = args.zero_stage_source
    if "gradient_clipping" in user:
        clip = user["gradient_clipping"]
        if getattr(args, "clip_grad_given", True) and clip != args.clip_grad:
            raise ArgumentError(
                f"--deepspeed-config: {path}: gradient_clipping={clip} contradicts --clip-grad "
                f"{args.clip_grad:g}; give one of them"
            )
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0:
            raise ArgumentError(f"--deepspeed-config: {path}: gradient_clipping must be a number >= 0, got {clip!r}")
        clip, clip_source = float(clip), f"gradient_clipping in {path}"
    stage = (
        (user.get("zero_optimization") or {}).get("stage") if isinstance(user.get("zero_optimization"), dict) else None
    )
    if stage is not None:
        if stage_source in ("--zero-stage", "--use-distributed-optimizer") and stage != args.zero_stage:
            raise ArgumentError(
                f"--deepspeed-config: {path}: zero_optimization.stage={stage} contradicts "
                f"{stage_source} (stage {args.zero_stage}); give one of them"
            )
        stage_source = f"zero_optimization.stage in {path}"
    return clip, clip_source, stage_source


def accumulate_bf16_gradients_in_fp32(config, stage):
    """bf16 runs accumulate gradients over micro-batches and reduce them across ranks in fp32, as
    Megatron-LM does (its main_grad): DeepSpeed's default is bf16 for both, and a sum of 16-128
    micro-batch gradients in bf16 (8 significant bits) loses ~2^-8 of the sum per addition. DeepSpeed
    takes an fp32 accumulation only with ZeRO >= 1 (stage 0 refuses the dtype mix), so stage 0 becomes
    stage 1, which on one data-parallel rank partitions nothing. A --deepspeed-config that names
    data_types.grad_accum_dtype or communication_data_type keeps its choice. Returns the stage."""
    data_types = config.setdefault("data_types", {})
    data_types.setdefault("grad_accum_dtype", "fp32")
    config.setdefault("communication_data_type", "fp32")
    if stage == 0 and _fp32_accumulation(config):
        stage = 1
        config["zero_optimization"]["stage"] = 1
    return stage


def zero_stage_for_precision(args, config, user, stage, source):
    """The ZeRO stage under which DeepSpeed 0.19.8 runs this precision without avoidable syncs or
    copies: (stage, where it comes from, start-up notes). A stage the user chose is kept, with a note,
    except ZeRO 2 for bf16 on one data-parallel rank (below). Which optimizer DeepSpeed wraps ours in
    (runtime/engine.py, _do_optimizer_sanity_check -> _configure_optimizer):
    - fp16, ZeRO 0: FP16_UnfusedOptimizer (FP16_Optimizer only for DeepSpeed's own FusedAdam). Its
      step asks CheckOverflow.has_overflow_serial (runtime/utils.py) about each parameter's gradient
      in turn, with `if has_inf_or_nan(grad)`: one host sync per parameter (~245 for phi-1).
    - fp16, ZeRO 1/2: DeepSpeedZeroOptimizer, whose has_overflow (zero/stage_1_and_2.py) adds the
      per-gradient flags on the device and syncs once.
    - bf16 with fp32 accumulation, ZeRO 1 (no offload): BF16_Optimizer; after the last backward it
      all-reduces the whole fp32 gradient (engine.allreduce_gradients), nothing overlapped.
    - bf16, ZeRO 2: DeepSpeedZeroOptimizer; each micro-batch's gradient is reduced in buckets from
      backward hooks (overlap_comm on, see generate_config) into fp32 gradient partitions.
    ZeRO 1 and 2 store the same optimizer state (a checkpoint of one resumes under the other).
    `config` (the merged DeepSpeed config) is updated to the stage returned; `user` is the JSON."""
    dp_size = getattr(args, "data_parallel_size", 1)
    default = source.startswith("default")
    notes = []
    if config.get("fp16", {}).get("enabled") and stage == 0:
        if default:
            stage, source = 1, f"raised from 0 ({source}) for fp16's overflow check"
            _set_stage(args, config, user, 1)
            notes.append(
                f"ZeRO stage 1 ({source}): at ZeRO 0 DeepSpeed's fp16 optimizer checks each parameter's "
                f"gradient for overflow with its own host sync; ZeRO 1 checks them all with one reduction "
                f"(one data-parallel rank partitions nothing)"
            )
        else:
            notes.append(
                f"note: ZeRO 0 ({source}) with fp16: DeepSpeed checks each parameter's gradient for overflow "
                f"with its own host sync; ZeRO 1 (the default) checks them all at once"
            )
    bf16_optimizer = bool(config.get("bf16", {}).get("enabled")) and _fp32_accumulation(config)
    offload = str((config["zero_optimization"].get("offload_optimizer") or {}).get("device", "none")) != "none"
    if bf16_optimizer and not offload and stage == 1 and default and dp_size > 1:
        if (getattr(args, "pipeline_model_parallel_size", 1) or 1) == 1:  # pipelining composes with ZeRO <= 1
            stage, source = 2, f"raised from 1 ({source}) for bf16: gradients reduced during backward"
            _set_stage(args, config, user, 2)
            notes.append(
                f"ZeRO stage 2 ({source}): with bf16 at ZeRO 1 DeepSpeed all-reduces the whole fp32 "
                f"gradient after backward; ZeRO 2 reduces it in buckets while backward runs"
            )
    elif bf16_optimizer and not offload and stage == 2 and dp_size == 1:
        stage, source = 1, f"lowered from 2 ({source}) for bf16 on 1 data-parallel rank"
        _set_stage(args, config, user, 1)
        notes.append(
            f"ZeRO stage 1 ({source}): with bf16 on one data-parallel rank ZeRO 2 partitions nothing and "
            f"reduces every micro-batch's gradient over a one-rank group; ZeRO 1 skips that reduction"
        )
    elif bf16_optimizer and stage == 3 and dp_size == 1:
        notes.append(
            f"note: ZeRO 3 ({source}) on one data-parallel rank partitions nothing and reduces every "
            f"micro-batch's gradient over a one-rank group; ZeRO 1 (the default) skips that reduction"
        )
    return stage, source, notes


def _fp32_accumulation(config):
    dtype = str(config.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    return dtype in ("fp32", "float32", "float", "torch.float32")


def _set_stage(args, config, user, stage):
    """The stage in the config, with the keys generate_config gives that stage where the JSON sets none."""
    zero = config["zero_optimization"]
    zero["stage"] = stage
    given = user.get("zero_optimization") or {}
    zero.update({key: value for key, value in _zero_settings(args, stage).items() if key not in given})
