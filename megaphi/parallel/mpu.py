"""The mpu object DeepSpeed expects: `deepspeed.initialize(..., mpu=megaphi.parallel.mpu)`.

DeepSpeed 0.19 reads: get_data_parallel_group/rank/world_size (ZeRO partitioning and the gradient
all-reduce run over the data-parallel group only, so TP-sharded gradients are never averaged across
TP ranks), get_data_parallel_group_ranks (checkpoint saving), get_model_parallel_rank (the
mp_rank_XX checkpoint file each TP rank writes), get_model_parallel_group and
get_tensor_model_parallel_rank (grad norm). For the norm it sums, over the model-parallel group,
the squared norms of parameters with `tensor_model_parallel=True` on every TP rank and of the others
on TP rank 0 only: each sharded parameter counted once per shard, each replicated one once.

Deliberately absent: get_sequence_parallel_* / initialize_sequence_parallel, which DeepSpeed takes
for Ulysses sequence parallelism (a different scheme that changes its data-parallel groups).
"""

from .state import (  # noqa: F401
    get_data_parallel_group,
    get_data_parallel_group_ranks,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
    get_pipeline_model_parallel_rank,
    get_pipeline_model_parallel_world_size,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_group_ranks,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
)
