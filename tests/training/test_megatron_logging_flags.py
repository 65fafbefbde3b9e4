"""Megatron's logging flags doing what they do in Megatron-LM: --log-num-zeros-in-grad (the zero entries
of each step's gradient, summed over TP and over the ZeRO partitions) and --tensorboard-log-interval N
(TensorBoard scalars every N iterations, that iteration's loss, whatever --log-interval is).

The zero count's golden value needs no reference implementation: an embedding row gets a gradient only
from the tokens that use it, so with input tokens drawn from the first K of V rows, the step's gradient
has (V - distinct input tokens of the global batch) x hidden zeros, and in fp32 no other: the models
rotate all of each head (rotary dim = head dim), because on a dimension rotary leaves alone the key
bias shifts every score of a query equally, which softmax ignores: its gradient is 0 up to rounding,
and sometimes exactly. A second golden value is numpy's count over DeepSpeed's own assembly of the
whole gradients (deepspeed.utils.safe_get_full_grad)."""

import json
import os

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from test_resume import read_metrics, run_pretrain

VOCAB, HIDDEN, SEQ, MICRO, ACCUMULATION, STEPS = 256, 64, 16, 2, 2, 3


def _batch(step, micro, dp_rank):
    """The micro-batch a data-parallel rank trains on: tokens from the first 20 + 10 * step ids only."""
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + dp_rank)
    return torch.randint(0, 20 + 10 * step, (MICRO, SEQ + 1), generator=g)


def expected_zeros(step, dp_size):
    seen = set()
    for dp_rank in range(dp_size):
        for micro in range(ACCUMULATION):
            seen |= set(_batch(step, micro, dp_rank)[:, :-1].flatten().tolist())  # inputs, not labels
    return (VOCAB - len(seen)) * HIDDEN


def _count_zeros_per_step(flags, dp_size):
    import deepspeed

    from megaphi.model import PhiForCausalLM, get_preset
    from megaphi.parallel import get_data_parallel_rank, mpu
    from megaphi.training.arguments import parse_args
    from megaphi.training.deepspeed_config import build_deepspeed_config
    from megaphi.training.engine import finish_engine_setup
    from megaphi.training.optimizer import build_optimizer

    argv = ["--model", "tiny", "--mock-data", "--lr", "1e-2", "--train-iters", "10", *flags]
    world = int(os.environ["WORLD_SIZE"])
    argv += ["--micro-batch-size", str(MICRO), "--global-batch-size", str(MICRO * ACCUMULATION * dp_size)]
    argv += ["--tensor-model-parallel-size", str(world // dp_size)]
    config = build_deepspeed_config(parse_args(argv, world_size=world))
    torch.manual_seed(0)
    model = PhiForCausalLM(
        get_preset(
            "tiny",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_attention_heads=2,
            rotary_dim=32,  # all of each 32-wide head
            max_position_embeddings=64,
        )
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, 1e-2, 0.1), mpu=mpu, config=config, dist_init_required=False
    )
    recorder = finish_engine_setup(engine, count_zeros=True)
    assert recorder.latest_zeros() is None  # before the first step
    counts, full_gradient_zeros = [], []
    for step in range(STEPS):
        for micro in range(ACCUMULATION):
            batch = _batch(step, micro, get_data_parallel_rank())
            loss, _ = engine(batch[:, :-1], labels=batch[:, 1:])
            engine.backward(loss)
            if micro == ACCUMULATION - 1:  # reduced, before the step: DeepSpeed's own whole gradients
                full_gradient_zeros.append(_zeros_in_full_gradients(engine.module))
            engine.step()
        counts.append(int(recorder.latest_zeros()))
    return {"counts": counts, "full": full_gradient_zeros, "optimizer": type(engine.optimizer).__name__}


def _zeros_in_full_gradients(module):
    """Zeros on this rank (replicated parameters on TP rank 0 only) of the whole gradients DeepSpeed's
    public safe_get_full_grad assembles from its partitions, counted by numpy."""
    from deepspeed.utils import safe_get_full_grad

    from megaphi.parallel import get_tensor_model_parallel_rank

    zeros = 0
    for param in module.parameters():
        grad = safe_get_full_grad(param)  # collective under ZeRO: every rank calls it for every parameter
        if get_tensor_model_parallel_rank() == 0 or getattr(param, "tensor_model_parallel", False):
            zeros += int((grad.detach().float().numpy() == 0).sum())
    return zeros


def _worker(rank, world, tp, cases, out_path):
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(tp)
    results = {name: _count_zeros_per_step(flags, world // tp) for name, flags in cases}
    destroy_model_parallel()
    torch.save(results, f"{out_path}.{rank}")


def _run(tmp_path, world, tp, cases):
    out = str(tmp_path / "zeros")
    run_distributed(_worker, world, tp, cases, out)
    return [torch.load(f"{out}.{rank}") for rank in range(world)]


ONE_RANK_CASES = (
    ("ZeRO 0 fp32", ["--zero-stage", "0"]),
    ("ZeRO 1 fp32", ["--zero-stage", "1"]),
    ("ZeRO 2 fp32", ["--zero-stage", "2"]),
    ("bf16 (ZeRO 1)", ["--bf16"]),
    ("bf16 ZeRO 2", ["--bf16", "--zero-stage", "2"]),
)


def test_num_zeros_is_the_unused_embedding_rows_under_every_zero_stage(tmp_path):
    (results,) = _run(tmp_path, 1, 1, ONE_RANK_CASES)
    golden = [expected_zeros(step, 1) for step in range(STEPS)]
    assert len(set(golden)) == STEPS  # the steps differ, so a stale or constant count fails
    # the paths counted: module gradients, ZeRO's partitions, the BF16 optimizer's fp32 buffers
    assert {r["optimizer"] for r in results.values()} >= {"AdamW", "DeepSpeedZeroOptimizer", "BF16_Optimizer"}
    for name, result in results.items():
        assert result["counts"] == result["full"], name
        if "bf16" in name:  # bf16 arithmetic also cancels a few sums to exactly 0
            assert all(0 <= count - want < 100 for count, want in zip(result["counts"], golden)), name
        else:
            assert result["counts"] == golden, name


@pytest.mark.distributed
@pytest.mark.slow
def test_num_zeros_sums_the_zero_partitions_over_data_parallel(tmp_path):
    cases = (ONE_RANK_CASES[0], ONE_RANK_CASES[1], ONE_RANK_CASES[2], ONE_RANK_CASES[3])
    ranks = _run(tmp_path, 2, 1, cases)
    golden = [expected_zeros(step, 2) for step in range(STEPS)]
    for name, _ in cases:
        full = ranks[0][name]["full"]  # every data-parallel rank sees the whole reduced gradient
        assert [r[name]["counts"] for r in ranks] == [full, full] and [r[name]["full"] for r in ranks] == [full, full]
        assert full == golden or "bf16" in name, name


@pytest.mark.distributed
@pytest.mark.slow
def test_num_zeros_sums_over_tensor_parallel_ranks(tmp_path):
    cases = (ONE_RANK_CASES[0], ONE_RANK_CASES[1])
    ranks = _run(tmp_path, 2, 2, cases)
    golden = [expected_zeros(step, 1) for step in range(STEPS)]  # the vocabulary rows split over TP, counted once
    for name, _ in cases:
        full = [a + b for a, b in zip(ranks[0][name]["full"], ranks[1][name]["full"])]  # summed over TP
        assert full == golden, name
        assert [r[name]["counts"] for r in ranks] == [golden, golden], name


# ----------------------------------------------------------------------------- whole runs
CYCLE = 20  # every training sample holds the ids 0..CYCLE-1 (and no other)


def _cycle_token_file(prefix):
    from megaphi.data import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(40):
        builder.add_document((np.arange(200) % CYCLE).astype(np.uint16))
    builder.finalize(prefix + ".idx")
    return prefix


def _flags(tmp_path, run, *extra):
    return [
        "--model", "tiny", "--num-layers", "2", "--hidden-size", str(HIDDEN), "--ffn-hidden-size", "128",
        "--num-attention-heads", "2", "--rotary-dim", "32", "--seq-length", "32", "--vocab-size", str(VOCAB),
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8", "--lr", "1e-3",
        "--data-path", _cycle_token_file(str(tmp_path / "cycle")), "--split", "100,0,0",
        "--log-dir", str(tmp_path / run), "--tensorboard-dir", str(tmp_path / run / "tb"), *extra,
    ]  # fmt: skip


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 8-iteration runs of the same data and seed: one logging every iteration (the golden per-iteration
    losses), one with --log-interval 3 --tensorboard-log-interval 2 --log-num-zeros-in-grad."""
    pytest.importorskip("tensorboard")
    tmp_path = tmp_path_factory.mktemp("megatron_logging")
    every = run_pretrain(_flags(tmp_path, "every", "--log-interval", "1"))
    sparse = run_pretrain(
        _flags(tmp_path, "sparse", "--log-interval", "3", "--tensorboard-log-interval", "2", "--log-num-zeros-in-grad")
    )
    return tmp_path, every, sparse


def test_num_zeros_in_the_log_line_metrics_and_tensorboard(runs):
    tmp_path, every, sparse = runs
    golden = (VOCAB - CYCLE) * HIDDEN  # 236 embedding rows never used
    lines = [line for line in sparse.stdout.splitlines() if line.startswith("iteration")]
    assert len(lines) == 4 and all(f"| num zeros: {golden} |" in line for line in lines), lines
    records = [r for r in read_metrics(tmp_path / "sparse") if "loss" in r]
    assert [r["num_zeros"] for r in records] == [golden] * 4
    assert _scalars(tmp_path / "sparse" / "tb", "num-zeros") == {2: golden, 4: golden, 6: golden, 8: golden}
    assert "num zeros" not in every.stdout and "num_zeros" not in json.dumps(read_metrics(tmp_path / "every"))


def test_tensorboard_log_interval_writes_every_n_iterations_the_iterations_loss(runs):
    tmp_path, _, _ = runs
    per_iteration = {r["iteration"]: r["loss"] for r in read_metrics(tmp_path / "every") if "loss" in r}
    assert sorted(per_iteration) == list(range(1, 9))
    # no flag: TensorBoard follows the log lines (here every iteration)
    assert _scalars(tmp_path / "every" / "tb", "lm loss") == pytest.approx(per_iteration)
    # --log-interval 3 (and the first and last iteration) for stdout and metrics.jsonl ...
    sparse = [r for r in read_metrics(tmp_path / "sparse") if "loss" in r]
    assert [r["iteration"] for r in sparse] == [1, 3, 6, 8]
    assert sparse[1]["loss"] == pytest.approx(np.mean([per_iteration[i] for i in (2, 3)]))  # the interval's mean
    # ... and TensorBoard at every 2nd iteration, with that iteration's loss (2 and 4: between log lines)
    losses = _scalars(tmp_path / "sparse" / "tb", "lm loss")
    assert losses == pytest.approx({i: per_iteration[i] for i in (2, 4, 6, 8)})
    assert sorted(_scalars(tmp_path / "sparse" / "tb", "learning-rate")) == [2, 4, 6, 8]
    assert sorted(_scalars(tmp_path / "sparse" / "tb", "iteration-time")) == [6, 8]  # timings: log lines only


def test_flag_checks():
    from megaphi.training.arguments import ArgumentError, parse_args

    base = ["--model", "tiny", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "4", "--mock-data"]
    with pytest.raises(ArgumentError, match="--tensorboard-log-interval must be >= 1, got 0"):
        parse_args([*base, "--tensorboard-log-interval", "0"], world_size=1)
    with pytest.raises(ArgumentError, match="--log-num-zeros-in-grad: ZeRO 3"):
        parse_args([*base, "--log-num-zeros-in-grad", "--zero-stage", "3"], world_size=1)
    with pytest.raises(ArgumentError, match="--no-save-optim: ZeRO 3 keeps the weights partitioned"):
        parse_args([*base, "--no-save-optim", "--zero-stage", "3"], world_size=1)
    args = parse_args(
        [*base, "--log-num-zeros-in-grad", "--tensorboard-log-interval", "5", "--no-save-optim"], world_size=1
    )
    assert args.flag_notes == []  # they do what they say: no note
    assert parse_args([*base, "--timing-log-level", "2"], world_size=1).flag_notes[0].startswith("--timing-log-level")


# ----------------------------------------------------------------------------- --no-save-optim
@pytest.mark.parametrize(
    "zero_stage, precision",
    [("1", []), pytest.param("0", [], marks=pytest.mark.slow), pytest.param("1", ["--bf16"], marks=pytest.mark.slow)],
    ids=["zero1", "zero0", "bf16-zero1"],
)
def test_no_save_optim_checkpoints_resume_with_no_load_optim(tmp_path, zero_stage, precision):
    """A --no-save-optim checkpoint holds no optimizer state; resuming it asks for --no-load-optim (as
    Megatron does), and then trains exactly as a full checkpoint resumed with --no-load-optim does."""
    from test_resume import make_token_file, tiny_flags

    prefix = make_token_file(str(tmp_path / "toy"))
    flags = tiny_flags(prefix, 4) + ["--zero-stage", zero_stage, *precision]
    full, weights = str(tmp_path / "full"), str(tmp_path / "weights")
    run_pretrain(flags + ["--save", full, "--exit-interval", "2"])
    run_pretrain(flags + ["--save", weights, "--exit-interval", "2", "--no-save-optim"])

    def listing(folder):
        return sorted(os.listdir(os.path.join(folder, "iter_0000002")))

    optimizer_files = [name for name in listing(full) if "optim" in name]
    assert zero_stage == "0" or optimizer_files  # ZeRO's per-rank optimizer files
    assert set(listing(weights)) == set(listing(full)) - set(optimizer_files)
    states = torch.load(os.path.join(weights, "iter_0000002", "mp_rank_00_model_states.pt"), weights_only=False)
    assert states["optimizer"] is None and states["global_steps"] == 2 and states["megaphi"]["iteration"] == 2

    refused = run_pretrain(flags + ["--load", weights], check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert (
        f"{weights}/iter_0000002 was saved with --no-save-optim (no optimizer state): resume it with --no-load-optim"
        in refused.stderr
    )

    for folder in (full, weights):
        proc = run_pretrain(flags + ["--load", folder, "--save", folder, "--no-load-optim"])
        assert f"resumed from {folder}/iter_0000002 at iteration 2" in proc.stdout
    a, b = ([r for r in read_metrics(folder) if "loss" in r] for folder in (full, weights))
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]  # bit for bit
    assert len({r["loss"] for r in b}) == 4
