"""Small helpers shared by the parallel layers: exact division, vocab ranges, partition attributes."""

import torch


def divide(numerator, denominator, what="value"):
    """numerator // denominator, raising a clear error when it does not divide exactly."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by {denominator}")
    return numerator // denominator


def pad_vocab_size(vocab_size, make_vocab_size_divisible_by=128, tensor_model_parallel_size=1):
    """Smallest multiple of make_vocab_size_divisible_by * TP that holds vocab_size (Megatron's rule)."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def vocab_range(global_vocab_size, rank, world_size):
    """[start, end) of the vocabulary rows held by `rank`."""
    per_partition = divide(global_vocab_size, world_size, "vocab size")
    start = rank * per_partition
    return start, start + per_partition


def split_tensor_along_dim(tensor, num_partitions, dim=-1):
    """Equal chunks (views) of tensor along dim."""
    size = divide(tensor.shape[dim], num_partitions, f"tensor dim {dim}")
    return torch.split(tensor, size, dim=dim)


def set_tensor_model_parallel_attributes(param, is_parallel, partition_dim=-1, stride=1):
    """Mark a parameter the way Megatron/DeepSpeed expect (used for grad-norm and checkpoint sharding).

    Sharded parameters carry tensor_model_parallel=True and the dim they are split on; replicated
    ones carry tensor_model_parallel=False.
    """
    param.tensor_model_parallel = bool(is_parallel)
    param.partition_dim = partition_dim
    param.partition_stride = stride
    return param


def is_tensor_model_parallel_param(param):
    return getattr(param, "tensor_model_parallel", False)
