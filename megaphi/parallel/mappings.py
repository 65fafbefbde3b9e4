"""Communication in and out of tensor-parallel regions, each with its conjugate backward.

    copy_to_tensor_model_parallel_region      fwd: identity        bwd: all-reduce
    reduce_from_tensor_model_parallel_region  fwd: all-reduce      bwd: identity
    scatter_to_tensor_model_parallel_region   fwd: split last dim  bwd: all-gather last dim
    gather_from_tensor_model_parallel_region  fwd: all-gather last bwd: split last dim

Sequence-parallel regions use the same primitives along the sequence dim:
    gather_along_dim / reduce_scatter_along_dim.

At TP=1 every function returns its input unchanged: no autograd node, no copy, no communication.

Copies: an all-gather writes every rank's tensor into one preallocated buffer [TP, *shape]
(all_gather_into_tensor); gathered along dim 0, or along a dim whose leading dims are all 1 (the
sequence of a batch-1 [1, s, h]), the result is a view of that buffer, otherwise one rearranging copy.
A reduce-scatter runs reduce_scatter_tensor on one rank-major input: the input itself when the scatter
dim is its leading one, otherwise one rearranging copy of it. reduce_from_tensor_model_parallel_region
copies its input once (it is the caller's); reduce_from_tensor_model_parallel_region_ all-reduces in
place, for a tensor the caller owns (the row layers' and the embedding's fresh outputs).
gloo has both tensor collectives from torch 2.3 (its reduce-scatter is an all-reduce inside); with an
older gloo the all-gather fills the buffer's rows through the list API and the reduce-scatter
all-reduces a private copy and keeps this rank's chunk.

_all_reduce / _reduce_scatter take async_op=True and then return a PendingCollective whose wait()
gives the result: the column layers launch their input-gradient communication that way and compute
the weight gradient while it runs (megaphi.parallel.layers).

`count_communication()` records every collective issued here (benchmarks/tp.py uses it).
"""

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist

from .state import get_tensor_model_parallel_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from .utils import divide, split_tensor_along_dim


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


_COUNTERS: list = []


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


def _torch_version():
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


# gloo gained reduce_scatter_tensor (and an async all_gather_into_tensor) in torch 2.3; tests switch
# this off to exercise the list-API fallback.
_GLOO_HAS_TENSOR_COLLECTIVES = _torch_version() >= (2, 3)
# Newer torch names the tensor collectives *_single and deprecates the old names (FutureWarning).
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _tensor_collectives_available(group):
    return _GLOO_HAS_TENSOR_COLLECTIVES or dist.get_backend(group) != "gloo"


class PendingCollective:
    """A collective launched with async_op=True; wait() blocks until it is done and returns its result."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish

    def wait(self):
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._finish()


def _done(result, async_op):
    return PendingCollective(None, lambda: result) if async_op else result


def _all_reduce(x, async_op=False):
    """Sum x over the TP ranks, in place when x is contiguous (otherwise into one contiguous copy)."""
    if get_tensor_model_parallel_world_size() == 1:
        return _done(x, async_op)
    x = x.contiguous()
    _record("all_reduce", x)
    work = dist.all_reduce(x, group=get_tensor_model_parallel_group(), async_op=async_op)
    return PendingCollective(work, lambda: x) if async_op else x


def _split(x, dim):
    """This rank's chunk of x along dim (contiguous copy)."""
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    return split_tensor_along_dim(x, world, dim)[get_tensor_model_parallel_rank()].contiguous()


def _merge_rank_dim(stacked, dim):
    """[TP, *shape] -> shape with shape[dim] * TP, rank-major along dim (what torch.cat gives): a view
    when every dim before `dim` has size 1, otherwise one copy."""
    shape = list(stacked.shape[1:])
    shape[dim] *= stacked.shape[0]
    return stacked.movedim(0, dim).reshape(shape)


def gather_shards(x, dim):
    """Concatenate every TP rank's x along dim (no autograd: the regions below wrap it; checkpoints and
    checks use it to see a sharded parameter whole)."""
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    group = get_tensor_model_parallel_group()
    _record("all_gather", x, world)
    stacked = x.new_empty((world,) + tuple(x.shape))
    if _tensor_collectives_available(group):
        # the [1, *shape] view makes the output the "concatenation along dim 0" form gloo requires
        _all_gather_into_tensor(stacked, x.unsqueeze(0), group=group)
    else:
        dist.all_gather(list(stacked.unbind(0)), x, group=group)  # straight into the buffer's rows
    return _merge_rank_dim(stacked, dim)


def _reduce_scatter(x, dim, async_op=False):
    """Sum x over the TP ranks and keep this rank's chunk along dim (x itself is never modified)."""
    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return _done(x, async_op)
    dim = dim % x.dim()
    group = get_tensor_model_parallel_group()
    _record("reduce_scatter", x)
    chunk_shape = list(x.shape)
    chunk_shape[dim] = divide(chunk_shape[dim], world, f"tensor dim {dim}")
    if not _tensor_collectives_available(group):
        # old gloo, no reduce-scatter: all-reduce a private copy of the whole tensor, keep our chunk
        full = x.clone(memory_format=torch.contiguous_format)
        work = dist.all_reduce(full, group=group, async_op=async_op)
        return PendingCollective(work, lambda: _split(full, dim)) if async_op else _split(full, dim)
    # Each rank's chunk must be one contiguous block, in rank order: free for dim 0 (or when the dims
    # before dim are all 1, e.g. batch-1 [1, s, h] on the sequence); otherwise this is the one copy.
    rank_major = x.unflatten(dim, (world, chunk_shape[dim])).movedim(dim, 0).contiguous()
    out = x.new_empty(chunk_shape)
    # shaped [TP * chunk_shape[0], ...]: the "concatenation along dim 0" form gloo requires
    work = _reduce_scatter_tensor(
        out, rank_major.view([world * chunk_shape[0]] + chunk_shape[1:]), group=group, async_op=async_op
    )
    return PendingCollective(work, lambda: out) if async_op else out


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
        # the caller's tensor is left alone: reduce one (contiguous) copy of it
        return _all_reduce(x.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ReduceFromRegionInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)  # x now holds the sum: autograd treats it as this node's output
        return _all_reduce(x)

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
        return gather_shards(grad, ctx.dim), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return gather_shards(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim), None


class _GatherAlongDim(torch.autograd.Function):
    """fwd: all-gather along dim; bwd: reduce-scatter along dim (sequence-parallel entry)."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return gather_shards(x, dim)

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
        return gather_shards(grad, ctx.dim), None


def _tp_active():
    return get_tensor_model_parallel_world_size() > 1


def copy_to_tensor_model_parallel_region(x):
    return _CopyToRegion.apply(x) if _tp_active() else x


def reduce_from_tensor_model_parallel_region(x):
    return _ReduceFromRegion.apply(x) if _tp_active() else x


def reduce_from_tensor_model_parallel_region_(x):
    """reduce_from_tensor_model_parallel_region, all-reducing x in place (no copy). Only for a tensor
    the caller owns and nothing saved for backward (e.g. a matmul's fresh output): x is overwritten by
    the sum. A non-contiguous x is reduced through one contiguous copy instead."""
    if not _tp_active():
        return x
    if not x.is_contiguous():  # cannot be reduced in place: reduce a contiguous copy instead
        return _ReduceFromRegion.apply(x)
    return _ReduceFromRegionInPlace.apply(x)


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
