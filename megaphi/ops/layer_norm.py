"""LayerNorm over the last dimension: the plain-torch reference (the spec and the CPU path) and the
fused CUDA kernel (megaphi._cuda), chosen by megaphi.ops.set_impl / the per-call `impl`."""

import torch
import torch.nn.functional as F
from torch import nn

from . import backend


def layer_norm_reference(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def check_layer_norm_inputs(x, weight, bias):
    """Shapes, dtypes and devices every backend needs; raises ValueError/TypeError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer_norm: x must be a tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have at least one dimension (the hidden size)")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (hidden,):
            raise ValueError(
                f"layer_norm: {name} has shape {tuple(t.shape)} but x's hidden size "
                f"(last dim of x {tuple(x.shape)}) is {hidden}"
            )
        if t.dtype != x.dtype:
            raise TypeError(f"layer_norm: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")


def layer_norm_kernel_problem(x, weight, bias):
    """Why the CUDA kernel cannot take these (already check_layer_norm_inputs-valid) tensors, as
    (exception type, message), or None when it can. `auto` falls back to torch on a problem;
    an explicit "cuda" raises it (check_layer_norm_kernel_inputs)."""
    if x.dtype not in backend.DTYPE_CODES:
        return TypeError, (
            f"layer_norm (cuda): dtype {x.dtype} is not supported; "
            f"use one of {sorted(str(d) for d in backend.DTYPE_CODES)}"
        )
    if weight is None or bias is None:
        return ValueError, "layer_norm (cuda): the kernel needs both weight and bias"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not t.is_contiguous():
            return ValueError, (
                f"layer_norm (cuda): {name} is not contiguous (shape {tuple(t.shape)}, "
                f"stride {t.stride()}); call .contiguous() first"
            )
        if not t.is_cuda:
            return ValueError, f"layer_norm (cuda): {name} is on {t.device}, not a CUDA device"
    return None


def check_layer_norm_kernel_inputs(x, weight, bias):
    """What the CUDA kernel needs on top of check_layer_norm_inputs; raises ValueError/TypeError."""
    problem = layer_norm_kernel_problem(x, weight, bias)
    if problem is not None:
        error_type, message = problem
        raise error_type(message)


def _backward_blocks(device, rows):
    # Enough blocks to fill the GPU twice over; each leaves one row of partial sums per parameter.
    return max(1, min(rows, 2 * backend.multiprocessor_count(device.index)))


# The kernels as torch custom ops (torch.library): torch.compile keeps them as single nodes, sized by
# their fake implementations, instead of breaking the graph at a Python call. The CPU
# implementations do the kernels' arithmetic in torch (fp32 statistics, one rounding), so the
# registration (schema, fake shapes, autograd) is testable without a GPU.


def _statistics_dtype(x):
    """fp32 (the kernel's; float64 for float64 inputs, which only the CPU implementation takes)."""
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.custom_op("megaphi::layer_norm_forward", mutates_args=(), device_types="cuda")
def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd): mean and rstd are fp32 per row, saved for the backward."""
    module = backend.cuda_module()
    x = x.contiguous()
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    module.layer_norm_forward(
        x.data_ptr(),
        weight.data_ptr(),
        bias.data_ptr(),
        y.data_ptr(),
        mean.data_ptr(),
        rstd.data_ptr(),
        rows,
        hidden,
        float(eps),
        backend.DTYPE_CODES[x.dtype],
        x.device.index,
        backend.current_stream_handle(x.device),
    )
    return y, mean, rstd


@layer_norm_forward.register_kernel("cpu")
def _layer_norm_forward_cpu(x, weight, bias, eps):
    acc = _statistics_dtype(x)
    xa = x.to(acc).reshape(-1, x.shape[-1])
    mean = xa.mean(dim=1)
    rstd = torch.rsqrt((xa - mean[:, None]).square().mean(dim=1) + eps)
    y = (xa - mean[:, None]) * rstd[:, None] * weight.to(acc) + bias.to(acc)
    return y.to(x.dtype).reshape(x.shape), mean, rstd


@layer_norm_forward.register_fake
def _layer_norm_forward_fake(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty((rows,), dtype=_statistics_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("megaphi::layer_norm_backward", mutates_args=(), device_types="cuda")
def layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of the forward above."""
    module = backend.cuda_module()
    dy, x = dy.contiguous(), x.contiguous()
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    num_blocks = _backward_blocks(x.device, rows)
    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    workspace = torch.empty((2, num_blocks, hidden), dtype=torch.float32, device=x.device)
    module.layer_norm_backward(
        dy.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        mean.data_ptr(),
        rstd.data_ptr(),
        dx.data_ptr(),
        dweight.data_ptr(),
        dbias.data_ptr(),
        workspace.data_ptr(),
        num_blocks,
        rows,
        hidden,
        backend.DTYPE_CODES[x.dtype],
        x.device.index,
        backend.current_stream_handle(x.device),
    )
    return dx, dweight, dbias


@layer_norm_backward.register_kernel("cpu")
def _layer_norm_backward_cpu(dy, x, weight, mean, rstd):
    hidden, acc = x.shape[-1], _statistics_dtype(x)
    dya, xa = dy.to(acc).reshape(-1, hidden), x.to(acc).reshape(-1, hidden)
    xhat = (xa - mean[:, None]) * rstd[:, None]
    dxhat = dya * weight.to(acc)
    dx = rstd[:, None] * (dxhat - dxhat.mean(dim=1, keepdim=True) - xhat * (dxhat * xhat).mean(dim=1, keepdim=True))
    return (dx.to(x.dtype).reshape(x.shape), (dya * xhat).sum(dim=0).to(weight.dtype), dya.sum(dim=0).to(weight.dtype))


@layer_norm_backward.register_fake
def _layer_norm_backward_fake(dy, x, weight, mean, rstd):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        torch.empty_like(weight),
    )


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_backward(dy, x, weight, mean, rstd)
    return dx, dweight, dbias, None


layer_norm_forward.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup_context)


def layer_norm_kernel(x, weight, bias, eps):
    """y of the kernel op (mean and rstd stay internal to autograd)."""
    return layer_norm_forward(x, weight, bias, eps)[0]


def layer_norm(x, weight, bias, eps=1e-5, impl=None):
    """LayerNorm over the last dim of x with weight and bias [hidden].

    impl: None (the backend chosen with megaphi.ops.set_impl), "auto", "cuda", "torch" or "apex".
    """
    check_layer_norm_inputs(x, weight, bias)
    chosen = backend.resolve("layernorm", impl, x)
    if (
        chosen == "cuda"
        and backend.requested_impl("layernorm", impl) == "auto"
        and layer_norm_kernel_problem(x, weight, bias) is not None
    ):
        chosen = "torch"  # e.g. no affine or a non-contiguous view: auto keeps these working
    if chosen == "cuda":
        if x.numel() == 0:
            return layer_norm_reference(x, weight, bias, eps)
        check_layer_norm_kernel_inputs(x, weight, bias)
        return layer_norm_kernel(x, weight, bias, eps)
    if chosen == "apex":
        return backend.apex_layer_norm()(x, weight, bias, (x.shape[-1],), eps)
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
