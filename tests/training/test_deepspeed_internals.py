"""The DeepSpeed internals megaphi relies on, and the DeepSpeed versions it supports.

megaphi wraps DeepSpeed through its public API except in a few places, all in
megaphi/training/engine.py (and no other module of the package names them):
- engine.clip_fp32_gradients() is what DeepSpeed's engine._take_model_step(lr_kwargs) calls to clip
  fp32 gradients without ZeRO/fp16/bf16; megaphi's GradNormRecorder replaces it to keep the grad norm
  it computes, and wraps _take_model_step to compute a norm when nothing clips;
- engine.enable_backward_allreduce = False skips the gradient all-reduce on one data-parallel rank
  at ZeRO 0 and with bf16's BF16_Optimizer (it would only copy the gradients through buckets); the
  BF16_Optimizer must accumulate its fp32 gradients before the engine reads the flag, and its
  bf16.immediate_grad_update config key frees each bf16 gradient once accumulated
  (tests/training/test_bf16_one_rank_reduction.py checks both behaviours end to end);
- the fp16 optimizers' current loss scale is read as optimizer.cur_scale or optimizer.loss_scale;
- engine.basic_optimizer is the optimizer megaphi passed (named in the start-up line);
- deepspeed.comm.torch.build_shm_op is replaced (pinned by tests/project/test_fresh_checkout.py).
A DeepSpeed that renames or reroutes any of these makes megaphi log no grad norm, all-reduce for
nothing or log a NaN loss scale, silently: these tests fail instead. pyproject.toml pins the range they
were run on.
"""

import json
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]


def _deepspeed_requirement():
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"deepspeed([^"]*)"', text)
    assert match, "pyproject.toml names no deepspeed requirement"
    return SpecifierSet(match.group(1))


def test_setup_pins_a_range_that_holds_the_installed_deepspeed():
    spec = _deepspeed_requirement()
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"deepspeed{spec} has no upper bound"
    assert any(s.operator in (">", ">=", "==", "~=") for s in spec), f"deepspeed{spec} has no lower bound"
    installed = Version(metadata.version("deepspeed"))
    assert installed in spec, f"deepspeed {installed} is installed, pyproject.toml supports deepspeed{spec}"
    # the GPU check carries the same version it was tested with
    carried = re.search(r"DEEPSPEED_VERSION:-([\d.]+)", (REPO / "tools" / "prepare_gpu_wheels.sh").read_text())
    assert carried and Version(carried.group(1)) in spec


def test_fp16_optimizers_expose_the_loss_scale_megaphi_reads():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls in (FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        readable = [name for name in ("cur_scale", "loss_scale") if isinstance(getattr(cls, name, None), property)]
        assert readable, f"{cls.__name__} has neither a cur_scale nor a loss_scale property"


def test_bf16_optimizer_internals_megaphi_relies_on():
    import inspect

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    assert "immediate_grad_update" in DeepSpeedBF16Config.model_fields
    # finish_engine_setup turns the all-reduce off for this class; the fp32 accumulation must not
    # depend on it: in _backward_epilogue, the optimizer's epilogue runs before the flag is read
    epilogue = inspect.getsource(DeepSpeedEngine._backward_epilogue)
    assert "self.optimizer.backward_epilogue()" in epilogue and "self.enable_backward_allreduce" in epilogue
    assert epilogue.index("self.optimizer.backward_epilogue()") < epilogue.index("self.enable_backward_allreduce")
    assert hasattr(BF16_Optimizer, "get_grads_for_reduction")


def test_loss_scale_of_reads_a_property():
    from megaphi.training.engine import loss_scale_of

    class Optimizer:
        loss_scale = property(lambda self: 1024.0)

    class Engine:
        optimizer = Optimizer()

        def fp16_enabled(self):
            return True

    assert loss_scale_of(Engine()) == 1024.0


def _engine(clip, torch):
    import deepspeed
    from megaphi.parallel import mpu
    from megaphi.training.engine import finish_engine_setup

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 2**31 - 1,
        "timers": {"throughput": {"enabled": False}},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        mpu=mpu,
        config=config,
        dist_init_required=False,
    )
    return engine, finish_engine_setup(engine)


def _step(engine, torch):
    """One step; returns the gradient norm before clipping, computed here (independent of DeepSpeed)."""
    x = torch.linspace(-1, 1, 16).view(2, 8)
    loss = engine(x).pow(2).sum() * 10  # large enough that a clip at 0.5 acts
    engine.backward(loss)
    norm = _grad_norm(engine, torch)
    engine.step()
    return norm


def _grad_norm(engine, torch):
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in engine.module.parameters()])
    ).item()


def _worker(rank, world, out_path):
    import torch

    from megaphi.parallel import initialize_model_parallel

    initialize_model_parallel(1)
    result = {}
    for clip in (0.5, 0.0):
        engine, grad_norms = _engine(clip, torch)
        calls = {"take_model_step": [], "clip": 0, "after": None}
        take_model_step, clip_fp32 = engine._take_model_step, engine.clip_fp32_gradients

        def counting_take(*args, **kwargs):
            calls["take_model_step"].append(len(args) + len(kwargs))
            return take_model_step(*args, **kwargs)

        def counting_clip():
            calls["clip"] += 1
            clip_fp32()
            calls["after"] = _grad_norm(engine, torch)  # the norm the optimizer step sees

        engine._take_model_step, engine.clip_fp32_gradients = counting_take, counting_clip
        norm = _step(engine, torch)
        result[f"clip{clip}"] = {
            "norm": norm,
            "recorded": float(grad_norms.latest()),
            "after": calls["after"],
            "take_model_step": calls["take_model_step"],
            "clip_calls": calls["clip"],
            "reported": engine.get_global_grad_norm(),
            "skipped": engine.skipped_steps,
        }

    engine, _ = _engine(1.0, torch)
    result["backward_allreduce_flag"] = engine.enable_backward_allreduce
    for flag in (False, True):
        engine.enable_backward_allreduce = flag
        allreduces = []
        engine.allreduce_gradients = lambda *a, **k: allreduces.append(1)
        engine.backward(engine(torch.ones(2, 8)).sum())
        engine.step()
        result[f"allreduces_{flag}"] = len(allreduces)
    Path(out_path).write_text(json.dumps(result))


def test_engine_hooks_megaphi_replaces_are_still_called(tmp_path):
    out = tmp_path / "result.json"
    run_distributed(_worker, 1, str(out))
    r = json.loads(out.read_text())
    clipped, unclipped = r["clip0.5"], r["clip0.0"]
    # _take_model_step(lr_kwargs) runs once per step and calls clip_fp32_gradients once when clipping
    assert clipped["take_model_step"] == [1] and clipped["clip_calls"] == 1
    assert unclipped["take_model_step"] == [1] and unclipped["clip_calls"] == 0
    # megaphi's replacement kept the norm before clipping, and the clip itself still happened
    assert clipped["norm"] > 0.5 and clipped["recorded"] == pytest.approx(clipped["norm"], rel=1e-5)
    assert clipped["after"] == pytest.approx(0.5, rel=1e-3)
    assert unclipped["recorded"] == pytest.approx(unclipped["norm"], rel=1e-5)
    assert unclipped["after"] is None
    assert clipped["skipped"] == 0
    # ZeRO 0, one data-parallel rank, fp32: megaphi turns the all-reduce off, and DeepSpeed obeys the flag
    assert r["backward_allreduce_flag"] is False
    assert r["allreduces_False"] == 0 and r["allreduces_True"] >= 1


def test_engine_internals_megaphi_wraps_still_exist():
    """The private engine members engine.py replaces or reads, and how DeepSpeed calls them."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    assert list(inspect.signature(DeepSpeedEngine._take_model_step).parameters)[:2] == ["self", "lr_kwargs"]
    assert callable(getattr(DeepSpeedEngine, "clip_fp32_gradients", None))
    take_step = inspect.getsource(DeepSpeedEngine._take_model_step)
    assert "self.clip_fp32_gradients()" in take_step  # the replaced method is what the step calls
    init = inspect.getsource(DeepSpeedEngine.__init__)
    assert "self.enable_backward_allreduce" in init and "self.skipped_steps" in init
    assert "self.basic_optimizer" in inspect.getsource(DeepSpeedEngine._configure_optimizer)
    assert callable(getattr(DeepSpeedEngine, "get_global_grad_norm", None))


def test_deepspeed_internals_are_named_only_in_the_engine_module():
    """Every use of a DeepSpeed internal lives in megaphi/training/engine.py (where this file pins it)."""
    internals = (
        "_take_model_step",
        "clip_fp32_gradients",
        "enable_backward_allreduce",
        "cur_scale",
        "basic_optimizer",
        "build_shm_op",
        "megaphi_grad_norm",
    )
    found = []
    for path in sorted((REPO / "megaphi").rglob("*.py")):
        if path == REPO / "megaphi" / "training" / "engine.py":
            continue
        text = path.read_text()
        found += [f"{path.relative_to(REPO)}: {name}" for name in internals if name in text]
    assert found == []
    engine_source = (REPO / "megaphi" / "training" / "engine.py").read_text()
    assert all(name in engine_source for name in internals if name != "megaphi_grad_norm")
