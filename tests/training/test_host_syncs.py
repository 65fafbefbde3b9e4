"""No per-iteration host synchronization in megaphi's training step.

On a GPU, reading a tensor's value on the host (.item(), .tolist(), float(t), bool(t), int(t)) blocks
until the device has finished everything queued before it. megaphi's own step code must read values
only at log intervals, evaluations and saves. This CPU test counts such reads made by megaphi's code
(DeepSpeed's own are outside its reach, and the data pipeline's reads of CPU batches are host data)
in a run of 2 and of 6 iterations with one log at the end: the counts must be equal. Device-wide
synchronizes (torch.cuda.synchronize, DeepSpeed's accelerator.synchronize) are counted from every
caller, DeepSpeed's included: its throughput timer would make two per micro-batch.
"""

import types

import pytest

from megaphi.training.host_sync_count import DeviceSynchronizeCounter, ValueReadCounter


def _count_value_reads(run):
    with ValueReadCounter(origins=("megaphi",)) as reads:  # megaphi's own reads; DeepSpeed's are not ours
        run()
    return reads.counts


def _count_device_synchronizes(run):
    with DeviceSynchronizeCounter() as syncs:  # anyone's: DeepSpeed's timer waits for the device too
        run()
    return syncs.counts


def _train(tmp_path, iterations, precision=()):
    from megaphi import pretrain

    argv = [
        "--model",
        "tiny",
        "--num-layers",
        "1",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--ffn-hidden-size",
        "64",
        "--rotary-dim",
        "8",
        "--seq-length",
        "16",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        str(iterations),
        "--log-interval",
        str(iterations),
        "--lr",
        "1e-3",
        "--lr-warmup-iters",
        "0",
        "--eval-iters",
        "0",
        "--mock-data",
        "--seed",
        "3",
        "--log-dir",
        str(tmp_path / f"log{iterations}"),
        *precision,
    ]
    assert pretrain.main(argv) in (0, None)


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16-zero1"])
def test_value_reads_do_not_grow_with_iterations(tmp_path, monkeypatch, precision):
    monkeypatch.setenv("MASTER_PORT", "0")
    syncs = {}

    def run(iterations):
        syncs[iterations] = _count_device_synchronizes(lambda: _train(tmp_path, iterations, precision))

    short, long = _count_value_reads(lambda: run(2)), _count_value_reads(lambda: run(6))
    short_syncs, long_syncs = syncs[2], syncs[6]
    per_iteration = {k: long.get(k, 0) - short.get(k, 0) for k in set(long) | set(short)}
    assert not {k: v for k, v in per_iteration.items() if v}, per_iteration
    syncs_per_iteration = {k: long_syncs.get(k, 0) - short_syncs.get(k, 0) for k in set(long_syncs) | set(short_syncs)}
    assert not {k: v for k, v in syncs_per_iteration.items() if v}, syncs_per_iteration


def _timer_syncs(timers_config):
    """Device synchronizes of DeepSpeed's throughput timer over 4 optimizer steps of 1 micro-batch."""
    from deepspeed.utils.config import get_timers_config
    from deepspeed.utils.timer import ThroughputTimer

    timer = ThroughputTimer(get_timers_config(timers_config), batch_size=1, start_step=0, logging_fn=lambda *a: None)
    with DeviceSynchronizeCounter() as syncs:
        for _ in range(4):
            timer.start()
            timer.stop(global_step=True)
    return syncs.total()


def test_counter_sees_deepspeed_throughput_timer_and_generated_config_turns_it_off():
    from megaphi.training.deepspeed_config import generate_config

    assert _timer_syncs({}) == 8  # DeepSpeed's default: a device synchronize at each start and stop
    args = types.SimpleNamespace(
        global_batch_size=4,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        clip_grad=1.0,
        zero_stage=0,
        fp16=False,
        bf16=False,
    )
    assert _timer_syncs(generate_config(args)) == 0


def test_counter_counts_one_wait_once_and_restores_what_it_patched():
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = type(get_accelerator())
    before = (torch.cuda.synchronize, vars(accelerator).get("synchronize"), "synchronize" in vars(accelerator))
    with DeviceSynchronizeCounter() as syncs:
        get_accelerator().synchronize()
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()
    assert syncs.total() == 1 + torch.accelerator.is_available()
    assert list(syncs.counts)[0].startswith("other ") and list(syncs.counts)[0].endswith(" synchronize")
    assert (torch.cuda.synchronize, vars(accelerator).get("synchronize"), "synchronize" in vars(accelerator)) == before
