"""Throughput, FLOPs and MFU, and the metrics sinks (stdout, metrics.jsonl, TensorBoard)."""
import json
import math
import os

import torch

# Dense bf16/fp16 peak TFLOP/s per device (DESIGN.md); matched against the device name.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


def matmul_params(num_layers, hidden_size, ffn_hidden_size, vocab_size):
    """Parameters taking part in matmuls: L*(4h^2 + 2*h*ffn) + h*V (biases, LayerNorm excluded)."""
    return num_layers * (4 * hidden_size ** 2 + 2 * hidden_size * ffn_hidden_size) + hidden_size * vocab_size


def flops_per_token(num_layers, hidden_size, ffn_hidden_size, vocab_size, seq_length):
    """Training FLOPs per token (forward + backward): 6 * N_matmul + 12 * L * h * s (attention scores)."""
    n = matmul_params(num_layers, hidden_size, ffn_hidden_size, vocab_size)
    return 6 * n + 12 * num_layers * hidden_size * seq_length


def device_peak_tflops(device=None):
    """Peak TFLOP/s of the current CUDA device by name, or None (CPU, unknown GPU)."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.cuda.current_device()
    if isinstance(device, str):
        name = device
    else:
        name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def throughput(tokens, seconds, flops_token, num_devices, peak_tflops):
    """(tokens/s, TFLOP/s per device, MFU or None)."""
    tokens_per_sec = tokens / seconds if seconds > 0 else float("nan")
    tflops = tokens_per_sec * flops_token / num_devices / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    return tokens_per_sec, tflops, mfu


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux -> GiB
    except ImportError:
        return None


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    if isinstance(value, torch.Tensor):
        return _clean(value.item())
    return value


class MetricsWriter:
    """Writes one JSON object per line to LOG_DIR/metrics.jsonl (rank 0 only) and to TensorBoard."""

    def __init__(self, log_dir=None, tensorboard_dir=None, enabled=True):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self.file = open(os.path.join(log_dir, "metrics.jsonl"), "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                                   f"({e})") from None
            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, record, prefix="train"):
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
            self.tb.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def format_train_line(r):
    parts = [f"iteration {r['iteration']:>8d}/{r['train_iters']:<8d}",
             f"consumed samples {r['consumed_samples']}",
             f"loss {r['loss']:.6f}", f"lr {r['lr']:.4e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"grad norm {r['grad_norm']:.4f}")
    parts += [f"loss scale {r['loss_scale']:g}", f"skipped {r['skipped_steps']}",
              f"{r['ms_per_iter']:.1f} ms/iter", f"{r['tokens_per_sec']:.0f} tokens/s",
              f"{r['tflops_per_gpu']:.2f} TFLOP/s/GPU"]
    parts.append("MFU n/a" if r.get("mfu") is None else f"MFU {100 * r['mfu']:.1f}%")
    if r.get("peak_memory_gb") is not None:
        parts.append(f"peak mem {r['peak_memory_gb']:.2f} GiB")
    return " | ".join(parts)
