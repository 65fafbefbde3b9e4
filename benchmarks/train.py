"""Training step benchmark, one row per configuration: ms/step, tokens/s, TFLOP/s, MFU, peak memory
and host syncs per step of megaphi's step (python -m megaphi.pretrain's engine, schedule and data).

    python benchmarks/train.py                         # CPU: tiny preset, the default grid below
    python benchmarks/train.py --model phi-1 --bf16 \\
        --grid "compile=off,on recompute=none,selective,full loss_chunk=0,4096 micro_batch=4,8" --json out.json
    python benchmarks/train.py --model phi-1 --bf16 --grid "compile=off,on loss_chunk=4096 micro_batch=8,16,32" \\
        --find-max-micro-batch                         # compiled at the best micro batch that fits
    python benchmarks/train.py --compare-plain         # engine overhead against a plain PyTorch loop

Grid: --grid "AXIS=V1,V2 ..." is the product of its axes; --grid again adds another product. Axes:
compile off|on (megaphi.model.compile.compile_decoder_layers), recompute none|selective|full,
loss_chunk N (--loss-chunk-tokens; 0 = full logits), micro_batch N. A missing axis takes its first
default value. Default grid: compile=off,on recompute=none,selective,full loss_chunk=0,C
micro_batch=--micro-batch-size, C = 256 on CPU and 4096 on a GPU.

Each configuration runs in a fresh process (its own memory peak, allocator and in-memory compile
caches; Inductor's on-disk cache is shared, which shortens later compiles only): the model is built
directly on the device, compiled when asked, wrapped by DeepSpeed as pretrain does;
then --warmup steps, then --steps timed steps (median reported). Data: megaphi.data.mock_dataset
(what --mock-data trains on; no dataset, no tokenizer). --rounds R runs the grid R times, the order
rotated each round, and reports the median of the rounds' medians.

Columns: tokens/s = micro batch x accumulation x seq / median step time; TFLOP/s and MFU count the
model's FLOPs (megaphi.training.metrics.flops_per_token; recomputation is not counted, as in MFU);
MFU needs a known GPU peak (or --peak-tflops). Peak mem: the largest of a timed step, CUDA
max_memory_allocated, CPU the resident set (VmHWM, reset before each step, freed heap pages given
back); fwd+bwd mem: the forward + backward peak (activations, logits, gradients; before the optimizer
update) above the memory held between steps (weights, optimizer state): the part the switches act
on (the JSON also has the whole step's, optimizer update included). Host syncs/step: on
CUDA the synchronizing calls torch.cuda.set_sync_debug_mode("warn") reports; on CPU the reads of
tensor values (.item, .tolist, float, bool, ...) by megaphi's and DeepSpeed's code
(megaphi.training.host_sync_count; the JSON lists every read by call site, torch's own included).
On a busy CPU use --threads 1: waiting OpenMP threads spin and make times swing tenfold.
Ratios are against the baseline: the first value of each axis (compile off, recompute none, loss
chunk 0 in the default grid) at the same micro batch. A CUDA out-of-memory is a row "OOM" (and the
larger micro batches of the same configuration are not tried).
"""

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(BENCHMARKS, ".."))
if BENCHMARKS not in sys.path:  # loaded by path (the tests): appended, so benchmarks/*.py shadow no other module
    sys.path.append(BENCHMARKS)

from train_config_run import child_main  # noqa: E402
from train_table import (
    AXES,
    add_ratios,
    describe,
    markdown_table,
    print_compare_plain,  # noqa: E402
    same_combination,
    summarize,
)

CHOICES = {"compile": ("off", "on"), "recompute": ("none", "selective", "full")}


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=("tiny", "phi-1-small", "phi-1"))
    for flag in (
        "--num-layers",
        "--hidden-size",
        "--ffn-hidden-size",
        "--num-attention-heads",
        "--rotary-dim",
        "--vocab-size",
        "--seq-length",
    ):
        p.add_argument(flag, type=int, help="overrides the preset (default: the preset's; seq: its context)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="micro batch when the grid names none")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--zero-stage", type=int, help="default: pretrain's (0 on one rank; 1 with --bf16)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--recompute-num-layers", type=int, default=0)
    p.add_argument("--grid", action="append", help="AXIS=V1,V2 ... (see above); may be repeated")
    p.add_argument(
        "--find-max-micro-batch",
        action="store_true",
        help="run the first configuration at each micro batch of the grid (default 1, 2, 4, ... 256) "
        "until one runs out of memory; the other configurations run at the fastest that fit",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: megaphi's table for the GPU)")
    p.add_argument("--json", help="write the results here too (rewritten after each configuration)")
    p.add_argument("--logs", help="keep each configuration's output in this folder")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU: torch threads per configuration (1 is steadiest on a busy "
        "machine, where waiting OpenMP threads spin); default torch's",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what ms/step and the columns from it measure: wall time, or this process's CPU time "
        "(with --threads 1 on a busy CPU: the work done, not the waits for other programs)",
    )
    p.add_argument("--config-timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument(
        "--compare-plain",
        action="store_true",
        help="instead of the grid: the first configuration's engine steps alternating with a plain "
        "PyTorch loop (torch AdamW, no DeepSpeed) on the same model and batches (fp32)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compare_plain and (args.bf16 or args.fp16):
        p.error("--compare-plain: the plain loop runs in fp32; leave out --bf16/--fp16")
    return args


def parse_grid(specs, cuda, default_micro_batch):
    """[{axis: value}] in order: each spec's product, specs after one another, duplicates dropped."""
    if not specs:
        specs = [f"compile=off,on recompute=none,selective,full loss_chunk=0,{4096 if cuda else 256}"]
    rows = []
    for spec in specs:
        axes = {"compile": ["off"], "recompute": ["none"], "loss_chunk": [0], "micro_batch": [default_micro_batch]}
        for part in spec.split():
            name, _, values = part.partition("=")
            if name not in AXES or not values:
                raise SystemExit(f"--grid: {part!r} is not AXIS=V1,V2 with AXIS one of {', '.join(AXES)}")
            values = values.split(",")
            if name in CHOICES:
                bad = [v for v in values if v not in CHOICES[name]]
            else:
                bad = [v for v in values if not v.isdigit() or (name == "micro_batch" and int(v) < 1)]
                values = [int(v) for v in values if v.isdigit()]
            if bad:
                raise SystemExit(f"--grid: {name} takes {'|'.join(CHOICES.get(name, ('integers',)))}, got {bad}")
            axes[name] = values
        for combo in itertools.product(*(axes[a] for a in AXES)):
            row = dict(zip(AXES, combo))
            if row not in rows:
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- the grid (parent)


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_config(args, cfg, workdir, index):
    """Run one configuration in a fresh process; its result dict (status ok | oom | error)."""
    name = (
        f"{index:02d}_compile-{cfg['compile']}_recompute-{cfg['recompute']}_chunk-{cfg['loss_chunk']}"
        f"_mb-{cfg['micro_batch']}"
    )
    spec_path, result_path = os.path.join(workdir, name + ".spec.json"), os.path.join(workdir, name + ".result.json")
    log_path = os.path.join(args.logs or workdir, name + ".log")
    child_args = {k: v for k, v in vars(args).items() if k not in ("grid", "json", "logs", "child")}
    with open(spec_path, "w") as f:
        json.dump({"args": child_args, "config": cfg, "result": result_path}, f)
    # each child makes its own one-rank process group (a Trainer in a plain process), even under a launcher
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    started = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", spec_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                timeout=args.config_timeout,
            )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {args.config_timeout:g}s: {last_line(log_path)}"}
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        result = {"status": "error", "reason": f"{how} (no result): {last_line(log_path)}"}
    result["process_seconds"] = time.perf_counter() - started
    return result


def powers_of_two(limit=256):
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


class GridRun:
    """The configurations, their results per round, and the report (written again after each run)."""

    def __init__(self, args, configs, workdir):
        self.args, self.configs, self.workdir = args, list(configs), workdir
        self.results = {}  # index into configs -> [result per round]
        self.best_micro_batch = None

    def run(self, index):
        cfg = self.configs[index]
        smaller_oom = next(
            (
                c["micro_batch"]
                for i, c in enumerate(self.configs)
                if i != index
                and same_combination(c, cfg)
                and c["micro_batch"] <= cfg["micro_batch"]
                and any(r["status"] == "oom" for r in self.results.get(i, []))
            ),
            None,
        )
        if smaller_oom is not None and not self.results.get(index):
            result = {"status": "oom", "reason": f"not run: micro batch {smaller_oom} ran out of memory"}
        else:
            result = run_config(self.args, cfg, self.workdir, len(sum(self.results.values(), [])))
        self.results.setdefault(index, []).append(result)
        where = f"{result.get('process_seconds', 0):.0f}s" if result["status"] == "ok" else result.get("reason")
        print(f"[{len(sum(self.results.values(), []))}] {describe(cfg)}: {result['status']} ({where})", flush=True)
        self.write_json()
        return result

    def find_max_micro_batch(self, micro_batches):
        """The first combination at each micro batch, ascending, until one fails; the fastest that ran
        becomes every other combination's micro batch."""
        base = self.configs[0]
        others = [c for c in self.configs if not same_combination(c, base)]
        self.configs = [dict(base, micro_batch=mb) for mb in sorted(set(micro_batches))]
        tried = []
        for index in range(len(self.configs)):
            tried.append(index)
            if self.run(index)["status"] != "ok":
                break
        clock = self.args.clock
        ran = [
            dict(self.configs[i], speed=summarize(self.configs[i], self.results[i], clock)["tokens_per_sec"])
            for i in tried
            if self.results[i][-1]["status"] == "ok"
        ]
        self.configs = self.configs[: len(tried)]
        if not ran:
            return
        self.best_micro_batch = max(ran, key=lambda r: r["speed"])["micro_batch"]
        for c in others:
            c = dict(c, micro_batch=self.best_micro_batch)
            if c not in self.configs:
                self.configs.append(c)

    def run_rounds(self):
        n = len(self.configs)
        for r in range(self.args.rounds):
            shift = (r * n) // self.args.rounds  # rotate the order, so slow drifts hit every configuration
            for index in list(range(shift, n)) + list(range(shift)):
                done = self.results.get(index, [])
                if len(done) > r or (r > 0 and not any(x["status"] == "ok" for x in done)):
                    continue  # already run this round (the micro-batch search), or failed before
                self.run(index)

    def rows(self):
        return add_ratios([summarize(c, self.results.get(i, []), self.args.clock) for i, c in enumerate(self.configs)])

    def report(self):
        ok = [r for rs in self.results.values() for r in rs if r["status"] == "ok"]
        return {
            "benchmark": "megaphi training step (benchmarks/train.py)",
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "model": self.args.model,
            "setup": ok[0]["setup"] if ok else None,
            "warmup": self.args.warmup,
            "steps": self.args.steps,
            "rounds": self.args.rounds,
            "clock": self.args.clock,
            "data": "megaphi.data.mock_dataset (--mock-data)",
            "baseline": describe(self.configs[0], micro_batch=False) + ", at the same micro batch",
            "best_micro_batch": self.best_micro_batch,
            "rows": self.rows(),
        }

    def write_json(self):
        if self.args.json:
            tmp = self.args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.report(), f, indent=1)
            os.replace(tmp, self.args.json)


def main(argv=None):
    args = parse_cli(argv)
    if args.child:
        child_main(args.child)
        return 0
    import torch  # is_available() does not create a CUDA context: the parent leaves the GPU to the children

    configs = parse_grid(args.grid, torch.cuda.is_available(), args.micro_batch_size)
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="megaphi-bench-train-") as workdir:
        if args.compare_plain:
            return print_compare_plain(run_config(args, configs[0], workdir, 0))
        grid = GridRun(args, configs, workdir)
        if args.find_max_micro_batch:
            given = any("micro_batch=" in spec for spec in args.grid or [])
            grid.find_max_micro_batch([c["micro_batch"] for c in configs] if given else powers_of_two())
        grid.run_rounds()
        report = grid.report()
        grid.write_json()
    print("\n" + markdown_table(report), end="")
    # out of memory is a finding; a configuration that failed otherwise (or none measured) is an error
    failed = any(r["status"] not in ("ok", "oom") for r in report["rows"])
    return 1 if failed or not any(r["status"] == "ok" for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
