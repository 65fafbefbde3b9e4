"""The worked example of docs/tensor_parallel.md: a multi-query attention block (H query heads, one
shared key/value head) written on megaphi's TP building blocks, and the TP=k vs TP=1 test that proves
it. TP=2 and TP=4 (4 gloo processes, so TP=2 also runs beside DP=2) give the TP=1 outputs and
gradients; TP=1 itself is checked against attention written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_utils import run_distributed
from megaphi.model.attention import causal_attention
from megaphi.parallel import state
from megaphi.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    enter_tensor_parallel_region,
    init_from_master,
)
from megaphi.parallel.mappings import copy_to_tensor_model_parallel_region, gather_shards
from megaphi.parallel.utils import divide, set_tensor_model_parallel_attributes

pytestmark = pytest.mark.distributed

HIDDEN, HEADS, HEAD_DIM, SEED = 32, 4, 8, 17


class MultiQueryAttention(nn.Module):
    """Causal self-attention with `num_heads` query heads sharing one key/value head.

    Query heads are split over TP ranks (column-parallel), the output projection is row-parallel,
    and the small key/value projection is replicated: every rank holds all of it, and since each
    rank only back-propagates through its own query heads, its gradient is summed over TP.
    """

    def __init__(self, hidden, num_heads, head_dim, seed=0):
        super().__init__()
        self.num_heads_per_rank = divide(num_heads, state.get_tensor_model_parallel_world_size(), "num_heads")
        self.head_dim = head_dim
        # input_in_parallel_region: forward() enters the TP region once for query and key/value
        self.query = ColumnParallelLinear(hidden, num_heads * head_dim, input_in_parallel_region=True, initialize=False)
        self.key_value = nn.Linear(hidden, 2 * head_dim)
        for p in self.key_value.parameters():
            set_tensor_model_parallel_attributes(p, False)  # replicated: grad-norm counts it once
        self.dense = RowParallelLinear(num_heads * head_dim, hidden, input_is_parallel=True, initialize=False)
        self.reset_parameters(seed)

    def reset_parameters(self, seed):
        # TP-independent init: each weight's full tensor from its own seeded generator, shards kept
        for i, p in enumerate((self.query.weight, self.key_value.weight, self.dense.weight)):
            init_from_master(p, lambda t, g: t.normal_(0.0, 0.02, generator=g), torch.Generator().manual_seed(seed + i))
        for b in (self.query.bias, self.key_value.bias, self.dense.bias):
            nn.init.zeros_(b)

    def forward(self, x):
        """x: [batch, seq, hidden], the same on every TP rank -> [batch, seq, hidden], the same on every rank."""
        b, s, _ = x.shape
        x = enter_tensor_parallel_region(x)  # identity forward, all-reduce of the input gradient backward
        q = self.query(x).view(b, s, self.num_heads_per_rank, self.head_dim)
        kv = F.linear(
            x,
            copy_to_tensor_model_parallel_region(self.key_value.weight),
            copy_to_tensor_model_parallel_region(self.key_value.bias),
        )  # grads summed over TP
        k, v = kv.view(b, s, 1, 2, self.head_dim).unbind(3)
        k, v = (t.expand(b, s, self.num_heads_per_rank, self.head_dim) for t in (k, v))
        out = causal_attention(q, k, v)
        return self.dense(out.reshape(b, s, self.num_heads_per_rank * self.head_dim))


def hand_written_mqa(x, wq, bq, wkv, bkv, wo, bo):
    """The same block without any TP machinery: explicit scores, mask and softmax."""
    b, s, _ = x.shape
    q = (x @ wq.T + bq).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
    k, v = (x @ wkv.T + bkv).split(HEAD_DIM, dim=-1)
    scores = q @ k.unsqueeze(1).transpose(-1, -2) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v.unsqueeze(1)).transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)
    return out @ wo.T + bo


def inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 6, HIDDEN, generator=g), torch.randn(2, 6, HIDDEN, generator=g)


def run_block():
    """Output and full (TP-gathered) gradients of the block at the current TP size."""
    block = MultiQueryAttention(HIDDEN, HEADS, HEAD_DIM, seed=SEED)
    x, upstream = inputs()
    x.requires_grad_()
    out = block(x)
    (out * upstream).sum().backward()
    grads = {
        n: (gather_shards(p.grad, p.partition_dim) if p.tensor_model_parallel else p.grad)
        for n, p in block.named_parameters()
    }
    grads["input"] = x.grad
    return out.detach(), grads, block


def worker(rank, world, reference):
    for tp in (2, 4):
        state.initialize_model_parallel(tp)
        out, grads, _ = run_block()
        torch.testing.assert_close(out, reference["out"], rtol=0, atol=1e-5)
        for name, g in reference["grads"].items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5, msg=f"TP={tp} {name}")
        state.destroy_model_parallel()


def test_multi_query_attention_tp_equals_tp1():
    out, grads, block = run_block()  # TP=1
    x, upstream = inputs()
    params = {n: p.detach().clone().requires_grad_() for n, p in block.named_parameters()}
    x.requires_grad_()
    ref = hand_written_mqa(
        x,
        *(
            params[n]
            for n in ("query.weight", "query.bias", "key_value.weight", "key_value.bias", "dense.weight", "dense.bias")
        ),
    )
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(grads["input"], x.grad, rtol=0, atol=1e-5)
    run_distributed(worker, 4, {"out": out, "grads": grads})
