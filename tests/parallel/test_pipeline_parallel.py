"""Pipeline parallelism on gloo CPU processes against the unsplit model (PP=1) on the same global batch.

The PP=1 reference is PhiForCausalLM trained by forward_backward_no_pipelining (the non-pipelined
schedule) with torch's clip_grad_norm_; every rank computes it locally, in float64.

What is bitwise and why. A stage runs exactly the ops the unsplit model runs for its layers, on the
same micro-batch shapes, and 1F1B (plain or interleaved) runs every stage's backwards in
micro-batch order, as gradient accumulation does; the gradient that crosses a boundary is the same
tensor the unsplit autograd would pass on. So at P = 2, 4, interleaved and uneven splits, the
per-micro-batch losses and the first step's gradients are bitwise equal to PP=1. Tensor and data
parallelism reorder float sums (TP shards the matmuls; DP sums two halves of the batch), and the
global gradient norm used for clipping is summed per stage then across stages: those agree to
rounding, not bitwise.

Bound for those, in float64 (u = 1.1e-16): a reordered sum of n <= 10^3 terms of magnitude <= 10 differs
by <= n * u * 10 ~ 1e-12 absolute; through AdamW with eps = COMPARISON_ADAM_EPS (slope <= lr / eps =
0.1) the weights move by <= 1e-13 per step; 3 steps stay below GRAD_TOL = WEIGHT_TOL = 1e-10 with
1000x room, while a missing micro-batch, a wrong 1/m or 1/dp, or an unreduced gradient moves weights
by ~lr * 0.1 = 1e-3.
"""

import pytest
import torch

from comparison_tolerances import COMPARISON_ADAM_EPS
from dist_utils import run_distributed
from megaphi.config import PhiConfig

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    rotary_dim=8,
    max_position_embeddings=16,
    attention_dropout=0.0,
    resid_dropout=0.0,
    embd_dropout=0.0,
)
GLOBAL_BATCH, SEQ, STEPS, INIT_SEED, LR, CLIP = 8, 8, 3, 11, 1e-2, 0.5
GRAD_TOL = WEIGHT_TOL = 1e-10


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, CONFIG["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _micro_batches(rows, micro):
    return [{"tokens": rows[i : i + micro, :-1], "labels": rows[i : i + micro, 1:]} for i in range(0, len(rows), micro)]


def _count_tokens(batch):
    return batch["labels"].numel()


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output, _ = model(batch["tokens"], labels=batch["labels"], reduction="none")

    def loss_func(token_losses):
        loss = token_losses.mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _reference(config, micro, count_tokens=False):
    """PP=1: losses per micro-batch per step, first-step gradients, final weights (by name)."""
    from megaphi.model import PhiForCausalLM
    from megaphi.training.schedules import forward_backward_no_pipelining

    model = PhiForCausalLM(config, init_seed=INIT_SEED, dtype=torch.float64).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=COMPARISON_ADAM_EPS)
    losses, first_grads, norms = [], None, []
    for batch in _batches():
        mbs = _micro_batches(batch, micro)
        logs = forward_backward_no_pipelining(
            _forward_step, iter(mbs), model, len(mbs), count_tokens_func=_count_tokens if count_tokens else None
        )
        losses.append([d["lm loss"] for d in logs])
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, first_grads, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def _full(param, tensor):
    from megaphi.parallel.mappings import gather_shards

    return gather_shards(tensor, param.partition_dim) if getattr(param, "tensor_model_parallel", False) else tensor


def _check_rank_layout(tp, pp):
    """Megatron's order: rank = pp_rank * (tp * dp) + dp_rank * tp + tp_rank; pipelines are rings."""
    from megaphi.parallel import state

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    stage_size = world // pp
    pipeline = list(range(rank % stage_size, world, stage_size))
    assert state.get_pipeline_model_parallel_group_ranks() == pipeline
    assert state.get_pipeline_model_parallel_rank() == rank // stage_size
    assert state.get_tensor_model_parallel_rank() == rank % tp
    assert state.get_data_parallel_rank() == (rank % stage_size) // tp
    assert state.get_data_parallel_world_size() == stage_size // tp
    stage = rank // stage_size
    assert state.get_pipeline_model_parallel_next_rank() == pipeline[(stage + 1) % pp]
    assert state.get_pipeline_model_parallel_prev_rank() == pipeline[(stage - 1) % pp]
    assert state.is_pipeline_first_stage() == (stage == 0)
    assert state.is_pipeline_last_stage() == (stage == pp - 1)


def _pipelined(config, pp, tp=1, chunks=1, micro=1, layers_per_stage=None, count_tokens=False, **overrides):
    """The same training through the pipeline engine; returns what _reference returns, for this
    rank's stage (losses only on the last stage), plus the most activations it held."""
    from megaphi.parallel import state
    from megaphi.parallel.pipeline import (
        StageCommunicator,
        allreduce_data_parallel_gradients,
        boundary_shape,
        build_model_chunks,
        clip_grad_norm_across_stages,
        forward_backward_pipelining,
    )

    from megaphi.model.runtime import ModelRuntime

    runtime = ModelRuntime(**overrides)  # recompute, loss chunks, sequence parallel: how the stages run
    state.initialize_model_parallel(tp, pp)
    _check_rank_layout(tp, pp)
    dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    model = build_model_chunks(
        config,
        state.get_pipeline_model_parallel_rank(),
        pp,
        chunks,
        layers_per_stage,
        init_seed=INIT_SEED,
        dtype=torch.float64,
        runtime=runtime,
    )
    for chunk in model:
        chunk.train()
    comm = StageCommunicator(boundary_shape(micro, SEQ, config.hidden_size, runtime.sequence_parallel), torch.float64)
    params = [p for chunk in model for p in chunk.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, eps=COMPARISON_ADAM_EPS)
    rows = GLOBAL_BATCH // dp
    losses, first_grads, norms, max_live = [], None, [], 0
    for batch in _batches():
        mbs = _micro_batches(batch[dp_rank * rows : (dp_rank + 1) * rows], micro)
        stats = {}
        logs = forward_backward_pipelining(
            _forward_step,
            [iter(mbs) for _ in model],
            model,
            len(mbs),
            comm,
            count_tokens_func=_count_tokens if count_tokens else None,
            dp_group=state.get_data_parallel_group() if dp > 1 else None,
            stats=stats,
        )
        max_live = max(max_live, stats["max_live_activations"])
        losses.append([d["lm loss"] for d in logs])
        allreduce_data_parallel_gradients(model)
        if first_grads is None:
            first_grads = {n: _full(p, p.grad).clone() for chunk in model for n, p in chunk.named_parameters()}
        norms.append(float(clip_grad_norm_across_stages(model, CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = {n: _full(p, p.detach()).clone() for chunk in model for n, p in chunk.named_parameters()}
    result = dict(
        losses=losses,
        grads=first_grads,
        norms=norms,
        weights=weights,
        max_live=max_live,
        dp_rank=dp_rank,
        dp=dp,
        last=state.is_pipeline_last_stage(),
    )
    state.destroy_model_parallel()
    return result


def _compare(name, result, reference, micro, bitwise):
    ref_losses, ref_grads, ref_norms, ref_weights = reference
    m_local = GLOBAL_BATCH // result["dp"] // micro
    if result["last"]:
        for step, step_losses in enumerate(result["losses"]):
            expected = ref_losses[step][result["dp_rank"] * m_local : (result["dp_rank"] + 1) * m_local]
            assert len(step_losses) == len(expected) == m_local, (name, step)
            for got, want in zip(step_losses, expected):
                if bitwise and step == 0:
                    assert torch.equal(got, want), (name, step, got, want)
                assert abs(float(got) - float(want)) <= WEIGHT_TOL, (name, step, got, want)
    else:
        assert result["losses"] == [[]] * STEPS, name
    assert result["grads"], name
    for n, g in result["grads"].items():
        if bitwise:
            assert torch.equal(g, ref_grads[n]), (name, n, (g - ref_grads[n]).abs().max())
        assert (g - ref_grads[n]).abs().max() <= GRAD_TOL, (name, n)
    assert ref_norms[0] > CLIP  # clipping is active and the whole-model norm matters
    for got, want in zip(result["norms"], ref_norms):
        assert abs(got - want) <= 1e-12 * want, (name, result["norms"], ref_norms)
    for n, w in result["weights"].items():
        assert (w - ref_weights[n]).abs().max() <= WEIGHT_TOL, (name, n, (w - ref_weights[n]).abs().max())


def _forward_only_equals_pp1(config, pp, chunks):
    """Evaluation (forward-only plan, no_grad): the last stage's per-micro-batch losses are bitwise
    those of the unsplit model; no activation is kept."""
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import state
    from megaphi.parallel.pipeline import (
        StageCommunicator,
        boundary_shape,
        build_model_chunks,
        forward_backward_pipelining,
    )

    mbs = _micro_batches(_batches()[0], 2)
    unsplit = PhiForCausalLM(config, init_seed=INIT_SEED, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = [unsplit(mb["tokens"], labels=mb["labels"], reduction="none")[0].mean() for mb in mbs]
    state.initialize_model_parallel(1, pp)
    model = [
        c.eval()
        for c in build_model_chunks(
            config, state.get_pipeline_model_parallel_rank(), pp, chunks, init_seed=INIT_SEED, dtype=torch.float64
        )
    ]
    comm = StageCommunicator(boundary_shape(2, SEQ, config.hidden_size), torch.float64)
    stats = {}
    logs = forward_backward_pipelining(
        _forward_step, [iter(mbs) for _ in model], model, len(mbs), comm, forward_only=True, stats=stats
    )
    assert stats["max_live_activations"] == 0
    if state.is_pipeline_last_stage():
        assert [d["lm loss"] for d in logs] == expected
    else:
        assert logs == []
    state.destroy_model_parallel()


def _masked_forward_step(data_iterator, model):
    """The 3-tuple contract: (masked token-loss sum, token count, logs), as the trainer's forward
    step returns for batches with a loss mask."""
    batch = next(data_iterator)
    output, _ = model(batch["tokens"], labels=batch["labels"], reduction="none")

    def loss_func(token_losses):
        loss_sum = (token_losses * batch["loss_mask"]).sum()
        count = batch["loss_mask"].sum()
        return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count])}

    return output, loss_func


def _token_average_equals_pp1(config):
    """Micro-batches with different numbers of loss tokens: the pipeline backpropagates
    loss_sum_i / T (T counted before the first backward) exactly as forward_backward_no_pipelining."""
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import state
    from megaphi.parallel.pipeline import (
        StageCommunicator,
        boundary_shape,
        build_model_chunks,
        forward_backward_pipelining,
    )
    from megaphi.training.schedules import forward_backward_no_pipelining

    mbs = _micro_batches(_batches()[0], 2)
    for i, mb in enumerate(mbs):
        mb["loss_mask"] = torch.ones(mb["labels"].shape, dtype=torch.float64)
        mb["loss_mask"][:, : i + 1] = 0.0  # micro-batch i ignores its first i + 1 positions

    def count(mb):
        return mb["loss_mask"].sum().item()

    unsplit = PhiForCausalLM(config, init_seed=INIT_SEED, dtype=torch.float64).train()
    ref_logs = forward_backward_no_pipelining(
        _masked_forward_step, iter(mbs), unsplit, len(mbs), count_tokens_func=count
    )
    state.initialize_model_parallel(1, 2)
    model = [
        c.train()
        for c in build_model_chunks(
            config, state.get_pipeline_model_parallel_rank(), 2, init_seed=INIT_SEED, dtype=torch.float64
        )
    ]
    comm = StageCommunicator(boundary_shape(2, SEQ, config.hidden_size), torch.float64)
    logs = forward_backward_pipelining(_masked_forward_step, iter(mbs), model, len(mbs), comm, count_tokens_func=count)
    if state.is_pipeline_last_stage():
        assert all(torch.equal(a["lm loss"], b["lm loss"]) for a, b in zip(logs, ref_logs, strict=True))
    reference = dict(unsplit.named_parameters())
    for n, p in model[0].named_parameters():
        assert torch.equal(p.grad, reference[n].grad), n
    state.destroy_model_parallel()


def _two_stage_worker(rank, world):
    config = PhiConfig(**CONFIG)
    reference = _reference(config, micro=1)
    runs = {
        "PP=2": dict(pp=2),
        "PP=2 interleaved v=2": dict(pp=2, chunks=2),
        "PP=2 split 1,3": dict(pp=2, layers_per_stage=[1, 3]),
        "PP=2 full recompute": dict(pp=2, recompute="full"),
    }  # replays the same ops: bitwise too
    for name, kwargs in runs.items():
        result = _pipelined(config, **kwargs)
        _compare(name, result, reference, 1, bitwise=True)
        if kwargs.get("chunks", 1) == 1 and rank == 0:
            assert result["max_live"] == 2, (name, result["max_live"])  # P, not m = 8
    # the chunked loss sums the cross entropy in another order: equal within the float64 bound
    _compare("PP=2 chunked loss", _pipelined(config, pp=2, loss_chunk_tokens=4), reference, 1, bitwise=False)
    for chunks in (1, 2):
        _forward_only_equals_pp1(config, 2, chunks)
    _token_average_equals_pp1(config)


def _four_rank_worker(rank, world):
    config = PhiConfig(**CONFIG)
    reference = _reference(config, micro=1)
    result = _pipelined(config, pp=4)
    _compare("PP=4", result, reference, 1, bitwise=True)
    if rank == 0:
        assert result["max_live"] == 4  # the first stage holds P = 4 of the 8 micro-batches at most
    _compare("PP=2 x TP=2", _pipelined(config, pp=2, tp=2), reference, 1, bitwise=False)
    _compare("PP=2 x TP=2 SP", _pipelined(config, pp=2, tp=2, sequence_parallel=True), reference, 1, bitwise=False)
    counted = _reference(config, micro=1, count_tokens=True)
    _compare("PP=2 x DP=2", _pipelined(config, pp=2, count_tokens=True), counted, 1, bitwise=False)


def test_pipeline_two_stages_equal_pp1():
    """PP=2 1F1B, interleaved with 2 virtual stages, an uneven split and full recompute: bitwise PP=1;
    the chunked loss within the float64 bound; forward-only evaluation (plain and interleaved) and
    the token-averaged loss over unequal masked micro-batches bitwise."""
    run_distributed(_two_stage_worker, 2)


def test_pipeline_four_ranks_equal_pp1():
    """PP=4, PP=2 x TP=2 (with and without sequence parallel), PP=2 x DP=2 (token-averaged loss,
    gradients averaged over DP) against PP=1 on the same global batch."""
    run_distributed(_four_rank_worker, 4)


def _dropout_worker(rank, world):
    """With dropout, a stage's masks come from its own streams (seed + 100 x stage): the step is
    reproducible bit for bit, and full recompute replays the masks exactly (same gradients)."""
    from megaphi.parallel import state
    from megaphi.parallel.pipeline import (
        StageCommunicator,
        boundary_shape,
        build_model_chunks,
        forward_backward_pipelining,
        seed_pipeline_stage,
    )

    results = {}
    for name, recompute in (("first", False), ("again", False), ("recompute", True)):
        from megaphi.model.runtime import ModelRuntime

        config = PhiConfig(**{**CONFIG, "attention_dropout": 0.2, "resid_dropout": 0.2, "embd_dropout": 0.2})
        state.initialize_model_parallel(1, 2)
        seed_pipeline_stage(1234)
        model = build_model_chunks(
            config,
            state.get_pipeline_model_parallel_rank(),
            2,
            init_seed=INIT_SEED,
            dtype=torch.float64,
            runtime=ModelRuntime(recompute="full" if recompute else "none"),
        )
        model[0].train()
        comm = StageCommunicator(boundary_shape(2, SEQ, config.hidden_size), torch.float64)
        mbs = _micro_batches(_batches()[0], 2)
        logs = forward_backward_pipelining(_forward_step, iter(mbs), model, len(mbs), comm)
        results[name] = ([d["lm loss"] for d in logs], {n: p.grad.clone() for n, p in model[0].named_parameters()})
        state.destroy_model_parallel()
    _overflow_is_agreed(rank)
    for name in ("again", "recompute"):
        assert results[name][0] == results["first"][0]
        for n, g in results[name][1].items():
            assert torch.equal(g, results["first"][1][n]), (name, n)
    if rank == 1:  # the masks are active: the losses differ from the dropout-free forward
        from megaphi.model import PhiForCausalLM

        plain = PhiForCausalLM(PhiConfig(**CONFIG), init_seed=INIT_SEED, dtype=torch.float64)
        mbs = _micro_batches(_batches()[0], 2)
        clean = [plain(mb["tokens"], labels=mb["labels"])[0] for mb in mbs]
        assert all(abs(float(a) - float(b)) > 1e-6 for a, b in zip(results["first"][0], clean))


def _overflow_is_agreed(rank):
    """An inf in one stage's gradients makes every stage skip the step (fp16 loss scaling)."""
    from megaphi.parallel import state
    from megaphi.parallel.pipeline import any_stage_overflowed, build_model_chunks

    state.initialize_model_parallel(1, 2)
    model = build_model_chunks(PhiConfig(**CONFIG), state.get_pipeline_model_parallel_rank(), 2, init_seed=INIT_SEED)
    for p in model[0].parameters():
        p.grad = torch.zeros_like(p)
    assert not any_stage_overflowed(model)
    if rank == 1:
        next(model[0].parameters()).grad[0] = float("inf")
    assert any_stage_overflowed(model)
    state.destroy_model_parallel()


def test_pipeline_dropout_is_reproducible_and_recompute_exact():
    """Also: an fp16 overflow found on one stage is seen by every stage."""
    run_distributed(_dropout_worker, 2)


def _four_stage_interleaved_worker(rank, world):
    config = PhiConfig(**{**CONFIG, "num_hidden_layers": 8})
    reference = _reference(config, micro=1)
    _compare("PP=4 interleaved v=2", _pipelined(config, pp=4, chunks=2), reference, 1, bitwise=True)


@pytest.mark.slow
def test_pipeline_four_stages_interleaved_equal_pp1():
    """P = 4 with 2 virtual stages (8 layers, one per virtual stage; m = 8): bitwise PP=1."""
    run_distributed(_four_stage_interleaved_worker, 4)
