"""benchmarks/train.py: a CPU grid of a 1-layer model (every row measured, the JSON and the table
written), the grid syntax, and the out-of-memory and --find-max-micro-batch logic with made-up
results (no GPU needed). Timings are not asserted."""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "train.py"
TINY = [
    "--num-layers",
    "1",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "2",
    "--ffn-hidden-size",
    "64",
    "--rotary-dim",
    "8",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--threads",
    "1",
]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def test_cpu_grid_reports_every_configuration(tmp_path):
    out = tmp_path / "train.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *TINY,
            "--grid",
            "compile=off recompute=none,selective loss_chunk=0,8",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["recompute"], r["loss_chunk"]) for r in rows] == [
        ("none", 0),
        ("none", 8),
        ("selective", 0),
        ("selective", 8),
    ]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["compile"] == "off" and r["micro_batch"] == 2
        assert r["ms_per_step"] > 0 and r["tokens_per_sec"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None  # no peak for a CPU
        assert r["peak_memory_gib"] > 0 and r["forward_backward_memory_gib"] >= 0
        assert isinstance(r["host_syncs_per_step"], (int, float)) and r["host_syncs_per_step"] >= 0
        assert isinstance(r["value_reads_per_step"], dict) and len(r["step_ms"]["wall"][0]) == 2
        assert r["loss_first"] > 0 and r["loss_last"] > 0
        assert r["time_vs_baseline"] > 0
    assert rows[0]["time_vs_baseline"] == 1.0
    setup = report["setup"]
    assert setup["layers"] == 1 and setup["hidden"] == 32 and setup["seq_length"] == 32
    assert setup["tokens_per_step"] == 64 and setup["device"].startswith("CPU")
    assert report["baseline"].startswith("compile off, recompute none, loss chunk off")
    table = proc.stdout
    assert (
        "| compile | recompute | loss chunk | micro batch | ms/step | tokens/s | TFLOP/s | MFU | peak mem GiB |"
        in table
    )
    for recompute, chunk in (("none", "off"), ("none", "8"), ("selective", "off"), ("selective", "8")):
        assert f"| off | {recompute} | {chunk} | 2 |" in table


def test_grid_syntax():
    rows = bench.parse_grid(["compile=off,on micro_batch=4,8", "recompute=full"], cuda=False, default_micro_batch=2)
    assert rows[0] == {"compile": "off", "recompute": "none", "loss_chunk": 0, "micro_batch": 4}
    assert len(rows) == 5 and rows[-1] == {"compile": "off", "recompute": "full", "loss_chunk": 0, "micro_batch": 2}
    default = bench.parse_grid(None, cuda=True, default_micro_batch=8)
    assert len(default) == 12 and {r["loss_chunk"] for r in default} == {0, 4096}
    for bad in ("compile=maybe", "recompute=some", "micro_batch=0", "loss_chunk=-1", "layers=2", "compile"):
        with pytest.raises(SystemExit):
            bench.parse_grid([bad], cuda=False, default_micro_batch=2)


def _fake_results(fits_up_to):
    """run_config stand-in: micro batches above fits_up_to run out of memory; throughput grows with the
    micro batch; the compiled rows are 20% faster."""
    calls = []

    def run_config(args, cfg, workdir, index):
        calls.append(dict(cfg))
        if cfg["micro_batch"] > fits_up_to:
            return {"status": "oom", "reason": "OutOfMemoryError: CUDA out of memory"}
        seconds = 0.1 * (1 + cfg["micro_batch"]) / cfg["micro_batch"] * (0.8 if cfg["compile"] == "on" else 1.0)
        return {
            "status": "ok",
            "step_seconds": [seconds] * 3,
            "step_cpu_seconds": [seconds] * 3,
            "warmup_seconds": 1.0,
            "loss_first": 10.0,
            "loss_last": 9.0,
            "peak_memory_bytes": 2**30,
            "step_memory_bytes": 2**29,
            "forward_backward_memory_bytes": 2**28 * cfg["micro_batch"],
            "value_reads_per_step": {"torch": 2.0},
            "value_read_sites": {},
            "cuda_syncs_per_step": 1.0,
            "cuda_sync_sites": {},
            "setup": {
                "device": "NVIDIA H200",
                "precision": "bf16",
                "peak_tflops": 989.4,
                "flops_per_token": 1e10,
                "tokens_per_step": 2048 * cfg["micro_batch"],
                "parameters": 1,
                "layers": 24,
                "hidden": 2048,
                "ffn": 8192,
                "heads": 32,
                "vocab": 51200,
                "seq_length": 2048,
                "zero_stage": 1,
                "accumulation": 1,
            },
        }

    return run_config, calls


def _args(tmp_path, **over):
    values = dict(rounds=1, json=str(tmp_path / "out.json"), model="phi-1", warmup=2, steps=3, clock="wall")
    values.update(over)
    return argparse.Namespace(**values)


def test_out_of_memory_rows_and_larger_micro_batches_not_tried(tmp_path, monkeypatch):
    run_config, calls = _fake_results(fits_up_to=8)
    monkeypatch.setattr(bench, "run_config", run_config)
    configs = bench.parse_grid(["compile=off,on micro_batch=8,16,32"], cuda=True, default_micro_batch=8)
    grid = bench.GridRun(_args(tmp_path, rounds=2), configs, str(tmp_path))
    grid.run_rounds()
    # 16 ran out of memory in round 1, so 32 was never started; failed rows are not rerun in round 2
    assert sum(1 for c in calls if c["micro_batch"] == 32) == 0
    assert sum(1 for c in calls if c["micro_batch"] == 16) == 2
    assert sum(1 for c in calls if c["micro_batch"] == 8) == 4
    report = json.loads((tmp_path / "out.json").read_text())
    status = {(r["compile"], r["micro_batch"]): r["status"] for r in report["rows"]}
    assert status == {
        ("off", 8): "ok",
        ("off", 16): "oom",
        ("off", 32): "oom",
        ("on", 8): "ok",
        ("on", 16): "oom",
        ("on", 32): "oom",
    }
    not_run = next(r for r in report["rows"] if r["compile"] == "off" and r["micro_batch"] == 32)
    assert not_run["reason"] == "not run: micro batch 16 ran out of memory"
    compiled = next(r for r in report["rows"] if r["compile"] == "on" and r["micro_batch"] == 8)
    assert compiled["time_vs_baseline"] == pytest.approx(0.8)
    assert compiled["host_syncs_per_step"] == 1.0 and compiled["mfu"] > 0
    table = bench.markdown_table(report)
    assert "| off | none | off | 16 | OOM |" in table and "synchronizing CUDA calls" in table
    assert "- compile on, recompute none, loss chunk off, micro batch 32: oom: not run: micro batch 16" in table


def test_find_max_micro_batch_runs_the_others_at_the_fastest_that_fit(tmp_path, monkeypatch):
    run_config, calls = _fake_results(fits_up_to=16)
    monkeypatch.setattr(bench, "run_config", run_config)
    configs = bench.parse_grid(
        ["compile=off,on recompute=none,full micro_batch=4,8,16,32"], cuda=True, default_micro_batch=8
    )
    grid = bench.GridRun(_args(tmp_path), configs, str(tmp_path))
    grid.find_max_micro_batch([c["micro_batch"] for c in configs])
    grid.run_rounds()
    assert grid.best_micro_batch == 16
    assert [(c["compile"], c["recompute"], c["micro_batch"]) for c in calls] == [
        ("off", "none", 4),
        ("off", "none", 8),
        ("off", "none", 16),
        ("off", "none", 32),
        ("off", "full", 16),
        ("on", "none", 16),
        ("on", "full", 16),
    ]
    report = grid.report()
    assert report["best_micro_batch"] == 16 and len(report["rows"]) == 7
    assert "Fastest micro batch that fit (--find-max-micro-batch): 16" in bench.markdown_table(report)


def test_gpu_report_shows_the_benchmark_rows(tmp_path, monkeypatch):
    """tools/gpu_report.py reads the JSON a bench_* step of tools/gpu_check.sh leaves."""
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_report

    run_config, _ = _fake_results(fits_up_to=16)
    monkeypatch.setattr(bench, "run_config", run_config)
    logs = tmp_path / "logs"
    logs.mkdir()
    configs = bench.parse_grid(["compile=off,on loss_chunk=4096 micro_batch=8,16,32"], cuda=True, default_micro_batch=8)
    grid = bench.GridRun(_args(tmp_path, json=str(logs / "bench_phi-1.json")), configs, str(tmp_path))
    grid.find_max_micro_batch([8, 16, 32])
    grid.run_rounds()
    (logs / "steps.order").write_text("env\nbench_phi-1\n")
    (logs / "mode").write_text("gpu\n")
    for name in ("env", "bench_phi-1"):
        (logs / f"{name}.status").write_text("status=passed\nrc=0\nseconds=5\ntimeout=240\n")
        (logs / f"{name}.reason").write_text("\n")
    assert gpu_report.main(["report", str(tmp_path)]) == 0
    steps = {s["name"]: s for s in json.loads((tmp_path / "report.json").read_text())["steps"]}
    rows = steps["bench_phi-1"]["benchmark"]["rows"]
    assert [(r["compile"], r["micro_batch"], r["status"]) for r in rows] == [
        ("off", 8, "ok"),
        ("off", 16, "ok"),
        ("off", 32, "oom"),
        ("on", 16, "ok"),
    ]
    md = (tmp_path / "report.md").read_text()
    assert "| bench_phi-1 | passed | 5 | 4 configurations: 3 measured, 1 out of memory, 0 failed |" in md
    assert "| phi-1 | off | none | 4096 | 32 | OOM |" in md
    assert "| phi-1 | on | none | 4096 | 16 |" in md and "| 0.80 |" in md
    assert "- bench_phi-1: fastest micro batch that fit: 16" in md
