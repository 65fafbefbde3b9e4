"""No per-iteration host synchronization in megaphi's training step.

On a GPU, reading a tensor's value on the host (.item(), .tolist(), float(t), bool(t), int(t)) blocks
until the device has finished everything queued before it. megaphi's own step code must read values
only at log intervals, evaluations and saves. This CPU test counts such reads made by megaphi's code
(DeepSpeed's own are outside its reach, and the data pipeline's reads of CPU batches are host data)
in a run of 2 and of 6 iterations with one log at the end: the counts must be equal.
"""
import pytest

from megaphi.training.host_sync_count import ValueReadCounter


def _count_value_reads(run):
    with ValueReadCounter(origins=("megaphi",)) as reads:  # megaphi's own reads; DeepSpeed's are not ours
        run()
    return reads.counts


def _train(tmp_path, iterations):
    from megaphi import pretrain
    argv = ["--model", "tiny", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
            "--ffn-hidden-size", "64", "--rotary-dim", "8", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iterations), "--log-interval", str(iterations), "--lr", "1e-3",
            "--lr-warmup-iters", "0", "--eval-iters", "0", "--mock-data", "--seed", "3",
            "--log-dir", str(tmp_path / f"log{iterations}")]
    assert pretrain.main(argv) in (0, None)


@pytest.mark.parametrize("precision", [[]], ids=["fp32"])
def test_value_reads_do_not_grow_with_iterations(tmp_path, monkeypatch, precision):
    monkeypatch.setenv("MASTER_PORT", "0")
    short = _count_value_reads(lambda: _train(tmp_path, 2))
    long = _count_value_reads(lambda: _train(tmp_path, 6))
    per_iteration = {k: long.get(k, 0) - short.get(k, 0) for k in set(long) | set(short)}
    assert not {k: v for k, v in per_iteration.items() if v}, per_iteration
