"""How phi-1's decoder layers split into pipeline stages, and what composes with a pipeline (no model code:
the flag checks and checkpoint tools use it too)."""


def virtual_stages_per_rank(num_layers, pipeline_size, layers_per_virtual_stage=None):
    """v, the number of model chunks per rank, from --num-layers-per-virtual-pipeline-stage."""
    if not layers_per_virtual_stage:
        return 1
    if pipeline_size < 2:
        raise ValueError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    if num_layers % pipeline_size or (num_layers // pipeline_size) % layers_per_virtual_stage:
        raise ValueError(
            f"--num-layers {num_layers} must split into --pipeline-model-parallel-size {pipeline_size} "
            f"stages of a multiple of --num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage} "
            f"layers each"
        )
    return num_layers // pipeline_size // layers_per_virtual_stage


def split_layers(num_layers, pipeline_size, num_chunks=1, layers_per_stage=None):
    """[(first, end)] layer ranges of every virtual stage, in virtual-stage order (P * v entries).

    Evenly by default: P * v must divide num_layers. layers_per_stage (--pipeline-layers-per-stage,
    P entries, or P * v with interleaving) gives explicit counts, e.g. fewer layers on the stages that
    also hold the embedding or the loss."""
    n_virtual = pipeline_size * num_chunks
    if layers_per_stage is None:
        if num_layers % n_virtual:
            what = (
                f"--pipeline-model-parallel-size {pipeline_size}"
                if num_chunks == 1
                else f"--pipeline-model-parallel-size {pipeline_size} x {num_chunks} virtual stages"
            )
            raise ValueError(
                f"--num-layers {num_layers} is not divisible by {what}; pass "
                f"--pipeline-layers-per-stage to split unevenly"
            )
        counts = [num_layers // n_virtual] * n_virtual
    else:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != n_virtual or any(c < 0 for c in counts) or sum(counts) != num_layers:
            raise ValueError(
                f"--pipeline-layers-per-stage {','.join(map(str, counts))} must give {n_virtual} "
                f"non-negative counts (--pipeline-model-parallel-size {pipeline_size} x {num_chunks} "
                f"virtual stages) summing to --num-layers {num_layers}"
            )
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def check_pipeline_composition(pipeline_size, zero_stage=0, tensor_parallel_size=1, sequence_parallel=False):
    """One-line refusals of what does not compose with pipelining. ZeRO-1 (optimizer state sharded
    over data parallelism) does; ZeRO-2 and -3 partition gradients (and parameters) per backward,
    which the pipeline runs m times per step, each needing whole gradients to accumulate into."""
    if pipeline_size > 1 and zero_stage not in (0, 1):
        raise ValueError(
            f"--zero-stage {zero_stage} does not compose with --pipeline-model-parallel-size "
            f"{pipeline_size}: use --zero-stage 0 or 1 (ZeRO-2/3 partition gradients or parameters "
            f"on every micro-batch's backward)"
        )
    if sequence_parallel and tensor_parallel_size < 2:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
