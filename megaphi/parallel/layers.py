"""Megatron-style tensor-parallel layers. At TP=1 each is exactly one F.linear / F.embedding call.

Sequence parallel (sequence_parallel=True, at construction or per call): activations outside the
column..row region are [seq, batch, hidden], split along the sequence (SEQUENCE_DIM = 0), as in
Megatron. A column layer then all-gathers its input along the sequence (backward: reduce-scatter), a
row layer reduce-scatters its output (backward: all-gather) and adds its bias to the local sequence
chunk, so the bias gradient is summed over TP inside the graph (see
replicated_in_sequence_parallel_region). With the sequence leading, each rank's chunk is one
contiguous block for any batch size: the gathers are views of the collective's buffer and the
reduce-scatters send their input as it is (no rearranging copy; with [batch, seq, hidden] and batch >
1 every one of them would copy the whole activation). The embedding takes [batch, seq] ids and
returns [seq/TP, batch, hidden]: it looks up the transposed ids, so no activation is transposed.

Input-gradient overlap (overlap_grad_communication=True, the default; an attribute of each column
layer, so it can be switched per layer to compare): a column layer that enters the TP region itself
(input_in_parallel_region=False, e.g. the model's lm_head) runs one fused autograd function whose
backward computes the input gradient, launches its all-reduce (with sequence parallel: reduce-scatter)
asynchronously, computes the weight and bias gradients while it runs, and waits before returning.
Same ops in the same order as F.linear + the region's backward, so the gradients are bitwise those
of the sequential path (overlap_grad_communication=False). column_parallel_linears_on_shared_input
does the same for several column layers reading one input (attention query_key_value and MLP fc1):
one summed input gradient, one collective, every weight gradient overlapping it. On NCCL the GEMM
only overlaps the collective if the communication kernel is queued first
(CUDA_DEVICE_MAX_CONNECTIONS=1, as Megatron sets); the result is correct either way.

Row layers and the embedding all-reduce their own fresh matmul/lookup output in place
(reduce_from_tensor_model_parallel_region_): no copy on the model's path.

Weights are [out, in] like nn.Linear. Parameters are initialized TP-independently: a full (master)
tensor is drawn on CPU in fp32 and each rank keeps its shard, so TP=k with a given RNG state holds
exactly the shards of the TP=1 layer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (
    _all_reduce,
    _reduce_scatter,
    copy_to_tensor_model_parallel_region,
    gather_along_dim,
    gather_from_tensor_model_parallel_region,
    gather_shards,
    reduce_from_tensor_model_parallel_region_,
    reduce_scatter_along_dim,
    scatter_to_tensor_model_parallel_region,
)
from .state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from .utils import divide, is_tensor_model_parallel_param, set_tensor_model_parallel_attributes, vocab_range

SEQUENCE_DIM = 0  # sequence-parallel activations are [seq, batch, hidden]


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


class _ColumnParallelLinearsWithOverlappedGradComm(torch.autograd.Function):
    """outputs[i] = F.linear(total, weight_i, bias_i), total = x entered into the TP region (identity,
    or all-gathered along the sequence, SEQUENCE_DIM). Backward: the input gradient sum_i grad_i @ weight_i
    first, its all-reduce (reduce-scatter along the sequence) launched asynchronously, then the weight and bias
    gradients, then the wait. The formulas are F.linear's own backward (grad @ W, grad^T @ x, sum over
    tokens); input gradients add up in layer order, which for one or two layers is bitwise autograd's
    accumulation (addition commutes)."""

    @staticmethod
    def forward(ctx, x, sequence_parallel, *weights_and_biases):
        total = gather_shards(x, SEQUENCE_DIM) if sequence_parallel else x
        weights, biases = list(weights_and_biases[0::2]), list(weights_and_biases[1::2])
        device_type = total.device.type
        if torch.is_autocast_enabled(device_type):  # cast like autocast's F.linear; save what the GEMMs use
            dtype = torch.get_autocast_dtype(device_type)
            total = total.to(dtype)
            weights = [w.to(dtype) for w in weights]
            biases = [None if b is None else b.to(dtype) for b in biases]
        ctx.sequence_parallel = sequence_parallel
        ctx.input_dtype = x.dtype
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(total, *weights)
        return tuple(F.linear(total, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads):
        total, *weights = ctx.saved_tensors
        grads_2d = [g.reshape(-1, g.shape[-1]) for g in grads]
        pending = None
        if ctx.needs_input_grad[0]:
            grad_total = None
            for grad_2d, weight in zip(grads_2d, weights):
                part = grad_2d.mm(weight)
                grad_total = part if grad_total is None else grad_total.add_(part)
            # communicated in x's dtype, as the sequential path does (autocast's cast sits inside the region)
            grad_total = grad_total.view(total.shape).to(ctx.input_dtype)
            # grad_total is this function's own fresh tensor: the all-reduce may work in place
            pending = (
                _reduce_scatter(grad_total, SEQUENCE_DIM, async_op=True)
                if ctx.sequence_parallel
                else _all_reduce(grad_total, async_op=True)
            )
        total_2d = total.reshape(-1, total.shape[-1])
        param_grads = []
        for i, (grad_2d, has_bias) in enumerate(zip(grads_2d, ctx.has_bias)):
            weight_needed, bias_needed = ctx.needs_input_grad[2 + 2 * i], ctx.needs_input_grad[3 + 2 * i]
            param_grads.append(grad_2d.t().mm(total_2d) if weight_needed else None)
            param_grads.append(grad_2d.sum(0) if has_bias and bias_needed else None)
        grad_x = pending.wait() if pending is not None else None
        return (grad_x, None, *param_grads)


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split along its output dim: each rank computes output_size / TP features.

    gather_output=True all-gathers the features (the output is then full on every rank).
    sequence_parallel=True: x is this rank's sequence chunk [s/TP, b, in]; it is all-gathered along
    the sequence first. input_in_parallel_region=True: the caller already moved x into the
    tensor-parallel region (enter_tensor_parallel_region), so the layer communicates nothing on its
    input; several column layers reading one tensor then share a single all-gather / all-reduce.
    overlap_grad_communication (attribute, default True): when the layer enters the region itself, its
    backward overlaps the input-gradient communication with the weight-gradient GEMM (module docstring).
    """

    def __init__(
        self,
        input_size,
        output_size,
        bias=True,
        gather_output=False,
        init_method=None,
        initialize=True,
        device=None,
        dtype=None,
        sequence_parallel=False,
        input_in_parallel_region=False,
        overlap_grad_communication=True,
    ):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.input_in_parallel_region = input_in_parallel_region
        self.overlap_grad_communication = overlap_grad_communication
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
        if self.input_in_parallel_region:
            y = F.linear(x, self.weight, self.bias)
        elif self.overlap_grad_communication:
            (y,) = _ColumnParallelLinearsWithOverlappedGradComm.apply(x, sp, self.weight, self.bias)
        else:
            y = F.linear(enter_tensor_parallel_region(x, sp), self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y

    def extra_repr(self):
        return (
            f"in={self.input_size}, out={self.output_size} (per rank {self.output_size_per_partition}), "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}, "
            f"overlap_grad_communication={self.overlap_grad_communication}"
        )


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split along its input dim; partial products are all-reduced, then the
    (unsharded) bias is added once.

    input_is_parallel=True: x is already split on its last dim (e.g. the output of a column layer);
    otherwise x is full and each rank takes its slice.
    sequence_parallel=True: the output is reduce-scattered along the sequence (dim 0) instead of
    all-reduced; needs input_is_parallel=True.
    """

    def __init__(
        self,
        input_size,
        output_size,
        bias=True,
        input_is_parallel=False,
        init_method=None,
        initialize=True,
        device=None,
        dtype=None,
        sequence_parallel=False,
    ):
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
        # y is our fresh matmul output (not saved for backward): all-reduce it in place, no copy
        y = reduce_scatter_along_dim(y, SEQUENCE_DIM) if sp else reduce_from_tensor_model_parallel_region_(y)
        if self.bias is None:
            return y
        return y + (replicated_in_sequence_parallel_region(self.bias) if sp else self.bias)

    def extra_repr(self):
        return (
            f"in={self.input_size} (per rank {self.input_size_per_partition}), out={self.output_size}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding with its rows (the vocabulary) split over TP ranks: each rank looks up the ids in
    its range, zeros the others, and the partial results are all-reduced (with sequence_parallel:
    reduce-scattered along the sequence, so each rank gets its sequence chunk).

    input_ids are [batch, seq]; the output is [batch, seq, hidden], or with sequence_parallel this
    rank's chunk [seq/TP, batch, hidden] (the lookup reads the transposed ids, a copy of the ids only)."""

    def __init__(self, num_embeddings, embedding_dim, init_method=None, initialize=True, device=None, dtype=None):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, get_tensor_model_parallel_rank(), world)
        self.weight = nn.Parameter(
            torch.empty(self.vocab_end - self.vocab_start, embedding_dim, device=device, dtype=dtype)
        )
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim=0)
        if initialize:
            self.reset_parameters(init_method)

    def reset_parameters(self, init_method=None, generator=None):
        init_from_master(self.weight, init_method or normal_init(), generator)

    def forward(self, input_ids, sequence_parallel=False):
        if sequence_parallel:
            input_ids = input_ids.t()  # [seq, batch]: the lookup writes the sequence-first layout itself
        if get_tensor_model_parallel_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        # the lookup's fresh output (its backward keeps only the ids): zeroed and all-reduced in place
        out = F.embedding(local_ids, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        if sequence_parallel:
            return reduce_scatter_along_dim(out, SEQUENCE_DIM)
        return reduce_from_tensor_model_parallel_region_(out)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end})"


def enter_tensor_parallel_region(x, sequence_parallel=False):
    """Make x (replicated, or this rank's sequence chunk when sequence_parallel) the full input of
    column-parallel layers: identity forward / all-reduce backward, or all-gather along the sequence
    forward / reduce-scatter backward."""
    return gather_along_dim(x, SEQUENCE_DIM) if sequence_parallel else copy_to_tensor_model_parallel_region(x)


def column_parallel_linears_on_shared_input(x, column_layers, sequence_parallel=False):
    """Enter the TP region once with x and apply every column layer to it (e.g. attention
    query_key_value and MLP fc1 on one LayerNorm output); returns their outputs, gathered for layers with
    gather_output. Equals `h = enter_tensor_parallel_region(x, sequence_parallel); [layer(h) ...]` for
    layers built with input_in_parallel_region=True, but the backward sums the layers' input gradients,
    launches the one all-reduce (reduce-scatter) and computes every weight gradient while it runs.
    If any layer has overlap_grad_communication=False, it is exactly that sequential composition."""
    column_layers = tuple(column_layers)
    if get_tensor_model_parallel_world_size() == 1:
        return tuple(F.linear(x, layer.weight, layer.bias) for layer in column_layers)
    if all(layer.overlap_grad_communication for layer in column_layers):
        params = [t for layer in column_layers for t in (layer.weight, layer.bias)]
        outputs = _ColumnParallelLinearsWithOverlappedGradComm.apply(x, sequence_parallel, *params)
    else:
        h = enter_tensor_parallel_region(x, sequence_parallel)
        outputs = [F.linear(h, layer.weight, layer.bias) for layer in column_layers]
    return tuple(
        gather_from_tensor_model_parallel_region(y) if layer.gather_output else y
        for y, layer in zip(outputs, column_layers)
    )


def set_grad_communication_overlap(model, enabled):
    """Turn the input-gradient / weight-gradient overlap of every column layer in `model` on or off."""
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear):
            module.overlap_grad_communication = bool(enabled)


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
