"""The few collectives a save or a load needs, over the default (global) process group.

Every helper also works in one plain process without a process group (rank 0 of 1), as the
converters and tests use this package."""

import torch.distributed as dist


def _distributed():
    return dist.is_available() and dist.is_initialized()


def rank_and_world():
    """(global rank, world size); (0, 1) without a process group."""
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_rank():
    return rank_and_world()[0]


def barrier():
    if _distributed():
        dist.barrier()


def broadcast_from_rank0(value):
    """Rank 0's (picklable) value on every rank."""
    if _distributed() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def gather_union(local):
    """Merge every rank's dict (all ranks get the union)."""
    _, world = rank_and_world()
    if world == 1:
        return dict(local)
    parts = [None] * world
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged
