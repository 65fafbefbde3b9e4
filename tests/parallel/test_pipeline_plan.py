"""Pipeline schedule plans, checked without processes: every (P, v, m) plan set runs to completion
under rendezvous communication (no deadlock on any backend), every receive gets the tensor it names,
the 1F1B memory bound holds, and the idle time equals the theoretical bubble. Plus the one-line
errors for splits and schedules that cannot work."""

import pytest

from megaphi.parallel.pipeline.plan import (
    Backward,
    Communicate,
    Forward,
    build_plan,
    forward_only_plan,
    interleaved_warmup,
    max_live_activations,
)
from megaphi.parallel.pipeline.simulate import PlanError, bubble_fraction, simulate
from megaphi.parallel.pipeline.stage import check_pipeline_composition, split_layers, virtual_stages_per_rank


@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16])
def test_one_forward_one_backward_completes_with_the_theoretical_bubble(P, m):
    plans = [build_plan(r, P, m) for r in range(P)]
    result = simulate(plans, m)  # forward costs 1, backward 2; communication free
    assert bubble_fraction(result) == pytest.approx((P - 1) / (m + P - 1), abs=1e-12)
    simulate([forward_only_plan(r, P, m) for r in range(P)], m, forward_only=True)


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_interleaved_completes_with_the_bubble_divided_by_v(P, v, groups):
    m = groups * P
    plans = [build_plan(r, P, m, v) for r in range(P)]
    result = simulate(plans, m, v, forward_cost=1.0 / v, backward_cost=2.0 / v)  # a chunk is 1/v of a stage
    ideal = (P - 1) / v
    assert bubble_fraction(result) == pytest.approx(ideal / (m + ideal), abs=1e-12)
    simulate([forward_only_plan(r, P, m, v) for r in range(P)], m, v, forward_only=True)


@pytest.mark.parametrize("P", [2, 4, 8])
def test_first_stage_holds_at_most_P_microbatches(P):
    """1F1B's memory bound: stage r holds P - r micro-batches' activations whatever m is, where running
    every forward before any backward would hold m."""
    for m in (P, 2 * P, 5 * P + 1):
        for r in range(P):
            assert max_live_activations(build_plan(r, P, m)) == min(P - r, m)
    all_forward_first = [Forward(0, i) for i in range(3 * P)] + [Backward(0, i) for i in range(3 * P)]
    assert max_live_activations(all_forward_first) == 3 * P  # the counter sees what the bound excludes


def test_interleaved_live_chunks_follow_megatrons_warmup():
    P, v, m = 4, 2, 8
    for r in range(P):
        assert max_live_activations(build_plan(r, P, m, v)) == interleaved_warmup(r, P, m, v) + 1
    assert interleaved_warmup(0, P, m, v) == 2 * (P - 1) + (v - 1) * P


def test_simulator_catches_deadlock_and_mislabelled_transfers():
    """The checker is not vacuous: a plan where both ranks receive before sending deadlocks, and a
    transfer whose label disagrees is reported."""
    rank0 = [Forward(0, 0), Communicate(send_next=(0, 0)), Communicate(recv_next=(0, 0)), Backward(0, 0)]
    rank1 = [Communicate(recv_next=(0, 0)), Communicate(recv_prev=(0, 0)), Forward(0, 0), Backward(0, 0)]
    with pytest.raises(PlanError, match="deadlock"):
        simulate([rank0, rank1], 1)
    rank1 = [Communicate(recv_prev=(0, 1)), Forward(0, 0), Backward(0, 0)]
    with pytest.raises(PlanError, match="expected"):
        simulate([rank0[:2], rank1], 1)


def test_zero_1_composes_with_pipelining():
    for stage in (0, 1):
        check_pipeline_composition(4, zero_stage=stage)
    check_pipeline_composition(1, zero_stage=3)  # no pipeline: every stage is allowed


def test_layer_splits():
    assert split_layers(8, 2) == [(0, 4), (4, 8)]
    assert split_layers(8, 2, 2) == [(0, 2), (2, 4), (4, 6), (6, 8)]  # virtual stage c * P + r
    assert split_layers(6, 2, layers_per_stage=[2, 4]) == [(0, 2), (2, 6)]
    assert virtual_stages_per_rank(24, 4, 3) == 2
    assert virtual_stages_per_rank(24, 4, None) == 1


@pytest.mark.parametrize(
    "call, flags",
    [
        (lambda: split_layers(6, 4), ["--num-layers 6", "--pipeline-model-parallel-size 4"]),
        (lambda: split_layers(8, 2, layers_per_stage=[3, 4]), ["--pipeline-layers-per-stage 3,4", "--num-layers 8"]),
        (
            lambda: virtual_stages_per_rank(24, 4, 4),
            ["--num-layers-per-virtual-pipeline-stage 4", "--pipeline-model-parallel-size 4"],
        ),
        (
            lambda: virtual_stages_per_rank(8, 1, 2),
            ["--num-layers-per-virtual-pipeline-stage", "--pipeline-model-parallel-size"],
        ),
        (lambda: check_pipeline_composition(2, zero_stage=2), ["--zero-stage 2", "--pipeline-model-parallel-size 2"]),
        (lambda: check_pipeline_composition(4, zero_stage=3), ["--zero-stage 3", "--pipeline-model-parallel-size 4"]),
        (
            lambda: build_plan(0, 4, 6, 2),
            ["--num-layers-per-virtual-pipeline-stage", "--pipeline-model-parallel-size 4"],
        ),
    ],
)
def test_bad_split_is_a_one_line_error_naming_the_flags(call, flags):
    """Splits, virtual stages, micro-batch counts and ZeRO stages that cannot work: one line, the flags named."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for flag in flags:
        assert flag in message, (flag, message)


def test_boundary_tensors_have_the_shape_fixed_for_the_run():
    """Shapes are agreed before the step; a tensor of another shape or dtype is refused before any
    transfer is posted (no process group needed to get there)."""
    import torch
    from megaphi.parallel.pipeline.p2p import StageCommunicator, boundary_shape

    assert boundary_shape(2, 16, 32, sequence_parallel=True, tp_size=4) == (4, 2, 32)  # [s/TP, b, h]
    assert boundary_shape(2, 16, 32, sequence_parallel=False, tp_size=4) == (2, 16, 32)
    comm = StageCommunicator((2, 16, 32), torch.float32, next_rank=1, prev_rank=1)
    with pytest.raises(ValueError, match="boundary shape"):
        comm.communicate(send_next=torch.zeros(2, 8, 32))
    with pytest.raises(ValueError, match="boundary shape"):
        comm.communicate(send_prev=torch.zeros(2, 16, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 4"):
        boundary_shape(2, 18, 32, sequence_parallel=True, tp_size=4)


def test_interleaving_needs_one_data_iterator_per_chunk():
    from megaphi.parallel.pipeline.schedules import forward_backward_pipelining

    with pytest.raises(ValueError, match="one data iterator per model chunk"):
        forward_backward_pipelining(None, iter([]), [object(), object()], 2, pipeline_rank=0, pipeline_size=1)
