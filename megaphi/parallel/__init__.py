"""Tensor-parallel building blocks: process-group state, mappings, layers, cross entropy, RNG."""

from . import mpu, state  # noqa: F401
from .cross_entropy import vocab_parallel_cross_entropy  # noqa: F401
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, init_from_master  # noqa: F401
from .mappings import (  # noqa: F401
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .random import checkpoint, get_cuda_rng_tracker, get_rng_tracker, model_parallel_seed, rng_neutral  # noqa: F401
from .state import (  # noqa: F401
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from .utils import divide, pad_vocab_size  # noqa: F401
