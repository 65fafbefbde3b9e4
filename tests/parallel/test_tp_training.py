"""TP x DP training through the DeepSpeed engine on 4 CPU processes (gloo), ZeRO 1 and 2:
TP=2 x DP=2 (with and without sequence parallel) tracks TP=1 x DP=4 step by step, and the gradient
norm DeepSpeed clips with equals the norm of the TP=1 gradient computed by hand (sharded parameters
counted once, replicated ones once).

AdamW runs with a large eps so the comparison does not depend on the CPU's rounding: see
comparison_tolerances.py."""

import pytest
import torch

from comparison_tolerances import COMPARISON_ADAM_EPS, COMPARISON_PARAM_TOL
from dist_utils import run_distributed
from megaphi.config import PhiConfig
from megaphi.model.runtime import ModelRuntime

pytestmark = pytest.mark.distributed

CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    rotary_dim=16,
    max_position_embeddings=32,
    attention_dropout=0.0,
    resid_dropout=0.0,
    embd_dropout=0.0,
)
GLOBAL_BATCH, SEQ, STEPS, INIT_SEED, LR = 8, 8, 3, 21, 1e-2
CLIP = 0.5  # below the first steps' gradient norms, so clipping is active and its norm matters
RUNS = [(1, False), (2, False), (2, True)]  # (TP, sequence parallel) on 4 ranks


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CONFIG["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(tp, sp, stage):
    import deepspeed
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import mpu, state
    from megaphi.parallel.mappings import gather_shards

    state.initialize_model_parallel(tp)
    dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    model = PhiForCausalLM(PhiConfig(**CONFIG), init_seed=INIT_SEED, runtime=ModelRuntime(sequence_parallel=sp)).train()
    micro = GLOBAL_BATCH // dp
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=COMPARISON_ADAM_EPS, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, mpu=mpu, config=ds_config, dist_init_required=False
    )
    losses, norms = [], []
    for batch in batches():
        rows = batch[dp_rank * micro : (dp_rank + 1) * micro]
        loss, _ = engine(rows[:, :-1], labels=rows[:, 1:])
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss, group=state.get_data_parallel_group())
        losses.append(mean_loss.item() / dp)
        norms.append(float(engine.get_global_grad_norm()))
    params = {
        n: (gather_shards(p.detach(), p.partition_dim) if p.tensor_model_parallel else p.detach()).clone()
        for n, p in engine.module.named_parameters()
    }
    state.destroy_model_parallel()
    return losses, norms, params


def worker(rank, world, stage, expected_first_norm):
    results = {run: train(*run, stage) for run in RUNS}
    ref_losses, ref_norms, ref_params = results[(1, False)]
    assert abs(ref_norms[0] - expected_first_norm) <= 1e-5 * expected_first_norm, (ref_norms[0], expected_first_norm)
    assert ref_norms[0] > CLIP
    for run in RUNS[1:]:
        losses, norms, params = results[run]
        for step in range(STEPS):
            assert abs(losses[step] - ref_losses[step]) <= 1e-5, (run, step, losses, ref_losses)
            assert abs(norms[step] - ref_norms[step]) <= 1e-5 * ref_norms[step], (run, step, norms, ref_norms)
        for name, p in params.items():
            diff = (p - ref_params[name]).abs().max().item()
            assert diff <= COMPARISON_PARAM_TOL, (run, name, diff)


def tp1_first_grad_norm():
    """The global gradient norm of step 1, by hand: one process, the whole global batch, TP=1."""
    from megaphi.model import PhiForCausalLM

    model = PhiForCausalLM(PhiConfig(**CONFIG), init_seed=INIT_SEED).train()
    batch = batches()[0]
    loss, _ = model(batch[:, :-1], labels=batch[:, 1:])
    loss.backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()


@pytest.mark.parametrize("stage", [1, 2])
def test_tp2_dp2_tracks_tp1_dp4(stage):
    run_distributed(worker, 4, stage, tp1_first_grad_norm())
