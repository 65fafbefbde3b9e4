"""Pipeline parallelism (Megatron semantics): stages, point-to-point transfers, 1F1B schedules."""

from .p2p import StageCommunicator, boundary_shape  # noqa: F401
from .plan import build_plan, forward_only_plan, max_live_activations  # noqa: F401
from .schedules import (  # noqa: F401
    allreduce_data_parallel_gradients,
    any_stage_overflowed,
    clip_grad_norm_across_stages,
    forward_backward_pipelining,
    global_grad_norm,
)
from .stage import (  # noqa: F401
    PipelineStage,
    build_model_chunks,
    check_pipeline_composition,
    seed_pipeline_stage,
)
from .split import split_layers, virtual_stages_per_rank  # noqa: F401
