"""No per-iteration host synchronization in megaphi's training step.

On a GPU, reading a tensor's value on the host (.item(), .tolist(), float(t), bool(t), int(t)) blocks
until the device has finished everything queued before it. megaphi's own step code must read values
only at log intervals, evaluations and saves. This CPU test counts such reads made by megaphi's code
(DeepSpeed's own are outside its reach, and the data pipeline's reads of CPU batches are host data)
in a run of 2 and of 6 iterations with one log at the end: the counts must be equal.
"""
import os
import sys

import pytest
import torch

MEGAPHI_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megaphi")
# functions that read CPU tensors of the data loader's batches: host data, never a device sync
HOST_DATA_FUNCTIONS = {"loss_token_mask", "count_loss_tokens",
                       "should_stop"}  # reads a flag reduced over a CPU (gloo) group by design
HOST_DATA_DIRS = (os.path.join(MEGAPHI_DIR, "data"),)
READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")


def _count_value_reads(run):
    counts = {}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            path = os.path.abspath(caller.f_code.co_filename)
            if path.startswith(MEGAPHI_DIR) and not path.startswith(HOST_DATA_DIRS) \
                    and caller.f_code.co_name not in HOST_DATA_FUNCTIONS:
                key = f"{os.path.relpath(path, MEGAPHI_DIR)}:{caller.f_lineno} {name}"
                counts[key] = counts.get(key, 0) + 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


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
