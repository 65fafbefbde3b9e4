"""MFU peaks: exact device names, per precision, dense datasheet figures; unknown devices get n/a."""

import argparse

import pytest
import torch

from megaphi.training import metrics

# torch.cuda.get_device_name() strings -> dense peak TFLOP/s (bf16, fp16, tf32, fp32) from the datasheets
NAMES = [
    ("NVIDIA H100 80GB HBM3", (989.4, 989.4, 494.7, 66.9)),  # SXM5
    ("NVIDIA H100 PCIe", (756.5, 756.5, 378.0, 51.2)),  # 1,513 sparse
    ("NVIDIA H100 NVL", (835.5, 835.5, 417.5, 60.0)),  # 1,671 sparse
    ("NVIDIA H200", (989.4, 989.4, 494.7, 67.0)),
    ("NVIDIA H200 NVL", (835.5, 835.5, 417.5, 60.0)),
    ("NVIDIA H800", (989.4, 989.4, 494.7, 67.0)),
    ("NVIDIA H800 PCIe", (756.5, 756.5, 378.0, 51.0)),
    ("NVIDIA GH200 480GB", (989.4, 989.4, 494.7, 67.0)),
    ("NVIDIA A100-SXM4-80GB", (312.0, 312.0, 156.0, 19.5)),
    ("NVIDIA A100-SXM4-40GB", (312.0, 312.0, 156.0, 19.5)),
    ("NVIDIA A100-PCIE-40GB", (312.0, 312.0, 156.0, 19.5)),
    ("NVIDIA A100 80GB PCIe", (312.0, 312.0, 156.0, 19.5)),
    ("NVIDIA A800-SXM4-80GB", (312.0, 312.0, 156.0, 19.5)),
    ("NVIDIA A30", (165.0, 165.0, 82.0, 10.3)),
    ("NVIDIA A40", (149.7, 149.7, 74.8, 37.4)),
    ("NVIDIA A10", (125.0, 125.0, 62.5, 31.2)),
    ("NVIDIA L40S", (362.05, 362.05, 183.0, 91.6)),
    ("NVIDIA L40", (181.05, 181.05, 90.5, 90.5)),
    ("NVIDIA L4", (121.0, 121.0, 60.0, 30.3)),
    ("NVIDIA GeForce RTX 4090", (165.2, 165.2, 82.6, 82.6)),
    ("NVIDIA GeForce RTX 3090", (71.0, 71.0, 35.6, 35.6)),
    ("Tesla V100-SXM2-32GB", (None, 125.0, 15.7, 15.7)),  # no bf16 / tf32 units: fp32 cores
    ("Tesla T4", (None, 65.0, 8.1, 8.1)),
]


@pytest.mark.parametrize("name, peaks", NAMES)
def test_peak_per_device_and_precision(name, peaks):
    for precision, peak in zip(metrics.PRECISIONS, peaks):
        assert metrics.lookup_peak_tflops(name, precision)[0] == peak, (name, precision)
        assert metrics.device_peak_tflops(name, precision) == peak
    assert metrics.lookup_peak_tflops(name.lower(), "fp16")[0] == peaks[1]  # case does not matter


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A10G",
        "NVIDIA H20",
        "NVIDIA B200",
        "NVIDIA H100 PCIe 2",
        "H100",
        "NVIDIA GeForce RTX 4080",
        "AMD Instinct MI300X",
        "",
    ],
)
def test_unknown_devices_get_no_peak_and_say_which(name):
    peak, why = metrics.lookup_peak_tflops(name, "bf16")
    assert peak is None and repr(name) in why and "--peak-tflops" in why


def test_no_bf16_units_is_said():
    assert metrics.lookup_peak_tflops("Tesla T4", "bf16") == (None, "Tesla T4 has no bf16 tensor cores")
    with pytest.raises(ValueError, match="precision"):
        metrics.lookup_peak_tflops("NVIDIA H200", "fp8")


@pytest.fixture
def restore_matmul_precision():
    """Tests below change torch's real fp32-matmul setting (patching `allow_tf32` cannot be undone: it is
    not a plain attribute of torch.backends.cuda.matmul); put it back afterwards."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def test_fp32_runs_use_tf32_only_when_torch_enables_it(restore_matmul_precision):
    assert metrics.training_precision(bf16=True) == "bf16" and metrics.training_precision(fp16=True) == "fp16"
    torch.set_float32_matmul_precision("highest")
    assert metrics.training_precision() == "fp32"
    torch.set_float32_matmul_precision("high")
    assert metrics.training_precision() == "tf32"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True  # the older switch says the same
    assert metrics.training_precision() == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert metrics.training_precision(bf16=True) == "bf16" and metrics.training_precision() == "fp32"


def _args(peak=None, fp16=False, bf16=False):
    return argparse.Namespace(peak_tflops=peak, fp16=fp16, bf16=bf16)


def test_run_peak(monkeypatch, restore_matmul_precision):
    from megaphi.training.run_info import resolve_peak_tflops

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert resolve_peak_tflops(_args(bf16=True), gpu) == (
        756.5,
        "MFU peak 756.5 TFLOP/s (NVIDIA H100 PCIe, dense bf16)",
    )
    torch.set_float32_matmul_precision("highest")
    assert resolve_peak_tflops(_args(), gpu)[0] == 51.2  # fp32 run: not the bf16 peak
    assert resolve_peak_tflops(_args(peak=100.0, bf16=True), gpu) == (100.0, "MFU peak 100 TFLOP/s (--peak-tflops)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H20")
    peak, text = resolve_peak_tflops(_args(bf16=True), gpu)
    assert peak is None and text.startswith("MFU n/a: unknown device 'NVIDIA H20'")
    assert resolve_peak_tflops(_args(bf16=True), torch.device("cpu"))[0] is None
