"""Tensor/sequence-parallel communication without extra copies, and the overlapped input-gradient
communication of column-parallel layers (2 CPU processes, gloo).

* gather_shards / _reduce_scatter (one preallocated buffer, all_gather_into_tensor / reduce_scatter_tensor)
  equal the list-based all_gather + cat and all-reduce + split for dims 0, 1, -1 and non-contiguous
  inputs; so does the fallback for a gloo without the tensor collectives.
* A TP=2 forward + backward of the tiny PhiForCausalLM (batch 1 and 3, with and without sequence
  parallel) issues no cat / clone / copy from the communication code.
* Overlapped backward (input-gradient all-reduce or reduce-scatter launched before the weight-gradient
  GEMM) gives bitwise the gradients of the sequential path, standalone and in the model.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import run_distributed
from megaphi.config import PhiConfig
from megaphi.model.runtime import ModelRuntime
from megaphi.parallel import layers, mappings, state

MODEL_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    rotary_dim=8,
    max_position_embeddings=32,
    attention_dropout=0.0,
    resid_dropout=0.0,
    embd_dropout=0.0,
)
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # dispatch machinery, dynamo wrappers, torch.nn.functional
TORCH_DISTRIBUTED_DIR = os.path.join(TORCH_DIR, "distributed") + os.sep
MAPPINGS_FILE = os.path.join("megaphi", "parallel", "mappings.py")
COPY_OPS = {"aten::cat", "aten::clone", "aten::copy_", "aten::stack", "aten::_to_copy", "aten::_reshape_copy"}


def _group():
    return state.get_tensor_model_parallel_group()


def _list_gather(x, dim):
    """The old semantics: all_gather into a list, then torch.cat."""
    parts = [torch.empty_like(x.contiguous()) for _ in range(state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, x.contiguous(), group=_group())
    return torch.cat(parts, dim=dim)


def _all_reduce_then_split(x, dim):
    full = x.clone()
    torch.distributed.all_reduce(full, group=_group())
    world, rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
    return full.chunk(world, dim=dim)[rank]


def _inputs(rank):
    """Integer-valued (exact sums in any order), distinct per rank; contiguous and not."""
    base = torch.arange(4 * 6 * 8, dtype=torch.float32).view(4, 6, 8) + 1000 * rank
    return {"contiguous": base, "transposed": base.transpose(0, 2), "sliced": base[:, :, ::2]}


def _check_collectives(rank):
    for name, x in _inputs(rank).items():
        before = x.clone()
        for dim in (0, 1, -1, 2):
            got = mappings.gather_shards(x, dim)
            assert torch.equal(got, _list_gather(x, dim)), (name, dim)
            assert got.is_contiguous(), (name, dim)
            got = mappings._reduce_scatter(x, dim)
            assert torch.equal(got, _all_reduce_then_split(x, dim)), (name, dim)
            pending = mappings._reduce_scatter(x, dim, async_op=True)
            assert torch.equal(pending.wait(), got), (name, dim)
        assert torch.equal(x, before), name  # the caller's tensor is never modified
    y = torch.full((3, 4), float(rank + 1))
    pending = mappings._all_reduce(y, async_op=True)
    assert torch.equal(pending.wait(), torch.full((3, 4), 3.0)) and torch.equal(y, torch.full((3, 4), 3.0))


def check_collectives_match_list_semantics(rank, world):
    state.initialize_model_parallel(world)
    _check_collectives(rank)
    # a gloo that lacks the tensor collectives (torch < 2.3): list all_gather into the buffer's rows,
    # all-reduce of a private copy + split for the reduce-scatter
    mappings._GLOO_HAS_TENSOR_COLLECTIVES = False
    try:
        _check_collectives(rank)
    finally:
        mappings._GLOO_HAS_TENSOR_COLLECTIVES = True


@pytest.mark.distributed
def test_gather_and_reduce_scatter_match_list_semantics():
    run_distributed(check_collectives_match_list_semantics, 2)


class CopiesFromCommunication(TorchDispatchMode):
    """Counts copying ops (cat, clone, copy_, stack, ...) that megaphi/parallel/mappings.py issues
    itself (the innermost Python frame outside torch and this file is in mappings.py). Work a
    collective does internally is the backend's, not counted: ops under torch.distributed frames, and
    writes into a collective's buffers (gloo emulates reduce-scatter with an all-reduce and copies the
    chunk into the output at wait(); NCCL reduce-scatters in place)."""

    def __init__(self):
        super().__init__()
        self.copies = []
        self._collective_buffers = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
            self._collective_buffers.update(t.data_ptr() for t in flat if isinstance(t, torch.Tensor))
        elif func.name().split(".")[0] in COPY_OPS and self._issued_by_mappings():
            into_collective_buffer = func.name() == "aten::copy_" and args[0].data_ptr() in self._collective_buffers
            if not into_collective_buffer:
                self.copies.append(func.name())
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _issued_by_mappings():
        frame = sys._getframe(1)
        while frame is not None and (
            frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__
        ):
            if frame.f_code.co_filename.startswith(TORCH_DISTRIBUTED_DIR):
                return False  # inside a collective (e.g. gloo's reduce-scatter emulation at wait())
            frame = frame.f_back
        return frame is not None and frame.f_code.co_filename.endswith(MAPPINGS_FILE)


def check_no_copies_on_model_path(rank, world):
    from megaphi.model import PhiForCausalLM

    state.initialize_model_parallel(world)
    with CopiesFromCommunication() as probe:  # the detector sees a copy made in mappings.py
        mappings._split(torch.ones(2, 4), -1)
    assert probe.copies == ["aten::clone"], probe.copies
    for batch in (1, 3):  # sequence-parallel activations are [seq, batch, hidden]: any batch splits freely
        ids = torch.randint(0, 256, (batch, 8), generator=torch.Generator().manual_seed(0))
        for sp in (False, True):
            model = PhiForCausalLM(
                PhiConfig(**MODEL_CONFIG), init_seed=3, runtime=ModelRuntime(sequence_parallel=sp)
            ).train()
            assert model.sequence_parallel_active(ids) == sp
            with CopiesFromCommunication() as mode:
                token_losses, _ = model(ids, labels=ids, reduction="none")
                token_losses.sum().backward()
            assert mode.copies == [], (batch, sp, mode.copies)
            assert all(p.grad is not None for p in model.parameters())


@pytest.mark.distributed
def test_no_copies_in_communication_on_model_path():
    run_distributed(check_no_copies_on_model_path, 2)


def _column_run(x, w, b, sp, overlap, gather_output=False, autocast=False):
    col = layers.ColumnParallelLinear(
        w.shape[1],
        w.shape[0] * state.get_tensor_model_parallel_world_size(),
        bias=b is not None,
        gather_output=gather_output,
        sequence_parallel=sp,
        overlap_grad_communication=overlap,
        initialize=False,
    )
    with torch.no_grad():
        col.weight.copy_(w)
        if b is not None:
            col.bias.copy_(b)
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = col(xi)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * up).sum().backward()
    return y.detach(), xi.grad, col.weight.grad, None if b is None else col.bias.grad


class OpOrder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)  # e.g. "mm.default", "allreduce_.default"
        return func(*args, **(kwargs or {}))


def _check_overlap_order(x, w, sp):
    """The collective on the input gradient is launched before the weight-gradient GEMM."""
    col = layers.ColumnParallelLinear(w.shape[1], w.shape[0] * 2, sequence_parallel=sp, initialize=False)
    with torch.no_grad():
        col.weight.copy_(w)
        col.bias.zero_()
    y = col(x.clone().requires_grad_())
    with OpOrder() as order:
        y.sum().backward()
    collective = next(i for i, op in enumerate(order.ops) if "allreduce" in op or "reduce_scatter" in op)
    gemms = [i for i, op in enumerate(order.ops) if op.startswith("mm.")]
    assert gemms and gemms[0] < collective < gemms[-1], order.ops  # input gradient, launch, weight gradient


def _check_shared_input(x, w, b, sp, g):
    """Two column layers on one input (attention qkv + MLP fc1 style) against entering the region once
    and applying each layer: identical outputs and gradients, one collective on the input gradient."""

    def column(out_features):
        return layers.ColumnParallelLinear(
            16, out_features, sequence_parallel=sp, input_in_parallel_region=True, initialize=False
        )

    first, second = column(24), column(40)
    with torch.no_grad():
        first.weight.copy_(w), first.bias.copy_(b)
        second.weight.copy_(torch.randn(20, 16, generator=g)), second.bias.copy_(torch.randn(20, generator=g))
    params = (*first.parameters(), *second.parameters())
    results = []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        with mappings.count_communication() as counter:
            if fused:
                outs = layers.column_parallel_linears_on_shared_input(xi, (first, second), sequence_parallel=sp)
            else:
                h = layers.enter_tensor_parallel_region(xi, sp)
                outs = (first(h), second(h))
            (outs[0].square().sum() + outs[1].sum()).backward()
        assert dict(counter.calls) == ({"all_gather": 1, "reduce_scatter": 1} if sp else {"all_reduce": 1})
        results.append([o.detach() for o in outs] + [xi.grad] + [p.grad for p in params])
        for p in params:
            p.grad = None
    assert all(torch.equal(a, s) for a, s in zip(*results)), sp


def check_overlap_matches_sequential(rank, world):
    from megaphi.model import PhiForCausalLM

    state.initialize_model_parallel(world)
    g = torch.Generator().manual_seed(1)
    x_full = torch.randn(6, 2, 16, generator=g)  # [seq, batch, in]: the sequence-parallel layout
    w, b = torch.randn(12, 16, generator=g), torch.randn(12, generator=g)  # this rank's shard of a 24-out layer
    w, b = w + rank, b - rank
    for sp in (False, True):
        x = x_full.chunk(world, dim=layers.SEQUENCE_DIM)[rank] if sp else x_full
        for bias in (b, None):
            for gather_output in (False,) if sp else (False, True):
                overlapped = _column_run(x, w, bias, sp, True, gather_output)
                sequential = _column_run(x, w, bias, sp, False, gather_output)
                for a, s in zip(overlapped, sequential):
                    assert (a is None and s is None) or torch.equal(a, s), (sp, bias is None, gather_output)
        overlapped, sequential = (_column_run(x, w, b, sp, overlap, autocast=True) for overlap in (True, False))
        assert overlapped[0].dtype == torch.bfloat16 and overlapped[2].dtype == torch.float32
        assert all(torch.equal(a, s) for a, s in zip(overlapped, sequential)), (sp, "autocast")
        _check_overlap_order(x, w, sp)
        # same communication counted either way
        for overlap in (True, False):
            with mappings.count_communication() as counter:
                _column_run(x, w, b, sp, overlap)
            expected = {"all_gather": 1, "reduce_scatter": 1} if sp else {"all_reduce": 1}
            assert dict(counter.calls) == expected, (sp, overlap, dict(counter.calls))
            assert counter.bytes["reduce_scatter" if sp else "all_reduce"] == x_full.numel() * 4

        _check_shared_input(x, w, b, sp, g)

        # the model (its lm_head is a standalone column layer): overlap on vs off, bitwise
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
        grads = []
        for overlap in (True, False):
            model = PhiForCausalLM(
                PhiConfig(**MODEL_CONFIG), init_seed=4, runtime=ModelRuntime(sequence_parallel=sp)
            ).train()
            for module in model.modules():
                if isinstance(module, layers.ColumnParallelLinear):
                    module.overlap_grad_communication = overlap
            loss, _ = model(ids, labels=ids)
            loss.backward()
            grads.append([loss.detach()] + [p.grad for p in model.parameters()])
        assert all(torch.equal(a, s) for a, s in zip(*grads)), sp


@pytest.mark.distributed
def test_overlapped_input_grad_communication_is_bitwise_sequential():
    run_distributed(check_overlap_matches_sequential, 2)


def test_tp1_column_layer_is_one_linear_call():
    col = layers.ColumnParallelLinear(8, 6)
    x = torch.randn(2, 3, 8)
    assert torch.equal(col(x), F.linear(x, col.weight, col.bias))
    outs = layers.column_parallel_linears_on_shared_input(x, (col, col))
    assert all(torch.equal(o, F.linear(x, col.weight, col.bias)) for o in outs)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_no_async_flag_turns_the_overlap_off():
    """Megatron's --no-async-tensor-model-parallel-allreduce selects the sequential path in every column layer."""
    from megaphi.config import get_preset
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel.layers import ColumnParallelLinear, set_grad_communication_overlap
    from megaphi.training.arguments import parse_args

    assert parse_args(
        ["--model", "tiny", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data"]
    ).async_tensor_model_parallel_allreduce
    args = parse_args(
        [
            "--model",
            "tiny",
            "--micro-batch-size",
            "1",
            "--train-iters",
            "1",
            "--lr",
            "1e-3",
            "--mock-data",
            "--no-async-tensor-model-parallel-allreduce",
        ]
    )
    model = PhiForCausalLM(get_preset("tiny"), initialize=False)
    columns = [m for m in model.modules() if isinstance(m, ColumnParallelLinear)]
    assert len(columns) == 2 * model.config.num_hidden_layers + 1 and all(m.overlap_grad_communication for m in columns)
    set_grad_communication_overlap(model, args.async_tensor_model_parallel_allreduce)
    assert not any(m.overlap_grad_communication for m in columns)
