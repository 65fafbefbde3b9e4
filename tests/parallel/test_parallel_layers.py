"""Tensor-parallel layers on 2 and 4 CPU processes (gloo) against single-process torch references."""

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from megaphi.config import PhiConfig
from megaphi.parallel import mappings, state
from megaphi.parallel.cross_entropy import _VocabParallelCrossEntropy, vocab_parallel_cross_entropy
from megaphi.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

MODEL_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    rotary_dim=16,
    max_position_embeddings=64,
    attention_dropout=0.0,
    resid_dropout=0.0,
    embd_dropout=0.0,
)
INIT_SEED = 1234


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.double() - b.double()).abs().max().item()
    assert diff <= tol, diff


def _shard(t, dim, rank, world):
    return t.chunk(world, dim=dim)[rank]


def check_linear_layers(rank, world):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 16, generator=g)
    w_col, b_col = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    w_row, b_row = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    up = torch.randn(3, 5, 24, generator=g)
    down = torch.randn(3, 5, 16, generator=g)

    # Column (gather_output=True) then a reference of the same math in one process.
    for gather in (True, False):
        col = ColumnParallelLinear(16, 24, gather_output=gather)
        with torch.no_grad():
            col.weight.copy_(_shard(w_col, 0, rank, world))
            col.bias.copy_(_shard(b_col, 0, rank, world))
        xi = x.clone().requires_grad_()
        y = col(xi)
        xr = x.clone().requires_grad_()
        wr, br = w_col.clone().requires_grad_(), b_col.clone().requires_grad_()
        yr = F.linear(xr, wr, br)
        (yr * up).sum().backward()
        if gather:
            _close(y, yr)
            (y * up).sum().backward()
        else:
            _close(y, _shard(yr, -1, rank, world))
            (y * _shard(up, -1, rank, world)).sum().backward()
        _close(xi.grad, xr.grad)  # the copy-to-region backward all-reduced the input grad
        _close(col.weight.grad, _shard(wr.grad, 0, rank, world))
        _close(col.bias.grad, _shard(br.grad, 0, rank, world))

    for input_is_parallel in (False, True):
        row = RowParallelLinear(24, 16, input_is_parallel=input_is_parallel)
        with torch.no_grad():
            row.weight.copy_(_shard(w_row, 1, rank, world))
            row.bias.copy_(b_row)
        h = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(9))
        hi = (_shard(h, -1, rank, world) if input_is_parallel else h).clone().requires_grad_()
        y = row(hi)
        (y * down).sum().backward()
        hr, wr, br = h.clone().requires_grad_(), w_row.clone().requires_grad_(), b_row.clone().requires_grad_()
        (F.linear(hr, wr, br) * down).sum().backward()
        _close(y, F.linear(h, w_row, b_row))
        _close(hi.grad, _shard(hr.grad, -1, rank, world) if input_is_parallel else hr.grad)
        _close(row.weight.grad, _shard(wr.grad, 1, rank, world))
        _close(row.bias.grad, br.grad)


def check_embedding_and_cross_entropy(rank, world):
    g = torch.Generator().manual_seed(11)
    table = torch.randn(64, 8, generator=g)
    ids = torch.randint(0, 64, (4, 6), generator=g)
    up = torch.randn(4, 6, 8, generator=g)
    emb = VocabParallelEmbedding(64, 8)
    with torch.no_grad():
        emb.weight.copy_(_shard(table, 0, rank, world))
    out = emb(ids)
    (out * up).sum().backward()
    tr = table.clone().requires_grad_()
    ref = F.embedding(ids, tr)
    (ref * up).sum().backward()
    _close(out, ref)
    _close(emb.weight.grad, _shard(tr.grad, 0, rank, world))

    logits = torch.randn(4, 6, 64, generator=g) * 3
    labels = torch.randint(0, 64, (4, 6), generator=g)
    weights = torch.rand(4, 6, generator=g)
    shard = _shard(logits, -1, rank, world).clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(shard, labels)
    (losses * weights).sum().backward()
    lr = logits.clone().requires_grad_()
    ref = F.cross_entropy(lr.reshape(-1, 64), labels.reshape(-1), reduction="none").view(4, 6)
    (ref * weights).sum().backward()
    _close(losses, ref)
    _close(shard.grad, _shard(lr.grad, -1, rank, world))
    # bf16 logits: computed in fp32, grads come back in bf16
    losses16 = vocab_parallel_cross_entropy(_shard(logits, -1, rank, world).bfloat16(), labels)
    assert losses16.dtype == torch.float32
    _close(
        losses16,
        F.cross_entropy(logits.bfloat16().float().reshape(-1, 64), labels.reshape(-1), reduction="none").view(4, 6),
    )


def check_sequence_primitives(rank, world):
    x = torch.arange(world * 6, dtype=torch.float32).view(1, world * 6, 1) * (rank + 1)
    x.requires_grad_()
    y = mappings.reduce_scatter_along_dim(x, 1)  # gloo: all-reduce + split fallback
    total = sum(r + 1 for r in range(world))
    _close(y, torch.arange(world * 6, dtype=torch.float32).view(1, world * 6, 1)[:, rank * 6 : (rank + 1) * 6] * total)
    y.sum().backward()
    _close(x.grad, torch.ones_like(x))  # all-gather of ones
    z = torch.full((1, 2, 1), float(rank), requires_grad=True)
    full = mappings.gather_along_dim(z, 1)
    _close(full.view(-1), torch.arange(world, dtype=torch.float32).repeat_interleave(2))
    full.sum().backward()
    _close(z.grad, torch.full_like(z, float(world)))  # reduce-scatter of ones


def check_rng_streams(rank, world):
    from megaphi.parallel.random import get_rng_tracker, model_parallel_seed

    model_parallel_seed(5)
    with get_rng_tracker().fork():
        tp_draw = torch.rand(8)
    shared = torch.rand(8)
    draws = [torch.empty(8) for _ in range(world)]
    torch.distributed.all_gather(draws, tp_draw, group=state.get_tensor_model_parallel_group())
    shared_all = [torch.empty(8) for _ in range(world)]
    torch.distributed.all_gather(shared_all, shared, group=state.get_tensor_model_parallel_group())
    assert all(torch.equal(shared_all[0], s) for s in shared_all)  # replicated stream: identical
    assert not torch.equal(draws[0], draws[1])  # TP stream: differs per rank
    model_parallel_seed(5)
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(8), tp_draw)  # and reproduces


def check_model(rank, world, reference):
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel.mappings import gather_shards

    model = PhiForCausalLM(PhiConfig(**MODEL_CONFIG), init_seed=INIT_SEED)
    for name, p in model.named_parameters():  # TP-independent init: shards of the TP=1 model
        full = gather_shards(p.detach(), p.partition_dim) if p.tensor_model_parallel else p.detach()
        assert torch.equal(full, reference["params"][name]), name
    ids, labels = reference["ids"], reference["labels"]
    logits = model(ids)
    _close(logits, reference["logits"])
    loss, _ = model(ids, labels=labels, loss_mask=reference["loss_mask"])
    _close(loss, reference["loss"])
    loss.backward()
    for name, p in model.named_parameters():
        grad = gather_shards(p.grad, p.partition_dim) if p.tensor_model_parallel else p.grad
        _close(grad, reference["grads"][name])
    from megaphi.checkpoint.hf_names import model_to_hf_names

    expected = model_to_hf_names(reference["params"], model.config)
    exported = model.hf_state_dict()  # gathers the shards (what save_pretrained writes)
    assert set(exported) == set(expected) and all(torch.equal(exported[n], expected[n]) for n in expected)
    token_losses, none = model(ids, labels=labels, reduction="none")
    assert none is None
    _close(token_losses, reference["token_losses"])


def tp_worker(rank, world, tp, reference):
    with pytest.raises(ValueError, match="divide the world size"):
        state.initialize_model_parallel(3)
    state.initialize_model_parallel(tp)
    assert state.get_tensor_model_parallel_world_size() == tp
    assert state.get_tensor_model_parallel_rank() == rank % tp
    assert state.get_data_parallel_world_size() == world // tp
    assert state.get_data_parallel_rank() == rank // tp
    if tp < world:  # e.g. TP=2 x DP=2: check the groups by reducing ranks
        t = torch.tensor([float(rank)])
        torch.distributed.all_reduce(t, group=state.get_tensor_model_parallel_group())
        base = (rank // tp) * tp
        assert t.item() == sum(range(base, base + tp))
        t = torch.tensor([float(rank)])
        torch.distributed.all_reduce(t, group=state.get_data_parallel_group())
        assert t.item() == sum(range(rank % tp, world, tp))
    state.destroy_model_parallel()
    state.initialize_model_parallel(world)  # the layer checks use every rank as TP
    check_linear_layers(rank, world)
    check_embedding_and_cross_entropy(rank, world)
    check_sequence_primitives(rank, world)
    check_rng_streams(rank, world)
    check_model(rank, world, reference)


@pytest.fixture(scope="module")
def model_reference():
    from megaphi.model import PhiForCausalLM

    model = PhiForCausalLM(PhiConfig(**MODEL_CONFIG), init_seed=INIT_SEED)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    labels = torch.randint(0, 512, (2, 12), generator=g)
    loss_mask = (torch.rand(2, 12, generator=g) > 0.3).float()
    ref = {
        "ids": ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    with torch.no_grad():
        ref["logits"] = model(ids)
        ref["token_losses"] = model(ids, labels=labels, reduction="none")[0]
    loss, _ = model(ids, labels=labels, loss_mask=loss_mask)
    loss.backward()
    ref["loss"] = loss.detach()
    ref["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return ref


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.distributed
def test_tensor_parallel_matches_single_process(world, model_reference):
    run_distributed(tp_worker, world, 2, model_reference)


def test_tp1_layers_are_plain_torch_calls():
    x = torch.randn(2, 3, 8)
    assert mappings.copy_to_tensor_model_parallel_region(x) is x
    assert mappings.reduce_from_tensor_model_parallel_region(x) is x
    assert mappings.gather_from_tensor_model_parallel_region(x) is x
    col, row, emb = ColumnParallelLinear(8, 6), RowParallelLinear(6, 8), VocabParallelEmbedding(10, 8)
    assert torch.equal(col(x), F.linear(x, col.weight, col.bias))
    y = col(x)
    assert type(y.grad_fn).__name__ in ("ViewBackward0", "AddmmBackward0", "UnsafeViewBackward0")
    assert torch.equal(row(y), F.linear(y, row.weight, row.bias))
    ids = torch.tensor([[0, 9, 3]])
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    assert state.get_tensor_model_parallel_world_size() == 1 and state.get_data_parallel_world_size() == 1


def test_vocab_parallel_cross_entropy_function_single_rank():
    """The communication-free path of the custom Function (used at TP>1) against torch at TP=1."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 50, (3, 7), generator=g)
    weights = torch.rand(3, 7, generator=g)
    out = _VocabParallelCrossEntropy.apply(logits, labels)
    (out * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, 50), labels.reshape(-1), reduction="none").view(3, 7)
    (ref * weights).sum().backward()
    _close(out, ref)
    _close(logits.grad, ref_logits.grad)


def test_initialize_requires_distributed():
    with pytest.raises(RuntimeError, match="init_process_group"):
        state.initialize_model_parallel(1)
