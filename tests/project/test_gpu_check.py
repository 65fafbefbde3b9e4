"""tools/gpu_check.sh: the smoke run on a clean copy of the repo (GPU steps skipped with a reason, the
CPU training step run with a private extension folder, the report and the archive written), the time
budget, a machine without torch, the GPU plan's order and caps, and tools/gpu_report.py on the files a
GPU run leaves."""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import gpu_report  # noqa: E402

GPU_STEPS = [
    "build",
    "bench_phi-1",
    "train_phi-1_bf16",
    "train_phi-1_fp16",
    "kernels",
    "tests_cuda",
    "bench_phi-1-small",
    "train_phi-1-small_bf16",
    "train_phi-1-small_fp16",
    "tests_compile_cuda",
]


def _clean_copy(dest):
    """The repo as a fresh clone plus the uncommitted work: git's tracked and untracked-not-ignored
    files, so no build output (megaphi/_C*.so), wheels folder or cache comes along."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode)
    return dest


def _check_env(tmp_path, **extra):
    env = dict(os.environ, PYTHON=sys.executable, TORCH_EXTENSIONS_DIR=str(tmp_path / "shared_extensions"))
    env.update(extra)
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "GPU_CHECK_WHEELS",
        "GPU_CHECK_SKIP",
        "GPU_CHECK_WORK",
        "OMP_NUM_THREADS",
    ):
        if key not in extra:
            env.pop(key, None)
    if "GPU_CHECK_BUDGET" not in extra:
        env.pop("GPU_CHECK_BUDGET", None)
    return env


def _unpack(out, tmp_path):
    """OUT_DIR holds exactly report.md and the archive; returns the unpacked report folder."""
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "report.md"]
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    check = tmp_path / "unpacked" / "gpu_check"
    assert (check / "report.md").read_text() == (out / "report.md").read_text()
    return check


def test_smoke_run_on_a_clean_copy_skips_gpu_steps_with_a_reason_and_trains_on_cpu(tmp_path):
    repo = _clean_copy(tmp_path / "repo")
    assert not list((repo / "megaphi").glob("_C*.so"))
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", "tools/gpu_check.sh", str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env=_check_env(tmp_path),
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check = _unpack(out, tmp_path)
    report = json.loads((check / "report.json").read_text())
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
    assert (check / "logs" / "train_cpu_tiny" / "metrics.jsonl").exists()
    assert "| cpu_tiny | passed |" in markdown and "| yes |" in markdown
    assert steps["bench_cpu_tiny"]["status"] == "passed", steps["bench_cpu_tiny"]
    # the CPU steps ran with one thread and a private extension folder, not the caller's shared one
    first = (check / "logs" / "train_cpu_tiny.log").read_text().splitlines()[0]
    assert first.startswith("OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=") and "shared_extensions" not in first
    assert not (tmp_path / "shared_extensions").exists()
    assert report["counts"]["not run"] == 0 and report["counts"]["failed"] == 0


def test_a_step_the_budget_cannot_hold_is_not_run_budget_not_failed(tmp_path):
    # a python that hangs in the training step: whatever the machine's speed, the budget stops it
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\ncase "$*" in *megaphi.pretrain*) exec sleep 600 ;; esac\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_check_env(tmp_path, PYTHON=str(python), GPU_CHECK_BUDGET="40"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]  # env passed, nothing failed
    report = json.loads((_unpack(out, tmp_path) / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["env"]["status"] == "passed"
    for name in ("train_cpu_tiny", "bench_cpu_tiny"):  # stopped by the budget, or not started
        assert steps[name]["status"] == "not run" and steps[name]["reason"].startswith("budget: "), steps[name]
    assert report["counts"]["failed"] == 0 and report["counts"]["not run"] == 2 and report["ok"]
    assert "2 not run: budget" in (out / "report.md").read_text()


def test_without_torch_the_check_says_torch_missing_not_no_gpu(tmp_path):
    shim = tmp_path / "no_torch" / "torch"  # found before the installed torch: an image without torch
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    bin_dir = tmp_path / "bin"  # a GPU that nvidia-smi sees
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3, 81559, 580.159.04"\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = tmp_path / "check"
    env = _check_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(shim.parent))
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((_unpack(out, tmp_path) / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert report["mode"] == "no-torch"
    missing = "torch missing: this check uses the image's CUDA torch (nvidia-smi sees NVIDIA H100 80GB HBM3)"
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["env"]["status"] == "failed" and steps["env"]["reason"].endswith(missing)
    for name in GPU_STEPS:
        assert steps[name]["status"] == "skipped" and steps[name]["reason"] == missing
    assert "train_cpu_tiny" not in steps and "no CUDA GPU" not in markdown
    assert "GPU: NVIDIA H100 80GB HBM3 seen by nvidia-smi" in markdown


def test_gpu_plan_runs_the_valuable_steps_first_inside_the_budget():
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--plan"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_check_env(pathlib.Path("/nonexistent")),
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    core = [name for kind, name, _ in rows if kind == "core"]
    tails = [name for kind, name, _ in rows if kind == "tail"]
    assert core == ["env", "install", "build", "bench_phi-1", "train_phi-1_bf16", "train_phi-1_fp16", "kernels"]
    assert set(tails) == {
        "tests_cuda",
        "bench_phi-1-small",
        "train_phi-1-small_bf16",
        "train_phi-1-small_fp16",
        "tests_compile_cuda",
    }
    # every core step fits even when each one takes its whole cap: 450 s in all, 15 s kept for the report
    assert sum(int(cap) for kind, _, cap in rows if kind == "core") <= 450 - 15
    # the script runs the GPU steps in the plan's order
    script = (REPO / "tools" / "gpu_check.sh").read_text()
    gpu_branch = script[script.index('if [ -z "$NO_GPU" ]; then') : script.index("--- CPU steps")]
    calls = {
        "build": "run_step build",
        "bench_phi-1": "bench_gpu phi-1 ",
        "train_phi-1_bf16": "train_gpu phi-1 bf16",
        "train_phi-1_fp16": "train_gpu phi-1 fp16",
        "kernels": "run_step kernels",
        "tests_cuda": "run_step tests_cuda",
        "bench_phi-1-small": "bench_gpu phi-1-small",
        "train_phi-1-small_bf16": "train_gpu phi-1-small bf16",
        "train_phi-1-small_fp16": "train_gpu phi-1-small fp16",
        "tests_compile_cuda": "run_step tests_compile_cuda",
    }
    positions = [gpu_branch.index(calls[name]) for name in core[2:] + tails]
    assert positions == sorted(positions)


def test_bad_arguments_are_refused(tmp_path):
    script = str(REPO / "tools" / "gpu_check.sh")
    for args in ([], [str(tmp_path), "--bogus"], [str(tmp_path), "--wheels", str(tmp_path / "none")]):
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr, args


def _write_gpu_run(out):
    """The files a GPU run of gpu_check.sh leaves (numbers made up)."""
    logs = out / "logs"
    (logs / "train_phi-1_bf16").mkdir(parents=True)
    steps = {
        "env": "passed",
        "install": "passed",
        "build": "passed",
        "bench_phi-1": "passed",
        "train_phi-1_bf16": "passed",
        "train_phi-1_fp16": "failed",
        "kernels": "passed",
        "tests_cuda": "failed",
        "tests_compile_cuda": "not run",
    }
    (logs / "steps.order").write_text("\n".join(steps) + "\n")
    (logs / "mode").write_text("gpu\n")
    for name, status in steps.items():
        (logs / f"{name}.status").write_text(
            f"status={status}\nrc={0 if status == 'passed' else 1}\nseconds=12\ntimeout=90\n"
        )
        (logs / f"{name}.reason").write_text(
            {
                "passed": "",
                "failed": "timed out after 240s; last output: x\n",
                "not run": "budget: 12s of GPU_CHECK_BUDGET=450s left\n",
            }[status]
        )
    row = {
        "compile": "off",
        "recompute": "none",
        "loss_chunk": 4096,
        "micro_batch": 8,
        "status": "ok",
        "ms_per_step": 400.0,
        "tokens_per_sec": 40960.0,
        "tflops": 372.1,
        "mfu": 0.376,
        "peak_memory_gib": 60.0,
        "host_syncs_per_step": 0,
        "time_vs_baseline": 1.0,
    }
    (logs / "bench_phi-1.json").write_text(
        json.dumps(
            {"best_micro_batch": 8, "rows": [row, dict(row, compile="on", ms_per_step=350.0, time_vs_baseline=0.875)]}
        )
    )
    (logs / "env.json").write_text(
        json.dumps(
            {
                "python": "3.12.3",
                "torch": "2.11.0+cu130",
                "torch_cuda": "13.0",
                "gpu": "NVIDIA H200",
                "arch": "90",
                "gpu_memory_gib": 139.8,
                "driver": "580.159.04",
                "deepspeed": "0.19.8",
            }
        )
    )
    (logs / "build.log").write_text("...\nmegaphi kernels: usable on NVIDIA H200\n")
    (logs / "install.log").write_text("...\nSuccessfully installed deepspeed-0.19.8 hjson-3.1.0\n")
    (logs / "pytest_cuda.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_kernels_cuda" name="test_a"/>'
        '<testcase classname="tests.test_kernels_cuda" name="test_b"><failure message="x"/></testcase>'
        "</testsuite></testsuites>"
    )
    (logs / "kernels.json").write_text(
        json.dumps(
            {
                "device": "NVIDIA H200",
                "dtype": "bf16",
                "copy_gb_per_s": 4300.0,
                "rows": [
                    {
                        "op": "LN fwd",
                        "implementation": "megaphi cuda",
                        "us": 40.0,
                        "gb_per_s": 3800.0,
                        "percent_of_copy": 88.4,
                        "note": None,
                    },
                    {
                        "op": "LN fwd",
                        "implementation": "torch.compile",
                        "us": None,
                        "gb_per_s": None,
                        "percent_of_copy": None,
                        "note": "skipped (--no-compile)",
                    },
                ],
            }
        )
    )
    records = [
        {
            "iteration": i,
            "loss": 11.0 - 0.2 * i,
            "tokens_per_sec": 1000.0 * i if i <= 2 else 50000.0 + i,
            "tflops_per_gpu": 450.0 + i,
            "mfu": (450.0 + i) / 989.4,
            "peak_memory_gb": 40.0 + i,
            "skipped_steps": 0,
            "ms_per_iter": 300.0,
        }
        for i in range(1, 11)
    ]
    records.append({"iteration": 10, "val_loss": 8.5, "val_ppl": 4900.0})
    (logs / "train_phi-1_bf16" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (logs / "train_phi-1_bf16.log").write_text(
        "backends: attention torch SDPA, flash_attention kernel (flash-attn is not installed) | layernorm cuda "
        "(auto: megaphi._cuda) | rotary cuda (auto: megaphi._cuda) | optimizer torch.optim.AdamW (fused) in "
        "DeepSpeed BF16_Optimizer | device NVIDIA H200 | precision bf16 | MFU peak 989.4 TFLOP/s\n"
        "WARNING: something to see\n"
    )


def test_report_of_a_gpu_run(tmp_path):
    _write_gpu_run(tmp_path)
    assert gpu_report.main(["report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["ok"] and report["counts"] == {"passed": 6, "failed": 2, "skipped": 0, "not run": 1}
    assert report["torch_provisional"] is True  # torch 2.11, CI tests 2.13
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["tests_cuda"]["tests"] == {
        "passed": 3,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "total": 5,
        "failing": ["tests.test_kernels_cuda::test_b"],
    }
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
    assert "**pytest -m cuda** (tests_cuda): 3 passed, 1 failed, 0 errors, 1 skipped" in md
    assert "| LN fwd | megaphi cuda | 40.0 | 3800 | 88 |" in md
    assert "| phi-1_bf16 | passed | 50,006 | 456.5 | 46.1% | 50.0 | 10.800 → 9.000 | yes |" in md
    assert "| train_phi-1_fp16 | failed | 12 | timed out after 240s; last output: x |" in md
    assert "(6 passed, 2 failed, 0 skipped, 1 not run: budget)" in md
    assert "| tests_compile_cuda | not run | 12 | budget: 12s of GPU_CHECK_BUDGET=450s left (provisional) |" in md
    assert "**torch 2.11.0+cu130 is not the torch CI tests (2.13)**" in md
    assert (
        "| phi-1 | off | none | 4096 | 8 | 400.0 |" in md
        and "| phi-1 | on (provisional) | none | 4096 | 8 | 350.0 |" in md
    )
    (tmp_path / "logs" / "env.json").write_text(
        json.dumps({"torch": "2.13.0+cu130", "gpu": "NVIDIA H200", "arch": "90"})
    )
    assert gpu_report.main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "provisional" not in md and "not the torch CI tests" not in md


def test_check_train_fails_when_the_loss_does_not_fall(tmp_path, capsys):
    records = [{"iteration": i, "loss": 5.0 + 0.1 * i, "tokens_per_sec": 1.0} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert gpu_report.main(["check-train", str(tmp_path)]) == 1
    assert "the loss did not fall" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text("")
    assert gpu_report.main(["check-train", str(tmp_path)]) == 1
