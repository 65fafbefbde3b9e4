"""`python -m megaphi.pretrain --pipeline-model-parallel-size P` against the PP=1 run of the same global
batch, end to end: flags, the Trainer's pipelined step and evaluation, checkpoints and the model folder.

What is bitwise and why. PP=1 runs PhiForCausalLM in DeepSpeed's engine (fp32, ZeRO 0); PP=2 runs the
same layers split over two processes, 1F1B backwards in micro-batch order (the order gradient
accumulation adds them in), 1/m applied at the loss (DeepSpeed divides by m: the same for m a power
of two) and AdamW per parameter. Without gradient clipping nothing differs but where the ops run, so
the per-iteration losses, the validation loss and the exported model folder are bitwise equal. With
clipping, the whole-model norm is summed per stage and then across stages (DeepSpeed sums it in one
pass), and TP / DP reorder float sums: those runs are compared with AdamW's eps raised to
COMPARISON_ADAM_EPS and the bound COMPARISON_PARAM_TOL (tests/comparison_tolerances.py derives both).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from comparison_tolerances import COMPARISON_ADAM_EPS, COMPARISON_PARAM_TOL
from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERS = 3
TINY = [
    "--model", "tiny", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--rotary-dim", "8", "--seq-length", "32", "--vocab-size", "256",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2", "--lr-warmup-iters", "1",
    "--lr-decay-iters", "10", "--mock-data", "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1",
    "--attention-dropout", "0", "--hidden-dropout", "0",  # PP equals PP=1 in law only with dropout (docs/pipeline.md)
]  # fmt: skip


def pretrain_command(save, ranks, *flags, train_iters=ITERS):
    """(argv, env) of megaphi.pretrain on `ranks` CPU processes (torchrun, gloo) saving into `save`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    launcher = [sys.executable, "-m", "megaphi.pretrain"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
        launcher += ["--master_port", str(free_port()), "-m", "megaphi.pretrain"]
    return launcher + [*TINY, "--train-iters", str(train_iters), "--save", str(save), *flags], env


def pretrain(save, ranks, *flags, train_iters=ITERS, timeout=420):
    """Run megaphi.pretrain (pretrain_command) to the end; its metrics records."""
    argv, env = pretrain_command(save, ranks, *flags, train_iters=train_iters)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"pretrain {flags} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return read_records(save)


def read_records(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stage_states(save, tag):
    return [
        torch.load(os.path.join(save, tag, f"pp_rank_0{p}_mp_rank_00_model_states.pt"), weights_only=False)
        for p in (0, 1)
    ]


def assert_same_stage_states(got, want):
    """Weights and AdamW state of every stage, bitwise."""
    for stage, (a, b) in enumerate(zip(got, want)):
        assert set(a["module"]) == set(b["module"])
        for name, tensor in b["module"].items():
            assert torch.equal(a["module"][name], tensor), (stage, name)
        for key, fields in b["optimizer"]["state"].items():
            for field, value in fields.items():
                assert torch.equal(a["optimizer"]["state"][key][field], value), (stage, key, field)
        assert a["lr_scheduler"] == b["lr_scheduler"]


def exported_weights(save, tag):
    from safetensors.torch import load_file

    return load_file(os.path.join(save, tag, "model", "model.safetensors"))


def train_losses(records):
    return [(r["iteration"], r["loss"]) for r in records if "loss" in r and "val_loss" not in r]


def val_losses(records):
    return [r["val_loss"] for r in records if "val_loss" in r]


def assert_same_run(records, weights, ref_records, ref_weights, bitwise, from_scratch=True):
    losses, ref_losses = train_losses(records), train_losses(ref_records)
    assert [i for i, _ in losses] == [i for i, _ in ref_losses] == list(range(1, len(ref_losses) + 1))
    assert val_losses(ref_records), "the reference run logged no validation loss"
    assert set(weights) == set(ref_weights)
    if bitwise:
        assert losses == ref_losses
        assert val_losses(records) == val_losses(ref_records)
        for name, tensor in ref_weights.items():
            assert torch.equal(weights[name], tensor), name
    else:
        for (_, got), (_, want) in zip(losses, ref_losses):
            assert abs(got - want) <= 1e-5, (got, want)
        for name, tensor in ref_weights.items():
            assert (weights[name] - tensor).abs().max().item() <= COMPARISON_PARAM_TOL, name
    if from_scratch:
        assert ref_losses[-1][1] < ref_losses[0][1], ref_losses  # the runs trained: a comparison with content


NO_CLIP = ("--clip-grad", "0", "--eval-interval", str(ITERS))


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pp2_ends_with_the_pp1_weights_bitwise(tmp_path, precision):
    """PP=2 (two processes) and PP=1 (one) on the same global batch, no clipping: the same
    per-iteration losses, validation loss and exported model folder, bit for bit. bf16: the stages'
    fp32 main weights and fp32 gradient accumulation do DeepSpeed's BF16_Optimizer's arithmetic."""
    flags = NO_CLIP + (("--bf16",) if precision == "bf16" else ())
    ref = pretrain(tmp_path / "pp1", 1, *flags)
    got = pretrain(tmp_path / "pp2", 2, *flags, "--pipeline-model-parallel-size", "2", "--log-params-norm")
    tag = f"iter_{ITERS:07d}"
    ref_weights, weights = exported_weights(tmp_path / "pp1", tag), exported_weights(tmp_path / "pp2", tag)
    assert_same_run(got, weights, ref, ref_weights, bitwise=True)
    norms = [r["params_norm"] for r in got if "params_norm" in r]  # the whole model's, summed over the stages
    ref_norm = torch.cat([t.double().flatten() for t in ref_weights.values()]).norm().item()
    assert len(norms) == ITERS and abs(norms[-1] - ref_norm) <= 1e-4 * ref_norm, (norms, ref_norm)
    stage_files = sorted(n for n in os.listdir(tmp_path / "pp2" / tag) if n.endswith("model_states.pt"))
    assert stage_files == ["pp_rank_00_mp_rank_00_model_states.pt", "pp_rank_01_mp_rank_00_model_states.pt"]


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_compiled_blocks_train_like_pp1_compiled(tmp_path):
    """--torch-compile on at PP=2: each stage compiles its decoder layers (the start-up line says so) and
    trains as the compiled PP=1 run does: the same first loss bit for bit (the same compiled layers on
    the same batch), later losses within the non-bitwise bound (the compiled graphs of a stage and of the
    whole model may fuse differently, and Adam amplifies the rounding)."""
    ref = pretrain(tmp_path / "pp1", 1, *NO_CLIP, "--torch-compile", "on")
    argv, env = pretrain_command(
        tmp_path / "pp2", 2, *NO_CLIP, "--torch-compile", "on", "--pipeline-model-parallel-size", "2"
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "blocks compiled (torch.compile)" in proc.stdout, proc.stdout[-3000:]
    got = read_records(tmp_path / "pp2")
    losses, ref_losses = train_losses(got), train_losses(ref)
    assert [i for i, _ in losses] == [i for i, _ in ref_losses] == list(range(1, ITERS + 1))
    assert losses[0] == ref_losses[0]
    for (_, a), (_, b) in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-3 * abs(b), (losses, ref_losses)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_interleaved_and_uneven_split_bitwise(tmp_path):
    """Interleaved 1F1B (2 chunks of 1 layer per rank) and an uneven 1,3 split: bitwise PP=1."""
    ref = pretrain(tmp_path / "pp1", 1, *NO_CLIP)
    tag = f"iter_{ITERS:07d}"
    ref_weights = exported_weights(tmp_path / "pp1", tag)
    for name, flags in {
        "interleaved": ("--num-layers-per-virtual-pipeline-stage", "1"),
        "uneven": ("--pipeline-layers-per-stage", "1,3"),
    }.items():
        got = pretrain(tmp_path / name, 2, *NO_CLIP, "--pipeline-model-parallel-size", "2", *flags)
        assert_same_run(got, exported_weights(tmp_path / name, tag), ref, ref_weights, bitwise=True)


CLIPPED = ("--clip-grad", "0.5", "--adam-eps", str(COMPARISON_ADAM_EPS), "--eval-interval", str(ITERS))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["PP=2 x DP=2", "PP=2 x DP=2 ZeRO-1", "PP=2 x TP=2", "PP=2 x TP=2 SP"])
def test_pp2_with_dp_or_tp_and_clipping_tracks_pp1(tmp_path, layout):
    """Four processes, gradient clipping active (0.5 is below these steps' norms): within the bound."""
    flags = {
        "PP=2 x DP=2": ("--zero-stage", "0"),
        "PP=2 x DP=2 ZeRO-1": ("--zero-stage", "1"),  # AdamW state sharded over each stage's 2 DP ranks
        "PP=2 x TP=2": ("--tensor-model-parallel-size", "2"),
        "PP=2 x TP=2 SP": ("--tensor-model-parallel-size", "2", "--sequence-parallel"),
    }[layout]
    ref = pretrain(tmp_path / "pp1", 1, *CLIPPED)
    assert all(r["grad_norm"] > 0.5 for r in ref if "grad_norm" in r), "clipping must be active"
    got = pretrain(tmp_path / "pp", 4, *CLIPPED, "--pipeline-model-parallel-size", "2", *flags)
    tag = f"iter_{ITERS:07d}"
    weights, ref_weights = exported_weights(tmp_path / "pp", tag), exported_weights(tmp_path / "pp1", tag)
    assert_same_run(got, weights, ref, ref_weights, bitwise=False)
    shards = sorted(n for n in os.listdir(tmp_path / "pp" / tag) if n.endswith("optim_states.pt"))
    if "ZeRO-1" in layout:  # each stage's AdamW state in 2 shards, one per data-parallel rank
        assert shards == [f"pp_rank_{p:02d}_mp_rank_00_dp_rank_{d:03d}_optim_states.pt" for p in (0, 1) for d in (0, 1)]
    else:
        assert shards == []
    for mine, theirs in zip((r for r in got if "grad_norm" in r), (r for r in ref if "grad_norm" in r)):
        assert abs(mine["grad_norm"] - theirs["grad_norm"]) <= 1e-5 * theirs["grad_norm"]


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_exit_and_resume_is_bit_exact(tmp_path):
    """With dropout: --exit-interval 2 stops both stages at iteration 2 (each saved its own file, one
    `latest`), and resuming ends bitwise where an uninterrupted run ends (weights, Adam state, losses)."""
    flags = ("--pipeline-model-parallel-size", "2", "--hidden-dropout", "0.1", "--attention-dropout", "0.1")
    full = pretrain(tmp_path / "full", 2, *flags, "--eval-interval", "2", train_iters=4)
    part = tmp_path / "part"
    pretrain(part, 2, *flags, "--eval-interval", "2", "--exit-interval", "2", train_iters=4)
    assert (part / "latest").read_text().split()[0] == "iter_0000002"
    assert sorted(n for n in os.listdir(part / "iter_0000002") if n.endswith("model_states.pt")) == [
        "pp_rank_00_mp_rank_00_model_states.pt",
        "pp_rank_01_mp_rank_00_model_states.pt",
    ]
    resumed = pretrain(part, 2, *flags, "--eval-interval", "2", "--load", str(part), train_iters=4)
    assert train_losses(resumed) == train_losses(full)  # the resumed run's log holds iterations 1-4
    assert val_losses(resumed)[-1] == val_losses(full)[-1]
    assert_same_stage_states(stage_states(part, "iter_0000004"), stage_states(tmp_path / "full", "iter_0000004"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks in /proc")
@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_kill_9_of_one_stage_then_resume_is_bit_exact(tmp_path):
    """The second stage's process is killed (SIGKILL) mid-run, saving every iteration: `latest` names a
    complete checkpoint of both stages, and the rerun ends bitwise where an uninterrupted run ends."""
    from test_rank_death import _rank_pids

    flags = ("--pipeline-model-parallel-size", "2", "--hidden-dropout", "0.1", "--save-interval", "1")
    iters = 6
    pretrain(tmp_path / "full", 2, *flags, train_iters=iters)
    killed = tmp_path / "killed"
    argv, env = pretrain_command(killed, 2, *flags, train_iters=iters)
    launcher = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics, deadline = killed / "metrics.jsonl", time.monotonic() + 300  # a hang guard, not a timing assertion
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.05)
        os.kill(_rank_pids(launcher.pid)[1], signal.SIGKILL)
        launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    tag = (killed / "latest").read_text().split()[0]
    assert tag != f"iter_{iters:07d}", "the run finished before the kill: nothing was tested"
    pretrain(killed, 2, *flags, "--load", str(killed), train_iters=iters)
    final = f"iter_{iters:07d}"
    assert_same_stage_states(stage_states(killed, final), stage_states(tmp_path / "full", final))


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_fp16_overflow_skips_the_step_on_every_stage(tmp_path):
    """fp16 with a loss scale of 2^40: every step's scaled gradients overflow; both stages skip all
    four steps together (no update, the lr schedule not advanced, the same halved loss scale), and
    the weights equal those of a run that never updated them (lr 0)."""
    flags = ("--pipeline-model-parallel-size", "2", "--fp16", "--hysteresis", "1", "--eval-interval", "4")
    records = pretrain(tmp_path / "skip", 2, *flags, "--initial-loss-scale", str(2**40), train_iters=4)
    logged = [r for r in records if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in logged] == [1, 2, 3, 4]
    assert [r["loss_scale"] for r in logged] == [2.0**39, 2.0**38, 2.0**37, 2.0**36]
    for stage in ("pp_rank_00", "pp_rank_01"):
        saved = torch.load(
            tmp_path / "skip" / "iter_0000004" / f"{stage}_mp_rank_00_model_states.pt", weights_only=False
        )
        assert saved["lr_scheduler"]["num_steps"] == 0 and saved["loss_scale"]["scale"] == 2.0**36, stage
    pretrain(tmp_path / "still", 2, *flags, "--lr", "0", "--min-lr", "0", train_iters=4)
    tag = "iter_0000004"
    skipped, still = exported_weights(tmp_path / "skip", tag), exported_weights(tmp_path / "still", tag)
    assert all(torch.equal(skipped[name], still[name]) for name in still)
    # the default scale 2^16: steps apply (an occasional overflow is skipped by both stages alike)
    trained = pretrain(tmp_path / "trains", 2, *flags, train_iters=4)
    skipped = [r["skipped_steps"] for r in trained if "skipped_steps" in r][-1]
    assert skipped < 4
    for stage in ("pp_rank_00", "pp_rank_01"):
        saved = torch.load(tmp_path / "trains" / tag / f"{stage}_mp_rank_00_model_states.pt", weights_only=False)
        assert saved["lr_scheduler"]["num_steps"] == saved["global_steps"] == 4 - skipped, stage


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_eval_only_and_finetune_from_a_pp1_model_folder(tmp_path):
    """--eval-only and --finetune at PP=2 read the PP=1 run's model folder: the same validation loss,
    and the finetuned run ends with the PP=1 finetuned weights, bitwise."""
    base = tmp_path / "base"
    pretrain(base, 1, *NO_CLIP)
    pp2 = ("--pipeline-model-parallel-size", "2")
    ref_eval = pretrain(tmp_path / "eval1", 1, "--eval-only", "--load", str(base))
    got_eval = pretrain(tmp_path / "eval2", 2, "--eval-only", "--load", str(base), *pp2)
    assert val_losses(got_eval) == val_losses(ref_eval) and len(val_losses(ref_eval)) == 1
    tuned = ("--finetune", "--load", str(base), *NO_CLIP)
    ref = pretrain(tmp_path / "ft1", 1, *tuned, train_iters=2)
    got = pretrain(tmp_path / "ft2", 2, *tuned, *pp2, train_iters=2)
    tag, weights = "iter_0000002", exported_weights(tmp_path / "ft2", "iter_0000002")
    ref_weights = exported_weights(tmp_path / "ft1", tag)
    assert_same_run(got, weights, ref, ref_weights, bitwise=True, from_scratch=False)
    start = exported_weights(base, f"iter_{ITERS:07d}")
    assert not all(torch.equal(start[name], weights[name]) for name in start)  # finetuning moved them


@pytest.mark.slow
@pytest.mark.distributed
def test_reshard_between_pipeline_and_tensor_layouts(tmp_path):
    """tools/convert_checkpoint.py reshard: (PP 2, TP 1) -> (1, 1) equals the PP=1 run's weights;
    (1, 1) -> (2, 1) equals the PP=2 run's stage files; (2, 1) -> (4, 2) -> (1, 1) gives them back. The
    resharded (1, 1) and (2, 1) checkpoints resume at PP=1 and PP=2 to the same weights, bitwise."""
    from megaphi.cli.convert_checkpoint import reshard

    pp1, pp2, tag = tmp_path / "pp1", tmp_path / "pp2", f"iter_{ITERS:07d}"
    pretrain(pp1, 1, *NO_CLIP)
    pretrain(pp2, 2, *NO_CLIP, "--pipeline-model-parallel-size", "2")

    def modules(save, files):
        return [torch.load(save / tag / f, weights_only=False)["module"] for f in files]

    def assert_equal(got, want):
        for a, b in zip(got, want, strict=True):
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)

    single, stages = ["mp_rank_00_model_states.pt"], [f"pp_rank_0{p}_mp_rank_00_model_states.pt" for p in (0, 1)]
    reshard(str(pp2), str(tmp_path / "to11"), 1, 1)
    assert_equal(modules(tmp_path / "to11", single), modules(pp1, single))
    reshard(str(pp1), str(tmp_path / "to21"), 1, 2)
    assert_equal(modules(tmp_path / "to21", stages), modules(pp2, stages))
    reshard(str(pp2), str(tmp_path / "to42"), 2, 4)
    assert len([n for n in os.listdir(tmp_path / "to42" / tag) if n.endswith("model_states.pt")]) == 8
    reshard(str(tmp_path / "to42"), str(tmp_path / "back"), 1, 1)
    assert_equal(modules(tmp_path / "back", single), modules(pp1, single))
    more = (*NO_CLIP, "--lr-decay-iters", str(ITERS), "--min-lr", "1e-3", "--override-opt_param-scheduler")
    pretrain(tmp_path / "to11", 1, *more, "--load", str(tmp_path / "to11"), train_iters=ITERS + 2)
    pp = ("--pipeline-model-parallel-size", "2")
    pretrain(tmp_path / "to21", 2, *more, *pp, "--load", str(tmp_path / "to21"), train_iters=ITERS + 2)
    end = f"iter_{ITERS + 2:07d}"
    a, b = exported_weights(tmp_path / "to11", end), exported_weights(tmp_path / "to21", end)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_stage_of_parameter_follows_the_split():
    from megaphi.checkpoint.pipeline_layout import stage_of_parameter

    def stage(name, **kw):
        return stage_of_parameter(name, 8, 2, **kw)

    assert stage("model.embed_tokens.weight") == 0 and stage("lm_head.weight") == 1
    assert [stage(f"model.layers.{i}.mlp.fc1.weight") for i in range(8)] == [0] * 4 + [1] * 4
    interleaved = [stage(f"model.layers.{i}.mlp.fc1.weight", num_chunks=2) for i in range(8)]
    assert interleaved == [0, 0, 1, 1, 0, 0, 1, 1]  # chunk c of rank r: virtual stage c * P + r
    uneven = [stage(f"model.layers.{i}.mlp.fc1.weight", layers_per_stage=[2, 6]) for i in range(8)]
    assert uneven == [0, 0] + [1] * 6 and stage("model.final_layernorm.weight", num_chunks=2) == 1


def _resolve(argv, world_size):
    from megaphi.training.arguments import parse_flags
    from megaphi.training.config import resolve_config

    return resolve_config(parse_flags([*TINY, "--train-iters", "2", *argv]), world_size)


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--pipeline-model-parallel-size", "2"], 3, "--pipeline-model-parallel-size 2 x --tensor-model-parallel-size 1 does not divide the world size 3"),
        (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
        (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], 2, "--zero-stage 2 does not compose with --pipeline-model-parallel-size 2"),
        (["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], 2, "use --zero-stage 0 or 1"),
        (["--pipeline-model-parallel-size", "2", "--pipeline-layers-per-stage", "1,2"], 2, "summing to --num-layers 4"),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2, "--num-layers-per-virtual-pipeline-stage 3"),
        (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs --pipeline-model-parallel-size > 1"),
        (["--pipeline-model-parallel-size", "2", "--eval-humaneval", "x", "--eval-humaneval-interval", "1"], 2, "--eval-humaneval is not supported with --pipeline-model-parallel-size 2"),
    ],
)  # fmt: skip
def test_pipeline_flag_errors_are_one_line(argv, world, message):
    from megaphi.training.argument_error import FlagError

    with pytest.raises(FlagError) as error:
        _resolve(argv, world)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_data_parallel_size_is_world_over_tp_times_pp():
    config = _resolve(["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 8)
    p = config.parallel
    assert (p.pipeline_model_parallel_size, p.tensor_model_parallel_size, p.data_parallel_size) == (2, 2, 2)
    assert config.training.gradient_accumulation_steps == 2  # 8 = micro 2 x DP 2 x 2
    interleaved = _resolve(["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2)
    assert interleaved.parallel.virtual_pipeline_stages == 2
