"""Start DeepSpeed without its CPU shared-memory collective extension, which megaphi never uses.

Creating deepspeed.comm's TorchBackend (inside deepspeed.initialize) loads `deepspeed_shm_comm`, a
C++/OpenMP extension that DeepSpeed JIT-compiles on CPU machines: about 2 minutes on the first run of
a fresh machine (a build killed half-way leaves a lock file that makes every later run wait for ever),
then, on every start, a ninja up-to-date check under that lock (runs started together wait for each
other: 90 s for a 2-rank torchrun on a loaded 2-core machine) and a "... built successfully" line.
DeepSpeed uses it only in `inference_all_reduce` (DeepSpeed-Inference's tensor parallelism), which
falls back to torch.distributed.all_reduce without it; megaphi's collectives are torch.distributed's.

No public setting turns the build off (DS_BUILD_SHM_COMM only affects `pip install`), so the module
function TorchBackend calls, deepspeed.comm.torch.build_shm_op, is replaced by one returning None:
the state DeepSpeed itself is in where the extension is not available (non-Linux). The hook is pinned
by tests/test_fresh_checkout.py (the function exists, TorchBackend calls it, nothing is built).
"""


def skip_shm_comm_extension():
    """Call before deepspeed.initialize / deepspeed.init_distributed (idempotent)."""
    import importlib

    # by name: `import deepspeed.comm.torch as m` binds deepspeed.comm's attribute `torch` (the torch package)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    if getattr(ds_torch_comm.build_shm_op, "megaphi_skipped", False):
        return

    def build_shm_op():
        return None  # "not available": inference_all_reduce uses torch.distributed

    build_shm_op.megaphi_skipped = True
    ds_torch_comm.build_shm_op = build_shm_op
