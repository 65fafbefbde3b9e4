"""Messages and streams (results on stdout, warnings and DeepSpeed's log lines on stderr, one line per
error, --version), the DeepSpeed JSON against --clip-grad / --zero-stage, and logging continuity (a
resumed run continues its W&B run; TensorBoard gets the run's arguments as text)."""

import json
import subprocess
import sys
import types

import pytest

from megaphi.training.arguments import ArgumentError, parse_args
from megaphi.training.deepspeed_config import build_deepspeed_config, resolve_deepspeed


def _args(*extra, world_size=1):
    return parse_args(
        ["--model", "tiny", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "4", "--mock-data", *extra],
        world_size=world_size,
    )


def _ds_json(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_json_gradient_clipping_against_clip_grad(tmp_path):
    path = _ds_json(tmp_path, {"gradient_clipping": 0.5})
    settings = resolve_deepspeed(_args("--deepspeed-config", path))
    assert settings.config["gradient_clipping"] == 0.5 and settings.clip_grad == 0.5
    assert settings.clip_grad_source == f"gradient_clipping in {path}"
    with pytest.raises(ArgumentError, match=r"gradient_clipping=0.5 contradicts --clip-grad 1; give one of them"):
        build_deepspeed_config(_args("--deepspeed-config", path, "--clip-grad", "1.0"))
    args = _args("--deepspeed-config", path, "--clip-grad", "0.5")  # the same value twice: fine
    assert build_deepspeed_config(args)["gradient_clipping"] == 0.5
    assert build_deepspeed_config(_args())["gradient_clipping"] == 1.0  # the default


def test_zero_stage_source_is_credited(tmp_path):
    path = _ds_json(tmp_path, {"zero_optimization": {"stage": 2}})
    settings = resolve_deepspeed(_args("--deepspeed-config", path))
    assert settings.config["zero_optimization"]["stage"] == 2
    assert (settings.zero_stage, settings.zero_stage_source) == (2, f"zero_optimization.stage in {path}")
    with pytest.raises(ArgumentError, match=r"zero_optimization.stage=2 contradicts --zero-stage \(stage 1\)"):
        build_deepspeed_config(_args("--deepspeed-config", path, "--zero-stage", "1"))
    settings = resolve_deepspeed(_args())
    assert (settings.zero_stage, settings.zero_stage_source) == (0, "default with 1 data-parallel rank(s)")
    settings = resolve_deepspeed(_args("--bf16"))
    assert settings.zero_stage == 1 and settings.zero_stage_source.startswith("raised from 0 (default with 1")
    assert resolve_deepspeed(_args("--zero-stage", "2")).zero_stage_source == "--zero-stage"


def test_warnings_on_stderr_results_on_stdout(capsys):
    from megaphi.training.messages import say_rank0
    from megaphi.training.metrics import format_train_line

    say_rank0("warning: no --save: nothing is saved")
    say_rank0("resumed from x at iteration 3")
    captured = capsys.readouterr()
    assert captured.err == "warning: no --save: nothing is saved\n"
    assert captured.out == "resumed from x at iteration 3\n"
    line = format_train_line(
        {
            "iteration": 1,
            "train_iters": 2,
            "consumed_samples": 2,
            "loss": 1.0,
            "lr": 1e-3,
            "loss_scale": 1.0,
            "skipped_steps": 0,
            "ms_per_iter": 5.0,
            "tokens_per_sec": 10.0,
            "tflops_per_gpu": 0.01,
            "mfu": None,
        }
    )
    assert "TFLOP/s per device" in line and "GPU" not in line


def test_deepspeed_log_lines_go_to_stderr():
    code = (
        "from megaphi.training.messages import deepspeed_logs_to_stderr\n"
        "deepspeed_logs_to_stderr()\n"
        "from deepspeed.utils import logger\n"
        "logger.warning('memory dump marker')\n"
        "print('result line')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "result line\n"  # DeepSpeed's accelerator line and its logger: not on stdout
    assert "memory dump marker" in proc.stderr


def test_convert_missing_folder_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaphi.cli.convert_checkpoint",
            "megaphi-to-hf",
            str(tmp_path / "nope"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"megaphi-convert megaphi-to-hf: error: {tmp_path / 'nope'}: neither a model folder")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_every_command_has_version():
    from megaphi import __version__

    commands = {
        "convert_checkpoint": "megaphi-convert",
        "preprocess_data": "megaphi-preprocess",
        "merge_datasets": "megaphi-merge-datasets",
        "train_tokenizer": "megaphi-train-tokenizer",
        "make_stdlib_corpus": "megaphi-stdlib-corpus",
        "generate": "megaphi-generate",
        "eval_humaneval": "megaphi-eval",
        "plot_metrics": "megaphi-plot",
    }
    code = (
        "import contextlib, importlib, io, sys\n"
        f"for name in {sorted(commands)!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            importlib.import_module('megaphi.cli.' + name).main(['--version'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, name\n"
        "    print(name, out.getvalue().strip())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert got == {name: f"{prog} {__version__}" for name, prog in commands.items()}


# ----------------------------------------------------------------------------- item 8: logging continuity
def test_tensorboard_gets_the_arguments_as_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megaphi.training.metrics import open_metrics_writer

    args = _args("--tensorboard-dir", str(tmp_path / "tb"), "--log-dir", str(tmp_path / "logs"))
    writer = open_metrics_writer(args)
    writer.write({"iteration": 1, "consumed_samples": 2, "loss": 3.0})
    writer.write({"iteration": 2, "consumed_samples": 4, "loss": 2.5})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "arguments/text_summary" in events.Tags()["tensors"]
    (text_event,) = events.Tensors("arguments/text_summary")  # once, not per log
    text = text_event.tensor_proto.string_val[0].decode()
    assert "| `--lr` | `0.001` |" in text and "| `--micro-batch-size` | `2` |" in text
    assert [e.value for e in events.Scalars("lm loss")] == [3.0, 2.5]


class _FakeWandb(types.ModuleType):
    """Stands for the wandb package (not installed here): records what init was asked."""

    def __init__(self):
        super().__init__("wandb")
        self.inits = []
        self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.inits)}")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = types.SimpleNamespace(id=kwargs["id"], logged=[])
        run.log = lambda values, step: run.logged.append((step, values))
        run.finish = lambda: None
        return run


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from megaphi.training.metrics import open_metrics_writer
    from megaphi.training.wandb_writer import RUN_ID_NAME

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    save = tmp_path / "ckpt"
    for _ in range(2):  # the first run, then a resumed one
        args = _args("--wandb-project", "p", "--save", str(save))
        writer = open_metrics_writer(args)
        writer.write({"iteration": 1, "loss": 2.0})
        writer.close()
    assert [i["id"] for i in fake.inits] == ["id0", "id0"]
    assert all(i["resume"] == "allow" for i in fake.inits)
    assert (save / RUN_ID_NAME).read_text().strip() == "id0"
    args = _args("--wandb-project", "p", "--save", str(tmp_path / "other"))  # another run: another id
    open_metrics_writer(args).close()
    assert fake.inits[-1]["id"] == "id2"


def test_wandb_offline_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from megaphi.training.metrics import open_metrics_writer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for _ in range(2):
        args = _args(
            "--wandb-project", "p", "--save", str(tmp_path / "ckpt"), "--wandb-save-dir", str(tmp_path / "wandb")
        )
        writer = open_metrics_writer(args)
        writer.write({"iteration": len(ids) + 1, "loss": 2.0})
        ids.append(writer.wandb.run.id)
        writer.close()
    assert ids[0] == ids[1]
