"""Sequence parallel on 2 and 4 CPU processes (gloo): equals the TP=1 model (dropout off), dropout
on sequence shards uses the per-TP-rank stream, clear errors for bad sequence lengths."""

import pytest
import torch

from dist_utils import run_distributed
from megaphi.config import PhiConfig
from megaphi.model.runtime import ModelRuntime
from megaphi.parallel import state
from megaphi.parallel.mappings import gather_shards, count_communication

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
SP = ModelRuntime(sequence_parallel=True)
INIT_SEED = 99
SEQ = 12  # divisible by 2 and 4


def _close(a, b, tol=1e-5, what=""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = (a.double() - b.double()).abs().max().item()
    assert diff <= tol, (what, diff)


def _full(param, tensor):
    return gather_shards(tensor, param.partition_dim) if param.tensor_model_parallel else tensor


def _identical_across_tp(t):
    world = state.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous(), group=state.get_tensor_model_parallel_group())
    return all(torch.equal(parts[0], p) for p in parts)


def check_equivalence(reference, recompute):
    from megaphi.model import PhiForCausalLM

    runtime = ModelRuntime(sequence_parallel=True, recompute="full" if recompute else "none")
    model = PhiForCausalLM(PhiConfig(**MODEL_CONFIG), init_seed=INIT_SEED, runtime=runtime).train()
    ids, labels, mask = reference["ids"], reference["labels"], reference["loss_mask"]
    assert model.sequence_parallel_active(ids)
    with torch.no_grad():
        _close(model(ids), reference["logits"], what="logits")
    loss, logits = model(ids, labels=labels, loss_mask=mask)
    _close(loss, reference["loss"], what="loss")
    _close(logits, reference["logits"], what="logits with labels")
    loss.backward()
    for name, p in model.named_parameters():
        _close(_full(p, p.grad), reference["grads"][name], what=name)
        if not p.tensor_model_parallel:  # LayerNorm and row biases: TP-summed, same on every rank
            assert _identical_across_tp(p.grad), name
    token_losses, _ = model(ids, labels=labels, reduction="none")
    _close(token_losses, reference["token_losses"], what="token losses")
    return model


def check_communication_pattern(model, ids):
    """One all-gather in (per block, shared by attention and MLP) and one reduce-scatter per row layer."""
    layers = model.config.num_hidden_layers
    with count_communication() as counter:
        with torch.no_grad():
            model(ids, labels=ids, reduction="none")
    assert counter.calls["all_reduce"] == 0, dict(counter.calls)  # vocab-parallel CE uses its own [tokens] reductions
    assert counter.calls["all_gather"] == layers + 1  # + lm_head input
    assert counter.calls["reduce_scatter"] == 2 * layers + 1  # dense, fc2 per block + embedding
    b, s, h = ids.shape[0], ids.shape[1], model.config.hidden_size
    assert counter.bytes["all_gather"] == (layers + 1) * b * s * h * 4


def check_dropout_streams(rank, world):
    from megaphi.model.phi import region_dropout
    from megaphi.parallel.random import model_parallel_seed

    dropout = torch.nn.Dropout(0.5).train()
    masks = {}
    for seed in (7, 7, 8):
        model_parallel_seed(seed)
        sharded = region_dropout(dropout, torch.ones(64), sequence_sharded=True)
        replicated = region_dropout(dropout, torch.ones(64), sequence_sharded=False)
        masks.setdefault(seed, []).append((sharded, replicated))
    (s1, r1), (s1_again, r1_again) = masks[7]
    assert torch.equal(s1, s1_again) and torch.equal(r1, r1_again)  # same seed: same masks
    assert not torch.equal(s1, masks[8][0][0])
    assert not _identical_across_tp(s1)  # sequence shards: per-TP-rank stream
    assert _identical_across_tp(r1)  # replicated region: shared stream

    # The whole SP model with dropout: reproducible with the same seed, different with another.
    from megaphi.model import PhiForCausalLM

    config = PhiConfig(**{**MODEL_CONFIG, "resid_dropout": 0.1, "embd_dropout": 0.1, "attention_dropout": 0.1})
    model = PhiForCausalLM(config, init_seed=INIT_SEED, runtime=SP).train()
    ids = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(0))
    losses = []
    for seed in (3, 3, 4):
        model_parallel_seed(seed)
        losses.append(model(ids, labels=ids)[0].item())
    assert losses[0] == losses[1] and losses[0] != losses[2]


def check_sequence_first_layout(model, ids, rank, world):
    """Megatron's layout: between the TP regions each rank holds [seq/TP, batch, hidden], the
    rank-th block of the sequence; the embedding takes [batch, seq] ids."""
    seen = {}

    def record(what, tensor):
        seen[what] = tensor  # returns None: the hooks leave inputs and outputs as they are

    hooks = [
        model.model.embed_tokens.register_forward_hook(lambda m, i, out: record("embedding", out)),
        model.model.layers[0].register_forward_pre_hook(lambda m, args: record("block input", args[0])),
    ]
    try:
        with torch.no_grad():
            model(ids, labels=ids)
    finally:
        for hook in hooks:
            hook.remove()
    b, s, h = ids.shape[0], ids.shape[1], model.config.hidden_size
    for what, t in seen.items():
        assert t.shape == (s // world, b, h) and t.is_contiguous(), (what, t.shape, t.stride())
    # the embedding's chunk is rows [rank * s/TP, (rank + 1) * s/TP) of every sequence in the batch
    full = torch.nn.functional.embedding(ids, gather_shards(model.model.embed_tokens.weight.detach(), 0))
    expected = full.transpose(0, 1).chunk(world, dim=0)[rank]
    assert torch.allclose(seen["embedding"], expected, rtol=0, atol=1e-6)


def sp_worker(rank, world, reference):
    state.initialize_model_parallel(world)
    model = check_equivalence(reference, recompute=False)
    check_sequence_first_layout(model, reference["ids"], rank, world)
    check_equivalence(reference, recompute=True)
    check_communication_pattern(model, reference["ids"])
    bad = torch.zeros(2, SEQ + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible by --tensor-model-parallel-size"):
        model(bad, labels=bad)
    model.eval()  # eval takes the plain TP path: any length works
    with torch.no_grad():
        _close(model(reference["ids"]), reference["logits"], what="eval logits")
        assert model(bad).shape == (2, SEQ + 1, 512)
    check_dropout_streams(rank, world)


@pytest.fixture(scope="module")
def reference():
    from megaphi.model import PhiForCausalLM

    model = PhiForCausalLM(PhiConfig(**MODEL_CONFIG), init_seed=INIT_SEED, runtime=SP).train()  # TP=1: SP is a no-op
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 512, (2, SEQ), generator=g)
    labels = torch.randint(0, 512, (2, SEQ), generator=g)
    loss_mask = (torch.rand(2, SEQ, generator=g) > 0.3).float()
    ref = {"ids": ids, "labels": labels, "loss_mask": loss_mask}
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
def test_sequence_parallel_matches_single_process(world, reference):
    run_distributed(sp_worker, world, reference)


def test_sequence_parallel_flag_is_a_noop_at_tp1(reference):
    from megaphi.model import PhiForCausalLM

    model = PhiForCausalLM(PhiConfig(**MODEL_CONFIG), init_seed=INIT_SEED, runtime=SP).train()
    assert not model.sequence_parallel_active(reference["ids"])
    assert model.runtime.sequence_parallel and "sequence_parallel" not in model.config.to_dict()
