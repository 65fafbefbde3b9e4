"""The run configuration: typed, frozen, in sections, resolved once from the parsed flags.

`resolve_config(parse_flags(argv))` is the one place where flags become values: the flag checks
(megaphi.training.flag_checks), the DeepSpeed JSON merged over the flags (ZeRO stage, clipping), the
finetune/evaluate switches, the tokenizer's vocabulary rows, what a resumed checkpoint's metadata makes
the run adopt, the peak TFLOP/s MFU is measured against, and whether blocks are compiled. Nothing
changes the parsed namespace or the config afterwards. Section fields carry the flags' names
(Megatron-LM's, `--num-layers` -> `model.num_layers`).
"""

import copy
import dataclasses
import json
import os
import time
import types
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from megaphi.training.argument_error import ArgumentError, FlagError
from megaphi.training.flag_checks import check_pipeline_composition, resolve_flags


@dataclass(frozen=True)
class ModelConfig:
    """The architecture (PhiConfig fields under the flags' names)."""

    model: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    rotary_dim: int
    max_position_embeddings: int
    vocab_size: Optional[int]  # embedding rows; None: the preset's (or the finetuned folder's)
    attention_dropout: float
    hidden_dropout: float
    embedding_dropout: float
    init_method_std: float
    base_model_config: Optional[Mapping[str, Any]]  # a finetuned folder's config.json (eps, rope base, ...)


@dataclass(frozen=True)
class RuntimeConfig:
    """How the model runs (not what it is): given to the model when it is built."""

    recompute: bool
    recompute_granularity: Optional[str]
    recompute_num_layers: int
    loss_chunk_tokens: int
    attention_backend: str
    sequence_parallel: bool  # as asked; the model gets it at TP > 1 only
    torch_compile: str
    compiled_blocks: bool  # --torch-compile resolved for this device
    layernorm_impl: str
    rotary_impl: str
    async_tensor_model_parallel_allreduce: bool


@dataclass(frozen=True)
class ParallelConfig:
    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    num_layers_per_virtual_pipeline_stage: Optional[int]
    pipeline_layers_per_stage: Optional[tuple]  # explicit layer counts per (virtual) stage, or None: even
    virtual_pipeline_stages: int  # model chunks per pipeline rank (1 without interleaving)
    data_parallel_size: int  # world / (TP x PP)
    zero_stage: int
    zero_stage_source: str
    distributed_backend: Optional[str]
    distributed_timeout_minutes: float
    check_replicated_params: Optional[int]
    deepspeed_json: str  # the DeepSpeed config the engine is built with (deepspeed_config() reads it)

    def deepspeed_config(self):
        """A fresh dict of the DeepSpeed config (DeepSpeed may keep and change what it is given)."""
        return json.loads(self.deepspeed_json)


@dataclass(frozen=True)
class TrainingConfig:
    """Batch geometry and run length."""

    micro_batch_size: int
    global_batch_size: int
    gradient_accumulation_steps: int
    train_iters: int
    seq_length: int
    seed: int
    exit_interval: Optional[int]
    exit_duration_in_mins: Optional[float]
    skip_train: bool
    start_time: float  # --exit-duration-in-mins counts from here


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, the lr schedule, clipping and precision."""

    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_iters: int
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    optimizer_impl: str
    clip_grad: float
    clip_grad_source: str
    fp16: bool
    bf16: bool

    @property
    def precision(self):
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"


@dataclass(frozen=True)
class DataConfig:
    mock_data: bool
    data_path: Optional[tuple]
    data_prefixes: tuple
    data_weights: Optional[tuple]
    split: str
    train_data_path: Optional[tuple]
    valid_data_path: Optional[tuple]
    test_data_path: Optional[tuple]
    data_cache_path: Optional[str]
    num_workers: int
    tokenizer: Optional[str]
    vocab_file: Optional[str]
    merge_file: Optional[str]
    make_vocab_size_divisible_by: int
    tokenizer_vocab_size: Optional[int]  # tokens of the loaded tokenizer (None without one)


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str]
    load: Optional[str]
    save_interval: Optional[int]
    save_interval_minutes: Optional[float]
    finetune: bool  # weights only (also with --skip-train); off when --save already holds a checkpoint
    no_export_model: bool
    keep_last: Optional[int]
    start_over: bool
    no_load_optim: bool
    no_save_optim: bool  # weights only: no optimizer state in the checkpoints (resume with --no-load-optim)
    no_load_rng: bool
    resume_tag: Optional[str]  # the --load checkpoint the run resumes (its metadata was read to resolve)


@dataclass(frozen=True)
class EvalConfig:
    eval_interval: int
    eval_iters: int
    eval_humaneval: Optional[str]
    eval_humaneval_interval: Optional[int]
    humaneval_max_new_tokens: int

    @property
    def enabled(self):
        return self.eval_iters > 0 and self.eval_interval is not None


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int
    log_dir: Optional[str]
    tensorboard_dir: Optional[str]
    wandb_project: Optional[str]
    wandb_exp_name: Optional[str]
    wandb_save_dir: Optional[str]
    log_params_norm: bool
    log_num_zeros_in_grad: bool  # zeros in each step's gradient (num_zeros, Megatron's num-zeros)
    tensorboard_log_interval: Optional[int]  # TensorBoard / W&B every N iterations; None: at every log line
    peak_tflops: Optional[float]  # None: no known peak, MFU n/a
    peak_tflops_text: str  # where the peak comes from, for the start-up line
    notes: tuple  # what Megatron flags do here, said on stderr at start
    messages: tuple  # what resolution adopted or decided, said on stdout at start


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    runtime: RuntimeConfig
    parallel: ParallelConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    logging: LoggingConfig
    flags: Mapping[str, Any]  # every resolved flag value (read-only), as checkpoints record them

    @classmethod
    def from_flags(cls, argv, world_size=None):
        """Parse and resolve a command line (the flags of `python -m megaphi.pretrain`)."""
        from megaphi.training.arguments import parse_flags

        return resolve_config(parse_flags(argv), world_size)

    def phi_config(self):
        """The PhiConfig the model is built from: the preset (or the finetuned folder's config) with the
        model fields (the architecture only; model_runtime() says how it runs)."""
        from megaphi.config import PhiConfig, get_preset

        m = self.model
        base = m.base_model_config
        config = PhiConfig.from_dict(_thaw(base)) if base is not None else get_preset(m.model)
        overrides = {
            "num_hidden_layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size,
            "num_attention_heads": m.num_attention_heads,
            "rotary_dim": m.rotary_dim,
            "max_position_embeddings": m.max_position_embeddings,
            "attention_dropout": m.attention_dropout,
            "resid_dropout": m.hidden_dropout,
            "embd_dropout": m.embedding_dropout,
            "initializer_range": m.init_method_std,
        }
        if m.vocab_size is not None:
            overrides["vocab_size"] = m.vocab_size
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    def model_runtime(self):
        """How this run's model runs (megaphi.model.ModelRuntime): recompute, loss chunking, attention
        backend, sequence parallel and compiled blocks. Never part of the exported config."""
        from megaphi.model import ModelRuntime

        r = self.runtime
        granularity = r.recompute_granularity or ("full" if r.recompute else None)
        return ModelRuntime(
            recompute=granularity or "none",
            recompute_num_layers=r.recompute_num_layers,
            loss_chunk_tokens=r.loss_chunk_tokens,
            attention_backend=r.attention_backend,
            # Megatron turns sequence parallel off at TP=1, where it changes nothing
            sequence_parallel=bool(r.sequence_parallel and self.parallel.tensor_model_parallel_size > 1),
            compile=r.compiled_blocks,
        )

    def flag_namespace(self):
        """A new, mutable namespace of the resolved flag values, for code that reads flags by name
        (checkpoint metadata, the metrics writer's run description); changing it changes nothing here."""
        return types.SimpleNamespace(**{k: _thaw(v) for k, v in self.flags.items()})


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


def _thaw(value):
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def _section(cls, values, **resolved):
    """cls built from the flag values of the same names, `resolved` overriding."""
    return cls(
        **{f.name: resolved[f.name] if f.name in resolved else _freeze(values[f.name]) for f in dataclasses.fields(cls)}
    )


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_config(args, world_size=None, device=None):
    """The RunConfig of parsed flags (`args` is not changed). world_size defaults to $WORLD_SIZE;
    device (MFU peak, compile default) to this rank's GPU, else the CPU. FlagError for a bad flag,
    ArgumentError / CheckpointError for what the files named by the flags refuse."""
    from megaphi.model.compile import compile_enabled
    from megaphi.checkpoint import layout, resume_checks
    from megaphi.training.deepspeed_config import resolve_deepspeed
    from megaphi.training.model_flags import load_run_tokenizer, model_vocab_size
    from megaphi.training.run_info import resolve_peak_tflops

    start_time = time.time()
    try:
        flags = resolve_flags(args, world_size)  # a checked copy; the resolution steps below complete it
    except FlagError:
        raise
    except ArgumentError as e:
        raise FlagError(str(e)) from None
    messages = []
    if flags.skip_train:
        flags.finetune = True  # load the weights only (a checkpoint or a model folder), as finetuning does
    if flags.finetune and flags.save and layout.read_pointer(flags.save) is not None:
        # a restarted finetuning job: continue its own checkpoints rather than start over
        messages.append(
            f"--finetune: {flags.save} already holds a checkpoint; resuming it instead of loading {flags.load}"
        )
        flags.finetune, flags.load = False, flags.save
    resume = resume_checks.resume_point(flags)  # (tag, metadata) of the checkpoint resumed, or None
    # the ZeRO stage and clipping settled with the JSON, and a default stage with the checkpoint
    deepspeed = zero_stage_for_resume(flags, resolve_deepspeed(flags), resume)
    flags.zero_stage, flags.zero_stage_source = deepspeed.zero_stage, deepspeed.zero_stage_source
    flags.clip_grad, flags.clip_grad_source = deepspeed.clip_grad, deepspeed.clip_grad_source
    messages.extend(deepspeed.notes)  # why the ZeRO stage differs from the one asked for (or should)
    try:
        check_pipeline_composition(flags)  # again: the DeepSpeed JSON may have set the ZeRO stage
    except ArgumentError as e:
        raise FlagError(str(e)) from None
    tokenizer_size, rows = None, flags.vocab_size
    if flags.tokenizer or flags.vocab_file:
        tokenizer = load_run_tokenizer(flags)
        tokenizer_size, rows = tokenizer.vocab_size, model_vocab_size(flags, tokenizer)
    if resume is not None:
        adopted, lines = resume_checks.resume_adoptions(flags, resume[1], tokenizer_size, rows)
        rows = adopted.pop("vocab_size", rows)
        for name, value in adopted.items():
            setattr(flags, name, value)
        messages += lines
    if tokenizer_size is None:
        flags.vocab_size = rows  # the flag's, or the checkpoint's (--use-checkpoint-args)
    device = device or _device()
    flags.peak_tflops, peak_text = resolve_peak_tflops(flags, device)
    flags.compiled_blocks = compile_enabled(flags.torch_compile, device.type)
    flags.start_time = start_time
    values = vars(flags)
    base = flags.base_model_config.to_dict() if flags.base_model_config is not None else None
    return RunConfig(
        model=_section(ModelConfig, values, vocab_size=rows, base_model_config=_freeze(base)),
        runtime=_section(RuntimeConfig, values),
        parallel=_section(ParallelConfig, values, deepspeed_json=json.dumps(deepspeed.config)),
        training=_section(TrainingConfig, values),
        optimizer=_section(OptimizerConfig, values),
        data=_section(DataConfig, values, tokenizer_vocab_size=tokenizer_size),
        checkpoint=_section(CheckpointConfig, values, resume_tag=resume[0] if resume else None),
        eval=_section(EvalConfig, values),
        logging=_section(
            LoggingConfig, values, peak_tflops_text=peak_text, notes=tuple(flags.flag_notes), messages=tuple(messages)
        ),
        flags=types.MappingProxyType({k: _freeze(v) for k, v in values.items() if k != "base_model_config"}),
    )


def zero_stage_for_resume(flags, deepspeed, resume):
    """The DeepSpeedSettings of a run resuming `resume` ((tag, metadata) or None). When no flag or JSON
    chose the ZeRO stage and the default would keep the optimizer state the run loads in another layout
    than the checkpoint's (resume_checks.conflicting_zero_stage: e.g. an fp16 checkpoint saved at ZeRO 0
    before fp16 defaulted to ZeRO 1), the run takes the checkpoint's stage, with a line saying so, where
    it can use it (not bf16 at ZeRO 0, nor a pipeline above ZeRO 1); otherwise the resume check refuses
    the difference, naming --zero-stage and --no-load-optim. `flags` is read, not changed."""
    from megaphi.checkpoint import resume_checks
    from megaphi.training.deepspeed_config import resolve_deepspeed
    from megaphi.training.megatron_compat import check_zero3_flags

    if resume is None or not deepspeed.zero_stage_defaulted:
        return deepspeed
    tag, meta = resume
    saved = resume_checks.conflicting_zero_stage(flags, meta, deepspeed.zero_stage)
    if saved is None:
        return deepspeed
    trial = copy.copy(flags)
    trial.zero_stage, trial.zero_stage_source = saved, f"from the checkpoint at --load {flags.load}/{tag}"
    try:
        adopted = resolve_deepspeed(trial)  # the precision rules may still move the stage (bf16: ZeRO >= 1)
        trial.zero_stage = adopted.zero_stage
        check_pipeline_composition(trial)
        check_zero3_flags(trial)
    except ArgumentError:
        return deepspeed
    if resume_checks.conflicting_zero_stage(trial, meta, adopted.zero_stage) is not None:
        return deepspeed
    line = (
        f"resuming at ZeRO stage {adopted.zero_stage}, the stage of --load {flags.load}/{tag}: this run's default "
        f"ZeRO {deepspeed.zero_stage} keeps the optimizer state in another layout (to change: --zero-stage "
        f"{deepspeed.zero_stage} --no-load-optim, which restarts the Adam moments)"
    )
    return adopted._replace(notes=(line, *adopted.notes))
