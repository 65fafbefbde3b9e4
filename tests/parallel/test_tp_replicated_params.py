"""TP ranks must keep replicated parameters (LayerNorm weights, row-parallel biases) bitwise equal: their
residual dropout is drawn from the default stream, which only stays in step while no rank draws alone.

- start-up probes leave every generator as they found it, for every attention backend;
- a real TP=2 training run with dropout ends with bitwise-equal replicated tensors in the two ranks'
  checkpoints, for every attention backend that runs on CPU, with and without sequence parallel (the
  comparison reads the checkpoints itself; it does not trust the trainer's own check);
- the guard (check_replicated_parameters, --check-replicated-params) names the first tensor that differs.
"""

import os
import subprocess
import sys

import pytest
import torch
from dist_utils import free_port, run_distributed

from megaphi.config import get_preset
from megaphi.model.attention import ATTENTION_BACKENDS
from megaphi.parallel.consistency import bitwise_checksum

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_start_up_probes_do_not_move_the_rng(backend):
    from megaphi.training.arguments import ArgumentError
    from megaphi.training.run_info import attention_backend

    config = get_preset("tiny", attention_dropout=0.1)
    before = torch.get_rng_state()
    try:
        attention_backend(torch.device("cpu"), torch.float32, config, 32, forced=backend)
    except ArgumentError:
        pass  # a backend that cannot run here is refused; the generator must be untouched all the same
    assert torch.equal(torch.get_rng_state(), before)


def test_checksum_sees_one_ulp_and_a_swap():
    x = torch.randn(1000)
    y = x.clone()
    y[17] = torch.nextafter(y[17], torch.tensor(float("inf")))
    assert not torch.equal(bitwise_checksum(x), bitwise_checksum(y))
    swapped = x.clone()
    swapped[[3, 4]] = x[[4, 3]]
    assert not torch.equal(bitwise_checksum(x), bitwise_checksum(swapped))
    assert torch.equal(bitwise_checksum(x), bitwise_checksum(x.clone()))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert bitwise_checksum(x.to(dtype)).shape == (2,)


def _guard_worker(rank, world, case):
    import torch.distributed as dist

    from megaphi.parallel.consistency import ReplicatedParameterMismatch, check_replicated_parameters
    from megaphi.parallel.utils import set_tensor_model_parallel_attributes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    set_tensor_model_parallel_attributes(model[1].weight, True, 0, 1)  # sharded: may differ per rank
    with torch.no_grad():
        model[1].weight.add_(rank)
        if case == "bias" and rank == 1:
            model[1].bias[5] = torch.nextafter(model[1].bias[5], torch.tensor(float("inf")))
    group = dist.new_group(list(range(world)))
    if case == "equal":
        check_replicated_parameters(model, group)
        return
    with pytest.raises(ReplicatedParameterMismatch) as err:
        check_replicated_parameters(model, group, " at iteration 3")
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "replicated parameter 1.bias differs between tensor-parallel ranks 0 and 1 at iteration 3 (max |difference| "
    )


@pytest.mark.parametrize("case", ["equal", "bias"])
@pytest.mark.distributed
def test_guard_names_the_first_tensor_that_differs(case):
    run_distributed(_guard_worker, 2, case)


# The replicated tensors of the tiny model below: LayerNorms and row-parallel biases.
REPLICATED = ("input_layernorm", "final_layernorm", "dense.bias", "fc2.bias")


def _train_tp2(tmp_path, backend, sequence_parallel, iters=4):
    save = str(tmp_path / "ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "megaphi.pretrain",
        "--model",
        "tiny",
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--ffn-hidden-size",
        "128",
        "--num-attention-heads",
        "4",
        "--rotary-dim",
        "8",
        "--seq-length",
        "32",
        "--vocab-size",
        "256",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--train-iters",
        str(iters),
        "--lr",
        "1e-2",
        "--mock-data",
        "--tensor-model-parallel-size",
        "2",
        "--hidden-dropout",
        "0.1",
        "--attention-dropout",
        "0.1",
        "--embedding-dropout",
        "0.1",
        "--attention-backend",
        backend,
        "--save",
        save,
        "--save-interval",
        str(iters),
        "--eval-iters",
        "0",
        "--no-export-model",
        *(["--sequence-parallel"] if sequence_parallel else []),
    ]
    run = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    tag = open(os.path.join(save, "latest")).read().strip()
    return [
        torch.load(os.path.join(save, tag, f"mp_rank_0{r}_model_states.pt"), map_location="cpu", weights_only=False)[
            "module"
        ]
        for r in range(2)
    ]


@pytest.mark.parametrize(
    "backend,sequence_parallel", [("math", False), ("math", True), ("auto", False), ("auto", True)]
)
@pytest.mark.distributed
def test_tp2_training_with_dropout_keeps_replicated_tensors_bitwise_equal(tmp_path, backend, sequence_parallel):
    rank0, rank1 = _train_tp2(tmp_path, backend, sequence_parallel)
    replicated = sorted(name for name in rank0 if any(part in name for part in REPLICATED))
    assert len(replicated) >= 10, sorted(rank0)
    differing = [name for name in replicated if not torch.equal(rank0[name], rank1[name])]
    assert not differing, f"differ between TP ranks: {differing}"
    sharded = [name for name in rank0 if name.endswith("fc1.weight")]
    assert sharded and not torch.equal(rank0[sharded[0]], rank1[sharded[0]])  # the ranks hold different shards
