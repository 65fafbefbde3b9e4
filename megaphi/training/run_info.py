"""What a training run runs on, said once at start-up: attention backend (and SDPA kernel), LayerNorm and
rotary implementations, optimizer, device, precision, and the peak TFLOP/s that MFU is measured against."""

import sys

import torch
import torch.distributed as dist

from megaphi.parallel.random import rng_neutral


def resolve_peak_tflops(args, device):
    """(peak TFLOP/s MFU divides by, or None; a line saying where it comes from). --peak-tflops wins;
    else the device's dense peak for the run's precision (fp32 runs: tf32 when torch enables it).
    `args`: the flags peak_tflops, fp16 and bf16."""
    from megaphi.training import metrics

    if args.peak_tflops:
        return args.peak_tflops, f"MFU peak {args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, f"MFU n/a on {device.type} (--peak-tflops sets a peak)"
    name = torch.cuda.get_device_name(device)
    precision = metrics.training_precision(args.fp16, args.bf16)
    peak, why = metrics.lookup_peak_tflops(name, precision)
    if peak is None:
        return None, f"MFU n/a: {why}"
    return peak, f"MFU peak {peak:g} TFLOP/s ({name}, dense {precision})"


def _sdpa_cuda_kernel(device, dtype, heads, seq, head_dim, dropout_p):
    """The kernel torch SDPA picks for this run's attention shape: each enabled backend is tried
    alone in torch's priority order, and the first that accepts the inputs is the one dispatched."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enabled = {
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    }
    try:  # private; the documented default order otherwise
        order = [SDPBackend(i) for i in torch._C._get_sdp_priority_order()]
    except (AttributeError, TypeError, ValueError):
        order = list(enabled)
    with rng_neutral():  # only rank 0 probes: its draws must not shift the dropout stream TP ranks share
        q = torch.randn(1, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
        for backend in order:
            if backend not in enabled or not enabled[backend]():
                continue
            try:
                with warnings.catch_warnings(), sdpa_kernel([backend]):
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, q, q, dropout_p=dropout_p, is_causal=True).sum().backward()
                return backend.name.lower()
            except RuntimeError:
                continue
    return "no"


def attention_backend(device, dtype, config, seq_length, tp=1, forced="auto"):
    """What the model's attention runs on: flash-attn, or torch SDPA (and its kernel on CUDA).
    `forced`: the runtime's attention_backend (ModelRuntime)."""
    from megaphi.model import attention

    half = dtype in (torch.float16, torch.bfloat16)
    if forced != "auto":
        check_attention_backend(forced, device, dtype, config, seq_length, tp)
        return f"{forced} (--attention-backend)"
    if device.type == "cuda" and half and attention.flash_attn_available():
        import flash_attn

        return f"flash-attn {getattr(flash_attn, '__version__', '?')}"
    if device.type != "cuda":
        return f"torch SDPA ({device.type})"
    why = "flash-attn is not installed" if not attention.flash_attn_available() else "flash-attn takes fp16/bf16 only"
    kernel = _sdpa_cuda_kernel(
        device, dtype, config.num_attention_heads // tp, seq_length, config.head_dim, config.attention_dropout
    )
    return f"torch SDPA, {kernel} kernel ({why})"


def check_attention_backend(backend, device, dtype, config, seq_length, tp=1):
    """Run the forced backend once on this run's attention shape (forward and backward, with its
    dropout): a backend that cannot take it is a one-line --attention-backend error at start."""
    from megaphi.model.attention import causal_attention
    from megaphi.training.argument_error import ArgumentError

    heads = config.num_attention_heads // tp
    try:
        with rng_neutral():  # a probe: leaves every generator as it found it
            q = torch.randn(
                1, min(seq_length, 256), heads, config.head_dim, device=device, dtype=dtype, requires_grad=True
            )
            causal_attention(q, q, q, config.attention_dropout, backend=backend).sum().backward()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArgumentError(
            f"--attention-backend {backend} cannot run here ({dtype}, {device.type}, head dim "
            f"{config.head_dim}, dropout {config.attention_dropout}): {reason}"
        ) from None


def ops_backend(op, device):
    """(the implementation `op` runs on here, a warning when `auto` falls back to torch on CUDA)."""
    import megaphi.ops as ops
    from megaphi.ops import backend as _backend

    impl = ops.get_impl(op) if hasattr(ops, "get_impl") else "auto"
    if impl != "auto":
        return impl, None
    if device.type != "cuda":
        return "torch (auto)", None
    reason = _backend.cuda_unavailable_reason(device)
    if reason is None:
        return "cuda (auto: megaphi._cuda)", None
    return "torch (auto)", (
        f"--{op}-impl auto falls back to the torch reference on {torch.cuda.get_device_name(device)}: {reason}"
    )


def describe_backends(config, engine, model_config):
    """(the start-up 'backends:' line, warnings): attention, LayerNorm, rotary, optimizer, device."""
    from megaphi.training.engine import describe_optimizer

    device = next(engine.module.parameters()).device
    precision = config.optimizer.precision
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    layernorm, ln_warning = ops_backend("layernorm", device)
    rotary, rotary_warning = ops_backend("rotary", device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    attention = attention_backend(
        device,
        dtype,
        model_config,
        config.training.seq_length,
        config.parallel.tensor_model_parallel_size,
        config.runtime.attention_backend,
    )
    line = " | ".join(
        [
            f"backends: attention {attention}",
            f"layernorm {layernorm}",
            f"rotary {rotary}",
            f"optimizer {describe_optimizer(engine)}",
            f"blocks {'compiled (torch.compile)' if config.runtime.compiled_blocks else 'eager'}",
            f"device {where}",
            f"precision {precision}",
        ]
    )
    return line, [w for w in (ln_warning, rotary_warning) if w]


def log_run_setup(config, engine, model_config):
    """Print (rank 0) what the run uses and the peak TFLOP/s MFU is measured against."""
    if dist.get_rank() != 0:
        return
    with rng_neutral():  # rank-0-only work: whatever it runs must not move rank 0's streams
        line, warnings = describe_backends(config, engine, model_config)
    print(f"{line} | {config.logging.peak_tflops_text}", flush=True)
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)


def training_summary(config, num_params, dp_size):
    """The run's one-line shape: parameters, parallel layout, batch geometry, ZeRO, clipping, precision."""
    t, p, o = config.training, config.parallel, config.optimizer
    pp = p.pipeline_model_parallel_size
    layout = f"TP {p.tensor_model_parallel_size} x " + (f"PP {pp} x " if pp > 1 else "") + f"DP {dp_size}"
    schedule = ""
    if pp > 1:
        kind = (
            f"interleaved 1F1B, {p.virtual_pipeline_stages} chunks per rank"
            if p.virtual_pipeline_stages > 1
            else "1F1B"
        )
        schedule = f", pipeline schedule {kind}"
    return (
        f"training: {num_params:,} parameters (per TP rank), world {p.world_size} ({layout}), "
        f"global batch {t.global_batch_size} = micro {t.micro_batch_size} x DP {dp_size} x "
        f"accumulation {t.gradient_accumulation_steps}{schedule}, ZeRO stage {p.zero_stage} "
        f"({p.zero_stage_source}), gradient clipping {o.clip_grad:g} ({o.clip_grad_source}), {o.precision}"
    )
