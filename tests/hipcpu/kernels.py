"""ctypes front of the HIP-CPU build of megaphi's kernels: the same host functions as megaphi._cuda,
over CPU torch tensors. Calls return once the kernels have finished; a C++ exception comes back as
RuntimeError. No checks beyond the C++ ones: the tests hand over odd pointers on purpose."""

import ctypes

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # megaphi::DType

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "megaphi_layer_norm_forward": [_P] * 6 + [_I64, _I64, _F32, _INT],
    "megaphi_layer_norm_backward": [_P] * 9 + [_I64, _I64, _I64, _INT],
    "megaphi_rotary": [_P] * 11 + [_I64] * 8 + [_INT, _INT],
    "megaphi_round_floats": [_P, _P, _I64, _INT],
    "megaphi_widen_to_floats": [_P, _P, _I64, _INT],
    "megaphi_fiber_schedule": [_INT, ctypes.c_uint64],
}
_FIBER_PROBES = {  # only in a library built for the fiber runtime (tests/hipcpu/fiber_probes.cpp)
    "megaphi_fiber_probe_order": [_INT, _INT, _P],
    "megaphi_fiber_probe_shared": [_INT, _INT, _INT, _P, _P],
}
SCHEDULES = ("forward", "reverse", "random")  # the fiber runtime's orders (megaphi_fiber::Order)


def _ptr(t):
    return None if t is None else t.data_ptr()


class CpuKernels:
    def __init__(self, library_path):
        self._lib = ctypes.CDLL(str(library_path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_char_p
        self.has_schedules = hasattr(self._lib, "megaphi_fiber_probe_order")
        if self.has_schedules:
            for name, argtypes in _FIBER_PROBES.items():
                fn = getattr(self._lib, name)
                fn.argtypes, fn.restype = argtypes, ctypes.c_char_p

    def _call(self, name, *args):
        error = getattr(self._lib, name)(*args)
        if error is not None:
            raise RuntimeError(error.decode())

    def layer_norm_forward(self, x, weight, bias, y, mean, rstd, eps=1e-5):
        rows, hidden = mean.numel(), weight.numel()
        self._call(
            "megaphi_layer_norm_forward",
            _ptr(x),
            _ptr(weight),
            _ptr(bias),
            _ptr(y),
            _ptr(mean),
            _ptr(rstd),
            rows,
            hidden,
            eps,
            DTYPE_CODES[x.dtype],
        )

    def layer_norm_backward(self, dy, x, weight, mean, rstd, dx, dweight, dbias, workspace):
        """workspace: fp32 [2, num_blocks, hidden]."""
        num_blocks = workspace.shape[1]
        self._call(
            "megaphi_layer_norm_backward",
            _ptr(dy),
            _ptr(x),
            _ptr(weight),
            _ptr(mean),
            _ptr(rstd),
            _ptr(dx),
            _ptr(dweight),
            _ptr(dbias),
            _ptr(workspace),
            num_blocks,
            mean.numel(),
            weight.numel(),
            DTYPE_CODES[x.dtype],
        )

    def rotary(self, q_in, q_out, k_in, k_out, cos, sin, position_ids=None, offset=0, inverse=False):
        """q/k [batch, seq, heads, head_dim] with a contiguous last dim; k_in = k_out = None for q only.
        position_ids: [batch, seq] or [1, seq] (shared by the batch), int64, contiguous."""
        batch, seq, q_heads, head_dim = q_in.shape
        k_heads = 0 if k_in is None else k_in.shape[2]
        pos_batch_stride = 0 if position_ids is None or position_ids.shape[0] == 1 else seq

        def strides(t):  # (batch, seq, head) element strides; a dummy for an absent k
            return (ctypes.c_int64 * 3)(*(t.stride()[:3] if t is not None else (0, 0, 0)))

        self._call(
            "megaphi_rotary",
            _ptr(q_in),
            _ptr(q_out),
            _ptr(k_in),
            _ptr(k_out),
            strides(q_in),
            strides(q_out),
            strides(k_in),
            strides(k_out),
            _ptr(cos),
            _ptr(sin),
            _ptr(position_ids),
            pos_batch_stride,
            offset,
            batch,
            seq,
            q_heads,
            k_heads,
            head_dim,
            cos.shape[1],
            int(inverse),
            DTYPE_CODES[q_in.dtype],
        )

    def round_floats(self, values, dtype):
        """fp32 values converted by the kernels' from_float<dtype>."""
        out = torch.empty(values.shape, dtype=dtype)
        self._call("megaphi_round_floats", _ptr(values), _ptr(out), values.numel(), DTYPE_CODES[dtype])
        return out

    def widen_to_floats(self, values):
        """values converted to fp32 by the kernels' to_float."""
        out = torch.empty(values.shape, dtype=torch.float32)
        self._call("megaphi_widen_to_floats", _ptr(values), _ptr(out), values.numel(), DTYPE_CODES[values.dtype])
        return out

    def set_schedule(self, order, seed=0):
        """Fiber runtime only: the order threads and blocks run in from now on (SCHEDULES), seeded."""
        self._call("megaphi_fiber_schedule", SCHEDULES.index(order), seed & (2**64 - 1))

    def probe_order(self, blocks, threads):
        """Fiber runtime only: (phase, block, thread) in the order the threads ran, where phase 0 is a
        thread's start and phase 1 its going on after a __syncthreads()."""
        log = torch.full((2 * blocks * threads,), -1, dtype=torch.int32)
        self._call("megaphi_fiber_probe_order", blocks, threads, _ptr(log))
        total = blocks * threads
        return [(v // total, v % total // threads, v % threads) for v in log.tolist()]

    def probe_shared(self, blocks, threads, dynamic_bytes):
        """Fiber runtime only: (the first 16 bytes of static and of dynamic shared memory each block found,
        [blocks, 2, 16]; whether each block kept its own copy of both while the others ran)."""
        seen = torch.zeros((blocks, 2, 16), dtype=torch.uint8)
        intact = torch.zeros(blocks, dtype=torch.int32)
        self._call("megaphi_fiber_probe_shared", blocks, threads, dynamic_bytes, _ptr(seen), _ptr(intact))
        return seen, intact.bool().tolist()
