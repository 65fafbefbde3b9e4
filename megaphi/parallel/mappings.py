"""Communication in and out of tensor-parallel regions, each with its conjugate backward.

    copy_to_tensor_model_parallel_region      fwd: identity        bwd: all-reduce
    reduce_from_tensor_model_parallel_region  fwd: all-reduce      bwd: identity
    scatter_to_tensor_model_parallel_region   fwd: split last dim  bwd: all-gather last dim
    gather_from_tensor_model_parallel_region  fwd: all-gather last bwd: split last dim

Sequence-parallel regions use the same primitives along the sequence dim:
    gather_along_dim / reduce_scatter_along_dim (gloo lacks reduce-scatter: all-reduce + split).

At TP=1 every function returns its input unchanged: no autograd node, no copy, no communication.

`count_communication()` records every collective issued here (benchmarks/tp.py uses it).
"""
import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist

from .state import get_tensor_model_parallel_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from .utils import split_tensor_along_dim


class CommunicationCounter:
    """Collectives seen while active: calls[op] and bytes[op], where bytes is the size of the full
    (unsharded) tensor the collective produces or reduces, as NCCL would be asked for it; a
    reduce-scatter that gloo emulates with an all-reduce still counts as one reduce-scatter."""

    def __init__(self):
        self.calls = defaultdict(int)
        self.bytes = defaultdict(int)

    def add(self, op, num_bytes):
        self.calls[op] += 1
        self.bytes[op] += int(num_bytes)


_COUNTERS = []


@contextlib.contextmanager
def count_communication():
    counter = CommunicationCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(op, tensor, factor=1):
    for counter in _COUNTERS:
        counter.add(op, tensor.numel() * tensor.element_size() * factor)


def _all_reduce(x):
    if get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.contiguous()
    _record("all_reduce", x)
    dist.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


def _split(x, dim):
    """This rank's chunk of x along dim (contiguous copy)."""
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    return split_tensor_along_dim(x, world, dim)[get_tensor_model_parallel_rank()].contiguous()


def _gather(x, dim):
    """Concatenate every TP rank's x along dim."""
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    _record("all_gather", x, world)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, dim):
    """Sum x over the TP ranks and keep this rank's chunk along dim."""
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    group = get_tensor_model_parallel_group()
    _record("reduce_scatter", x)
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: all-reduce the whole tensor, then keep our chunk.
        full = x.contiguous().clone()
        dist.all_reduce(full, group=group)
        return _split(full, dim)
    chunks = [c.contiguous() for c in split_tensor_along_dim(x, world, dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())  # never modify the caller's tensor in place

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _split(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim), None


class _GatherAlongDim(torch.autograd.Function):
    """fwd: all-gather along dim; bwd: reduce-scatter along dim (sequence-parallel entry)."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim), None


class _ReduceScatterAlongDim(torch.autograd.Function):
    """fwd: reduce-scatter along dim; bwd: all-gather along dim (sequence-parallel exit)."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


def _tp_active():
    return get_tensor_model_parallel_world_size() > 1


def copy_to_tensor_model_parallel_region(x):
    return _CopyToRegion.apply(x) if _tp_active() else x


def reduce_from_tensor_model_parallel_region(x):
    return _ReduceFromRegion.apply(x) if _tp_active() else x


def scatter_to_tensor_model_parallel_region(x, dim=-1):
    return _ScatterToRegion.apply(x, dim) if _tp_active() else x


def gather_from_tensor_model_parallel_region(x, dim=-1):
    return _GatherFromRegion.apply(x, dim) if _tp_active() else x


def gather_along_dim(x, dim):
    """All-gather along dim with a reduce-scatter backward (sequence-parallel column input)."""
    return _GatherAlongDim.apply(x, dim) if _tp_active() else x


def reduce_scatter_along_dim(x, dim):
    """Reduce-scatter along dim with an all-gather backward (sequence-parallel row output)."""
    return _ReduceScatterAlongDim.apply(x, dim) if _tp_active() else x
