"""Process-group state for tensor, data and pipeline parallelism (Megatron's parallel_state).

Ranks are laid out TP fastest, then DP, then PP (Megatron's order): with world size W = t * d * p,
global rank = pp_rank * (t * d) + dp_rank * t + tp_rank. TP group i holds ranks [i*t, (i+1)*t)
(adjacent ranks, so they share a node); a data-parallel group holds the ranks of one pipeline stage
with the same TP rank (j, j+t, j+2t, ... within the stage's block of t*d ranks); a pipeline group
holds the ranks with the same (dp, tp) position in every stage: i, i + t*d, i + 2*t*d, ....
Without torch.distributed (or before initialize_model_parallel) every accessor answers TP=1 and
PP=1; the data-parallel group is then the whole world.
"""

import torch.distributed as dist

_TENSOR_MODEL_PARALLEL_GROUP = None
_TENSOR_MODEL_PARALLEL_RANKS = None
_DATA_PARALLEL_GROUP = None
_DATA_PARALLEL_RANKS = None
_PIPELINE_MODEL_PARALLEL_GROUP = None
_PIPELINE_MODEL_PARALLEL_RANKS = None


def initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1):
    """Build the TP, DP and PP groups. Call after torch.distributed.init_process_group on every rank."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    global _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_RANKS
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group first")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialized (call destroy_model_parallel first)")
    world_size = dist.get_world_size()
    tp = int(tensor_model_parallel_size)
    if tp < 1 or world_size % tp != 0:
        raise ValueError(f"--tensor-model-parallel-size {tp} must be >= 1 and divide the world size {world_size}")
    pp = int(pipeline_model_parallel_size)
    if pp < 1 or world_size % (tp * pp) != 0:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} x --tensor-model-parallel-size {tp} must divide "
            f"the world size {world_size}"
        )
    rank = dist.get_rank()
    stage_size = world_size // pp  # t * d ranks per pipeline stage
    # Every rank must create every group, in the same order.
    for i in range(world_size // tp):
        ranks = list(range(i * tp, (i + 1) * tp))
        group = dist.new_group(ranks)
        if rank in ranks:
            _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS = group, ranks
    for stage in range(pp):
        for j in range(tp):
            ranks = list(range(stage * stage_size + j, (stage + 1) * stage_size, tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS = group, ranks
    for i in range(stage_size):
        ranks = list(range(i, world_size, stage_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_RANKS = group, ranks


def model_parallel_is_initialized():
    return _TENSOR_MODEL_PARALLEL_GROUP is not None


def destroy_model_parallel():
    global _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_RANKS
    global _DATA_PARALLEL_GROUP, _DATA_PARALLEL_RANKS
    global _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_RANKS
    _TENSOR_MODEL_PARALLEL_GROUP = _TENSOR_MODEL_PARALLEL_RANKS = None
    _DATA_PARALLEL_GROUP = _DATA_PARALLEL_RANKS = None
    _PIPELINE_MODEL_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_RANKS = None


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


# The names DeepSpeed's mpu interface uses ("model parallel" = tensor parallel here; the pipeline
# engine reduces across stages itself).
get_model_parallel_group = get_tensor_model_parallel_group
get_model_parallel_world_size = get_tensor_model_parallel_world_size
get_model_parallel_rank = get_tensor_model_parallel_rank


def get_pipeline_model_parallel_group():
    """The PP group, or None when model parallelism is not initialized (PP=1)."""
    return _PIPELINE_MODEL_PARALLEL_GROUP


def get_pipeline_model_parallel_group_ranks():
    """Global ranks of this rank's pipeline, stage 0 first."""
    if _PIPELINE_MODEL_PARALLEL_RANKS is None:
        return [dist.get_rank()] if _distributed() else [0]
    return list(_PIPELINE_MODEL_PARALLEL_RANKS)


def get_pipeline_model_parallel_world_size():
    return len(get_pipeline_model_parallel_group_ranks())


def get_pipeline_model_parallel_rank():
    if _PIPELINE_MODEL_PARALLEL_RANKS is None:
        return 0
    return _PIPELINE_MODEL_PARALLEL_RANKS.index(dist.get_rank())


def is_pipeline_first_stage():
    """This rank holds the embedding (physical stage 0; virtual chunks are the schedule's business)."""
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage():
    """This rank holds the final LayerNorm, lm_head and the loss."""
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_pipeline_model_parallel_first_rank():
    return get_pipeline_model_parallel_group_ranks()[0]


def get_pipeline_model_parallel_last_rank():
    return get_pipeline_model_parallel_group_ranks()[-1]


def get_pipeline_model_parallel_next_rank():
    """Global rank of the next stage; the last stage's next is the first (interleaved chunks wrap)."""
    ranks = get_pipeline_model_parallel_group_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank():
    """Global rank of the previous stage; the first stage's previous is the last."""
    ranks = get_pipeline_model_parallel_group_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]
