"""Pipeline parallelism (Megatron semantics): stages, point-to-point transfers, 1F1B schedules."""
from .p2p import StageCommunicator, boundary_shape  # noqa: F401
from .plan import build_plan, forward_only_plan, max_live_activations  # noqa: F401
from .schedules import (allreduce_data_parallel_gradients, clip_grad_norm_across_stages,  # noqa: F401
                        forward_backward_pipelining, global_grad_norm)
from .stage import (PipelineStage, build_model_chunks, seed_pipeline_stage, split_layers,  # noqa: F401
                    virtual_stages_per_rank)
