"""The ZeRO stage megaphi picks for each precision, and what DeepSpeed 0.19.8 builds from it.

- fp16 without a chosen stage runs at ZeRO 1: at ZeRO 0 DeepSpeed's unfused fp16 optimizer asks about
  every parameter's gradient for overflow with its own host sync; an explicit --zero-stage 0 is kept,
  with a note.
- bf16 with several data-parallel ranks and no chosen stage runs at ZeRO 2 (gradients reduced during
  backward) instead of ZeRO 1 (DeepSpeed's BF16 optimizer all-reduces the fp32 gradient after
  backward); the two end with the same weights.
- bf16 --zero-stage 2 on one data-parallel rank runs as ZeRO 1, whose one-rank reduction megaphi skips.
"""

import json

import pytest
import torch

from comparison_tolerances import COMPARISON_ADAM_EPS, COMPARISON_PARAM_TOL
from dist_utils import run_distributed

MICRO, SEQ, STEPS, LR = 2, 16, 3, 1e-2
FP16_SCALE = ("--initial-loss-scale", "256")  # no overflow in the tiny model: every step is taken


def _resolve(*extra, world_size=1, micro_batches=1):
    from megaphi.training.arguments import parse_args
    from megaphi.training.deepspeed_config import resolve_deepspeed

    argv = ["--model", "tiny", "--micro-batch-size", str(MICRO), "--lr", str(LR), "--train-iters", "4"]
    argv += ["--global-batch-size", str(MICRO * world_size * micro_batches), "--mock-data", *extra]
    return resolve_deepspeed(parse_args(argv, world_size=world_size))


def _single_line(notes):
    assert len(notes) == 1 and "\n" not in notes[0], notes
    return notes[0]


def test_fp16_defaults_to_zero1_and_keeps_an_explicit_zero0():
    settings = _resolve("--fp16")
    assert settings.zero_stage == settings.config["zero_optimization"]["stage"] == 1
    assert (
        settings.zero_stage_source == "raised from 0 (default with 1 data-parallel rank(s)) for fp16's overflow check"
    )
    assert "host sync" in _single_line(settings.notes)
    explicit = _resolve("--fp16", "--zero-stage", "0")
    assert explicit.zero_stage == explicit.config["zero_optimization"]["stage"] == 0
    assert explicit.zero_stage_source == "--zero-stage"
    assert _single_line(explicit.notes).startswith("note: ZeRO 0 (--zero-stage) with fp16: ")
    assert _resolve("--fp16", world_size=2).zero_stage == 1  # several ranks: ZeRO 1 already
    fp32 = _resolve()
    assert (fp32.zero_stage, fp32.notes) == (0, ())  # fp32 at ZeRO 0 has no overflow check


def test_bf16_with_several_ranks_defaults_to_zero2(tmp_path):
    settings = _resolve("--bf16", world_size=2)
    assert settings.zero_stage == settings.config["zero_optimization"]["stage"] == 2
    assert settings.config["zero_optimization"]["overlap_comm"] is True
    assert settings.zero_stage_source.startswith("raised from 1 (default with 2 data-parallel rank(s)) for bf16")
    assert "while backward runs" in _single_line(settings.notes)
    # a stage the user chose stays: the flag, the JSON, Megatron's distributed optimizer (ZeRO 1)
    assert _resolve("--bf16", "--zero-stage", "1", world_size=2).zero_stage == 1
    assert _resolve("--bf16", "--use-distributed-optimizer", world_size=2).zero_stage == 1
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert _resolve("--bf16", "--deepspeed-config", str(path), world_size=2).zero_stage == 1
    # fp32 and fp16 keep ZeRO 1 (no BF16 optimizer there: DeepSpeed's ZeRO 1 optimizer already reduces in buckets)
    assert _resolve(world_size=2).zero_stage == 1


def test_bf16_zero2_on_one_rank_runs_as_zero1(tmp_path):
    settings = _resolve("--bf16", "--zero-stage", "2")
    assert settings.zero_stage == settings.config["zero_optimization"]["stage"] == 1
    assert settings.zero_stage_source == "lowered from 2 (--zero-stage) for bf16 on 1 data-parallel rank"
    assert "one-rank group" in _single_line(settings.notes)
    # offloading the optimizer is a reason for ZeRO 2 on one rank: kept
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert _resolve("--bf16", "--deepspeed-config", str(path)).zero_stage == 2
    # ZeRO 3 keeps its own checkpoint layout (and is how parameters are offloaded): kept, with a note
    zero3 = _resolve("--bf16", "--zero-stage", "3")
    assert zero3.zero_stage == 3 and _single_line(zero3.notes).startswith("note: ZeRO 3 (--zero-stage) ")
    assert _resolve("--bf16", "--zero-stage", "2", world_size=2).zero_stage == 2


def _model_config():
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


class _HostReads:
    """Counts Tensor.__bool__ / .item() calls: the places where a GPU run waits for the device."""

    def __enter__(self):
        self.count, self.saved = 0, (torch.Tensor.__bool__, torch.Tensor.item)

        def counted(original):
            def read(tensor, *args):
                self.count += 1
                return original(tensor, *args)

            return read

        torch.Tensor.__bool__, torch.Tensor.item = (counted(f) for f in self.saved)
        return self

    def __exit__(self, *exc):
        torch.Tensor.__bool__, torch.Tensor.item = self.saved


def _train(config, dp_rank, dp_size, adam_eps=1e-8, steps=STEPS):
    """`steps` optimizer steps on the data-parallel rank's share of the same global batches. Returns the initial weights,
    the engine's final bf16/fp16 weights, fp32 master weights, DeepSpeed's optimizer class, the host
    reads of the last optimizer step, AdamW's step count, the gradient elements all-reduced and those
    left on the parameters after each backward."""
    import deepspeed
    import deepspeed.comm as ds_comm
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import mpu
    from megaphi.parallel.random import model_parallel_seed
    from megaphi.training.engine import finish_engine_setup, skip_shm_comm_extension
    from megaphi.training.optimizer import build_optimizer

    skip_shm_comm_extension()
    torch.manual_seed(0)
    model_parallel_seed(1)  # the tensor-parallel layers' initialisation stream
    model = PhiForCausalLM(_model_config())
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, LR, 0.1, eps=adam_eps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, mpu=mpu, config=config, dist_init_required=False
    )
    finish_engine_setup(engine)
    accumulation = config["gradient_accumulation_steps"]
    reduced, all_reduce = [0], ds_comm.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        reduced[0] += tensor.numel()
        return all_reduce(tensor, *args, **kwargs)

    ds_comm.all_reduce = counting_all_reduce
    g = torch.Generator().manual_seed(5)
    lingering = []  # gradient elements still on the module's parameters after each backward
    try:
        for _ in range(steps * accumulation):
            rows = slice(dp_rank * MICRO, (dp_rank + 1) * MICRO)
            batch = torch.randint(0, 255, (MICRO * dp_size, SEQ + 1), generator=g)[rows]
            loss, _ = engine(batch[:, :-1], labels=batch[:, 1:])
            engine.backward(loss)
            lingering.append(sum(p.grad.numel() for p in engine.module.parameters() if p.grad is not None))
            with _HostReads() as reads:
                engine.step()
    finally:
        ds_comm.all_reduce = all_reduce
    params = dict(engine.module.named_parameters())
    return {
        "start": start,
        "weights": {n: p.detach().clone() for n, p in params.items()},
        "fp32": {n: _fp32_master(engine, p) for n, p in params.items()},
        "optimizer": type(engine.optimizer).__name__,
        "adam_steps": max(int(state["step"]) for state in engine.basic_optimizer.state.values()),
        "step_host_reads": reads.count,
        "reduced": reduced[0],
        "lingering": lingering,
        "parameters": len(params),
        "numel": sum(p.numel() for p in params.values()),
    }


def _fp32_master(engine, param):
    """The optimizer's fp32 copy of a parameter (DeepSpeed's accessor, or FP16_UnfusedOptimizer's lists)."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is None:
        opt = engine.optimizer
        pairs = zip((p for g in opt.fp16_groups for p in g), (p for g in opt.fp32_groups for p in g))
        master = next(fp32 for low, fp32 in pairs if low is param)
    return master.detach().clone()


def _worker(rank, world, runs, out_path, tensor_parallel=1):
    from deepspeed.accelerator import get_accelerator
    from megaphi.parallel import destroy_model_parallel, get_data_parallel_rank, get_data_parallel_world_size
    from megaphi.parallel import initialize_model_parallel

    # DeepSpeed refuses fp16 on CPUs without mkldnn fp16 (as tests/training/test_train_zero.py does): the
    # optimizer DeepSpeed picks and its overflow check do not depend on the device
    type(get_accelerator()).is_fp16_supported = lambda self: True
    initialize_model_parallel(tensor_parallel)
    dp_rank, dp_size = get_data_parallel_rank(), get_data_parallel_world_size()
    results = {name: _train(config, dp_rank, dp_size, **kwargs) for name, (config, kwargs) in runs.items()}
    destroy_model_parallel()
    if rank < tensor_parallel:  # each tensor-parallel shard once
        torch.save(results, f"{out_path}.{rank}" if tensor_parallel > 1 else out_path)


def _config(*extra, world_size=1, micro_batches=1):
    return _resolve(*extra, world_size=world_size, micro_batches=micro_batches).config


def test_engines_on_one_rank(tmp_path):
    runs = {
        "fp16 default": (_config("--fp16", *FP16_SCALE), {}),
        "fp16 zero0": (_config("--fp16", "--zero-stage", "0", *FP16_SCALE), {}),
        "bf16 zero2": (_config("--bf16", "--zero-stage", "2", "--clip-grad", "0"), {}),
        "bf16 plain zero2": (_config("--bf16", "--clip-grad", "0") | {"zero_optimization": {"stage": 2}}, {}),
    }
    out = tmp_path / "runs.pt"
    run_distributed(_worker, 1, runs, str(out))
    r = torch.load(out)
    # DeepSpeed's wrappers, as read in its engine.py (see zero_stage_for_precision)
    assert r["fp16 default"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert r["fp16 zero0"]["optimizer"] == "FP16_UnfusedOptimizer"
    # ZeRO 0's overflow check reads every parameter's flag on the host; ZeRO 1 reads a few scalars
    parameters = r["fp16 zero0"]["parameters"]
    assert r["fp16 zero0"]["step_host_reads"] >= parameters
    assert r["fp16 default"]["step_host_reads"] < parameters // 2  # measured: 6 reads vs 25 parameters
    # and the unfused optimizer steps AdamW once with zero gradients when it is built
    # (initialize_optimizer_states): an extra weight decay, and Adam's bias correction one step ahead
    assert (r["fp16 default"]["adam_steps"], r["fp16 zero0"]["adam_steps"]) == (STEPS, STEPS + 1)
    # bf16 --zero-stage 2 on one rank: the BF16 optimizer, no gradient all-reduce (only scalars),
    # and the same weights as DeepSpeed's ZeRO 2 (no clipping: the same additions in the same order)
    zero2_as_1, zero2 = r["bf16 zero2"], r["bf16 plain zero2"]
    assert (zero2_as_1["optimizer"], zero2["optimizer"]) == ("BF16_Optimizer", "DeepSpeedZeroOptimizer")
    assert zero2_as_1["reduced"] < zero2_as_1["numel"] <= zero2["reduced"] / STEPS
    for name, weight in zero2["fp32"].items():
        assert torch.equal(zero2_as_1["fp32"][name], weight), name
        assert torch.equal(zero2_as_1["weights"][name], zero2["weights"][name]), name
    for run in r.values():  # every run trained (no fp16 step skipped for overflow)
        assert max((run["fp32"][n] - w).abs().max().item() for n, w in run["start"].items()) > 1e-3


@pytest.mark.distributed
def test_bf16_zero2_default_trains_like_zero1_on_two_ranks(tmp_path):
    """2 gloo ranks. One micro-batch per step, no clipping: each gradient element is the halved sum of
    two bf16 values in fp32 under both stages (an exact halving and one commutative addition), so the
    weights are bitwise equal over STEPS steps. Two micro-batches and clipping: ZeRO 1 sums each
    rank's micro-batches and then the ranks, ZeRO 2 the ranks per micro-batch and then the
    micro-batches, and their clipping factors are rounded differently (clip / (norm + 1e-6) vs
    1 / ((norm + 1e-6) / clip)): fp32 rounding, bounded by COMPARISON_PARAM_TOL with Adam's eps at
    COMPARISON_ADAM_EPS. Over one step only: after it, a master weight that differs in its last bit
    can round to a neighbouring bf16 weight, and the next forward then differs by a bf16 ulp."""
    exact = _config("--bf16", "--clip-grad", "0", world_size=2)
    assert exact["zero_optimization"]["stage"] == 2
    accumulated = _config("--bf16", "--clip-grad", "1.0", world_size=2, micro_batches=2)
    runs = {}
    for name, config, kwargs in (
        ("exact", exact, {}),
        ("accumulated", accumulated, {"adam_eps": COMPARISON_ADAM_EPS, "steps": 1}),
    ):
        zero1 = json.loads(json.dumps(config))
        zero1["zero_optimization"]["stage"] = 1
        runs[f"{name} zero1"], runs[f"{name} zero2"] = (zero1, kwargs), (config, kwargs)
    out = tmp_path / "runs.pt"
    run_distributed(_worker, 2, runs, str(out))
    r = torch.load(out)
    assert r["exact zero1"]["optimizer"] == "BF16_Optimizer"
    assert r["exact zero2"]["optimizer"] == "DeepSpeedZeroOptimizer"
    # neither keeps bf16 gradients after backward (BF16 optimizer: immediate_grad_update; ZeRO 2: buckets)
    assert all(run["lingering"] == [0] * len(run["lingering"]) for run in r.values())
    for name, weight in r["exact zero1"]["weights"].items():
        assert torch.equal(r["exact zero2"]["weights"][name], weight), name
        assert torch.equal(r["exact zero2"]["fp32"][name], r["exact zero1"]["fp32"][name]), name
    worst = max(
        (r["accumulated zero2"]["fp32"][n] - w).abs().max().item() for n, w in r["accumulated zero1"]["fp32"].items()
    )
    assert worst <= COMPARISON_PARAM_TOL, worst
    for run in r.values():  # the runs did train: weights moved by ~lr, far above the bound
        assert (
            max((run["fp32"][n] - w).abs().max().item() for n, w in run["start"].items()) > 1e3 * COMPARISON_PARAM_TOL
        )


def _resume_worker(rank, world, zero1, zero2, folder, out_path):
    """Train 2 steps at ZeRO 1 (BF16 optimizer) and save; one more step there, and the same step from the
    checkpoint loaded under ZeRO 2 (and, for contrast, from a fresh ZeRO 2 engine)."""
    import deepspeed
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel, mpu
    from megaphi.training.engine import finish_engine_setup, skip_shm_comm_extension
    from megaphi.training.optimizer import build_optimizer

    skip_shm_comm_extension()
    initialize_model_parallel(1)

    def engine_for(config):
        torch.manual_seed(0)
        model = PhiForCausalLM(_model_config())
        optimizer = build_optimizer(model, LR, 0.1, eps=COMPARISON_ADAM_EPS)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, mpu=mpu, config=config, dist_init_required=False
        )
        finish_engine_setup(engine)
        return engine

    def step(engine, seed):
        g = torch.Generator().manual_seed(seed)
        batch = torch.randint(0, 255, (MICRO * world, SEQ + 1), generator=g)[rank * MICRO : (rank + 1) * MICRO]
        loss, _ = engine(batch[:, :-1], labels=batch[:, 1:])
        engine.backward(loss)
        engine.step()
        return {n: _fp32_master(engine, p) for n, p in engine.module.named_parameters()}

    first = engine_for(zero1)
    step(first, 1), step(first, 2)
    first.save_checkpoint(folder, tag="saved")
    results = {"continued": step(first, 3), "optimizer": type(first.optimizer).__name__}
    resumed = engine_for(zero2)
    resumed.load_checkpoint(folder, tag="saved")
    results["resumed"], results["resumed optimizer"] = step(resumed, 3), type(resumed.optimizer).__name__
    results["fresh"] = step(engine_for(zero2), 3)
    destroy_model_parallel()
    if rank == 0:
        torch.save(results, out_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_zero1_checkpoint_resumes_under_the_zero2_default(tmp_path):
    """A bf16 run saved at the former default (ZeRO 1 with several ranks) resumes under the new one."""
    zero2 = _config("--bf16", world_size=2)
    zero1 = json.loads(json.dumps(zero2))
    zero1["zero_optimization"]["stage"] = 1
    out = tmp_path / "runs.pt"
    run_distributed(_resume_worker, 2, zero1, zero2, str(tmp_path / "ckpt"), str(out))
    r = torch.load(out)
    assert (r["optimizer"], r["resumed optimizer"]) == ("BF16_Optimizer", "DeepSpeedZeroOptimizer")
    worst = max((r["resumed"][n] - w).abs().max().item() for n, w in r["continued"].items())
    assert worst <= COMPARISON_PARAM_TOL, worst  # the step's fp32 rounding only (clipping, see above)
    apart = max((r["fresh"][n] - w).abs().max().item() for n, w in r["continued"].items())
    assert apart > 1e3 * COMPARISON_PARAM_TOL  # without the checkpoint: two steps' worth apart


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_zero2_default_with_tensor_parallel(tmp_path):
    """TP 2 x DP 2 (4 gloo ranks): the ZeRO 2 default trains bitwise like ZeRO 1 (one micro-batch per
    step, no clipping, as in the two-rank test) on both tensor-parallel shards."""
    zero2 = _config("--bf16", "--clip-grad", "0", "--tensor-model-parallel-size", "2", world_size=4)
    assert zero2["zero_optimization"]["stage"] == 2
    zero1 = json.loads(json.dumps(zero2))
    zero1["zero_optimization"]["stage"] = 1
    out = tmp_path / "runs.pt"
    run_distributed(_worker, 4, {"zero1": (zero1, {}), "zero2": (zero2, {})}, str(out), 2)
    for shard in (0, 1):
        r = torch.load(f"{out}.{shard}")
        assert (r["zero1"]["optimizer"], r["zero2"]["optimizer"]) == ("BF16_Optimizer", "DeepSpeedZeroOptimizer")
        for name, weight in r["zero1"]["weights"].items():
            assert torch.equal(r["zero2"]["weights"][name], weight), (shard, name)
        assert max((r["zero2"]["fp32"][n] - w).abs().max().item() for n, w in r["zero2"]["start"].items()) > 1e-3
