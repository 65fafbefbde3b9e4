"""phi-1 (PhiForCausalLM) written once on the tensor-parallel layers.

Block (parallel attention + MLP, one shared LayerNorm):
    h = LN(x);  x = drop(dense(attn(h))) + drop(fc2(gelu_tanh(fc1(h)))) + x
Attention holds a fused query_key_value column layer whose output rows are laid out per head as
[q_h; k_h; v_h] (head-major), so splitting it over TP ranks gives each rank whole heads; the HF
q_proj/k_proj/v_proj tensors are fused/split by megaphi.checkpoint.hf_names.

Tensor parallel: the LayerNorm output enters the TP region once (shared by the attention and MLP
column layers, whose backward overlaps the collective on its gradient with both weight-gradient
GEMMs); each branch leaves it through its row layer. With runtime.sequence_parallel (and
TP > 1, in training) the residual stream, LayerNorms and residual/embedding dropout hold only
seq/TP tokens, sequence first as in Megatron ([seq/TP, batch, hidden]): the region entry is an
all-gather along the sequence and each row layer reduce-scatters, none of them copying for any batch
size (megaphi.parallel.layers). Attention reads q, k, v as [batch, seq, heads, head_dim] views of the
sequence-first projection, and its output is laid out sequence first once ([seq, batch, hidden/TP])
for the dense layer; the loss reads the transposed labels, and logits are returned as a
[batch, seq, vocab] view. Dropout on those sequence shards draws from the
per-TP-rank stream (different tokens per rank), so an SP run equals TP=1 in law, not bitwise.

The config (PhiConfig) is the architecture; how the model runs (recompute, loss chunking, attention
kernel, sequence parallel, compiled blocks) is its ModelRuntime (megaphi.model.runtime), held by the
modules that read it and replaced as one by apply_runtime.
"""

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megaphi.config import PhiConfig
from megaphi.ops import LayerNorm, apply_rotary_qk, layer_norm, rotary_tables
from megaphi.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from megaphi.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linears_on_shared_input,
    enter_tensor_parallel_region,
    init_from_master,
    replicated_in_sequence_parallel_region,
)
from megaphi.parallel.mappings import gather_from_tensor_model_parallel_region
from megaphi.parallel.random import checkpoint, get_rng_tracker
from megaphi.parallel.state import get_tensor_model_parallel_world_size
from megaphi.parallel.utils import divide, set_tensor_model_parallel_attributes

from .attention import causal_attention
from .compile import eager_in_compiled_blocks
from .kv_cache import KVCache
from .runtime import PLAIN, apply_runtime

IGNORE_INDEX = -100


class PhiAttention(nn.Module):
    def __init__(self, config, layer_idx, device=None, dtype=None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.runtime = PLAIN  # set by apply_runtime
        self.head_dim = config.head_dim
        self.num_heads = divide(
            config.num_attention_heads, get_tensor_model_parallel_world_size(), "num_attention_heads"
        )
        h = config.hidden_size
        self.query_key_value = ColumnParallelLinear(
            h, 3 * h, initialize=False, device=device, dtype=dtype, input_in_parallel_region=True
        )
        self.dense = RowParallelLinear(h, h, input_is_parallel=True, initialize=False, device=device, dtype=dtype)

    def forward(self, hidden, cos, sin, position_ids=None, kv_cache=None, sequence_parallel=False):
        """hidden: the full input, already in the TP region (enter_tensor_parallel_region): [b, s, h],
        or [s, b, h] with sequence_parallel (the output is then this rank's [s/TP, b, h] chunk)."""
        q, k, v = self.rotated_qkv(hidden, cos, sin, position_ids, kv_cache, sequence_parallel)
        return self.output(self.attend(q, k, v, kv_cache), sequence_parallel)

    def rotated_qkv(self, hidden, cos, sin, position_ids=None, kv_cache=None, sequence_first=False):
        """q, k, v [b, s, heads, head_dim] with rotary applied; k, v include the cache when given."""
        return self.split_rotated(self.query_key_value(hidden), cos, sin, position_ids, kv_cache, sequence_first)

    def split_rotated(self, projected, cos, sin, position_ids=None, kv_cache=None, sequence_first=False):
        """rotated_qkv from the query_key_value output ([b, s, 3h/TP], or [s, b, 3h/TP] when
        sequence_first: q, k, v are then strided [b, s, ...] views of it, which rotary and the attention
        kernels take as they are)."""
        if sequence_first:
            # split before transposing: the backward then stacks q, k, v's gradients straight into the
            # sequence-first layout of projected (transposing first would leave a gradient that the
            # column layer's backward has to copy)
            s, b, _ = projected.shape
            q, k, v = (t.transpose(0, 1) for t in projected.view(s, b, self.num_heads, 3, self.head_dim).unbind(3))
        else:
            b, s, _ = projected.shape
            q, k, v = projected.view(b, s, self.num_heads, 3, self.head_dim).unbind(3)
        if self.config.rotary_dim > 0:
            q, k = apply_rotary_qk(q, k, cos, sin, position_ids)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        return q, k, v

    def attend(self, q, k, v, kv_cache=None):
        dropout_p = self.config.attention_dropout if self.training else 0.0
        recompute = self.recompute_core_attention and self.training and torch.is_grad_enabled() and kv_cache is None
        return self._attention_core(q, k, v, dropout_p, recompute)

    def output(self, attended, sequence_parallel=False):
        """The dense layer on the attention output [b, s, heads, head_dim]; with sequence_parallel it is
        first laid out sequence first, [s, b, h/TP] (one copy of this rank's heads, where the [b, s, h]
        layout would copy the whole activation at each of the block's sequence collectives)."""
        b, s = attended.shape[:2]
        width = self.num_heads * self.head_dim
        if sequence_parallel:
            return self.dense(attended.transpose(0, 1).reshape(s, b, width), sequence_parallel=True)
        return self.dense(attended.reshape(b, s, width), sequence_parallel=False)

    # Eager even inside a compiled block (one graph break per layer): switching RNG streams (tracker
    # fork) and the selective checkpoint are Python state changes Dynamo cannot trace, and the
    # attention kernel is one opaque call, so no fusion is lost.
    @eager_in_compiled_blocks
    def _attention_core(self, q, k, v, dropout_p, recompute):
        if recompute:
            # selective recompute: keep q, k, v, drop what the attention kernel saves; RNG-exact replay
            return checkpoint(self._core_attention, q, k, v, dropout_p)
        return self._core_attention(q, k, v, dropout_p)

    @property
    def recompute_core_attention(self):
        return self.runtime.recompute == "selective"

    def _core_attention(self, q, k, v, dropout_p):
        if dropout_p > 0.0:
            # heads differ per TP rank: their dropout draws from the per-rank stream
            with get_rng_tracker().fork():
                return causal_attention(q, k, v, dropout_p, backend=self.runtime.attention_backend)
        return causal_attention(q, k, v, 0.0, backend=self.runtime.attention_backend)


class PhiMLP(nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.fc1 = ColumnParallelLinear(
            h, f, initialize=False, device=device, dtype=dtype, input_in_parallel_region=True
        )
        self.fc2 = RowParallelLinear(f, h, input_is_parallel=True, initialize=False, device=device, dtype=dtype)

    def forward(self, x, sequence_parallel=False):
        """x: the full input, already in the TP region."""
        return self.from_fc1(self.fc1(x), sequence_parallel)

    def from_fc1(self, projected, sequence_parallel=False):
        """The MLP's output from the fc1 output."""
        return self.fc2(F.gelu(projected, approximate="tanh"), sequence_parallel=sequence_parallel)


def apply_layer_norm(norm, x, sequence_parallel):
    """LayerNorm; on sequence shards its replicated parameters get TP-summed gradients."""
    if not sequence_parallel:
        return norm(x)
    return layer_norm(
        x,
        replicated_in_sequence_parallel_region(norm.weight),
        replicated_in_sequence_parallel_region(norm.bias),
        norm.eps,
    )


def region_dropout(dropout, x, sequence_sharded):
    """Dropout on replicated activations uses the shared default stream; on sequence shards (each TP
    rank holds different tokens) the per-TP-rank stream."""
    if sequence_sharded and dropout.training and dropout.p > 0.0:
        return _dropout_on_tensor_parallel_stream(dropout, x)
    return dropout(x)


@eager_in_compiled_blocks  # the stream switch is Python RNG state
def _dropout_on_tensor_parallel_stream(dropout, x):
    with get_rng_tracker().fork():
        return dropout(x)


def batch_first(t, sequence_first):
    """A [seq, batch, ...] tensor as [batch, seq, ...] (a view) when sequence_first, else t."""
    return t.transpose(0, 1) if sequence_first else t


def causal_lm_loss(lm_head, runtime, hidden, labels, loss_mask, reduction, sequence_parallel):
    """The loss of the final hidden states and the logits shard it came from (None on the chunked
    path, where no logits tensor exists): reduction="none" gives the per-token losses [b, s] times
    the mask (labels != IGNORE_INDEX, times loss_mask when given), "mean" their mean over the mask.
    hidden is [b, s, h], or this rank's [s/TP, b, h] chunk with sequence_parallel: the losses are then
    computed against the transposed labels and read back as [b, s]."""
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    valid = labels != IGNORE_INDEX
    mask = valid.float() if loss_mask is None else loss_mask.float() * valid
    token_losses, logits_shard = _token_losses(
        lm_head, runtime, hidden, labels.masked_fill(~valid, 0), reduction, sequence_parallel
    )
    if reduction == "none":
        return token_losses * mask, logits_shard
    return (token_losses * mask).sum() / mask.sum().clamp(min=1.0), logits_shard


def _token_losses(lm_head, runtime, hidden, labels, reduction, sequence_parallel):
    """Unmasked per-token losses [b, s] and the logits shard (None when chunked)."""
    sp = sequence_parallel
    labels = labels.t() if sp else labels
    if reduction == "none" and runtime.loss_chunk_tokens > 0:
        # training's path: the logits never exist as one tensor (none are returned)
        h = enter_tensor_parallel_region(hidden, sp) if get_tensor_model_parallel_world_size() > 1 else hidden
        token_losses = chunked_linear_cross_entropy(h, lm_head.weight, lm_head.bias, labels, runtime.loss_chunk_tokens)
        return batch_first(token_losses, sp), None
    logits_shard = lm_head(hidden, sequence_parallel=sp)
    return batch_first(vocab_parallel_cross_entropy(logits_shard, labels), sp), logits_shard


class PhiDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self.self_attn = PhiAttention(config, layer_idx, device=device, dtype=dtype)
        self.mlp = PhiMLP(config, device=device, dtype=dtype)
        self.resid_dropout = nn.Dropout(config.resid_dropout)  # replicated region: default RNG stream

    def forward(self, x, cos, sin, position_ids=None, kv_cache=None, sequence_parallel=False):
        sp = sequence_parallel
        attention = self.self_attn
        # query_key_value and fc1 read the one LayerNorm output: it enters the TP region once, and the
        # backward's collective on its gradient runs while both weight gradients are computed
        qkv, fc1 = column_parallel_linears_on_shared_input(
            apply_layer_norm(self.input_layernorm, x, sp), (attention.query_key_value, self.mlp.fc1), sp
        )
        # the attention sublayer's steps are called from here so that, in a compiled block, the one
        # graph break (PhiAttention._attention_core) splits this frame into two graphs
        attended = attention.attend(*attention.split_rotated(qkv, cos, sin, position_ids, kv_cache, sp), kv_cache)
        attn = region_dropout(self.resid_dropout, attention.output(attended, sp), sp)
        mlp = region_dropout(self.resid_dropout, self.mlp.from_fc1(fc1, sp), sp)
        return attn + mlp + x  # HF's summation order


class PhiModel(nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.runtime = PLAIN  # set by apply_runtime
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, initialize=False, device=device, dtype=dtype
        )
        self.embed_dropout = nn.Dropout(config.embd_dropout)
        self.layers = nn.ModuleList(
            PhiDecoderLayer(config, i, device=device, dtype=dtype) for i in range(config.num_hidden_layers)
        )
        self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self._rotary = {}  # device -> fp32 (cos, sin); kept out of buffers so .half() never rounds them

    def rotary(self, device, length):
        tables = self._rotary.get(device)
        if tables is None or tables[0].shape[0] < length:
            n = max(length, self.config.max_position_embeddings)
            tables = rotary_tables(self.config.rotary_dim, n, self.config.rope_theta, device=device)
            self._rotary[device] = tables
        return tables

    def forward(self, input_ids, position_ids=None, kv_cache=None, sequence_parallel=False):
        """Final hidden states [b, s, h]; with sequence_parallel, this rank's sequence chunk [s/TP, b, h]."""
        seq = input_ids.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        needed = past + seq
        if position_ids is None and past > 0:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).unsqueeze(0)
        elif position_ids is not None:
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            # the caller's positions size the rotary table: one read of their maximum (a device sync
            # when they live on a GPU; training and cached decoding never pass them)
            needed = max(needed, int(position_ids.max()) + 1) if position_ids.numel() else needed
        cos, sin = self.rotary(input_ids.device, needed)

        sp = sequence_parallel
        x = region_dropout(self.embed_dropout, self.embed_tokens(input_ids, sequence_parallel=sp), sp)
        recompute = self.runtime.recompute == "full" and self.training and torch.is_grad_enabled() and kv_cache is None
        full_layers = self.runtime.recompute_num_layers or len(self.layers)
        for index, layer in enumerate(self.layers):
            if recompute and index < full_layers:
                x = checkpoint(layer, x, cos, sin, position_ids, None, sp)
            else:
                x = layer(x, cos, sin, position_ids, kv_cache, sp)
        if kv_cache is not None:
            kv_cache.advance(seq)
        return apply_layer_norm(self.final_layernorm, x, sp)


def _parameter_seed(seed, name):
    """A stable per-parameter seed: independent of TP size, creation order and Python's hash salt."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class PhiForCausalLM(nn.Module):
    """phi-1 causal LM: `config` is the architecture, `runtime` how it runs (ModelRuntime; default
    plain). `initialize=False` leaves parameters uninitialized (for loading weights)."""

    def __init__(self, config, init_seed=None, initialize=True, device=None, dtype=None, runtime=None):
        super().__init__()
        if isinstance(config, dict):
            config = PhiConfig.from_dict(config)
        config.check_tensor_parallel(get_tensor_model_parallel_world_size())
        self.config = config
        self.runtime = PLAIN
        self.model = PhiModel(config, device=device, dtype=dtype)
        self.lm_head = ColumnParallelLinear(
            config.hidden_size, config.vocab_size, initialize=False, device=device, dtype=dtype
        )
        for name, param in self.named_parameters():  # LayerNorms: replicated on every TP rank
            if not hasattr(param, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(param, False)
            if "layernorm" in name:
                param.sequence_parallel = True  # on sequence shards under SP: TP-summed gradient
        if initialize:
            self.reset_parameters(init_seed)
        if runtime is not None:
            apply_runtime(self, runtime)

    def reset_parameters(self, seed=None):
        """normal(0, initializer_range) weights, zero biases, LayerNorm ones; dense and fc2 weights use
        std / sqrt(2 * layers). Each parameter's full tensor comes from a CPU generator seeded by
        (seed, parameter name), so any TP size holds shards of the same model. seed defaults to
        torch.initial_seed() (what torch.manual_seed / model_parallel_seed set)."""
        seed = torch.initial_seed() if seed is None else seed
        std = self.config.initializer_range
        out_std = std / math.sqrt(2.0 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            if name.endswith(".bias"):
                with torch.no_grad():
                    param.zero_()
            elif "layernorm" in name:
                with torch.no_grad():
                    param.fill_(1.0)
            else:
                scaled = name.endswith(("self_attn.dense.weight", "mlp.fc2.weight"))
                s = out_std if scaled else std
                gen = torch.Generator().manual_seed(_parameter_seed(seed, name))
                init_from_master(param, lambda t, g, s=s: t.normal_(0.0, s, generator=g), gen)

    def sequence_parallel_active(self, input_ids, kv_cache=None):
        """Sequence parallel runs in training forwards (no KV cache) when the runtime asks and TP > 1;
        eval and decoding take the plain TP path, which computes the same function."""
        tp = get_tensor_model_parallel_world_size()
        if not (self.runtime.sequence_parallel and tp > 1 and self.training and kv_cache is None):
            return False
        if input_ids.shape[1] % tp != 0:
            raise ValueError(
                f"sequence parallel: sequence length {input_ids.shape[1]} is not divisible by "
                f"--tensor-model-parallel-size {tp}"
            )
        return True

    def forward(
        self,
        input_ids,
        labels=None,
        loss_mask=None,
        reduction="mean",
        kv_cache=None,
        position_ids=None,
        logits_to_keep=0,
    ):
        """logits_to_keep=N > 0 returns logits for the last N positions only ([b, N, vocab]); without
        labels the other positions never reach lm_head (decoding). The loss always uses every position."""
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = all positions), got {logits_to_keep!r}")
        sp = self.sequence_parallel_active(input_ids, kv_cache)
        hidden = self.model(input_ids, position_ids=position_ids, kv_cache=kv_cache, sequence_parallel=sp)
        if labels is None:
            if logits_to_keep and not sp:
                hidden = hidden[:, -logits_to_keep:]
            logits_shard = self.lm_head(hidden, sequence_parallel=sp)
            if logits_to_keep and sp:
                logits_shard = logits_shard[-logits_to_keep:]
            return batch_first(gather_from_tensor_model_parallel_region(logits_shard), sp)
        loss, logits_shard = causal_lm_loss(self.lm_head, self.runtime, hidden, labels, loss_mask, reduction, sp)
        if reduction == "none":
            return loss, None
        if logits_to_keep:
            logits_shard = logits_shard[:, -logits_to_keep:] if not sp else logits_shard[-logits_to_keep:]
        return loss, batch_first(gather_from_tensor_model_parallel_region(logits_shard), sp)

    def allocate_kv_cache(self, batch_size, max_length, dtype=None, device=None):
        ref = self.model.embed_tokens.weight
        return KVCache(
            self.config.num_hidden_layers,
            batch_size,
            max_length,
            self.model.layers[0].self_attn.num_heads,
            self.config.head_dim,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
        )

    # -- checkpoints (config.json + model.safetensors in HF PhiForCausalLM names) --
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, runtime=None):
        """The model of a folder or training checkpoint; it runs plain unless `runtime` is given (the
        runtime choices older folders recorded in config.json are ignored)."""
        from megaphi.checkpoint.model_folder import load_megaphi_state

        config, hf_state = load_megaphi_state(path, cls)
        model = cls(config, initialize=False, device=device, dtype=dtype)
        model.load_hf_state_dict(hf_state, source=str(path))
        return model if runtime is None else apply_runtime(model, runtime)

    def load_hf_state_dict(self, hf_state, source="state dict"):
        from megaphi.checkpoint.hf_names import load_hf_state_into

        load_hf_state_into(self, hf_state, source)

    def hf_state_dict(self):
        from megaphi.checkpoint.hf_names import model_to_hf_state

        return model_to_hf_state(self)

    def save_pretrained(self, path, bos_token_id=None, eos_token_id=None):
        """A Hugging Face folder (AutoModelForCausalLM loads it); token ids default to phi-1's <|endoftext|>."""
        from megaphi.checkpoint.model_folder import save_megaphi_folder
        from megaphi.parallel.state import get_data_parallel_rank, get_tensor_model_parallel_rank

        state = self.hf_state_dict()  # collective under TP: every rank takes part
        if get_tensor_model_parallel_rank() == 0 and get_data_parallel_rank() == 0:
            save_megaphi_folder(path, self.config, state, bos_token_id, eos_token_id)
