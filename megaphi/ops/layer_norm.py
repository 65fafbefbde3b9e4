"""LayerNorm: the plain-torch reference (the spec and the CPU path).

The fused CUDA kernel (megaphi._cuda) is dispatched from here when available.
"""
import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_reference(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm(x, weight, bias, eps=1e-5, impl=None):
    return layer_norm_reference(x, weight, bias, eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with weight and bias (HF parameter names)."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape[0]}, eps={self.eps}"
