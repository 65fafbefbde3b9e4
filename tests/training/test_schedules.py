"""forward_backward_no_pipelining: Megatron's contract, token averaging across micro-batches."""

import pytest
import torch

from comparison_tolerances import COMPARISON_ADAM_EPS, COMPARISON_PARAM_TOL
from dist_utils import run_distributed
from megaphi.training.schedules import forward_backward_no_pipelining, reduce_loss_dicts

SEQ, STEPS = 16, 2


def _config():
    from megaphi.model import get_preset

    return get_preset(
        "tiny",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        resid_dropout=0.0,
        embd_dropout=0.0,
    )


def _batches():
    g = torch.Generator().manual_seed(5)
    data = torch.randint(0, 255, (STEPS, 4, SEQ + 1), generator=g)
    return [{"tokens": d[:, :-1], "labels": d[:, 1:]} for d in data]


def _masked_batches():
    """Samples 0-1 (the first micro-batch at micro 2) keep only the second half of their tokens and
    sample 3 ignores two labels: the micro-batches' unmasked token counts differ."""
    batches = []
    for b in _batches():
        mask = torch.ones(4, SEQ)
        mask[:2, : SEQ // 2] = 0
        labels = b["labels"].clone()
        labels[3, :2] = -100
        batches.append({"tokens": b["tokens"], "labels": labels, "loss_mask": mask})
    return batches


def _train(micro, accum, zero_stage, batches=_batches, count_tokens=True, rank=0, world=1):
    import deepspeed
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import mpu
    from megaphi.training.lr_schedule import WarmupDecayLR
    from megaphi.training.optimizer import build_optimizer
    from megaphi.training.train_loop import count_loss_tokens, make_forward_step

    torch.manual_seed(3)
    model = PhiForCausalLM(_config())
    opt = build_optimizer(model, 1e-3, 0.1, eps=COMPARISON_ADAM_EPS)  # CPU-independent comparisons
    sched = WarmupDecayLR(opt, 1e-3, 0.0, 1, 10)
    config = {
        "train_batch_size": micro * accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, mpu=mpu, config=config, dist_init_required=False
    )
    per_rank = 4 // world  # rank r holds samples [r * per_rank, (r + 1) * per_rank) of every global batch
    micro_batches = [
        {k: v[i : i + micro] for k, v in b.items()}
        for b in batches()
        for i in range(rank * per_rank, (rank + 1) * per_rank, micro)
    ]
    data = iter(micro_batches)
    losses = []
    for _ in range(STEPS):
        logs = forward_backward_no_pipelining(
            make_forward_step(torch.device("cpu")),
            data,
            engine,
            accum,
            count_tokens_func=count_loss_tokens if count_tokens else None,
        )
        assert len(logs) == accum and set(logs[0]) == {"lm loss"}
        losses.append(reduce_loss_dicts(logs)["lm loss"])
    return losses, {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _worker(rank, world, out_path):
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)
    results = {"2x2": _train(2, 2, 1), "4x1": _train(4, 1, 1), "2x2 legacy": _train(2, 2, 1, count_tokens=False)}
    destroy_model_parallel()
    torch.save(results, out_path)


def test_micro2_accum2_equals_micro4(tmp_path):
    out = tmp_path / "r.pt"
    run_distributed(_worker, 1, str(out))
    r = torch.load(out)
    (l22, p22), (l41, p41) = r["2x2"], r["4x1"]
    assert l22 == pytest.approx(l41, rel=1e-6)
    # unmasked pretraining takes the legacy path bit for bit, with or without token counting
    assert r["2x2 legacy"][0] == l22
    assert all(torch.equal(r["2x2 legacy"][1][n], p22[n]) for n in p22)
    for name in p41:
        torch.testing.assert_close(p22[name], p41[name], rtol=0, atol=COMPARISON_PARAM_TOL)
    # and the logged loss is the token mean over the whole batch, computed independently
    from megaphi.model import PhiForCausalLM

    torch.manual_seed(3)
    model = PhiForCausalLM(_config())
    b = _batches()[0]
    logits = model(b["tokens"]).float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))
    assert l22[0] == pytest.approx(expected.item(), rel=1e-6)


def test_plain_module_contract_and_forward_only():
    """Without an engine: backward of the micro-batch mean / num_microbatches; forward_only keeps no graph."""
    layer = torch.nn.Linear(3, 1, bias=False)
    xs = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 1.0, 0.0]])]

    def forward_step(it, model):
        x = next(it)
        out = model(x)
        return out, lambda o: (o.sum(), {"lm loss": o.sum()})

    logs = forward_backward_no_pipelining(forward_step, iter(xs), layer, 2)
    torch.testing.assert_close(layer.weight.grad, (xs[0] + xs[1]) / 2)
    assert len(logs) == 2 and not logs[0]["lm loss"].requires_grad
    layer.weight.grad = None
    logs = forward_backward_no_pipelining(forward_step, iter(xs), layer, 2, forward_only=True)
    assert layer.weight.grad is None
    assert reduce_loss_dicts(logs)["lm loss"] == pytest.approx((layer(xs[0]).sum() + layer(xs[1]).sum()).item() / 2)


def _masked_reference_loss_and_grads():
    """Independent: F.cross_entropy over the whole masked batch (masked labels -> ignore_index)."""
    from megaphi.model import PhiForCausalLM

    torch.manual_seed(3)
    model = PhiForCausalLM(_config())
    b = _masked_batches()[0]
    labels = b["labels"].masked_fill(b["loss_mask"] == 0, -100)
    logits = model(b["tokens"]).float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _masked_worker(rank, world, out_path):
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)
    results = {"2x2": _train(2, 2, 1, _masked_batches), "4x1": _train(4, 1, 1, _masked_batches)}
    try:  # a (sum, count) loss without token counting cannot be averaged exactly: refused
        _train(2, 2, 1, _masked_batches, count_tokens=False)
        results["refused"] = ""
    except ValueError as e:
        results["refused"] = str(e)
    destroy_model_parallel()
    torch.save(results, out_path)


def _masked_dp_worker(rank, world, out_path):
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)
    result = _train(2, 1, 1, _masked_batches, rank=rank, world=world)
    destroy_model_parallel()
    if rank == 0:
        torch.save(result, out_path)


@pytest.mark.distributed
def test_masked_micro_batches_are_token_averaged(tmp_path):
    """Micro-batches with different unmasked token counts: micro 2 x accum 2 == micro 4, and the logged
    loss is the global token average."""
    out = tmp_path / "r.pt"
    run_distributed(_masked_worker, 1, str(out))
    r = torch.load(out)
    (l22, p22), (l41, p41) = r["2x2"], r["4x1"]
    expected_loss, _ = _masked_reference_loss_and_grads()
    assert l22[0] == pytest.approx(expected_loss, rel=1e-6)
    assert l22 == pytest.approx(l41, rel=1e-6)
    for name in p41:
        torch.testing.assert_close(p22[name], p41[name], rtol=0, atol=COMPARISON_PARAM_TOL)
    assert "count_tokens_func" in r["refused"]
    # two data-parallel ranks holding different token counts (16 vs 30): still the same update
    run_distributed(_masked_dp_worker, 2, str(tmp_path / "dp.pt"))
    l_dp, p_dp = torch.load(tmp_path / "dp.pt")
    assert l_dp == pytest.approx(l41, rel=1e-6)
    for name in p41:
        torch.testing.assert_close(p_dp[name], p41[name], rtol=0, atol=COMPARISON_PARAM_TOL)


def test_masked_gradients_match_reference_without_engine():
    """The accumulated gradient (plain module, 2 micro-batches) is d(masked token-loss sum) / tokens."""
    from megaphi.model import PhiForCausalLM
    from megaphi.training.train_loop import count_loss_tokens, make_forward_step

    expected_loss, expected_grads = _masked_reference_loss_and_grads()
    torch.manual_seed(3)
    model = PhiForCausalLM(_config())
    b = _masked_batches()[0]
    micro_batches = [{k: v[i : i + 2] for k, v in b.items()} for i in (0, 2)]
    assert count_loss_tokens(micro_batches[0]) == SEQ and count_loss_tokens(micro_batches[1]) == 2 * SEQ - 2
    logs = forward_backward_no_pipelining(
        make_forward_step(torch.device("cpu")), iter(micro_batches), model, 2, count_tokens_func=count_loss_tokens
    )
    assert reduce_loss_dicts(logs)["lm loss"] == pytest.approx(expected_loss, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-5, atol=1e-7)
    # the test has teeth: weighting the two micro-batch means equally (the old schedule) is far off
    model.zero_grad()
    forward_step = make_forward_step(torch.device("cpu"))

    def per_micro_batch_mean(data_iterator, model_):
        output, loss_func = forward_step(data_iterator, model_)

        def mean_loss(out):
            loss_sum, num_tokens, _ = loss_func(out)
            return loss_sum / num_tokens, {}

        return output, mean_loss

    forward_backward_no_pipelining(per_micro_batch_mean, iter(micro_batches), model, 2)
    grad = model.model.embed_tokens.weight.grad
    assert (grad - expected_grads["model.embed_tokens.weight"]).abs().max() > 1e-3 * grad.abs().max()


def _mixed_batches():
    """Micro-batch 0 (samples 0-1) has -100 labels and no loss_mask; micro-batch 1 (samples 2-3) is clean:
    one logs a masked token sum, the other a plain mean, and both must reduce together."""
    batches = []
    for b in _batches():
        labels = b["labels"].clone()
        labels[0, 3] = -100
        labels[1, :5] = -100
        batches.append({"tokens": b["tokens"], "labels": labels})
    return batches


def _mixed_reference_loss():
    """Independent: F.cross_entropy(ignore_index=-100) over the whole first global batch."""
    from megaphi.model import PhiForCausalLM

    torch.manual_seed(3)
    model = PhiForCausalLM(_config())
    b = _mixed_batches()[0]
    with torch.no_grad():
        logits = model(b["tokens"]).float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1), ignore_index=-100
    ).item()


def _mixed_forward_only_loss(rank, world):
    """Validation path: forward-only over this rank's share of the first batch, reduced over all ranks."""
    from megaphi.model import PhiForCausalLM
    from megaphi.training.train_loop import make_forward_step

    torch.manual_seed(3)
    model = PhiForCausalLM(_config())
    per_rank = 4 // world
    b = _mixed_batches()[0]
    micro_batches = [{k: v[i : i + 2] for k, v in b.items()} for i in range(rank * per_rank, (rank + 1) * per_rank, 2)]
    logs = forward_backward_no_pipelining(
        make_forward_step(torch.device("cpu")), iter(micro_batches), model, len(micro_batches), forward_only=True
    )
    return reduce_loss_dicts(logs)["lm loss"]


def _mixed_worker(rank, world, out_path):
    import os
    import threading

    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    # a shape mismatch between ranks' loss reductions would hang the group: fail fast instead
    watchdog = threading.Timer(120, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    initialize_model_parallel(1)
    forward_only = _mixed_forward_only_loss(rank, world)
    micro, accum = (2, 2) if world == 1 else (2, 1)
    losses, params = _train(micro, accum, 1, _mixed_batches, rank=rank, world=world)
    destroy_model_parallel()
    watchdog.cancel()
    if rank == 0:
        torch.save({"forward_only": forward_only, "losses": losses, "params": params}, out_path)


@pytest.mark.distributed
def test_masked_and_clean_micro_batches_mix(tmp_path):
    """A micro-batch with -100 labels next to a clean one, on one rank (2 micro-batches) and split over
    2 data-parallel ranks: no error or hang, and the logged loss is the token average of the whole batch."""
    expected = _mixed_reference_loss()
    run_distributed(_mixed_worker, 1, str(tmp_path / "one.pt"))
    one = torch.load(tmp_path / "one.pt")
    assert one["forward_only"] == pytest.approx(expected, rel=1e-6)
    assert one["losses"][0] == pytest.approx(expected, rel=1e-6)
    run_distributed(_mixed_worker, 2, str(tmp_path / "dp.pt"))
    dp = torch.load(tmp_path / "dp.pt")
    assert dp["forward_only"] == pytest.approx(expected, rel=1e-6)
    assert dp["losses"] == pytest.approx(one["losses"], rel=1e-6)
    for name, p in one["params"].items():
        torch.testing.assert_close(dp["params"][name], p, rtol=0, atol=COMPARISON_PARAM_TOL)


def test_fractional_loss_weights_below_one_and_empty_count():
    """[sum, count] pairs whose counts total below 1 (fractional loss_mask) are not clamped to 1; a zero
    count has no average: nan."""
    logs = [
        {"lm loss": torch.tensor([0.3, 0.25], dtype=torch.float64)},
        {"lm loss": torch.tensor([0.1, 0.25], dtype=torch.float64)},
    ]
    assert reduce_loss_dicts(logs)["lm loss"] == pytest.approx(0.4 / 0.5)
    empty = [{"lm loss": torch.zeros(2, dtype=torch.float64)}]
    assert torch.isnan(torch.tensor(reduce_loss_dicts(empty)["lm loss"]))
