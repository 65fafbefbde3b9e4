"""The DeepSpeed engine: AdamW, the lr schedule, the engine itself, and every use of DeepSpeed internals.

megaphi drives DeepSpeed through its public API (deepspeed.initialize, engine.backward/step,
save/load_checkpoint, get_global_grad_norm) except in the places below, each needed for a reason given
where it is done, and each pinned by tests/training/test_deepspeed_internals.py (or test_fresh_checkout.py for
the shared-memory extension) so that a DeepSpeed release that changes them fails a test instead of
silently logging no grad norm, all-reducing for nothing or logging a NaN loss scale:

- engine.clip_fp32_gradients and engine._take_model_step: wrapped to keep the fp32 gradient norm, which
  DeepSpeed does not report without ZeRO/fp16/bf16, and the count of zeros in the gradient
  (--log-num-zeros-in-grad) before the optimizer step (GradNormRecorder);
- the ZeRO 1/2 and BF16 optimizers' gradient fragments (param._hp_mapping, read as DeepSpeed's own
  safe_get_full_grad reads them) for that count (gradient_zero_count; pinned by
  tests/training/test_megatron_logging_flags.py against safe_get_full_grad);
- engine.enable_backward_allreduce: off on one data-parallel rank (finish_engine_setup);
- the fp16 optimizers' cur_scale / loss_scale (loss_scale_of), engine.basic_optimizer (describe_optimizer);
- deepspeed.comm.torch.build_shm_op: replaced so no CPU extension is JIT-built (skip_shm_comm_extension).
"""

import importlib
import os

import torch
import torch.distributed as dist

from megaphi.training.argument_error import ArgumentError


def build_engine(model, config):
    """(DeepSpeed engine, GradNormRecorder) for `model` under the RunConfig `config`: our AdamW param
    groups, our warmup/decay schedule, the config's DeepSpeed JSON and the mpu of megaphi.parallel."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from megaphi.parallel import mpu
    from megaphi.training.lr_schedule import WarmupDecayLR
    from megaphi.training.optimizer import build_optimizer

    # DeepSpeed's INFO lines (config dumps, timers) drown the training log; megaphi prints its own.
    ds_logger.setLevel(os.environ.get("MEGAPHI_DEEPSPEED_LOG_LEVEL", "WARNING").upper())
    o = config.optimizer
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    optimizer = build_optimizer(
        model,
        o.lr,
        o.weight_decay,
        (o.adam_beta1, o.adam_beta2),
        o.adam_eps,
        device_type=device_type,
        impl=o.optimizer_impl,
    )
    scheduler = WarmupDecayLR(optimizer, o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters, o.lr_decay_style)
    skip_shm_comm_extension()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=mpu,
        config=config.parallel.deepspeed_config(),
        dist_init_required=False,
    )
    if config.logging.log_num_zeros_in_grad and engine.zero_optimization_stage() == 3:
        raise ArgumentError(
            "--log-num-zeros-in-grad: ZeRO 3 partitions the gradients per parameter; use --zero-stage 0-2"
        )
    if config.checkpoint.no_save_optim and engine.zero_optimization_stage() == 3:
        from megaphi.training.megatron_compat import NO_SAVE_OPTIM_ZERO3

        raise ArgumentError(NO_SAVE_OPTIM_ZERO3)
    return engine, finish_engine_setup(engine, count_zeros=config.logging.log_num_zeros_in_grad)


def check_precision_supported(fp16, bf16):
    """A one-line --fp16/--bf16 error where DeepSpeed's accelerator cannot run that precision."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if fp16 and not accelerator.is_fp16_supported():
        raise ArgumentError(
            f"--fp16: DeepSpeed does not support fp16 on this device ({accelerator.device_name()}); use --bf16 or fp32"
        )
    if bf16 and not accelerator.is_bf16_supported():
        raise ArgumentError(f"--bf16: not supported on this device ({accelerator.device_name()}); use --fp16 or fp32")


def finish_engine_setup(engine, count_zeros=False):
    """Small fixes on a fresh engine; returns the GradNormRecorder that keeps the fp32 grad norm (and,
    with `count_zeros`, the zeros in each step's gradient).

    Skips the engine's gradient all-reduce when there is a single data-parallel rank. The engine
    all-reduces (engine.allreduce_gradients -> buffered_allreduce_fallback) the module's gradients at
    ZeRO 0 (fp32, fp16; bf16 at ZeRO 0 is left as it was) and, for bf16 at ZeRO 1 with fp32 accumulation
    (megaphi's bf16 stage on one data-parallel rank, --zero-stage 2 there included: see
    deepspeed_config.zero_stage_for_precision), the BF16 optimizer's flat fp32 gradient buffers: over
    one rank that only flattens the gradient into a bucket of up to 500M elements (2 GB in fp32),
    "reduces" it and copies it back, ~4 passes over the fp32 gradient per step. The BF16 optimizer
    accumulates its fp32 gradients before the flag is read (engine._backward_epilogue), so turning the
    flag off skips the reduction only. The ZeRO optimizers (stages 1-3 otherwise, fp16 at ZeRO 1
    included) move gradients into their partitions inside their reduction: not touched. DeepSpeed
    0.19.8 reads immediate_grad_update in the BF16 optimizer only; its ZeRO 2 optimizer frees each bf16
    gradient once it is in a bucket (checked in tests/training/test_zero_defaults.py)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from megaphi.parallel import get_data_parallel_world_size

    recorder = GradNormRecorder(engine, count_zeros)
    fp32_fp16_zero0 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    if (fp32_fp16_zero0 or isinstance(engine.optimizer, BF16_Optimizer)) and get_data_parallel_world_size() == 1:
        engine.enable_backward_allreduce = False
    return recorder


class GradNormRecorder:
    """The gradient norm of the last optimizer step. DeepSpeed reports one (get_global_grad_norm) with
    ZeRO, fp16 or bf16; without them it computes none of its own: with clipping it clips with a helper
    whose norm it discards, without clipping it computes none. The recorder keeps (or computes) that
    norm; the clipping itself is unchanged. With `count_zeros` (--log-num-zeros-in-grad) it also counts
    the zero entries of each step's gradient (gradient_zero_count), at the same point: after the
    gradients are reduced, before the optimizer step. Values stay tensors, read at log time (no per-step
    sync; the count's all-reduce runs at every step, as Megatron's does)."""

    def __init__(self, engine, count_zeros=False):
        from deepspeed.runtime.utils import clip_grad_norm_

        self.engine = engine
        self.fp32_norm = None
        self.count_zeros = count_zeros
        self.zeros = None

        def clip_and_record():  # what engine._take_model_step calls to clip fp32 gradients
            self.fp32_norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(), mpu=engine.mpu)

        engine.clip_fp32_gradients = clip_and_record
        take_model_step = engine._take_model_step

        def take_model_step_with_norm(*args, **kwargs):
            if engine.gradient_clipping() <= 0 and not (
                engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()
            ):
                self.fp32_norm = global_grad_norm(engine.module.parameters())
            if self.count_zeros:
                self.zeros = gradient_zero_count(engine.module.parameters())
            return take_model_step(*args, **kwargs)

        engine._take_model_step = take_model_step_with_norm

    def latest(self):
        """The last step's norm (a float or a 0-dim tensor), or None before the first step."""
        reported = self.engine.get_global_grad_norm()
        return self.fp32_norm if reported is None else reported

    def latest_zeros(self):
        """Zero entries in the last step's gradient (a 0-dim int64 tensor), or None (not counted, or
        before the first step)."""
        return self.zeros


def gradient_zero_count(parameters):
    """Number of zero entries in the model's gradient (Megatron's num-zeros for
    --log-num-zeros-in-grad): 0-dim int64 tensor, the same on every rank; collective over the TP and DP
    groups. Call after the data-parallel reduction, before the optimizer step. Loss scaling and
    clipping multiply by a nonzero factor, so the count is that of the unscaled main gradient, as
    Megatron counts it, whichever copy is read. What each rank reads:

    - ZeRO 0 (fp32, fp16): `param.grad` of every parameter, whole and already all-reduced over data
      parallel, so every DP rank counts the same and nothing is summed over DP;
    - ZeRO 1 and 2 (and bf16's BF16_Optimizer, ZeRO 1): the fragment of each parameter's reduced
      gradient that this rank's optimizer partition updates (DeepSpeed's gradient fragment, the part
      safe_get_full_grad assembles); the fragments tile each gradient once over the DP group, so the
      counts are summed over DP. Padding of the flat partitions is not a parameter's and is not counted;
    - ZeRO 3: not counted (refused when the engine is built).

    Tensor parallelism: a shard of a tensor-parallel parameter counts on every TP rank, a replicated
    parameter (identical on every TP rank) once, from TP rank 0; the counts are summed over TP."""
    from megaphi.parallel import (
        get_data_parallel_group,
        get_tensor_model_parallel_group,
        get_tensor_model_parallel_rank,
    )

    parameters = list(parameters)
    device = parameters[0].device if parameters else torch.device("cpu")
    partitioned = any(hasattr(p, "_hp_mapping") for p in parameters)  # the same on every rank
    tp_rank = get_tensor_model_parallel_rank()
    zeros = []
    for param in parameters:
        if tp_rank != 0 and not getattr(param, "tensor_model_parallel", False):
            continue
        if hasattr(param, "_hp_mapping"):  # a ZeRO 1/2 or BF16 optimizer's parameter
            if param._hp_mapping is None:
                continue  # no element of this parameter is in this rank's partition
            fragment = param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
            address = param._hp_mapping.lp_fragment_address
            if fragment.numel() == param.numel() != address.numel:  # BF16 keeps the whole gradient: its part
                fragment = fragment.narrow(0, address.start, address.numel)
        elif param.grad is None:
            continue
        else:
            fragment = param.grad.reshape(-1)
        zeros.append((fragment.numel() - torch.count_nonzero(fragment)).to(device))  # offload: on the CPU
    total = torch.stack(zeros).sum() if zeros else torch.zeros((), dtype=torch.int64, device=device)
    groups = [get_tensor_model_parallel_group()] + ([get_data_parallel_group()] if partitioned else [])
    for group in groups:
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            if dist.get_backend(group) == "nccl":
                total = total.cuda()
            dist.all_reduce(total, group=group)
    return total


def global_grad_norm(parameters):
    """L2 norm of the whole model's gradient (gradients already reduced over data parallel). A
    parameter marked tensor_model_parallel holds a different shard on each TP rank and is summed over
    the TP group; a replicated one is counted once (from TP rank 0), as DeepSpeed counts them.
    Returns a 0-dim tensor where the gradients live: read it at log time."""
    from megaphi.parallel import get_tensor_model_parallel_group, get_tensor_model_parallel_rank

    tp_rank = get_tensor_model_parallel_rank()
    squares = [
        p.grad.detach().float().pow(2).sum()
        for p in parameters
        if p.grad is not None and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
    ]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    group = get_tensor_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=group)
    return total.sqrt()


def loss_scale_of(engine):
    """The fp16 optimizer's current loss scale (1.0 without fp16); DeepSpeed has no public accessor."""
    if not engine.fp16_enabled():
        return 1.0
    if hasattr(engine, "current_loss_scale"):  # the pipelined stages' engine (pipeline_trainer) keeps its own
        return float(engine.current_loss_scale())
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(opt, name, None)
        if value is not None:
            return float(value() if callable(value) else value)
    return float("nan")


def describe_optimizer(engine):
    """'torch.optim.AdamW (fused) in DeepSpeed BF16_Optimizer': the optimizer we built, and DeepSpeed's
    wrapper around it (engine.basic_optimizer is the one we passed)."""
    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    cls = type(basic)
    module = "torch.optim" if cls.__module__.startswith("torch.optim.") else cls.__module__
    flags = [key for key in ("fused", "foreach") if getattr(basic, "defaults", {}).get(key)]
    text = f"{module}.{cls.__qualname__}" + (f" ({', '.join(flags)})" if flags else "")
    if engine.optimizer is not basic:
        text += f" in DeepSpeed {type(engine.optimizer).__name__}"
    return text


def skip_shm_comm_extension():
    """Start DeepSpeed without its CPU shared-memory collective extension, which megaphi never uses.
    Call before deepspeed.initialize / deepspeed.init_distributed (idempotent).

    Creating deepspeed.comm's TorchBackend (inside deepspeed.initialize) loads `deepspeed_shm_comm`, a
    C++/OpenMP extension DeepSpeed JIT-compiles on CPU machines: about 2 minutes on a fresh machine (a
    build killed half-way leaves a lock file that makes every later run wait for ever), then, on every
    start, a ninja up-to-date check under that lock (runs started together wait for each other) and a
    "... built successfully" line. DeepSpeed uses it only in `inference_all_reduce` (DeepSpeed-Inference's
    tensor parallelism), which falls back to torch.distributed.all_reduce without it; megaphi's
    collectives are torch.distributed's. No public setting turns the build off (DS_BUILD_SHM_COMM only
    affects `pip install`), so the module function TorchBackend calls, deepspeed.comm.torch.build_shm_op,
    is replaced by one returning None: the state DeepSpeed itself is in where the extension is not
    available (non-Linux)."""
    # by name: `import deepspeed.comm.torch as m` binds deepspeed.comm's attribute `torch` (the torch package)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if getattr(ds_torch_comm.build_shm_op, "megaphi_skipped", False):
        return

    def build_shm_op():
        return None  # "not available": inference_all_reduce uses torch.distributed

    build_shm_op.megaphi_skipped = True
    ds_torch_comm.build_shm_op = build_shm_op
