"""The mpu object DeepSpeed expects: `deepspeed.initialize(..., mpu=megaphi.parallel.mpu)`.

ZeRO then partitions over the data-parallel group only, and gradient-norm clipping counts each
TP-sharded parameter on every TP rank and each replicated one once (parameters carry
`tensor_model_parallel`, see megaphi.parallel.utils).
"""
from .state import (  # noqa: F401
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
    get_pipeline_model_parallel_rank,
    get_pipeline_model_parallel_world_size,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
