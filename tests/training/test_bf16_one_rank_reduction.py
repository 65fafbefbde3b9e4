"""bf16 on one data-parallel rank: no gradient all-reduce, no bf16 gradients kept after backward.

megaphi's bf16 runs use DeepSpeed's BF16_Optimizer (ZeRO 1 with fp32 gradient accumulation). Left to
itself, DeepSpeed all-reduces the whole fp32 gradient at every accumulation boundary, also over a
one-rank group, where it only copies the gradient into a bucket and back; and it keeps every bf16
gradient alive next to its fp32 accumulator. The engine megaphi builds (its config and
finish_engine_setup) must do neither, and train bitwise like plain DeepSpeed does over a few steps.
"""

import json
import pytest
import torch

from dist_utils import run_distributed

MICRO, SEQ, ACCUMULATION, STEPS = 2, 16, 2, 3


def _megaphi_config(*extra):
    from megaphi.training.arguments import parse_args
    from megaphi.training.deepspeed_config import build_deepspeed_config

    args = parse_args(
        [
            "--model",
            "tiny",
            "--bf16",
            "--mock-data",
            "--micro-batch-size",
            str(MICRO),
            "--global-batch-size",
            str(MICRO * ACCUMULATION),
            "--train-iters",
            "10",
            "--lr",
            "1e-2",
            "--clip-grad",
            "1.0",
            *extra,
        ],
        world_size=1,
    )
    return build_deepspeed_config(args)


def _model_config():
    from megaphi.model import get_preset

    return get_preset(
        "tiny",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
        resid_dropout=0.1,
        embd_dropout=0.1,
    )


def _train(config, megaphi_setup):
    """STEPS optimizer steps; returns the final parameters, the losses, how many gradient elements
    went through all-reduce, and the bf16 gradients still held after each backward."""
    import deepspeed
    import deepspeed.comm as ds_comm
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import mpu
    from megaphi.parallel.random import model_parallel_seed
    from megaphi.training.engine import finish_engine_setup
    from megaphi.training.optimizer import build_optimizer

    torch.manual_seed(0)
    model = PhiForCausalLM(_model_config())
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, 1e-2, 0.1), mpu=mpu, config=config, dist_init_required=False
    )
    if megaphi_setup:
        finish_engine_setup(engine)
    reduced, lingering, losses = [0], [], []
    all_reduce = ds_comm.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        reduced[0] += tensor.numel()
        return all_reduce(tensor, *args, **kwargs)

    ds_comm.all_reduce = counting_all_reduce
    try:
        g = torch.Generator().manual_seed(5)
        model_parallel_seed(1)  # dropout masks: the default and the tensor-parallel streams
        for _ in range(STEPS * ACCUMULATION):
            batch = torch.randint(0, 255, (MICRO, SEQ + 1), generator=g)
            loss, _ = engine(batch[:, :-1], labels=batch[:, 1:])
            engine.backward(loss)
            lingering.append(sum(p.grad.numel() for p in engine.module.parameters() if p.grad is not None))
            engine.step()
            losses.append(loss.float().item())
    finally:
        ds_comm.all_reduce = all_reduce
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return {
        "params": params,
        "losses": losses,
        "reduced": reduced[0],
        "lingering": lingering,
        "optimizer": type(engine.optimizer).__name__,
        "numel": sum(p.numel() for p in engine.module.parameters()),
    }


def _worker(rank, world, megaphi_config, plain_config, out_path):
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)
    result = {"megaphi": _train(megaphi_config, True), "plain": _train(plain_config, False)}
    destroy_model_parallel()
    torch.save(result, out_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    megaphi_config = _megaphi_config()
    plain_config = json.loads(json.dumps(megaphi_config))
    plain_config["bf16"] = {"enabled": True}  # DeepSpeed's own bf16 defaults
    out = tmp_path_factory.mktemp("bf16dp1") / "runs.pt"
    run_distributed(_worker, 1, megaphi_config, plain_config, str(out))
    return torch.load(out)


def test_bf16_at_dp1_uses_deepspeeds_bf16_optimizer(runs):
    # the path this file is about: ZeRO 1 + fp32 accumulation -> BF16_Optimizer, in both runs
    assert runs["megaphi"]["optimizer"] == runs["plain"]["optimizer"] == "BF16_Optimizer"


def test_bf16_at_dp1_reduces_no_gradient(runs):
    numel = runs["plain"]["numel"]
    # plain DeepSpeed all-reduces the whole (fp32) gradient once per step over the one-rank group
    assert runs["plain"]["reduced"] >= STEPS * numel
    # megaphi's engine: only scalars (the grad norm) go through all-reduce
    assert runs["megaphi"]["reduced"] < numel


def test_bf16_gradients_do_not_linger_after_backward(runs):
    numel = runs["plain"]["numel"]
    assert runs["plain"]["lingering"] == [numel] * (STEPS * ACCUMULATION)  # bf16 copy kept alongside fp32
    assert runs["megaphi"]["lingering"] == [0] * (STEPS * ACCUMULATION)


def test_bf16_at_dp1_trains_bitwise_like_plain_deepspeed(runs):
    mine, plain = runs["megaphi"], runs["plain"]
    assert mine["losses"] == plain["losses"]
    assert len(set(plain["losses"])) > 1  # it trained
    for name, value in plain["params"].items():
        assert torch.equal(mine["params"][name], value), name


def test_the_generated_bf16_config_frees_bf16_gradients_in_backward(tmp_path):
    assert _megaphi_config()["bf16"] == {"enabled": True, "immediate_grad_update": True}
    # a --deepspeed-config that says otherwise keeps its choice
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True, "immediate_grad_update": False}}))
    assert _megaphi_config("--deepspeed-config", str(path))["bf16"]["immediate_grad_update"] is False
