"""FLOPs per token, MFU, peak lookup, the metrics.jsonl / TensorBoard writer and the curves plot."""

import json
import pathlib

import pytest
import torch

from megaphi.training import metrics


def test_flops_per_token_matches_design_numbers():
    # docs/design.md: 9.085e9 (phi-1) and 2.328e9 (phi-1-small) at s = 2048
    phi1 = metrics.flops_per_token(24, 2048, 8192, 51200, 2048)
    small = metrics.flops_per_token(20, 1024, 4096, 51200, 2048)
    assert phi1 == pytest.approx(9.085e9, rel=2e-4)
    assert small == pytest.approx(2.328e9, rel=2e-4)


def test_matmul_params_counts_the_real_model_matmul_weights():
    from megaphi.model import PhiForCausalLM, get_preset

    config = get_preset("tiny", hidden_size=64, intermediate_size=192, num_attention_heads=2, vocab_size=256)
    model = PhiForCausalLM(config)
    # every 2-d weight except the embedding table (a lookup, not a matmul)
    counted = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    assert metrics.matmul_params(2, 64, 192, 256) == counted


def test_throughput_and_mfu():
    tok_s, tflops, mfu = metrics.throughput(
        tokens=2048 * 8, seconds=2.0, flops_token=1e9, num_devices=2, peak_tflops=100.0
    )
    assert tok_s == 8192.0
    assert tflops == pytest.approx(8192 * 1e9 / 2 / 1e12)
    assert mfu == pytest.approx(tflops / 100.0)
    assert metrics.throughput(10, 1.0, 1e9, 1, None)[2] is None  # CPU: no MFU without --peak-tflops


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("Tesla T4", None),
    ],
)
def test_bf16_peak_by_device_name(name, peak):
    # the default precision is bf16 (more devices and precisions: test_mfu.py)
    assert metrics.device_peak_tflops(name) == peak


def test_writer_jsonl(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.write({"iteration": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": torch.tensor(0.5), "mfu": None})
    writer.write({"iteration": 1, "val_loss": float("nan")}, prefix="valid")
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"iteration": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "mfu": None}
    assert lines[1] == {"iteration": 1, "val_loss": "nan"}


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install tensorboard"):
            metrics.MetricsWriter(str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        writer = metrics.MetricsWriter(str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))
        writer.write({"iteration": 1, "loss": 1.5, "lr": 1e-3})
        writer.write({"iteration": 2, "loss": 1.25, "lr": 2e-3})
        writer.write({"iteration": 2, "val_loss": 1.75}, prefix="valid")
        writer.close()
        events = EventAccumulator(str(tmp_path / "tb"))
        events.Reload()
        # Megatron-LM's tag names, so its users' dashboards carry over
        assert [(e.step, e.value) for e in events.Scalars("lm loss")] == [(1, 1.5), (2, 1.25)]
        assert [(e.step, e.value) for e in events.Scalars("learning-rate")] == [
            (1, pytest.approx(1e-3)),
            (2, pytest.approx(2e-3)),
        ]
        assert [(e.step, e.value) for e in events.Scalars("lm loss validation")] == [(2, 1.75)]


def test_megatron_tag_names_and_eta():
    record = {
        "iteration": 3,
        "train_iters": 10,
        "consumed_samples": 12,
        "loss": 2.0,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "loss_scale": 1.0,
        "ms_per_iter": 250.0,
        "mfu": None,
        "global_batch_size": 4,
        "tokens_per_sec": 9.0,
    }
    tags = metrics.scalar_tags(record)
    assert tags == {
        "lm loss": 2.0,
        "learning-rate": 1e-3,
        "grad-norm": 0.5,
        "loss-scale": 1.0,
        "iteration-time": 0.25,
        "batch-size": 4,
        "tokens-per-sec": 9.0,
    }
    assert metrics.scalar_tags({"iteration": 3, "val_loss": 1.0, "val_ppl": 2.7}, "valid") == {
        "lm loss validation": 1.0,
        "lm loss validation ppl": 2.7,
    }
    assert metrics.eta_seconds(3, 10, 0.25) == 1.75
    assert [metrics.format_duration(s) for s in (59.6, 3725, 90061, float("nan"))] == [
        "01:00",
        "01:02:05",
        "1d 01:01:01",
        "n/a",
    ]


def test_plot_metrics_writes_a_png(tmp_path):
    import subprocess
    import sys

    records = [{"iteration": i, "loss": 5.0 / i, "lr": 1e-3 * min(1.0, i / 3)} for i in range(1, 11)]
    records.append({"iteration": 10, "val_loss": 0.7, "val_ppl": 2.0})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    repo = pathlib.Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, str(repo / "tools" / "plot_metrics.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
