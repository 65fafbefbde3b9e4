"""A resume whose ZeRO stage is only a default takes the checkpoint's stage when the default keeps the
optimizer state in another layout (ZeRO 0 / 1-2 / 3), e.g. an fp16 checkpoint saved at the old default
ZeRO 0 resumed after fp16 moved to ZeRO 1. A stage the user gives is kept, and a conflict refused."""

import json
import os

import pytest

from test_resume import N, make_token_file, read_metrics, run_pretrain, tiny_flags

from megaphi.checkpoint import resume_checks
from megaphi.checkpoint.layout import CheckpointError

MOCK = ["--model", "tiny", "--mock-data", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "8"]


def _fake_checkpoint(folder, zero_stage, **extra):
    """A --load folder whose `latest` names a checkpoint saved at `zero_stage` (metadata only: what the
    run configuration is resolved from, before any file is verified)."""
    tag = "iter_0000004"
    os.makedirs(os.path.join(folder, tag))
    meta = {"iteration": 4, "consumed_samples": 16, "consumed_tokens": 0, "zero_stage": zero_stage, **extra}
    with open(os.path.join(folder, tag, "megaphi_meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(folder, "latest"), "w") as f:
        f.write(tag + "\n")
    return f"{folder}/{tag}"


def _resolve(*flags, world_size=1):
    from megaphi.training.arguments import parse_flags
    from megaphi.training.config import resolve_config

    argv = MOCK + ["--global-batch-size", str(2 * world_size), *flags]
    return resolve_config(parse_flags(argv), world_size=world_size)


def _adoption_lines(config):
    return [line for line in config.logging.messages if line.startswith("resuming at ZeRO stage")]


def test_fp16_resumes_a_zero0_checkpoint_at_zero0(tmp_path):
    where = _fake_checkpoint(str(tmp_path / "ck"), 0)
    fresh = _resolve("--fp16")
    assert fresh.parallel.zero_stage == 1  # the default this resume would otherwise get
    config = _resolve("--fp16", "--load", str(tmp_path / "ck"))
    p = config.parallel
    assert (p.zero_stage, p.deepspeed_config()["zero_optimization"]["stage"]) == (0, 0)
    assert p.zero_stage_source == f"from the checkpoint at --load {where}"
    (line,) = _adoption_lines(config)
    assert "\n" not in line and line.startswith(f"resuming at ZeRO stage 0, the stage of --load {where}: ")
    assert "ZeRO 1" in line  # names the default it replaces
    resume_checks.check_resume_setup(
        config.flag_namespace(), json.load(open(f"{where}/megaphi_meta.json")), config.phi_config(), 0, "x"
    )


def test_stage_given_or_not_allowed_is_kept(tmp_path):
    load = str(tmp_path / "ck")
    where = _fake_checkpoint(load, 0)
    meta = json.load(open(f"{where}/megaphi_meta.json")) | {"tag": "iter_0000004"}
    # a stage the user gives stays, and the resume check refuses the conflict in one line
    for flags in (["--zero-stage", "1"], ["--use-distributed-optimizer"]):
        config = _resolve("--fp16", "--load", load, *flags)
        assert config.parallel.zero_stage == 1 and not _adoption_lines(config)
        with pytest.raises(CheckpointError) as info:
            resume_checks.check_resume_setup(config.flag_namespace(), meta, config.phi_config(), 1, load)
        assert "\n" not in str(info.value)
        assert "saved with ZeRO stage 0, this run uses stage 1" in str(info.value)
        assert "or resume with --zero-stage 0" in str(info.value)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert _resolve("--fp16", "--load", load, "--deepspeed-config", str(ds)).parallel.zero_stage == 1
    # bf16 needs ZeRO >= 1 (fp32 gradient accumulation): the default stays, the refusal says why
    config = _resolve("--bf16", "--load", load)
    assert config.parallel.zero_stage == 1 and not _adoption_lines(config)
    with pytest.raises(CheckpointError, match=r"\(bf16 runs use ZeRO >= 1 for fp32 gradient accumulation\)"):
        resume_checks.check_resume_setup(config.flag_namespace(), meta, config.phi_config(), 1, load)
    # no optimizer state to load: nothing to adopt
    assert _resolve("--fp16", "--load", load, "--no-load-optim").parallel.zero_stage == 1


def test_pipeline_and_same_family_keep_the_default(tmp_path):
    zero3 = str(tmp_path / "zero3")
    _fake_checkpoint(zero3, 3, args={"pipeline_model_parallel_size": 2})
    # a pipeline composes with ZeRO 0/1 only: a ZeRO 3 checkpoint is not adopted (refused at the resume check)
    config = _resolve("--load", zero3, "--pipeline-model-parallel-size", "2", world_size=2)
    assert config.parallel.zero_stage == 0 and not _adoption_lines(config)
    # ZeRO 3 where it is allowed: adopted
    config = _resolve("--load", zero3)
    assert config.parallel.zero_stage == 3 and len(_adoption_lines(config)) == 1
    # ZeRO 1 and 2 keep the same optimizer state: bf16 on 2 ranks resumes a ZeRO 1 checkpoint at its default 2
    zero1 = str(tmp_path / "zero1")
    _fake_checkpoint(zero1, 1, args={"data_parallel_size": 2})
    config = _resolve("--bf16", "--load", zero1, world_size=2)
    assert config.parallel.zero_stage == 2 and not _adoption_lines(config)


def test_fresh_start_keeps_the_default(tmp_path):
    for load in (tmp_path / "empty", tmp_path / "missing"):
        if load.name == "empty":
            load.mkdir()
        config = _resolve("--fp16", "--load", str(load))
        assert config.parallel.zero_stage == 1 and not _adoption_lines(config)
        assert config.parallel.zero_stage_source.startswith("raised from 0 (default")


def test_resume_without_zero_stage_continues_bit_exact(tmp_path):
    """fp32 on one rank defaults to ZeRO 0 (fp16 is not run on CPU): a checkpoint saved at ZeRO 1 resumed
    without --zero-stage continues at ZeRO 1, bit for bit as the uninterrupted ZeRO 1 run."""
    prefix = make_token_file(str(tmp_path / "toy"))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_pretrain(tiny_flags(prefix, 2 * N) + ["--save", straight, "--zero-stage", "1"])
    run_pretrain(tiny_flags(prefix, 2 * N) + ["--save", split, "--zero-stage", "1", "--exit-interval", str(N)])
    resumed = run_pretrain(tiny_flags(prefix, 2 * N) + ["--save", split, "--load", split])
    where = f"--load {split}/iter_{N:07d}"
    assert f"resumed from {split}/iter_{N:07d} at iteration {N}" in resumed.stdout
    adopted = [line for line in resumed.stdout.splitlines() if line.startswith("resuming at ZeRO stage 1, ")]
    assert len(adopted) == 1 and where in adopted[0], resumed.stdout[-3000:]
    assert f"ZeRO stage 1 (from the checkpoint at {where})" in resumed.stdout

    a = [r for r in read_metrics(straight) if "loss" in r]
    b = [r for r in read_metrics(split) if "loss" in r]
    assert [r["iteration"] for r in b] == list(range(1, 2 * N + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "consumed_samples"):
            assert ra[key] == rb[key], (ra["iteration"], key, ra[key], rb[key])
    tag = f"iter_{2 * N:07d}"
    with (
        open(os.path.join(straight, tag, "model", "model.safetensors"), "rb") as fa,
        open(os.path.join(split, tag, "model", "model.safetensors"), "rb") as fb,
    ):
        assert fa.read() == fb.read()
    assert json.load(open(os.path.join(split, tag, "megaphi_meta.json")))["zero_stage"] == 1
