"""Backend selection for the fused ops, the unavailable-backend errors, the extension module and
`python -m megaphi.ops`."""

import shutil
import subprocess
import sys
import types

import pytest
import torch

from megaphi import ops
from megaphi.ops import backend

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _restore_impl():
    saved = {op: ops.get_impl(op) for op in backend.OPS}
    yield
    ops.set_impl(**saved)


def test_defaults_and_set_impl_torch():
    assert ops.get_impl("layernorm") == "auto" and ops.get_impl("rotary") == "auto"
    ops.set_impl(layernorm="torch")
    assert ops.get_impl("layernorm") == "torch" and ops.get_impl("rotary") == "auto"
    ops.set_impl(rotary="torch")
    assert ops.get_impl("rotary") == "torch"


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="--layernorm-impl: unknown implementation 'fast'"):
        ops.set_impl(layernorm="fast")
    with pytest.raises(ValueError, match="--rotary-impl: unknown implementation"):
        ops.set_impl(rotary="triton")
    assert ops.get_impl("layernorm") == "auto"


def test_apex_is_not_a_rotary_backend():
    with pytest.raises(RuntimeError, match="--rotary-impl=apex is not available here: apex has no rotary"):
        ops.set_impl(rotary="apex")


@pytest.mark.skipif(not NO_GPU, reason="checks the error raised without a GPU")
def test_cuda_impl_without_gpu_is_a_clear_error():
    with pytest.raises(
        RuntimeError,
        match=r"--layernorm-impl=cuda is not available here: .*(CPU-only|no CUDA GPU|"
        r"cannot be imported)",
    ):
        ops.set_impl(layernorm="cuda")
    with pytest.raises(RuntimeError, match="--rotary-impl=cuda is not available here"):
        ops.set_impl(layernorm="torch", rotary="cuda")
    assert ops.get_impl("layernorm") == "auto", "a failed set_impl must change nothing"
    x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="--layernorm-impl=cuda is not available here"):
        ops.layer_norm(x, w, b, impl="cuda")
    cos, sin = ops.rotary_tables(4, 8)
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="--rotary-impl=cuda is not available here"):
        ops.apply_rotary_qk(q, q.clone(), cos, sin, impl="cuda")


def test_auto_uses_torch_for_cpu_tensors():
    x = torch.randn(3, 8)
    assert backend.resolve("layernorm", None, x) == "torch"
    assert backend.resolve("rotary", "auto", x) == "torch"
    assert backend.resolve("layernorm", "torch", x) == "torch"
    ops.set_impl(layernorm="torch")
    w, b = torch.randn(8), torch.randn(8)
    assert torch.equal(ops.layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: megaphi._cuda is not built here")
def test_cuda_module_imports_after_nvcc_build():
    import megaphi._cuda as cuda_module  # built by `python setup.py build_ext --inplace` when nvcc exists

    assert cuda_module.cuda_runtime_version() >= 11000
    assert (cuda_module.FLOAT32, cuda_module.FLOAT16, cuda_module.BFLOAT16) == (0, 1, 2)
    assert isinstance(cuda_module.cuda_device_status(), str)
    assert backend.cuda_module() is cuda_module


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: megaphi._cuda is not built here")
def test_cuda_module_rejects_bad_arguments_before_launching():
    import megaphi._cuda as cuda_module

    with pytest.raises(ValueError, match="bad sizes"):
        cuda_module.layer_norm_forward(0, 0, 0, 0, 0, 0, rows=4, hidden=0, eps=1e-5, dtype=0, device=0, stream=0)
    with pytest.raises(ValueError, match="unsupported dtype code 7"):
        cuda_module.layer_norm_forward(0, 0, 0, 0, 0, 0, rows=0, hidden=8, eps=1e-5, dtype=7, device=0, stream=0)
    with pytest.raises(ValueError, match="num_blocks"):
        cuda_module.layer_norm_backward(
            0, 0, 0, 0, 0, 0, 0, 0, 0, num_blocks=0, rows=4, hidden=8, dtype=0, device=0, stream=0
        )
    with pytest.raises(ValueError, match="both be in place or both out of place"):
        layout = (8, 8, 8)
        cuda_module.rotary(
            16,
            16,
            32,
            48,
            layout,
            layout,
            layout,
            layout,
            0,
            0,
            0,
            0,
            0,
            batch=1,
            seq=1,
            q_heads=1,
            k_heads=1,
            head_dim=8,
            half=4,
            inverse=False,
            dtype=0,
            device=0,
            stream=0,
        )


def test_python_m_megaphi_ops_reports_backends():
    result = subprocess.run([sys.executable, "-m", "megaphi.ops"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "megaphi._cuda:" in out and "apex FusedLayerNorm:" in out
    assert "layernorm: selected 'auto'" in out and "rotary: selected 'auto'" in out
    if NO_GPU:
        assert "auto -> torch (" in out  # says why the kernels are not used


def test_missing_module_reason_is_reported(monkeypatch):
    monkeypatch.setattr(backend, "_load_cuda_module", lambda: (None, "megaphi._cuda cannot be imported (test)"))
    backend.clear_availability_caches()
    try:
        assert backend.cuda_unavailable_reason() == "megaphi._cuda cannot be imported (test)"
        text = "\n".join(backend.describe())
        assert "megaphi._cuda: not available: megaphi._cuda cannot be imported (test)" in text
        with pytest.raises(RuntimeError, match=r"--layernorm-impl=cuda is not available here: .*\(test\)"):
            ops.set_impl(layernorm="cuda")
    finally:
        monkeypatch.undo()
        backend.clear_availability_caches()


class _ModuleWithoutImageForThisGPU:
    """Stands in for megaphi._cuda on a GPU the build did not target (e.g. sm_100 with an 80;90 build)."""

    def cuda_device_count(self):
        return 1

    def cuda_device_status(self):
        return "1 CUDA device(s)"

    def cuda_runtime_version(self):
        return 13000

    def cuda_driver_version(self):
        return 13000

    def kernel_image_error(self, device):
        assert device == 0
        return "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"


def test_missing_kernel_image_makes_auto_use_torch(monkeypatch):
    monkeypatch.setattr(backend, "_load_cuda_module", lambda: (_ModuleWithoutImageForThisGPU(), None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(backend, "apex_unavailable_reason", lambda: "not installed (test)")
    backend.clear_availability_caches()
    try:
        reason = backend.cuda_unavailable_reason()
        assert reason is not None and "no kernel image for GPU 0 (Test GPU, compute capability 10.0)" in reason
        assert "cudaErrorNoKernelImageForDevice" in reason and "MEGAPHI_CUDA_ARCHS=100" in reason
        cuda_tensor = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
        assert backend.resolve("layernorm", "auto", cuda_tensor) == "torch"
        assert backend.resolve("rotary", None, cuda_tensor) == "torch"
        with pytest.raises(RuntimeError, match="--rotary-impl=cuda is not available here: .*no kernel image"):
            ops.set_impl(rotary="cuda")
        text = "\n".join(backend.describe())
        assert (
            "layernorm: selected 'auto'; usable here: torch; auto -> torch (megaphi._cuda has no kernel image" in text
        )
    finally:
        monkeypatch.undo()
        backend.clear_availability_caches()


def test_module_with_a_kernel_image_is_usable():
    module = _ModuleWithoutImageForThisGPU()
    module.kernel_image_error = lambda device: ""
    assert backend.kernel_image_reason(module, 0) is None
    assert "older build" in backend.kernel_image_reason(types.SimpleNamespace(), 0)  # no kernel_image_error


class _ModuleWithImageOnlyForGPU0(_ModuleWithoutImageForThisGPU):
    """Two visible GPUs of different architectures; the build has an image for GPU 0 only. Records
    which devices were probed (each probe creates a CUDA context on that device)."""

    def __init__(self):
        self.probed = []

    def cuda_device_status(self):
        return "2 CUDA device(s)"

    def kernel_image_error(self, device):
        self.probed.append(device)
        return "" if device == 0 else "cudaErrorNoKernelImageForDevice: no kernel image (test)"


@pytest.fixture
def two_gpus_image_on_gpu0(monkeypatch):
    module = _ModuleWithImageOnlyForGPU0()
    current = {"device": 0}
    monkeypatch.setattr(backend, "_load_cuda_module", lambda: (module, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0) if device == 0 else (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Test GPU {device}")
    monkeypatch.setattr(backend, "apex_unavailable_reason", lambda: "not installed (test)")
    backend.clear_availability_caches()
    yield module, current
    monkeypatch.undo()
    backend.clear_availability_caches()


def _fake_cuda_tensor(index):
    return types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", index))


def test_only_the_requested_device_is_probed_and_cached(two_gpus_image_on_gpu0):
    module, current = two_gpus_image_on_gpu0
    current["device"] = 1
    reason = backend.cuda_unavailable_reason()  # the current device, as set_impl / the report use
    assert "no kernel image for GPU 1 (Test GPU 1, compute capability 10.0)" in reason
    assert module.probed == [1], "GPU 0 must not be touched by a process working on GPU 1"
    for _ in range(3):
        assert backend.resolve("layernorm", "auto", _fake_cuda_tensor(1)) == "torch"
        assert backend.cuda_unavailable_reason(1) == reason
    assert module.probed == [1], "the probe result must be cached per device"
    with pytest.raises(RuntimeError, match="--rotary-impl=cuda is not available here: .*GPU 1"):
        ops.set_impl(rotary="cuda")
    assert module.probed == [1]


def test_auto_per_device_uses_the_kernel_where_an_image_exists(two_gpus_image_on_gpu0):
    module, current = two_gpus_image_on_gpu0
    assert backend.resolve("rotary", "auto", _fake_cuda_tensor(0)) == "cuda"
    assert module.probed == [0]
    assert backend.resolve("layernorm", None, _fake_cuda_tensor(1)) == "torch"  # falls back, no error
    assert backend.resolve("layernorm", "auto", _fake_cuda_tensor(0)) == "cuda"
    assert sorted(module.probed) == [0, 1]
    assert backend.resolve("layernorm", "cuda", _fake_cuda_tensor(0)) == "cuda"
    with pytest.raises(RuntimeError, match="--layernorm-impl=cuda is not available here: .*no kernel image for GPU 1"):
        backend.resolve("layernorm", "cuda", _fake_cuda_tensor(1))
    ops.set_impl(layernorm="cuda")  # the current device (0) has an image
    assert sorted(module.probed) == [0, 1]


def test_report_probes_every_gpu_and_says_so(two_gpus_image_on_gpu0):
    module, _ = two_gpus_image_on_gpu0
    text = "\n".join(backend.describe())
    assert "this report probes all 2; training processes probe only their own device" in text
    assert "GPU 0: kernel image present" in text and "GPU 1: megaphi._cuda has no kernel image for GPU 1" in text
    assert "layernorm: selected 'auto'; usable here: cuda, torch; auto -> cuda" in text
    assert sorted(set(module.probed)) == [0, 1] and len(module.probed) == 2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: megaphi._cuda is not built here")
def test_built_module_probe_reports_a_missing_device():
    import megaphi._cuda as cuda_module

    error = cuda_module.kernel_image_error(9999)
    assert error  # no such device here (and without a GPU the runtime says why)


@pytest.mark.skipif(not NO_GPU, reason="checks the message printed without a GPU")
def test_benchmark_exits_cleanly_without_gpu(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("kernels_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
