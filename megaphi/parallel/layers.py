"""Megatron-style tensor-parallel layers. At TP=1 each is exactly one F.linear / F.embedding call.

Sequence parallel (sequence_parallel=True, at construction or per call): activations outside the
column..row region are split along the sequence dim (dim 1 of [batch, seq, hidden]; Megatron uses
[seq, batch, hidden] and dim 0). A column layer then all-gathers its input along the sequence
(backward: reduce-scatter), a row layer reduce-scatters its output (backward: all-gather) and adds
its bias to the local sequence chunk, so the bias gradient is summed over TP inside the graph
(see replicated_in_sequence_parallel_region).

Weights are [out, in] like nn.Linear. Parameters are initialized TP-independently: a full (master)
tensor is drawn on CPU in fp32 and each rank keeps its shard, so TP=k with a given RNG state holds
exactly the shards of the TP=1 layer.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_along_dim,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_along_dim,
    scatter_to_tensor_model_parallel_region,
)
from .state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from .utils import divide, is_tensor_model_parallel_param, set_tensor_model_parallel_attributes, vocab_range


def normal_init(std=0.02):
    def init(tensor, generator=None):
        return tensor.normal_(0.0, std, generator=generator)
    return init


def full_shape(param):
    """Shape of the unsharded parameter this rank holds a shard of."""
    shape = list(param.shape)
    if is_tensor_model_parallel_param(param):
        shape[param.partition_dim] *= get_tensor_model_parallel_world_size()
    return shape


def shard_of(full_tensor, param):
    """This rank's shard of full_tensor, laid out like param (a view)."""
    if not is_tensor_model_parallel_param(param):
        return full_tensor
    world = get_tensor_model_parallel_world_size()
    return full_tensor.chunk(world, dim=param.partition_dim)[get_tensor_model_parallel_rank()]


@torch.no_grad()
def init_from_master(param, init_fn, generator=None):
    """Draw the full parameter on CPU in fp32 with init_fn(tensor, generator); keep this rank's shard."""
    if param.is_meta:
        return
    master = torch.empty(full_shape(param), dtype=torch.float32)
    init_fn(master, generator)
    param.copy_(shard_of(master, param))


def _reset_linear(layer, init_method=None, generator=None):
    """This rank's shard of the TP=1 weight init (see init_from_master); zero bias."""
    init_from_master(layer.weight, init_method or normal_init(), generator)
    if layer.bias is not None and not layer.bias.is_meta:
        with torch.no_grad():
            layer.bias.zero_()


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split along its output dim: each rank computes output_size / TP features.

    gather_output=True all-gathers the features (the output is then full on every rank).
    sequence_parallel=True: x is this rank's sequence chunk [b, s/TP, in]; it is all-gathered along
    the sequence first. input_in_parallel_region=True: the caller already moved x into the
    tensor-parallel region (enter_tensor_parallel_region), so the layer communicates nothing on its
    input; several column layers reading one tensor then share a single all-gather / all-reduce.
    """

    def __init__(self, input_size, output_size, bias=True, gather_output=False, init_method=None,
                 initialize=True, device=None, dtype=None, sequence_parallel=False, input_in_parallel_region=False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.input_in_parallel_region = input_in_parallel_region
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True is not supported with sequence_parallel")
        world = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, world, "ColumnParallelLinear output size")
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim=0)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, device=device, dtype=dtype))
            set_tensor_model_parallel_attributes(self.bias, True, partition_dim=0)
        else:
            self.register_parameter("bias", None)
        if initialize:
            self.reset_parameters(init_method)

    def reset_parameters(self, init_method=None, generator=None):
        _reset_linear(self, init_method, generator)

    def forward(self, x, sequence_parallel=None):
        if get_tensor_model_parallel_world_size() == 1:
            return F.linear(x, self.weight, self.bias)
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        if not self.input_in_parallel_region:
            x = enter_tensor_parallel_region(x, sp)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y

    def extra_repr(self):
        return (f"in={self.input_size}, out={self.output_size} (per rank {self.output_size_per_partition}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input dim; partial products are all-reduced, then the
    (unsharded) bias is added once.

    input_is_parallel=True: x is already split on its last dim (e.g. the output of a column layer);
    otherwise x is full and each rank takes its slice.
    sequence_parallel=True: the output is reduce-scattered along the sequence (dim 1) instead of
    all-reduced; needs input_is_parallel=True.
    """

    def __init__(self, input_size, output_size, bias=True, input_is_parallel=False, init_method=None,
                 initialize=True, device=None, dtype=None, sequence_parallel=False):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        self.sequence_parallel = sequence_parallel
        world = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, world, "RowParallelLinear input size")
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim=1)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, device=device, dtype=dtype))
            set_tensor_model_parallel_attributes(self.bias, False)
            self.bias.sequence_parallel = True  # its gradient is TP-summed when SP is on (see forward)
        else:
            self.register_parameter("bias", None)
        if initialize:
            self.reset_parameters(init_method)

    def reset_parameters(self, init_method=None, generator=None):
        _reset_linear(self, init_method, generator)

    def forward(self, x, sequence_parallel=None):
        if get_tensor_model_parallel_world_size() == 1:
            return F.linear(x, self.weight, self.bias)
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight)
        y = reduce_scatter_along_dim(y, 1) if sp else reduce_from_tensor_model_parallel_region(y)
        if self.bias is None:
            return y
        return y + (replicated_in_sequence_parallel_region(self.bias) if sp else self.bias)

    def extra_repr(self):
        return (f"in={self.input_size} (per rank {self.input_size_per_partition}), out={self.output_size}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with its rows (the vocabulary) split over TP ranks: each rank looks up the ids in
    its range, zeros the others, and the partial results are all-reduced (with sequence_parallel:
    reduce-scattered along the sequence, so each rank gets its sequence chunk)."""

    def __init__(self, num_embeddings, embedding_dim, init_method=None, initialize=True, device=None, dtype=None):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, get_tensor_model_parallel_rank(), world)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim, device=device, dtype=dtype))
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim=0)
        if initialize:
            self.reset_parameters(init_method)

    def reset_parameters(self, init_method=None, generator=None):
        init_from_master(self.weight, init_method or normal_init(), generator)

    def forward(self, input_ids, sequence_parallel=False):
        if get_tensor_model_parallel_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if sequence_parallel:
            return reduce_scatter_along_dim(out, 1)
        return reduce_from_tensor_model_parallel_region(out)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end})"


def enter_tensor_parallel_region(x, sequence_parallel=False):
    """Make x (replicated, or this rank's sequence chunk when sequence_parallel) the full input of
    column-parallel layers: identity forward / all-reduce backward, or all-gather along the sequence
    forward / reduce-scatter backward."""
    return gather_along_dim(x, 1) if sequence_parallel else copy_to_tensor_model_parallel_region(x)


def replicated_in_sequence_parallel_region(param):
    """Use a replicated parameter (LayerNorm weight/bias, row bias) on sequence-sharded activations.

    Each TP rank only sees its sequence chunk, so its gradient is partial; this identity forward /
    all-reduce backward sums it over the TP group inside autograd, before any optimizer or ZeRO hook
    sees it (Megatron instead all-reduces these gradients after backward). Identity at TP=1.
    """
    return copy_to_tensor_model_parallel_region(param)


def scaled_normal_init(std, num_layers):
    """Megatron's output-projection init: std / sqrt(2 * num_layers)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))
