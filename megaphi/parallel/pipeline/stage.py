"""phi-1 split into pipeline stages: the embedding on the first, final LayerNorm + lm_head + loss on
the last, contiguous decoder layers in between.

A stage is built from the same layer classes as PhiForCausalLM (megaphi/model/phi.py) and names its
parameters exactly as PhiForCausalLM does (`model.embed_tokens.weight`, `model.layers.7....`,
`model.final_layernorm.weight`, `lm_head.weight`): each parameter is initialized from the same
(seed, name) generator, so the stages of one rank hold exactly the tensors that the unsplit model
holds under those names, and checkpoints keep one naming for every pipeline layout.

With interleaving (v > 1 model chunks per rank) chunk c of pipeline rank r is virtual stage
c * P + r; virtual stages hold consecutive layer ranges in order.
"""

import torch
from torch import nn

from megaphi.model.compile import compile_layers
from megaphi.model.runtime import PLAIN, set_runtime
from megaphi.model.phi import (
    PhiDecoderLayer,
    PhiForCausalLM,
    apply_layer_norm,
    batch_first,
    causal_lm_loss,
    region_dropout,
)
from megaphi.ops import LayerNorm, rotary_tables
from megaphi.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megaphi.parallel.mappings import gather_from_tensor_model_parallel_region
from megaphi.parallel.random import checkpoint
from megaphi.parallel.state import get_tensor_model_parallel_world_size
from megaphi.parallel.utils import set_tensor_model_parallel_attributes

from .split import check_pipeline_composition, split_layers, virtual_stages_per_rank  # noqa: F401  (their home before split.py)


class _StageBody(nn.Module):
    """Holds what PhiModel holds, for this stage's share (names as in PhiModel)."""

    def __init__(self, config, layer_range, holds_embedding, holds_final_norm, device=None, dtype=None):
        super().__init__()
        if holds_embedding:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, initialize=False, device=device, dtype=dtype
            )
            self.embed_dropout = nn.Dropout(config.embd_dropout)
        self.layers = nn.ModuleDict(
            {str(i): PhiDecoderLayer(config, i, device=device, dtype=dtype) for i in range(*layer_range)}
        )
        if holds_final_norm:
            self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device, dtype=dtype)


class PipelineStage(nn.Module):
    """One model chunk: forward(input_ids, labels=...) mirrors PhiForCausalLM's training forward and
    returns a pair. On stages without the embedding the input comes from set_input_tensor (what the
    previous stage sent; input_ids are ignored); on stages without the loss the pair is
    (hidden state to send on, None)."""

    def __init__(
        self,
        config,
        layer_range,
        holds_embedding,
        holds_loss,
        init_seed=None,
        initialize=True,
        device=None,
        dtype=None,
        runtime=None,
    ):
        super().__init__()
        config.check_tensor_parallel(get_tensor_model_parallel_world_size())
        self.config = config
        self.runtime = PLAIN  # how it runs (recompute, loss chunks, SP): a ModelRuntime, as PhiForCausalLM's
        self.layer_range = tuple(layer_range)
        self.holds_embedding, self.holds_loss = holds_embedding, holds_loss
        self.model = _StageBody(config, layer_range, holds_embedding, holds_loss, device=device, dtype=dtype)
        if holds_loss:
            self.lm_head = ColumnParallelLinear(
                config.hidden_size, config.vocab_size, initialize=False, device=device, dtype=dtype
            )
        for name, param in self.named_parameters():  # as PhiForCausalLM marks them
            if not hasattr(param, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(param, False)
            if "layernorm" in name:
                param.sequence_parallel = True
        self.input_tensor = None
        self._rotary = {}
        if initialize:
            # PhiForCausalLM's initialization reads only config and named_parameters: with the same
            # names it gives each of this stage's parameters the tensor the whole model gives it.
            PhiForCausalLM.reset_parameters(self, init_seed)
        if runtime is not None:
            set_runtime(self, runtime)  # the stage and every layer that reads a runtime choice
            if runtime.compile:  # this stage's decoder layers, as compile_decoder_layers does for the whole model
                compile_layers(self.model.layers.values())

    def set_input_tensor(self, tensor):
        """The activation received from the previous stage (Megatron's set_input_tensor)."""
        self.input_tensor = tensor

    def sequence_parallel_active(self):
        return self.runtime.sequence_parallel and get_tensor_model_parallel_world_size() > 1 and self.training

    def _rotary_tables(self, device, length):
        tables = self._rotary.get(device)
        if tables is None or tables[0].shape[0] < length:  # the same tables PhiModel.rotary builds
            n = max(length, self.config.max_position_embeddings)
            tables = rotary_tables(self.config.rotary_dim, n, self.config.rope_theta, device=device)
            self._rotary[device] = tables
        return tables

    def forward(self, input_ids=None, labels=None, loss_mask=None, reduction="none"):
        sp = self.sequence_parallel_active()
        if self.holds_embedding:
            x = self.model.embed_tokens(input_ids, sequence_parallel=sp)
            x = region_dropout(self.model.embed_dropout, x, sp)
            seq = input_ids.shape[1]
        else:
            if self.input_tensor is None:
                raise RuntimeError("pipeline stage without the embedding ran forward before set_input_tensor")
            x = self.input_tensor
            # [b, s, h], or this rank's sequence-first chunk [s/TP, b, h] under sequence parallel
            seq = x.shape[0] * get_tensor_model_parallel_world_size() if sp else x.shape[1]
        cos, sin = self._rotary_tables(x.device, seq)
        r = self.runtime
        recompute = r.recompute == "full" and self.training and torch.is_grad_enabled()
        # recompute_num_layers counts this stage's layers (Megatron's per-stage meaning)
        full_layers = r.recompute_num_layers or len(self.model.layers)
        for index, layer in enumerate(self.model.layers.values()):
            if recompute and index < full_layers:
                x = checkpoint(layer, x, cos, sin, None, None, sp)
            else:
                x = layer(x, cos, sin, None, None, sp)
        if not self.holds_loss:
            return x, None  # the same (output, extra) pair as the loss stage, for one forward_step_func
        hidden = apply_layer_norm(self.model.final_layernorm, x, sp)
        return self._loss(hidden, labels, loss_mask, reduction, sp)

    def _loss(self, hidden, labels, loss_mask, reduction, sp):
        """PhiForCausalLM.forward's loss path: per-token losses (reduction='none') or their mean."""
        if labels is None:
            return batch_first(gather_from_tensor_model_parallel_region(self.lm_head(hidden, sequence_parallel=sp)), sp)
        loss, logits_shard = causal_lm_loss(self.lm_head, self.runtime, hidden, labels, loss_mask, reduction, sp)
        if reduction == "none":
            return loss, None
        return loss, batch_first(gather_from_tensor_model_parallel_region(logits_shard), sp)


def seed_pipeline_stage(seed):
    """model_parallel_seed with the stage's offset (Megatron adds 100 x pipeline rank): stages draw
    dropout masks from different streams, where one seed everywhere would repeat stage 0's masks
    in every stage's layers."""
    from megaphi.parallel.random import model_parallel_seed
    from megaphi.parallel.state import get_pipeline_model_parallel_rank

    model_parallel_seed(seed + 100 * get_pipeline_model_parallel_rank())


def build_model_chunks(
    config,
    pipeline_rank,
    pipeline_size,
    num_chunks=1,
    layers_per_stage=None,
    init_seed=None,
    device=None,
    dtype=None,
    runtime=None,
):
    """This rank's model chunks (one without interleaving), chunk c holding virtual stage c * P + rank."""
    if not 0 <= pipeline_rank < pipeline_size:
        raise ValueError(f"pipeline rank {pipeline_rank} outside --pipeline-model-parallel-size {pipeline_size}")
    bounds = split_layers(config.num_hidden_layers, pipeline_size, num_chunks, layers_per_stage)
    last = pipeline_size * num_chunks - 1
    chunks = []
    for c in range(num_chunks):
        virtual = c * pipeline_size + pipeline_rank
        chunks.append(
            PipelineStage(
                config,
                bounds[virtual],
                virtual == 0,
                virtual == last,
                init_seed=init_seed,
                device=device,
                dtype=dtype,
                runtime=runtime,
            )
        )
    return chunks
