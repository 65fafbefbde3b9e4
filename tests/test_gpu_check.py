"""tools/gpu_check.sh: the smoke run (GPU steps skipped with a reason, the CPU training step run, the
report written), and tools/gpu_report.py on the files a GPU run leaves."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_report  # noqa: E402

GPU_STEPS = ["build", "tests_cuda", "kernels", "train_phi-1-small_bf16", "train_phi-1-small_fp16",
             "train_phi-1_bf16", "train_phi-1_fp16"]


def test_smoke_run_skips_gpu_steps_with_a_reason_and_trains_on_cpu(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "GPU_CHECK_WHEELS", "GPU_CHECK_SKIP", "GPU_CHECK_BUDGET"):
        env.pop(key, None)
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(out), "--smoke"], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert report["mode"] == "smoke" and report["ok"]
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]][:2] == ["env", "install"]
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped", steps[name]
        assert steps[name]["reason"].startswith("--smoke: the GPU steps are not run"), steps[name]
        assert f"| {name} | skipped | 0 | --smoke: the GPU steps are not run" in markdown
    assert steps["env"]["status"] == "passed" and report["environment"]["python"]
    assert steps["install"]["status"] in ("skipped", "passed") and steps["install"]["reason"] != "None"
    tiny = steps["train_cpu_tiny"]
    assert tiny["status"] == "passed", tiny
    training = tiny["training"]
    assert training["iterations"] == 8 and training["loss_falling"] is True
    assert training["backends"]["attention"] == "torch SDPA (cpu)"
    assert training["backends"]["optimizer"].startswith("torch.optim.AdamW")
    assert (out / "logs" / "train_cpu_tiny" / "metrics.jsonl").exists()
    assert "| cpu_tiny | passed |" in markdown and "| yes |" in markdown


def test_bad_arguments_are_refused(tmp_path):
    script = str(REPO / "tools" / "gpu_check.sh")
    for args in ([], [str(tmp_path), "--bogus"], [str(tmp_path), "--wheels", str(tmp_path / "none")]):
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr, args


def _write_gpu_run(out):
    """The files a GPU run of gpu_check.sh leaves (numbers made up)."""
    logs = out / "logs"
    (logs / "train_phi-1_bf16").mkdir(parents=True)
    steps = {"env": "passed", "install": "passed", "build": "passed", "tests_cuda": "failed", "kernels": "passed",
             "train_phi-1_bf16": "passed", "train_phi-1_fp16": "failed"}
    (logs / "steps.order").write_text("\n".join(steps) + "\n")
    (logs / "mode").write_text("gpu\n")
    for name, status in steps.items():
        (logs / f"{name}.status").write_text(f"status={status}\nrc={0 if status == 'passed' else 1}\nseconds=12\n"
                                             f"timeout=90\n")
        (logs / f"{name}.reason").write_text("" if status == "passed" else "timed out after 240s; last output: x\n")
    (logs / "env.json").write_text(json.dumps({"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
                                               "gpu": "NVIDIA H200", "arch": "90", "gpu_memory_gib": 139.8,
                                               "driver": "580.159.04", "deepspeed": "0.19.8"}))
    (logs / "build.log").write_text("...\nmegaphi kernels: usable on NVIDIA H200\n")
    (logs / "install.log").write_text("...\nSuccessfully installed deepspeed-0.19.8 hjson-3.1.0\n")
    (logs / "pytest_cuda.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_kernels_cuda" name="test_a"/>'
        '<testcase classname="tests.test_kernels_cuda" name="test_b"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    (logs / "kernels.json").write_text(json.dumps({"device": "NVIDIA H200", "dtype": "bf16", "copy_gb_per_s": 4300.0,
                                                   "rows": [{"op": "LN fwd", "implementation": "megaphi cuda",
                                                             "us": 40.0, "gb_per_s": 3800.0, "percent_of_copy": 88.4,
                                                             "note": None},
                                                            {"op": "LN fwd", "implementation": "torch.compile",
                                                             "us": None, "gb_per_s": None, "percent_of_copy": None,
                                                             "note": "skipped (--no-compile)"}]}))
    records = [{"iteration": i, "loss": 11.0 - 0.2 * i, "tokens_per_sec": 1000.0 * i if i <= 2 else 50000.0 + i,
                "tflops_per_gpu": 450.0 + i, "mfu": (450.0 + i) / 989.4, "peak_memory_gb": 40.0 + i,
                "skipped_steps": 0, "ms_per_iter": 300.0} for i in range(1, 11)]
    records.append({"iteration": 10, "val_loss": 8.5, "val_ppl": 4900.0})
    (logs / "train_phi-1_bf16" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (logs / "train_phi-1_bf16.log").write_text(
        "backends: attention torch SDPA, flash_attention kernel (flash-attn is not installed) | layernorm cuda "
        "(auto: megaphi._cuda) | rotary cuda (auto: megaphi._cuda) | optimizer torch.optim.AdamW (fused) in "
        "DeepSpeed BF16_Optimizer | device NVIDIA H200 | precision bf16 | MFU peak 989.4 TFLOP/s\n"
        "WARNING: something to see\n")


def test_report_of_a_gpu_run(tmp_path):
    _write_gpu_run(tmp_path)
    assert gpu_report.main(["report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["ok"] and report["counts"] == {"passed": 5, "failed": 2, "skipped": 0}
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["tests_cuda"]["tests"] == {"passed": 3, "failed": 1, "errors": 0, "skipped": 1, "total": 5,
                                            "failing": ["tests.test_kernels_cuda::test_b"]}
    assert steps["build"]["kernels_usable"] == "usable on NVIDIA H200"
    assert steps["install"]["installed"] == ["deepspeed-0.19.8", "hjson-3.1.0"]
    t = steps["train_phi-1_bf16"]["training"]
    # medians leave out the 2 warm-up iterations; peak memory is the maximum
    assert t["tokens_per_sec"] == pytest.approx(50006.5) and t["tflops_per_gpu"] == pytest.approx(456.5)
    assert t["peak_memory_gb"] == 50.0 and t["loss_falling"] is True and t["val_loss"] == 8.5
    assert t["backends"]["layernorm"] == "cuda (auto: megaphi._cuda)" and t["warnings"] == ["something to see"]
    assert steps["train_phi-1_fp16"]["training"]["iterations"] == 0
    md = (tmp_path / "report.md").read_text()
    assert "SOME STEPS FAILED" in md and "NVIDIA H200 (sm_90, 139.8 GiB, driver 580.159.04)" in md
    assert "| install | passed | 12 | installed 2 packages: deepspeed-0.19.8, hjson-3.1.0 |" in md
    assert "**pytest -m cuda**: 3 passed, 1 failed, 0 errors, 1 skipped" in md
    assert "| LN fwd | megaphi cuda | 40.0 | 3800 | 88 |" in md
    assert "| phi-1_bf16 | passed | 50,006 | 456.5 | 46.1% | 50.0 | 10.800 → 9.000 | yes |" in md
    assert "| train_phi-1_fp16 | failed | 12 | timed out after 240s; last output: x |" in md


def test_check_train_fails_when_the_loss_does_not_fall(tmp_path, capsys):
    records = [{"iteration": i, "loss": 5.0 + 0.1 * i, "tokens_per_sec": 1.0} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert gpu_report.main(["check-train", str(tmp_path)]) == 1
    assert "the loss did not fall" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text("")
    assert gpu_report.main(["check-train", str(tmp_path)]) == 1
