"""Cross-rank check that parameters every tensor-parallel rank holds whole (LayerNorm weights, row-parallel
biases) are bitwise equal, as they must be: each TP rank updates its own copy from gradients that agree only
while every rank draws the same replicated dropout masks. A rank whose default RNG stream moved (a probe,
rank-dependent work) drifts silently; this finds it at the cost of one small all-gather."""

import torch
import torch.distributed as dist

from .utils import is_tensor_model_parallel_param


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ReplicatedParameterMismatch(RuntimeError):
    pass


def replicated_parameters(module):
    """(name, parameter) for every parameter not sharded over the TP group."""
    return [(name, p) for name, p in module.named_parameters() if not is_tensor_model_parallel_param(p)]


def _local_values(param):
    """The values this rank holds: the whole tensor, or its ZeRO-3 partition (TP ranks of one DP rank
    hold the same partition)."""
    partition = getattr(param, "ds_tensor", None)
    return (partition if partition is not None else param).detach().reshape(-1)


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_checksum(tensor):
    """Two int64 sums of the tensor's bit patterns (plain and position-weighted). Integer addition
    wraps and is associative, so any reduction order, on any device, gives the same result."""
    flat = tensor.detach().contiguous().reshape(-1)
    bits = flat.view(_SAME_WIDTH_INT[flat.element_size()]).to(torch.int64)
    positions = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64)
    return torch.stack([bits.sum(), (bits * positions).sum()])


def check_replicated_parameters(module, group, when=""):
    """Raise ReplicatedParameterMismatch (one line, naming the first parameter that differs and by how much)
    unless every replicated parameter is bitwise equal on all ranks of `group`. Every rank of the group
    must call it; each raises the same error."""
    world = dist.get_world_size(group)
    named = replicated_parameters(module)
    if world == 1 or not named:
        return
    local = torch.stack([bitwise_checksum(_local_values(p)) for _, p in named])
    gathered = torch.empty((world * local.shape[0], local.shape[1]), dtype=local.dtype, device=local.device)
    _all_gather_into_tensor(gathered, local, group=group)  # rank-major rows (gloo wants dim 0 = world x)
    gathered = gathered.view(world, *local.shape)
    differs = (gathered != gathered[0]).any(dim=2)  # [rank, parameter]
    if not bool(differs.any()):  # the only host sync when all agree
        return
    index = int(differs.any(dim=0).nonzero()[0])
    other = int(differs[:, index].nonzero()[0])
    name, param = named[index]
    values = _local_values(param)
    copies = torch.empty(world * values.numel(), dtype=values.dtype, device=values.device)
    _all_gather_into_tensor(copies, values.contiguous(), group=group)
    copies = copies.view(world, values.numel())
    gap = (copies[other].float() - copies[0].float()).abs().max().item()
    raise ReplicatedParameterMismatch(
        f"replicated parameter {name} differs between tensor-parallel ranks 0 and {other}{when} (max |difference| "
        f"{gap:.3g}): the ranks no longer train one model; resume from a checkpoint saved before this"
    )
