"""Counting host reads of tensor values: on a GPU each one is a host synchronization.

Reading a tensor's value on the host (.item(), .tolist(), float(t), bool(t), int(t), operator.index(t))
waits until the device has finished everything queued before it. ValueReadCounter patches those
methods of torch.Tensor while it is active and counts each read by its call site, labelled with who
made it: "megaphi" (megaphi's own code), "deepspeed", "torch" or "other". Reads of the data
pipeline's CPU batches are host data, never a device sync, and are left out (HOST_DATA_*).

Used by tests/test_host_syncs.py (megaphi's step makes no per-iteration reads) and by
benchmarks/train.py ("host syncs/step"). On CUDA, CudaSyncCounter counts what
torch.cuda.set_sync_debug_mode("warn") reports, which also sees synchronizations made in C++.
"""
import os
import sys
import warnings

import torch

MEGAPHI_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# megaphi functions that read CPU tensors of the data loader's batches: host data, never a device sync
HOST_DATA_FUNCTIONS = frozenset({"loss_token_mask", "count_loss_tokens",
                                 "should_stop"})  # reads a flag reduced over a CPU (gloo) group by design
HOST_DATA_DIRS = (os.path.join(MEGAPHI_DIR, "data"),)
READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")
_DEEPSPEED_MARK = os.sep + "deepspeed" + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def origin_of(path):
    """Who a source file belongs to: "megaphi", "deepspeed", "torch" or "other"."""
    if path.startswith(MEGAPHI_DIR + os.sep):
        return "megaphi"
    if _DEEPSPEED_MARK in path:
        return "deepspeed"
    if path.startswith(_TORCH_DIR + os.sep):
        return "torch"
    return "other"


class ValueReadCounter:
    """with ValueReadCounter(origins=...) as reads: run(); then reads.counts {"origin path:line method": n}.

    origins: which callers count (default all four); ("megaphi",) counts megaphi's own reads only.
    device_tensors_only: skip reads of CPU tensors (right on a GPU run, where only a read of a device
    tensor synchronizes; on CPU every tensor is a CPU tensor, so leave it False there).
    Not thread-safe: the patch is process-wide while active."""

    def __init__(self, origins=("megaphi", "deepspeed", "torch", "other"), device_tensors_only=False):
        self.origins = frozenset(origins)
        self.device_tensors_only = device_tensors_only
        self.counts = {}
        self._originals = None

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            self._record(tensor, name, sys._getframe(1))
            return original(tensor, *args, **kwargs)
        read.__name__ = name
        return read

    def _record(self, tensor, name, caller):
        if self.device_tensors_only and tensor.device.type == "cpu":
            return
        path = os.path.abspath(caller.f_code.co_filename)
        origin = origin_of(path)
        if origin not in self.origins:
            return
        if origin == "megaphi" and (path.startswith(HOST_DATA_DIRS)
                                    or caller.f_code.co_name in HOST_DATA_FUNCTIONS):
            return
        where = os.path.relpath(path, MEGAPHI_DIR) if origin == "megaphi" else path
        key = f"{origin} {where}:{caller.f_lineno} {name}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self):
        self._originals = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = None
        return False

    def total(self):
        return sum(self.counts.values())

    def by_origin(self):
        out = {}
        for key, n in self.counts.items():
            origin = key.split(" ", 1)[0]
            out[origin] = out.get(origin, 0) + n
        return out


class CudaSyncCounter:
    """with CudaSyncCounter() as syncs: run(); then syncs.count: the synchronizing CUDA calls that
    torch.cuda.set_sync_debug_mode("warn") reported, and syncs.sites {"file:line": n}. Synchronize
    outside the block (a torch.cuda.synchronize() inside it would count too)."""

    def __init__(self):
        self.count, self.sites = 0, {}
        self._catcher = None

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(*exc)
        for w in self._caught:
            if "synchroniz" in str(w.message):
                self.count += 1
                site = f"{w.filename}:{w.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1
        return False
