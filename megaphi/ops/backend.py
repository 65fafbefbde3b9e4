"""Backend selection for the fused ops: which implementations exist here, and why not.

Backends: "cuda" (megaphi._cuda kernels), "torch" (the plain-torch reference), "apex" (apex's
FusedLayerNorm, LayerNorm only, where apex is installed), "auto" (cuda for CUDA tensors when the
kernels are usable, torch otherwise).
"""

import functools

import torch

IMPLS = ("auto", "cuda", "torch", "apex")
OPS = ("layernorm", "rotary")

# dtype codes understood by megaphi._cuda (csrc/kernels/kernels.h).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_selected = {"layernorm": "auto", "rotary": "auto"}


@functools.lru_cache(maxsize=None)
def _load_cuda_module():
    """(module, None) or (None, reason it cannot be imported)."""
    try:
        from megaphi import _cuda
    except ImportError as exc:
        return None, (
            f"megaphi._cuda cannot be imported ({exc}); build it with nvcc: python setup.py build_ext --inplace"
        )
    return _cuda, None


def cuda_module():
    """The megaphi._cuda extension module, or None."""
    return _load_cuda_module()[0]


@functools.lru_cache(maxsize=None)
def _runtime_unavailable_reason():
    """None when the module imports and its CUDA runtime sees a GPU, else why not (process-wide)."""
    module, reason = _load_cuda_module()
    if module is None:
        return reason
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build (no CUDA)"
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
    if module.cuda_device_count() < 1:
        # e.g. the module was built with a newer CUDA toolkit than the installed driver supports
        return f"megaphi._cuda's CUDA runtime cannot use the GPU: {module.cuda_device_status()}"
    return None


@functools.lru_cache(maxsize=None)
def _device_kernel_image_reason(device_index):
    # Cached per device: the probe creates a CUDA context on the device it asks about, so each
    # process must probe only the GPU(s) it actually computes on, and only once.
    return kernel_image_reason(cuda_module(), device_index)


def _device_index(device):
    """The CUDA device index for `device` (a torch.device, "cuda:N", an int, or None = current)."""
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def cuda_unavailable_reason(device=None):
    """None when the CUDA kernels can run on `device` (None: torch's current CUDA device), else a
    sentence saying why not. Only that device is probed; results are cached per device."""
    reason = _runtime_unavailable_reason()
    if reason is not None:
        return reason
    return _device_kernel_image_reason(_device_index(device))


def clear_availability_caches():
    """Forget the cached availability checks (tests that swap the module or the GPU use this)."""
    _runtime_unavailable_reason.cache_clear()
    _device_kernel_image_reason.cache_clear()


def kernel_image_reason(module, device_index):
    """None when `module` has a kernel image (SASS or PTX) GPU `device_index` can run, else why not.

    Without this check `auto` would pick the kernels on a GPU the build did not target and fail at
    the first launch with "no kernel image is available for execution on the device".
    """
    probe = getattr(module, "kernel_image_error", None)
    if probe is None:
        return (
            "megaphi._cuda is an older build without the kernel image check; rebuild it: "
            "python setup.py build_ext --inplace"
        )
    error = probe(device_index)
    if error:
        major, minor = torch.cuda.get_device_capability(device_index)
        return (
            f"megaphi._cuda has no kernel image for GPU {device_index} "
            f"({torch.cuda.get_device_name(device_index)}, compute capability {major}.{minor}): {error}; "
            f"rebuild with MEGAPHI_CUDA_ARCHS={major}{minor} python setup.py build_ext --inplace"
        )
    return None


@functools.lru_cache(maxsize=None)
def _load_apex_layer_norm():
    """(fused_layer_norm_affine, None) or (None, reason)."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except Exception as exc:  # apex import can fail in many ways (missing, built without CUDA ext)
        return None, f"apex FusedLayerNorm is not importable ({type(exc).__name__}: {exc})"
    return fused_layer_norm_affine, None


def apex_layer_norm():
    return _load_apex_layer_norm()[0]


def apex_unavailable_reason():
    fn, reason = _load_apex_layer_norm()
    if fn is None:
        return reason
    if not torch.cuda.is_available():
        return "apex is installed but torch sees no CUDA GPU"
    return None


def _unavailable_reason(op, impl, device=None):
    if impl == "cuda":
        return cuda_unavailable_reason(device)
    if impl == "apex":
        if op != "layernorm":
            return "apex has no rotary kernel for this layout; choose auto, cuda or torch"
        return apex_unavailable_reason()
    return None


def _check_impl(op, impl, device=None):
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if impl not in IMPLS:
        raise ValueError(f"--{op}-impl: unknown implementation {impl!r}; expected one of {IMPLS}")
    reason = _unavailable_reason(op, impl, device)
    if reason is not None:
        raise RuntimeError(f"--{op}-impl={impl} is not available here: {reason}")


def set_impl(layernorm=None, rotary=None):
    """Select the backend for each op ("auto", "cuda", "torch", "apex"); None leaves it unchanged.

    Asking for a backend that cannot run here raises RuntimeError saying why ("cuda" is checked on
    torch's current CUDA device, so call torch.cuda.set_device first in multi-GPU processes).
    """
    requested = {"layernorm": layernorm, "rotary": rotary}
    for op, impl in requested.items():
        if impl is not None:
            _check_impl(op, impl)
    for op, impl in requested.items():
        if impl is not None:
            _selected[op] = impl


def get_impl(op):
    return _selected[op]


def requested_impl(op, impl):
    """The per-call `impl`, or the selected one when it is None."""
    return _selected[op] if impl is None else impl


def resolve(op, impl, tensor):
    """The backend ("cuda", "torch" or "apex") that runs `op` on `tensor` given a per-call `impl`
    (None = the selected one)."""
    device = tensor.device
    return _resolve_on(op, requested_impl(op, impl), device.type, device.index, tensor.dtype)


def mark_choice_constant_for_compile():
    """Under torch.compile, decide the backend once per (op, impl, device, dtype) while tracing and bake
    the answer into the graph: the availability probes call into the CUDA runtime, which Dynamo cannot
    trace. megaphi.model.compile.prepare_for_compile calls it; the mark is made on the function in place."""
    torch.compiler.assume_constant_result(_resolve_on)


def _resolve_on(op, impl, device_type, device_index, dtype):
    is_cuda = device_type == "cuda"
    if impl == "auto":
        if is_cuda and dtype in DTYPE_CODES and cuda_unavailable_reason(device_index) is None:
            return "cuda"
        return "torch"
    if impl in ("cuda", "apex") and not is_cuda:
        _check_impl(op, impl)
        raise ValueError(f"{op} impl {impl!r} needs CUDA tensors, got a tensor on {device_type}")
    _check_impl(op, impl, device_index if impl == "cuda" else None)
    return impl


def current_stream_handle(device):
    return torch.cuda.current_stream(device).cuda_stream


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def describe():
    """Lines saying what is available and why not (printed by `python -m megaphi.ops`)."""
    lines = [f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"]
    module, reason = _load_cuda_module()
    if module is None:
        lines.append(f"megaphi._cuda: not available: {reason}")
    else:
        runtime = module.cuda_runtime_version()
        driver = module.cuda_driver_version()
        driver_text = f"{driver // 1000}.{driver % 1000 // 10}" if driver else "no driver"
        lines.append(
            f"megaphi._cuda: importable (built for CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}; "
            f"driver: {driver_text}; {module.cuda_device_status()})"
        )
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    apex_reason = apex_unavailable_reason()
    lines.append("apex FusedLayerNorm: " + ("available" if apex_reason is None else f"not available: {apex_reason}"))
    if _runtime_unavailable_reason() is None:
        # A diagnostic run by hand, so it may touch every GPU (one CUDA context each); training
        # processes probe only the device their tensors are on.
        lines.append(
            f"kernel image per visible GPU (this report probes all {torch.cuda.device_count()}; "
            "training processes probe only their own device):"
        )
        for index in range(torch.cuda.device_count()):
            reason = _device_kernel_image_reason(index)
            lines.append(f"  GPU {index}: " + ("kernel image present" if reason is None else reason))
    for op in OPS:
        usable = [impl for impl in IMPLS if impl != "auto" and _unavailable_reason(op, impl) is None]
        cuda_reason = cuda_unavailable_reason()
        auto_text = (
            "cuda for CUDA tensors (on the current GPU), torch otherwise"
            if cuda_reason is None
            else f"torch ({cuda_reason})"
        )
        lines.append(f"{op}: selected {_selected[op]!r}; usable here: {', '.join(usable)}; auto -> {auto_text}")
    return lines
