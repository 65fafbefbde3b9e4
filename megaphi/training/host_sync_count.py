"""Counting host reads of tensor values: on a GPU each one is a host synchronization.

Reading a tensor's value on the host (.item(), .tolist(), float(t), bool(t), int(t), operator.index(t))
waits until the device has finished everything queued before it. ValueReadCounter patches those
methods of torch.Tensor while it is active and counts each read by its call site, labelled with who
made it: "megaphi" (megaphi's own code), "deepspeed", "torch" or "other". Reads of the data
pipeline's CPU batches are host data, never a device sync, and are left out (HOST_DATA_*).

DeviceSynchronizeCounter counts the device-wide waits called from Python: torch.cuda.synchronize,
torch.accelerator.synchronize and DeepSpeed's accelerator.synchronize() (DeepSpeed's throughput timer
and ZeRO call the last), by call site and origin; it works on CPU too, where DeepSpeed's CPU
accelerator's synchronize is a no-op that is still called.

Used by tests/training/test_host_syncs.py (megaphi's step makes no per-iteration reads or synchronizes) and by
benchmarks/train.py ("host syncs/step"). On CUDA, CudaSyncCounter adds two sources: what
torch.cuda.set_sync_debug_mode("warn") reports (value reads, device-to-host copies, nonzero and other
data-dependent shapes, stream synchronizes, also when made in torch's C++) and, because that mode
does not report cudaDeviceSynchronize, the device synchronizes above. Neither sees: event
synchronizes (cudaEventSynchronize), waits made in C++ outside torch's checks (NCCL, cuBLAS,
DeepSpeed's compiled ops), the caching allocator's cudaFree when it gives memory back (an
out-of-memory retry, empty_cache), a synchronize bound to a name before the counter started (from
torch.cuda import synchronize), and the host blocking on a full launch queue.
"""

import functools
import os
import sys
import warnings

import torch

MEGAPHI_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# megaphi functions that read CPU tensors of the data loader's batches: host data, never a device sync
HOST_DATA_FUNCTIONS = frozenset(
    {"loss_token_mask", "count_loss_tokens", "should_stop"}
)  # reads a flag reduced over a CPU (gloo) group by design
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
        if origin == "megaphi" and (path.startswith(HOST_DATA_DIRS) or caller.f_code.co_name in HOST_DATA_FUNCTIONS):
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


def _synchronize_entry_points():
    """(owner, attribute name) of each Python function that waits for the whole device."""
    points = [(torch.cuda, "synchronize")]
    if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "synchronize"):
        points.append((torch.accelerator, "synchronize"))
    try:  # DeepSpeed calls its accelerator object's method; patch that object's class
        from deepspeed.accelerator import get_accelerator

        points.append((type(get_accelerator()), "synchronize"))
    except ImportError:
        pass
    return points


class DeviceSynchronizeCounter:
    """with DeviceSynchronizeCounter(origins=...) as syncs: run(); then syncs.counts
    {"origin path:line synchronize": n}: the device synchronizes called from Python (see the module
    docstring), each counted once at its outermost call (DeepSpeed's CUDA accelerator calls
    torch.cuda.synchronize: one wait, one count). Synchronize outside the block. Not thread-safe."""

    def __init__(self, origins=("megaphi", "deepspeed", "torch", "other")):
        self.origins = frozenset(origins)
        self.counts = {}
        self._patched = None
        self._depth = 0

    def _counting(self, original):
        @functools.wraps(original)
        def synchronize(*args, **kwargs):
            if self._depth == 0:
                self._record(sys._getframe(1))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return synchronize  # a plain function: as a class attribute it binds like the method it replaces

    def _record(self, caller):
        path = os.path.abspath(caller.f_code.co_filename)
        origin = origin_of(path)
        if origin not in self.origins:
            return
        where = os.path.relpath(path, MEGAPHI_DIR) if origin == "megaphi" else path
        key = f"{origin} {where}:{caller.f_lineno} synchronize"
        self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self):
        self._patched = []
        for owner, name in _synchronize_entry_points():
            own = vars(owner).get(name)  # None: inherited, so restoring means deleting our attribute
            self._patched.append((owner, name, own))
            setattr(owner, name, self._counting(getattr(owner, name)))
        return self

    def __exit__(self, *exc):
        for owner, name, own in reversed(self._patched):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._patched = None
        return False

    def total(self):
        return sum(self.counts.values())


class CudaSyncCounter:
    """with CudaSyncCounter() as syncs: run(); then syncs.count: the synchronizing CUDA calls that
    torch.cuda.set_sync_debug_mode("warn") reported plus the device synchronizes called from Python
    (which that mode does not report), and syncs.sites {"file:line": n}. Synchronize outside the block
    (a torch.cuda.synchronize() inside it counts too). The block may be entered many times; the
    counts add up."""

    def __init__(self):
        self.count, self.sites = 0, {}
        self._catcher = None
        self._device_syncs = None

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._device_syncs = DeviceSynchronizeCounter().__enter__()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._device_syncs.__exit__(*exc)
        self._catcher.__exit__(*exc)
        for w in self._caught:
            if "synchroniz" in str(w.message):
                self._add(f"{w.filename}:{w.lineno}", 1)
        for key, n in self._device_syncs.counts.items():
            self._add(key.split(" ", 1)[1], n)
        return False

    def _add(self, site, n):
        self.count += n
        self.sites[site] = self.sites.get(site, 0) + n
