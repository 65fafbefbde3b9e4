"""The helper of tools/gpu_check.sh: facts about the machine, and the report of a check.

    python tools/gpu_report.py env [PATH]          # JSON: Python, torch, CUDA, GPU (torch and nvidia-smi),
                                                   # nvcc, deepspeed, flash-attn; exit 1 when torch is missing
    python tools/gpu_report.py check-train DIR     # exit 1 unless DIR/metrics.jsonl shows a falling loss
    python tools/gpu_report.py report DIR          # DIR/report.json + report.md from DIR/logs

gpu_check.sh leaves, per step NAME, in DIR/logs: NAME.log (its output), NAME.status (status=passed|
failed|skipped|not run, rc=, seconds=, timeout=), NAME.reason (why it failed, was skipped or not run),
and for some steps more: pytest_cuda.xml and pytest_compile_cuda.xml (JUnit), kernels.json
(benchmarks/kernels.py --json), NAME/metrics.jsonl (training), NAME.json (bench_*: benchmarks/train.py
--json). steps.order lists the steps in the order they ran. The report reads only these files, with
the standard library, so it is written even when torch or the GPU is broken.
"""

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET

WARMUP_ITERATIONS = 2  # left out of the throughput medians (allocator, cuBLAS and kernel warm-up)
TESTED_TORCH = "2.13"  # the torch CI tests; with another, version-sensitive results are provisional
STATUSES = ("passed", "failed", "skipped", "not run")


def _run(cmd, timeout=30):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment():
    """What the check ran on; each fact None where it cannot be read."""
    env = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "deepspeed": _version("deepspeed"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "triton": _version("triton"),
        "pytest": _version("pytest"),
    }
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    release = _run([nvcc, "--version"]) if nvcc else None
    env["nvcc"] = (re.search(r"release ([\d.]+)", release) or [None, release])[1] if release else None
    # nvidia-smi sees the GPU whatever the Python environment holds (a missing or CPU-only torch)
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    first = [field.strip() for field in smi.splitlines()[0].split(",")] if smi else []
    env["nvidia_smi_gpu"] = first[0] if first else None
    env["driver"] = first[2] if len(first) > 2 else None
    env["git_commit"] = _run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"])
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":  # torch is there but one of its own imports is not
            env["torch_missing"] = f"torch not importable ({e}): this check uses the image's CUDA torch"
        else:
            env["torch_missing"] = "torch missing: this check uses the image's CUDA torch"
        return env
    except Exception as e:  # a broken torch is a finding, not a crash
        env["torch_missing"] = f"torch not importable ({type(e).__name__}: {e}): this check uses the image's CUDA torch"
        return env
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if env["cuda_available"]:
        major, minor = torch.cuda.get_device_capability()
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(),
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{major}.{minor}",
            arch=f"{major}{minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    return env


# ---------------------------------------------------------------------------------------------- report


def _read(path, default=None):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def read_step(logs, name):
    fields = dict(
        line.split("=", 1)
        for line in (_read(os.path.join(logs, name + ".status"), "") or "").splitlines()
        if "=" in line
    )
    step = {
        "name": name,
        "status": fields.get("status", "missing"),
        "reason": (_read(os.path.join(logs, name + ".reason"), "") or "").strip() or None,
    }
    for key in ("rc", "seconds", "timeout"):
        if fields.get(key, "") not in ("", None):
            step[key] = int(fields[key])
    if step["status"] not in STATUSES + ("missing",):
        step["status"] = "missing"
    if step["status"] == "missing":
        step["reason"] = "the step left no status (the check was interrupted?)"
    return step


def pytest_counts(path):
    """{passed, failed, errors, skipped, total} from a JUnit XML file, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) for s in suites)
    errors = sum(int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failing = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for s in suites
        for case in s.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": total - failed - errors - skipped,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
        "total": total,
        "failing": failing[:20],
    }


def parse_backends(log_text):
    """The start-up 'backends: attention ... | layernorm ... | ...' line of megaphi.pretrain as a dict."""
    for line in (log_text or "").splitlines():
        if line.startswith("backends: "):
            parts = line[len("backends: ") :].split(" | ")
            out = {}
            for part in parts:
                key, _, value = part.partition(" ")
                out[key] = value
            return out
    return None


def training_summary(metrics_path, log_text):
    records = []
    for line in (_read(metrics_path, "") or "").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    train = [r for r in records if "loss" in r and "tokens_per_sec" in r]
    summary = {
        "iterations": len(train),
        "backends": parse_backends(log_text),
        "warnings": [
            line[len("WARNING: ") :] for line in (log_text or "").splitlines() if line.startswith("WARNING: ")
        ],
    }
    if not train:
        return summary
    steady = train[WARMUP_ITERATIONS:] if len(train) > WARMUP_ITERATIONS else train

    def median(key):
        values = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    losses = [r["loss"] for r in train if isinstance(r["loss"], (int, float))]
    summary.update(
        tokens_per_sec=median("tokens_per_sec"),
        tflops_per_gpu=median("tflops_per_gpu"),
        mfu=median("mfu"),
        ms_per_iter=median("ms_per_iter"),
        peak_memory_gb=max(
            (r["peak_memory_gb"] for r in train if isinstance(r.get("peak_memory_gb"), (int, float))), default=None
        ),
        skipped_steps=train[-1].get("skipped_steps"),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
    )
    tail = losses[-3:]
    summary["loss_falling"] = bool(len(losses) >= 2 and statistics.mean(tail) < losses[0])
    val = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    summary["val_loss"] = val[-1] if val else None
    return summary


BENCHMARK_FIELDS = (
    "compile",
    "recompute",
    "loss_chunk",
    "micro_batch",
    "status",
    "reason",
    "ms_per_step",
    "tokens_per_sec",
    "tflops",
    "mfu",
    "peak_memory_gib",
    "forward_backward_memory_gib",
    "host_syncs_per_step",
    "time_vs_baseline",
)


def benchmark_summary(path):
    """The rows of a benchmarks/train.py --json file (rewritten after each configuration, so a step
    that timed out still shows what it measured), or None."""
    try:
        data = json.loads(_read(path, "") or "null")
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return None
    return {
        "setup": data.get("setup"),
        "baseline": data.get("baseline"),
        "best_micro_batch": data.get("best_micro_batch"),
        "rows": [{k: r.get(k) for k in BENCHMARK_FIELDS} for r in data["rows"] if isinstance(r, dict)],
    }


def check_training(log_dir):
    """Exit status of a training step: 0 when metrics.jsonl holds finite losses that fall."""
    t = training_summary(os.path.join(log_dir, "metrics.jsonl"), "")
    if not t["iterations"]:
        print(f"no training records in {log_dir}/metrics.jsonl")
        return 1
    print(
        f"{t['iterations']} iterations, loss {t['loss_first']} -> {t['loss_last']}, "
        f"tokens/s {t['tokens_per_sec']}, MFU {t['mfu']}, peak memory {t['peak_memory_gb']} GiB"
    )
    if not t["loss_falling"]:
        print(f"the loss did not fall: {t['loss_first']} at the first iteration, {t['loss_last']} at the last")
        return 1
    return 0


def build_report(out_dir):
    logs = os.path.join(out_dir, "logs")
    order = [n for n in (_read(os.path.join(logs, "steps.order"), "") or "").split() if n]
    env = None
    try:
        env = json.loads(_read(os.path.join(logs, "env.json"), "") or "null")
    except ValueError:
        pass
    steps = []
    for name in order:
        step = read_step(logs, name)
        log_text = _read(os.path.join(logs, name + ".log"), "")
        if name in ("tests_cuda", "tests_compile_cuda"):
            step["tests"] = pytest_counts(os.path.join(logs, "pytest_" + name[len("tests_") :] + ".xml"))
        elif name == "kernels":
            try:
                step["kernels"] = json.loads(_read(os.path.join(logs, "kernels.json"), "") or "null")
            except ValueError:
                step["kernels"] = None
        elif name.startswith("train_"):
            step["training"] = training_summary(os.path.join(logs, name, "metrics.jsonl"), log_text)
        elif name.startswith("bench_"):
            step["benchmark"] = benchmark_summary(os.path.join(logs, name + ".json"))
        elif name == "install":
            installed = re.search(r"^Successfully installed (.*)$", log_text or "", re.MULTILINE)
            step["installed"] = installed.group(1).split() if installed else []
        elif name == "build":
            usable = re.search(r"^megaphi kernels: (.*)$", log_text or "", re.MULTILINE)
            step["kernels_usable"] = usable.group(1) if usable else None
        steps.append(step)
    counts = {s: sum(1 for step in steps if step["status"] == s) for s in STATUSES}
    mode = _read(os.path.join(logs, "mode"), "unknown").strip()
    torch_version = (env or {}).get("torch")
    provisional = bool(torch_version) and not _same_minor(torch_version, TESTED_TORCH)
    for step in steps:  # compile graphs and their timings change with the torch version
        step["provisional"] = provisional and (
            step["name"] == "tests_compile_cuda" or step["name"].startswith("bench_")
        )
    return {
        "mode": mode,
        "environment": env,
        "steps": steps,
        "counts": counts,
        "tested_torch": TESTED_TORCH,
        "torch_provisional": provisional,
        "ok": counts["failed"] == 0 and all(s["status"] != "missing" for s in steps),
    }


def _same_minor(version, minor):
    """'2.11.0+cu130' against '2.13': the same major.minor?"""
    match = re.match(r"(\d+\.\d+)", version or "")
    return bool(match) and match.group(1) == minor


def _fmt(value, spec="", none="–"):
    if value is None:
        return none
    return format(value, spec) if spec else str(value)


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _gpu_line(env):
    if env.get("gpu"):
        gpu = f"{env['gpu']} (sm_{env['arch']}, {env.get('gpu_memory_gib')} GiB, driver {env.get('driver')})"
    elif env.get("nvidia_smi_gpu"):
        gpu = f"{env['nvidia_smi_gpu']} seen by nvidia-smi (driver {env.get('driver')}), not usable by torch"
    else:
        gpu = "none"
    torch_text = env.get("torch_missing") or f"torch {env.get('torch')} (CUDA build: {env.get('torch_cuda') or 'none'})"
    return (
        f"GPU: {gpu} · {torch_text} · Python {env.get('python')} · nvcc {env.get('nvcc')} · "
        f"deepspeed {env.get('deepspeed')} · flash-attn {env.get('flash_attn')} · commit {env.get('git_commit')}"
    )


def markdown(report):
    env = report["environment"] or {}
    counts = report["counts"]
    lines = [
        "# megaphi GPU check",
        "",
        f"mode: **{report['mode']}** · {'no step failed' if report['ok'] else 'SOME STEPS FAILED'} "
        f"({counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
        f"{counts['not run']} not run: budget)",
        "",
        _gpu_line(env),
        "",
    ]
    if report.get("torch_provisional"):
        lines += [
            f"**torch {env.get('torch')} is not the torch CI tests ({report['tested_torch']})**: the "
            "version-sensitive results (compiled benchmark rows, compile tests, graph breaks) are "
            "provisional.",
            "",
        ]
    lines += ["| step | status | seconds | result / reason |", "|---|---|---|---|"]
    for step in report["steps"]:
        lines.append(
            f"| {step['name']} | {step['status']} | {_fmt(step.get('seconds'))} | "
            f"{_cell(_step_result(step))}{' (provisional)' if step.get('provisional') else ''} |"
        )
    for step in report["steps"]:
        tests = step.get("tests")
        if not tests:
            continue
        lines += [
            "",
            f"**pytest -m cuda** ({step['name']}): {tests['passed']} passed, {tests['failed']} failed, "
            f"{tests['errors']} errors, {tests['skipped']} skipped",
        ]
        lines += [f"- failing: {name}" for name in tests["failing"]]
    kernels = next((s.get("kernels") for s in report["steps"] if s.get("kernels")), None)
    if kernels:
        lines += [
            "",
            f"**Kernels** ({kernels.get('device')}, {kernels.get('dtype')}; device copy "
            f"{kernels['copy_gb_per_s']:.0f} GB/s)",
            "",
            "| op | implementation | µs | GB/s | % of copy |",
            "|---|---|---|---|---|",
        ]
        for r in kernels["rows"]:
            lines.append(
                f"| {r['op']} | {r['implementation']} | {_fmt(r['us'], '.1f')} | {_fmt(r['gb_per_s'], '.0f')}"
                f" | {_fmt(r['percent_of_copy'], '.0f')} |"
            )
    runs = [s for s in report["steps"] if s.get("training")]
    if runs:
        lines += [
            "",
            "**Training** (`python -m megaphi.pretrain --mock-data`; medians after "
            f"{WARMUP_ITERATIONS} warm-up iterations)",
            "",
            "| run | status | tokens/s | TFLOP/s/GPU | MFU | peak mem GiB | loss first → last | falling | "
            "attention | layernorm | rotary | optimizer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in runs:
            t = s["training"]
            b = t.get("backends") or {}
            mfu = t.get("mfu")
            mfu_text = "–" if not t["iterations"] else "n/a" if mfu is None else f"{100 * mfu:.1f}%"
            tflops = t.get("tflops_per_gpu")
            lines.append(
                f"| {s['name'][len('train_') :]} | {s['status']} | {_fmt(t.get('tokens_per_sec'), ',.0f')} | "
                f"{_fmt(tflops, '.1f' if tflops is None or tflops >= 10 else '.3g')} | {mfu_text} | "
                f"{_fmt(t.get('peak_memory_gb'), '.1f')} | {_fmt(t.get('loss_first'), '.3f')} → "
                f"{_fmt(t.get('loss_last'), '.3f')} | {_yes_no(t.get('loss_falling'))} | "
                f"{_cell(b.get('attention', '–'))} | {_cell(b.get('layernorm', '–'))} | "
                f"{_cell(b.get('rotary', '–'))} | "
                f"{_cell(b.get('optimizer', '–'))} |"
            )
        for s in runs:
            lines += [f"- {s['name']}: WARNING {w}" for w in s["training"].get("warnings", [])]
    lines += benchmark_markdown([s for s in report["steps"] if s.get("benchmark")])
    lines += ["", "Everything (this report, `report.json`, `logs/<step>.log`): `gpu_check.tar.gz`."]
    return "\n".join(lines) + "\n"


def benchmark_markdown(steps):
    if not steps:
        return []
    lines = [
        "",
        "**Training step** (`benchmarks/train.py`, `--mock-data`, each configuration in its own process; "
        "medians; time ratio against the first configuration at the same micro batch)",
        "",
        "| run | compile | recompute | loss chunk | micro batch | ms/step | tokens/s | TFLOP/s | MFU | "
        "peak mem GiB | host syncs/step | time vs base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        bench = s["benchmark"]
        for r in bench["rows"]:
            compiled = r["compile"] + (" (provisional)" if s.get("provisional") and r["compile"] == "on" else "")
            head = (
                f"| {s['name'][len('bench_') :]} | {compiled} | {r['recompute']} | {r['loss_chunk'] or 'off'} "
                f"| {r['micro_batch']} |"
            )
            if r["status"] != "ok":
                lines.append(head + f" {str(r['status']).upper()} |" + " |" * 6)
                continue
            mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            tflops = r.get("tflops")
            lines.append(
                head + f" {_fmt(r.get('ms_per_step'), '.1f')} | {_fmt(r.get('tokens_per_sec'), ',.0f')} | "
                f"{_fmt(tflops, '.1f' if tflops is None or tflops >= 10 else '.3g')} | {mfu} | "
                f"{_fmt(r.get('peak_memory_gib'), '.2f')} | {_fmt(r.get('host_syncs_per_step'), 'g')} | "
                f"{_fmt(r.get('time_vs_baseline'), '.2f')} |"
            )
    for s in steps:
        if s["benchmark"].get("best_micro_batch"):
            lines.append(f"- {s['name']}: fastest micro batch that fit: {s['benchmark']['best_micro_batch']}")
    return lines


def _yes_no(value):
    return "–" if value is None else "yes" if value else "no"


def _step_result(step):
    if step["status"] != "passed":
        return step.get("reason") or f"exit code {step.get('rc')}"
    if step.get("tests"):
        t = step["tests"]
        return f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
    if step.get("kernels"):
        return f"device copy {step['kernels']['copy_gb_per_s']:.0f} GB/s; {len(step['kernels']['rows'])} rows"
    if step.get("training"):
        t = step["training"]
        return f"{t['iterations']} iterations, loss falling: {_yes_no(t.get('loss_falling'))}"
    if step.get("benchmark"):
        rows = step["benchmark"]["rows"]
        counts = {status: sum(1 for r in rows if r["status"] == status) for status in ("ok", "oom", "error")}
        return (
            f"{len(rows)} configurations: {counts['ok']} measured, {counts['oom']} out of memory, "
            f"{counts['error']} failed"
        )
    if step.get("installed"):
        return f"installed {len(step['installed'])} packages: {', '.join(step['installed'])}"
    if step["name"] == "install":
        return "nothing was missing"
    if step.get("kernels_usable"):
        return f"megaphi kernels: {step['kernels_usable']}"
    return step.get("reason") or "ok"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["env"] and len(argv) <= 2:
        env = environment()
        text = json.dumps(env, indent=1)
        print(text)
        if len(argv) == 2:
            with open(argv[1], "w") as f:
                f.write(text + "\n")
        if env.get("torch_missing"):
            print(
                env["torch_missing"]
                + (f" (nvidia-smi sees {env['nvidia_smi_gpu']})" if env.get("nvidia_smi_gpu") else "")
            )
            return 1
        return 0
    if argv[:1] == ["check-train"] and len(argv) == 2:
        return check_training(argv[1])
    if argv[:1] == ["report"] and len(argv) == 2:
        report = build_report(argv[1])
        with open(os.path.join(argv[1], "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        text = markdown(report)
        with open(os.path.join(argv[1], "report.md"), "w") as f:
            f.write(text)
        print(text, end="")
        return 0
    print("usage: python tools/gpu_report.py env [PATH] | check-train DIR | report DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
