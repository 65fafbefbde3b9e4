"""megaphi's fiber runtime (tests/hipcpu/fiber_runtime) on its own probe kernels (tests/hipcpu/fiber_probes.cpp):
the orders its schedules run threads and blocks in, the garbage and privacy of each block's shared memory,
and the 48 KiB launch limit. What it does to megaphi's kernels is tests/ops/test_kernels_hipcpu.py."""

import pytest

from hipcpu import build
from hipcpu.kernels import SCHEDULES, CpuKernels


@pytest.fixture(scope="module")
def kernels():
    reason = build.missing_prerequisite("fiber")
    if reason is not None:
        pytest.skip(reason)
    return CpuKernels(build.build(runtime_name="fiber"))


def test_fiber_schedules_order_threads_and_interleave_blocks(kernels):
    """forward runs a block's threads in index order, reverse backwards, random in a seeded random order
    drawn again after each __syncthreads(); no thread goes on past the barrier before all arrived; three
    blocks run at a time, interleaved, started in index, reverse or random order."""
    blocks, threads = 5, 64
    everything = sorted((phase, b, t) for phase in (0, 1) for b in range(blocks) for t in range(threads))
    for order in SCHEDULES:
        kernels.set_schedule(order, seed=1)
        log = kernels.probe_order(blocks, threads)
        assert sorted(log) == everything, f"{order}: not every thread ran once per phase"
        for b in range(blocks):
            mine = [(phase, t) for phase, block, t in log if block == b]
            assert [phase for phase, _ in mine] == [0] * threads + [1] * threads, f"{order}: went past the barrier"
            starts, after_barrier = [t for _, t in mine[:threads]], [t for _, t in mine[threads:]]
            if order == "forward":
                assert starts == after_barrier == list(range(threads))
            elif order == "reverse":
                assert starts == after_barrier == list(range(threads))[::-1]
            else:
                assert starts not in (sorted(starts), sorted(starts)[::-1]) and starts != after_barrier
        span = {
            b: (min(i for i, e in enumerate(log) if e[1] == b), max(i for i, e in enumerate(log) if e[1] == b))
            for b in range(blocks)
        }
        running = [sum(first <= i <= last for first, last in span.values()) for i in range(len(log))]
        assert max(running) == 3, f"{order}: {max(running)} blocks ran at a time, not 3"
        switches = sum(a[1] != b[1] for a, b in zip(log, log[1:]))
        assert switches > 4 * blocks, f"{order}: blocks do not interleave ({switches} switches)"
        start_order = list(dict.fromkeys(block for phase, block, _ in log if phase == 0))
        if order == "forward":
            assert start_order == list(range(blocks))
        elif order == "reverse":
            assert start_order == list(range(blocks))[::-1]
    kernels.set_schedule("random", seed=1)
    again = kernels.probe_order(blocks, threads)
    kernels.set_schedule("random", seed=2)
    other = kernels.probe_order(blocks, threads)
    kernels.set_schedule("random", seed=1)
    assert kernels.probe_order(blocks, threads) == again != other, "random schedules are not reproducible by seed"


@pytest.mark.parametrize("order", SCHEDULES)
def test_fiber_shared_memory_is_fresh_garbage_and_private_per_block(kernels, order):
    """Every block finds random bytes in its static and its dynamic shared memory, not what an earlier
    block left there, and keeps its own copy while the other resident blocks run."""
    kernels.set_schedule(order, seed=3)
    blocks = 7
    seen, intact = kernels.probe_shared(blocks, 64, 4096)
    assert all(intact), f"a block saw another block's writes to shared memory: {intact}"
    found = {bytes(seen[b, kind].tolist()) for b in range(blocks) for kind in (0, 1)}
    assert len(found) == 2 * blocks, "two blocks found the same bytes: garbage is not fresh per block"
    stamps = {bytes([b + 1] * 16) for b in range(blocks)}  # what each block writes
    assert not found & stamps, "a block found an earlier block's data"


def test_fiber_refuses_more_than_48k_of_shared_memory_per_block(kernels):
    """Static plus dynamic shared memory over 48 KiB per block fails to launch, as on a GPU without an
    opt-in (the probe kernel has 1 KiB of static shared memory). LayerNorm's hidden 6112 uses exactly 48 KiB
    (test_layer_norm_low_variance_rows)."""
    static_bytes = 1024
    _, intact = kernels.probe_shared(2, 32, 48 * 1024 - static_bytes)
    assert all(intact)
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.probe_shared(2, 32, 48 * 1024 - static_bytes + 1)
