"""Process-group state for tensor and data parallelism (Megatron's parallel_state, pipeline size 1).

Ranks are laid out TP-fastest: with world size W and TP size t, TP group i holds ranks
[i*t, (i+1)*t) (adjacent ranks, so they share a node), and data-parallel group j holds ranks
j, j+t, j+2t, .... Without torch.distributed (or before initialize_model_parallel) every accessor
answers TP=1; the data-parallel group is then the whole world.
"""
import torch.distributed as dist

_TENSOR_MODEL_PARALLEL_GROUP = None
_TENSOR_MODEL_PARALLEL_RANKS = None
_DATA_PARALLEL_GROUP = None
_DATA_PARALLEL_RANKS = None


def initialize_model_parallel(tensor_model_parallel_size=1):
    """Build the TP and DP groups. Call after torch.distributed.init_process_group on every rank."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group first")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialized (call destroy_model_parallel first)")
    world_size = dist.get_world_size()
    tp = int(tensor_model_parallel_size)
    if tp < 1 or world_size % tp != 0:
        raise ValueError(f"--tensor-model-parallel-size {tp} must be >= 1 and divide the world size {world_size}")
    rank = dist.get_rank()
    # Every rank must create every group, in the same order.
    for i in range(world_size // tp):
        ranks = list(range(i * tp, (i + 1) * tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS = group, ranks
    for j in range(tp):
        ranks = list(range(j, world_size, tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS = group, ranks


def model_parallel_is_initialized():
    return _TENSOR_MODEL_PARALLEL_GROUP is not None


def destroy_model_parallel():
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    _TENSOR_MODEL_PARALLEL_GROUP = _TENSOR_MODEL_PARALLEL_RANKS = None
    _DATA_PARALLEL_GROUP = _DATA_PARALLEL_RANKS = None


def _distributed():
    return dist.is_available() and dist.is_initialized()


def get_tensor_model_parallel_group():
    """The TP group, or None when model parallelism is not initialized (TP=1)."""
    return _TENSOR_MODEL_PARALLEL_GROUP


def get_tensor_model_parallel_world_size():
    if _TENSOR_MODEL_PARALLEL_RANKS is None:
        return 1
    return len(_TENSOR_MODEL_PARALLEL_RANKS)


def get_tensor_model_parallel_rank():
    if _TENSOR_MODEL_PARALLEL_RANKS is None:
        return 0
    return _TENSOR_MODEL_PARALLEL_RANKS.index(dist.get_rank())


def get_tensor_model_parallel_src_rank():
    """Global rank of TP rank 0 in this rank's TP group (the rank that broadcasts data)."""
    if _TENSOR_MODEL_PARALLEL_RANKS is None:
        return dist.get_rank() if _distributed() else 0
    return _TENSOR_MODEL_PARALLEL_RANKS[0]


def get_data_parallel_group():
    if _DATA_PARALLEL_GROUP is None:
        return dist.group.WORLD if _distributed() else None
    return _DATA_PARALLEL_GROUP


def get_data_parallel_group_ranks():
    """Global ranks of this rank's data-parallel group (DeepSpeed asks for them when saving)."""
    if _DATA_PARALLEL_RANKS is None:
        return list(range(dist.get_world_size())) if _distributed() else [0]
    return list(_DATA_PARALLEL_RANKS)


def get_tensor_model_parallel_group_ranks():
    if _TENSOR_MODEL_PARALLEL_RANKS is None:
        return [dist.get_rank()] if _distributed() else [0]
    return list(_TENSOR_MODEL_PARALLEL_RANKS)


def get_data_parallel_world_size():
    if _DATA_PARALLEL_RANKS is None:
        return dist.get_world_size() if _distributed() else 1
    return len(_DATA_PARALLEL_RANKS)


def get_data_parallel_rank():
    if _DATA_PARALLEL_RANKS is None:
        return dist.get_rank() if _distributed() else 0
    return _DATA_PARALLEL_RANKS.index(dist.get_rank())


# The names DeepSpeed's mpu interface uses ("model parallel" = tensor parallel here, no pipeline).
get_model_parallel_group = get_tensor_model_parallel_group
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank


def get_pipeline_model_parallel_world_size():
    return 1


def get_pipeline_model_parallel_rank():
    return 0
