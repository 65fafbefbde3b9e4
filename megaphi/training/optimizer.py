"""AdamW with weight decay on weight matrices only (not on biases, LayerNorm or 1-d params)."""

import torch
from torch import nn


def _is_layer_norm(module):
    if isinstance(module, (nn.LayerNorm,)):
        return True
    try:
        from megaphi.ops import LayerNorm
    except ImportError:  # ops not built yet: fall back to the class name
        return "LayerNorm" in type(module).__name__
    return isinstance(module, LayerNorm) or "LayerNorm" in type(module).__name__


def param_groups(model, weight_decay):
    """Two groups: decayed (weights of Linear/Embedding) and not decayed (biases, LayerNorm)."""
    no_decay_ids = set()
    for module in model.modules():
        if _is_layer_norm(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in no_decay_ids or name.endswith(".bias") or name == "bias" or param.ndim < 2:
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


OPTIMIZER_IMPLS = ("auto", "torch", "torch-fused", "deepspeed-fused")


def build_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, device_type=None, impl="auto"):
    """AdamW with decoupled weight decay on the groups above.

    impl: "auto" = torch's fused AdamW on CUDA (one kernel for all tensors, nothing compiled at run
    time), torch's default (foreach) AdamW elsewhere; "torch" / "torch-fused" force those;
    "deepspeed-fused" = DeepSpeed's FusedAdam, which JIT-compiles a CUDA extension on first use (nvcc,
    ninja and CUDA_HOME needed, about a minute) and has no CPU fallback."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {', '.join(OPTIMIZER_IMPLS)}, got {impl!r}")
    if device_type is None:
        device_type = next(model.parameters()).device.type
    groups = param_groups(model, weight_decay)
    for g in groups:
        g.pop("names")
    if impl == "auto":
        impl = "torch-fused" if device_type == "cuda" else "torch"
    if impl == "deepspeed-fused":
        if device_type != "cuda":
            raise ValueError(f"optimizer impl deepspeed-fused needs CUDA parameters, got {device_type}")
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    fused = True if impl == "torch-fused" else None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
