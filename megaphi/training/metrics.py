"""Throughput, FLOPs and MFU, and the metrics sinks (stdout, metrics.jsonl, TensorBoard)."""

import json
import math
import os
import re
import sys

import torch

# Dense (not sparse) peak TFLOP/s per device and precision, from NVIDIA's datasheets and architecture
# whitepapers; figures quoted "with sparsity" are halved (H100 SXM: the Hopper whitepaper's 989.4 =
# the datasheet's 1,979 / 2). bf16/fp16: tensor cores with fp32 accumulation (GeForce cards run fp16
# accumulation twice as fast; training accumulates in fp32); tf32: tensor cores; fp32: the plain cores.
# None: no such unit. A pattern must match the whole torch.cuda.get_device_name() (case-insensitive),
# so an H100 PCIe or NVL never gets the SXM figure; an unlisted device gets no MFU (--peak-tflops).
#   device name                                                            bf16    fp16    tf32    fp32
PEAK_TFLOPS = (
    (r"NVIDIA H100( \d+GB HBM3)?", 989.4, 989.4, 494.7, 66.9),
    (r"NVIDIA H100 PCIe", 756.5, 756.5, 378.0, 51.2),
    (r"NVIDIA H100 NVL", 835.5, 835.5, 417.5, 60.0),
    (r"NVIDIA H200( 141GB HBM3e)?", 989.4, 989.4, 494.7, 67.0),
    (r"NVIDIA H200 NVL", 835.5, 835.5, 417.5, 60.0),
    (r"NVIDIA GH200( \d+GB)?( HBM3e?)?", 989.4, 989.4, 494.7, 67.0),
    (r"NVIDIA H800( 80GB HBM3)?", 989.4, 989.4, 494.7, 67.0),
    (r"NVIDIA H800 PCIe", 756.5, 756.5, 378.0, 51.0),
    (r"NVIDIA A[18]00[- ](SXM4?-|PCIE-)?(40|80)GB( PCIe)?", 312.0, 312.0, 156.0, 19.5),
    (r"NVIDIA A30", 165.0, 165.0, 82.0, 10.3),
    (r"NVIDIA A40", 149.7, 149.7, 74.8, 37.4),
    (r"NVIDIA A10", 125.0, 125.0, 62.5, 31.2),
    (r"NVIDIA L40S", 362.05, 362.05, 183.0, 91.6),
    (r"NVIDIA L40", 181.05, 181.05, 90.5, 90.5),
    (r"NVIDIA L4", 121.0, 121.0, 60.0, 30.3),
    (r"NVIDIA GeForce RTX 4090", 165.2, 165.2, 82.6, 82.6),
    (r"NVIDIA GeForce RTX 3090", 71.0, 71.0, 35.6, 35.6),
    (r"Tesla V100-SXM2-(16|32)GB", None, 125.0, None, 15.7),
    (r"Tesla V100-PCIE-(16|32)GB", None, 112.0, None, 14.0),
    (r"Tesla V100S-PCIE-32GB", None, 130.0, None, 16.4),
    (r"Tesla T4", None, 65.0, None, 8.1),
)
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


def matmul_params(num_layers, hidden_size, ffn_hidden_size, vocab_size):
    """Parameters taking part in matmuls: L*(4h^2 + 2*h*ffn) + h*V (biases, LayerNorm excluded)."""
    return num_layers * (4 * hidden_size**2 + 2 * hidden_size * ffn_hidden_size) + hidden_size * vocab_size


def flops_per_token(num_layers, hidden_size, ffn_hidden_size, vocab_size, seq_length):
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * L * h * s (attention scores)."""
    n = matmul_params(num_layers, hidden_size, ffn_hidden_size, vocab_size)
    return 6 * n + 12 * num_layers * hidden_size * seq_length


def tf32_enabled():
    """Whether fp32 matmuls on CUDA may run on TF32 tensor cores (torch's default: no)."""
    legacy_switch = getattr(torch.backends.cuda.matmul, "allow_tf32", False)  # deprecated alias of the precision
    return bool(legacy_switch) or torch.get_float32_matmul_precision() != "highest"


def training_precision(fp16=False, bf16=False):
    """The precision key the peak is looked up under: fp32 runs use tf32 when it is enabled."""
    return "fp16" if fp16 else "bf16" if bf16 else ("tf32" if tf32_enabled() else "fp32")


def lookup_peak_tflops(name, precision="bf16"):
    """(peak TFLOP/s or None, why None) for a device name such as "NVIDIA H100 80GB HBM3"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for pattern, *peaks in PEAK_TFLOPS:
        if re.fullmatch(pattern, name.strip(), flags=re.IGNORECASE):
            by_precision = dict(zip(PRECISIONS, peaks))
            peak = by_precision[precision]
            if peak is None and precision == "tf32":  # no TF32 units: fp32 matmuls run on the fp32 cores
                peak = by_precision["fp32"]
            if peak is None:
                return None, f"{name} has no {precision} tensor cores"
            return peak, None
    return None, f"unknown device {name!r} (no peak in megaphi.training.metrics.PEAK_TFLOPS; pass --peak-tflops)"


def device_peak_tflops(device=None, precision="bf16"):
    """Dense peak TFLOP/s of a CUDA device (index, torch.device or a device name) for `precision`,
    or None (CPU, unknown GPU, no such tensor cores)."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.cuda.current_device()
    name = device if isinstance(device, str) else torch.cuda.get_device_name(device)
    return lookup_peak_tflops(name, precision)[0]


def throughput(tokens, seconds, flops_token, num_devices, peak_tflops):
    """(tokens/s, TFLOP/s per device, MFU or None)."""
    tokens_per_sec = tokens / seconds if seconds > 0 else float("nan")
    tflops = tokens_per_sec * flops_token / num_devices / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    return tokens_per_sec, tflops, mfu


def parameters_norm(parameters):
    """L2 norm of the whole model's parameters (--log-params-norm, Megatron's params-norm): a shard of a
    tensor-parallel parameter counts on every TP rank, a replicated one once. A float; all TP ranks call it."""
    import torch.distributed as dist

    from megaphi.parallel import get_tensor_model_parallel_group, get_tensor_model_parallel_rank
    from megaphi.parallel.state import get_pipeline_model_parallel_group

    tp_rank = get_tensor_model_parallel_rank()
    squares = [
        p.detach().float().pow(2).sum()
        for p in parameters
        if tp_rank == 0 or getattr(p, "tensor_model_parallel", False)
    ]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    for group in (get_tensor_model_parallel_group(), get_pipeline_model_parallel_group()):  # each stage's share
        if dist.is_initialized() and group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return float(total.sqrt())


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    except ImportError:
        return None


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    if isinstance(value, torch.Tensor):
        return _clean(value.item())
    return value


def repair_truncated_last_line(path):
    """A run killed (or out of disk) mid-write leaves a last line without its newline: cut it off, so
    appending goes on from a whole line. Returns the number of bytes removed."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = 0
        pos = size
        while pos > 0:  # find the last newline, reading backwards in blocks
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            idx = block.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        f.truncate(keep)
    print(
        f"warning: {path}: removed a truncated last line ({size - keep} bytes) left by an interrupted write",
        file=sys.stderr,
        flush=True,
    )
    return size - keep


# metrics.jsonl keys -> the TensorBoard / W&B tags Megatron-LM writes, so dashboards carry over.
# (key, tag, scale); "vs samples" twins are written at step = consumed samples, as Megatron does.
TRAIN_TAGS = (
    ("loss", "lm loss", 1.0),
    ("lr", "learning-rate", 1.0),
    ("grad_norm", "grad-norm", 1.0),
    ("loss_scale", "loss-scale", 1.0),
    ("ms_per_iter", "iteration-time", 1e-3),  # seconds, as Megatron
    ("global_batch_size", "batch-size", 1.0),
    ("tflops_per_gpu", "throughput", 1.0),
    ("tokens_per_sec", "tokens-per-sec", 1.0),
    ("mfu", "mfu", 1.0),
    ("skipped_in_interval", "skipped-iterations", 1.0),
    ("consumed_tokens", "consumed-tokens", 1.0),
    ("peak_memory_gb", "mem-max-allocated-bytes", 2.0**30),
    ("params_norm", "params-norm", 1.0),
    ("num_zeros", "num-zeros", 1.0),  # --log-num-zeros-in-grad
)
VALID_TAGS = (("val_loss", "lm loss validation", 1.0), ("val_ppl", "lm loss validation ppl", 1.0))
TEST_TAGS = (("test_loss", "lm loss test", 1.0), ("test_ppl", "lm loss test ppl", 1.0))
VS_SAMPLES = {
    "lm loss",
    "learning-rate",
    "grad-norm",
    "num-zeros",
    "loss-scale",
    "batch-size",
    "lm loss validation",
    "lm loss validation ppl",
    "lm loss test",
    "lm loss test ppl",
}


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scalar_tags(record, prefix="train"):
    """{tag: value} of a metrics record under Megatron's names; keys without one keep PREFIX/KEY."""
    table = {"train": TRAIN_TAGS, "valid": VALID_TAGS, "test": TEST_TAGS}.get(prefix, ())
    named = {key: (tag, scale) for key, tag, scale in table}
    skip = {"iteration", "train_iters", "consumed_samples", "skipped_steps"}
    out = {}
    for key, value in record.items():
        if key in skip or not _number(value):
            continue
        tag, scale = named.get(key, (f"{prefix}/{key}", 1.0))
        out[tag] = value * scale
    return out


class MetricsWriter:
    """Writes one JSON object per line to LOG_DIR/metrics.jsonl (rank 0 only), and the scalars to
    TensorBoard and Weights & Biases (`wandb`: a megaphi.training.wandb_writer.WandbWriter) under
    Megatron's tag names."""

    def __init__(self, log_dir=None, tensorboard_dir=None, enabled=True, wandb=None, arguments=None):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.wandb = wandb if enabled else None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "metrics.jsonl")
            repair_truncated_last_line(path)
            self.file = open(path, "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    f"--tensorboard-dir needs the tensorboard package: pip install tensorboard ({e})"
                ) from None
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
            if arguments:  # the run's flags, once per start, as TensorBoard text (its "Text" tab)
                self.tb.add_text("arguments", arguments_markdown(arguments), 0)
                self.tb.flush()

    def write(self, record, prefix="train", to_file=True, to_scalars=True):
        """The record as a metrics.jsonl line (to_file) and as TensorBoard / W&B scalars (to_scalars):
        --tensorboard-log-interval writes the scalars at other iterations than the log lines."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        if self.file is not None and to_file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if (self.tb is None and self.wandb is None) or not to_scalars:
            return
        step = record.get("iteration", 0)
        scalars = scalar_tags(record, prefix)
        if self.tb is not None:
            samples = record.get("consumed_samples")
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
                if tag in VS_SAMPLES and samples is not None:
                    self.tb.add_scalar(f"{tag} vs samples", value, samples)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.add_scalars(scalars, step)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def arguments_markdown(arguments):
    """{name: value} as a two-column markdown table (TensorBoard renders it), sorted by name."""
    rows = [f"| `--{name.replace('_', '-')}` | `{value}` |" for name, value in sorted(arguments.items())]
    return "\n".join(["| flag | value |", "|---|---|", *rows])


def open_metrics_writer(args, enabled=True):
    """The run's MetricsWriter: metrics.jsonl in --log-dir, TensorBoard in --tensorboard-dir (with the
    run's arguments as text), and W&B with --wandb-project (started on the writing rank only; the run id
    kept in --save, so a resumed run continues the same W&B run)."""
    from .wandb_writer import WandbWriter, wandb_config

    wandb = None
    if enabled and getattr(args, "wandb_project", None):
        wandb = WandbWriter(
            args.wandb_project,
            args.wandb_exp_name,
            args.wandb_save_dir or args.log_dir,
            wandb_config(args),
            id_dir=getattr(args, "save", None) or args.wandb_save_dir or args.log_dir,
        )
    return MetricsWriter(args.log_dir, args.tensorboard_dir, enabled=enabled, wandb=wandb, arguments=wandb_config(args))


def format_train_line(r):
    parts = [
        f"iteration {r['iteration']:>8d}/{r['train_iters']:<8d}",
        f"consumed samples {r['consumed_samples']}",
        f"loss {r['loss']:.6f}",
        f"lr {r['lr']:.4e}",
    ]
    if r.get("grad_norm") is not None:
        parts.append(f"grad norm {r['grad_norm']:.4f}")
    if r.get("num_zeros") is not None:
        parts.append(f"num zeros: {r['num_zeros']}")  # Megatron's words (--log-num-zeros-in-grad)
    parts += [
        f"loss scale {r['loss_scale']:g}",
        f"skipped {r['skipped_steps']}",
        f"{r['ms_per_iter']:.1f} ms/iter",
        f"{r['tokens_per_sec']:.0f} tokens/s",
        f"{r['tflops_per_gpu']:.2f} TFLOP/s per device",
    ]  # a GPU, or a CPU rank
    parts.append("MFU n/a" if r.get("mfu") is None else f"MFU {100 * r['mfu']:.1f}%")
    if r.get("params_norm") is not None:
        parts.append(f"params norm {r['params_norm']:.4f}")
    if r.get("peak_memory_gb") is not None:
        parts.append(f"peak mem {r['peak_memory_gb']:.2f} GiB")
    if r.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(r['eta_seconds'])}")
    return " | ".join(parts)


def format_duration(seconds):
    """1d 02:03:04, 02:03:04 or 03:04 (minutes:seconds)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)):
        return "n/a"
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def eta_seconds(iteration, train_iters, seconds_per_iter):
    """Time left at the current pace (evaluation and saving not included)."""
    return max(0, train_iters - iteration) * seconds_per_iter


def train_record(
    config,
    state,
    step,
    interval_loss,
    interval_iters,
    interval_time,
    flops_token,
    loss_scale,
    skipped,
    skipped_in_interval,
):
    """The metrics record of one log line (metrics.jsonl and the printed line)."""
    t = config.training
    tok_s, tflops, mfu = throughput(
        t.global_batch_size * t.seq_length * interval_iters,
        interval_time,
        flops_token,
        config.parallel.world_size,
        config.logging.peak_tflops,
    )
    return {
        "iteration": state.iteration,
        "train_iters": t.train_iters,
        "consumed_samples": state.consumed_samples,
        "consumed_tokens": state.consumed_tokens,
        "loss": interval_loss,
        "lr": step.lr,
        "grad_norm": None if step.grad_norm is None else float(step.grad_norm),
        "loss_scale": loss_scale,
        "skipped_steps": skipped,
        "skipped_in_interval": skipped_in_interval,
        "ms_per_iter": 1000 * interval_time / interval_iters,
        "tokens_per_sec": tok_s,
        "tflops_per_gpu": tflops,
        "mfu": mfu,
        "peak_memory_gb": peak_memory_gb(),
        "global_batch_size": t.global_batch_size,
        "eta_seconds": eta_seconds(state.iteration, t.train_iters, interval_time / interval_iters),
    }
