"""forward_backward_no_pipelining: Megatron's contract, token averaging across micro-batches."""
import pytest
import torch

from dist_utils import run_distributed
from megaphi.training.schedules import forward_backward_no_pipelining, reduce_loss_dicts

SEQ, STEPS = 16, 2


def _config():
    from megaphi.model import get_preset
    return get_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                      max_position_embeddings=64, attention_dropout=0.0, resid_dropout=0.0, embd_dropout=0.0)


def _batches():
    g = torch.Generator().manual_seed(5)
    data = torch.randint(0, 255, (STEPS, 4, SEQ + 1), generator=g)
    return [{"tokens": d[:, :-1], "labels": d[:, 1:]} for d in data]


def _train(micro, accum, zero_stage):
    import deepspeed
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import mpu
    from megaphi.training.lr_schedule import WarmupDecayLR
    from megaphi.training.optimizer import build_optimizer
    from megaphi.training.train_loop import make_forward_step

    torch.manual_seed(3)
    model = PhiForCausalLM(_config())
    opt = build_optimizer(model, 1e-3, 0.1)
    sched = WarmupDecayLR(opt, 1e-3, 0.0, 1, 10)
    config = {"train_batch_size": micro * accum, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accum, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, mpu=mpu, config=config,
                                      dist_init_required=False)
    micro_batches = [{k: v[i:i + micro] for k, v in b.items()} for b in _batches() for i in range(0, 4, micro)]
    data = iter(micro_batches)
    losses = []
    for _ in range(STEPS):
        logs = forward_backward_no_pipelining(make_forward_step(torch.device("cpu")), data, engine, accum)
        assert len(logs) == accum and set(logs[0]) == {"lm loss"}
        losses.append(reduce_loss_dicts(logs)["lm loss"])
    return losses, {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _worker(rank, world, out_path):
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)
    results = {"2x2": _train(2, 2, 1), "4x1": _train(4, 1, 1)}
    destroy_model_parallel()
    torch.save(results, out_path)


def test_micro2_accum2_equals_micro4(tmp_path):
    out = tmp_path / "r.pt"
    run_distributed(_worker, 1, str(out))
    r = torch.load(out)
    (l22, p22), (l41, p41) = r["2x2"], r["4x1"]
    assert l22 == pytest.approx(l41, rel=1e-6)
    for name in p41:
        torch.testing.assert_close(p22[name], p41[name], rtol=1e-4, atol=2e-6)  # Adam amplifies fp32 rounding of tiny grads
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
