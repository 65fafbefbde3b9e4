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
import contextlib
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

AXES = ("compile", "recompute", "loss_chunk", "micro_batch")
CHOICES = {"compile": ("off", "on"), "recompute": ("none", "selective", "full")}


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=("tiny", "phi-1-small", "phi-1"))
    for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--rotary-dim",
                 "--vocab-size", "--seq-length"):
        p.add_argument(flag, type=int, help="overrides the preset (default: the preset's; seq: its context)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="micro batch when the grid names none")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--zero-stage", type=int, help="default: pretrain's (0 on one rank; 1 with --bf16)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--recompute-num-layers", type=int, default=0)
    p.add_argument("--grid", action="append", help="AXIS=V1,V2 ... (see above); may be repeated")
    p.add_argument("--find-max-micro-batch", action="store_true",
                   help="run the first configuration at each micro batch of the grid (default 1, 2, 4, ... 256) "
                        "until one runs out of memory; the other configurations run at the fastest that fit")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: megaphi's table for the GPU)")
    p.add_argument("--json", help="write the results here too (rewritten after each configuration)")
    p.add_argument("--logs", help="keep each configuration's output in this folder")
    p.add_argument("--threads", type=int, help="CPU: torch threads per configuration (1 is steadiest on a busy "
                                                 "machine, where waiting OpenMP threads spin); default torch's")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what ms/step and the columns from it measure: wall time, or this process's CPU time "
                        "(with --threads 1 on a busy CPU: the work done, not the waits for other programs)")
    p.add_argument("--config-timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--compare-plain", action="store_true",
                   help="instead of the grid: the first configuration's engine steps alternating with a plain "
                        "PyTorch loop (torch AdamW, no DeepSpeed) on the same model and batches (fp32)")
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


# ---------------------------------------------------------------------- one configuration (child process)

def pretrain_argv(args, cfg):
    """The python -m megaphi.pretrain flags of this configuration (so the engine is built as training does)."""
    argv = ["--model", args.model, "--mock-data", "--lr", "1e-4", "--lr-warmup-iters", "0", "--eval-iters", "0",
            "--micro-batch-size", str(cfg["micro_batch"]),
            "--global-batch-size", str(cfg["micro_batch"] * args.accumulation),
            "--train-iters", str(max(args.warmup + args.steps + 1, 4)), "--loss-chunk-tokens", str(cfg["loss_chunk"]),
            "--attention-backend", args.attention_backend, "--recompute-num-layers", str(args.recompute_num_layers)]
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "rotary_dim", "vocab_size",
                 "seq_length", "zero_stage"):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if cfg["recompute"] != "none":
        argv += ["--recompute-granularity", cfg["recompute"]]
    return argv + (["--bf16"] if args.bf16 else []) + (["--fp16"] if args.fp16 else [])


def init_on_device(model, config, seed):
    """The model's init distribution (normal, output layers scaled, zero biases, LayerNorm ones) drawn
    on the model's device: PhiForCausalLM's own init draws every tensor on the CPU (seconds for phi-1)."""
    import math
    import torch

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif "layernorm" in name:
                param.fill_(1.0)
            else:
                scaled = name.endswith(("self_attn.dense.weight", "mlp.fc2.weight"))
                param.normal_(0.0, std / math.sqrt(2.0 * config.num_hidden_layers) if scaled else std, generator=gen)


def host_memory(field):
    """VmRSS / VmHWM of this process in bytes (None where /proc cannot tell)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class StepMemory:
    """Memory of the timed steps, in bytes: `held` before a step (weights, optimizer state), the peak
    of its forward + backward (activations, logits, gradients: read when the schedule calls
    engine.step), and the peak of the whole step (with the optimizer's). CUDA: allocated memory; CPU:
    the resident set, freed heap pages given back before each step so it counts what is alive."""

    def __init__(self, engine, device):
        self.cuda = device.type == "cuda"
        self.held, self.forward_backward, self.peak = [], [], []
        update = engine.step

        def read_peak_then_update(*args, **kwargs):
            self.forward_backward[-1] = max(self.forward_backward[-1], self._peak())
            self._reset_peak()
            return update(*args, **kwargs)
        engine.step = read_peak_then_update

    def _peak(self):
        import torch
        return torch.cuda.max_memory_allocated() if self.cuda else host_memory("VmHWM")

    def _reset_peak(self):
        import torch
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set (Linux >= 4.0)
                f.write("5")
        except OSError:
            pass  # not resettable here: the peaks are the process's since its start

    def before_step(self):
        import gc
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.held.append(torch.cuda.memory_allocated())
        else:
            try:  # freed heap pages back to the system, so the resident set is what is alive
                import ctypes
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            self.held.append(host_memory("VmRSS"))
        self._reset_peak()
        self.forward_backward.append(0)
        self.peak.append(0)

    def after_step(self):
        self.peak[-1] = max(self.forward_backward[-1], self._peak())

    def summary(self):
        """(peak, peak above held, forward + backward peak above held): the largest over the steps."""
        return (max(self.peak), max(p - h for p, h in zip(self.peak, self.held)),
                max(f - h for f, h in zip(self.forward_backward, self.held)))


def build_engine(args, cfg, device):
    """(engine, pretrain args, model config, parameter count) as python -m megaphi.pretrain builds them."""
    import megaphi.ops as ops
    from megaphi.model import PhiForCausalLM
    from megaphi.model.compile import compile_decoder_layers
    from megaphi.pretrain import build_model_config, check_precision_supported, set_seed, setup_engine
    from megaphi.training.arguments import parse_args
    from megaphi.training.deepspeed_config import build_deepspeed_config

    run = parse_args(pretrain_argv(args, cfg), world_size=1)
    if hasattr(ops, "set_impl"):
        ops.set_impl(layernorm=run.layernorm_impl, rotary=run.rotary_impl)
    set_seed(run.seed)
    check_precision_supported(run)
    config = build_model_config(run, None)
    model = PhiForCausalLM(config, initialize=False, device=device)
    init_on_device(model, config, run.seed)
    if cfg["compile"] == "on":
        compile_decoder_layers(model)
    params = sum(p.numel() for p in model.parameters())
    return setup_engine(run, model, build_deepspeed_config(run)), run, config, params


def measure(args, cfg):
    """One configuration: warm-up, then the timed steps; a dict for the JSON row."""
    import torch
    from megaphi.parallel import get_data_parallel_group, initialize_model_parallel
    from megaphi.pretrain import build_mock_data, init_distributed
    from megaphi.training import metrics
    from megaphi.training.host_sync_count import CudaSyncCounter, ValueReadCounter
    from megaphi.training.schedules import forward_backward_no_pipelining, reduce_loss_tensors
    from megaphi.training.train_loop import PendingLosses, count_loss_tokens, make_forward_step

    init_distributed()
    initialize_model_parallel(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    engine, run, config, params = build_engine(args, cfg, device)
    make_train_iterator, _ = build_mock_data(run, config.vocab_size, 0, 1)
    batches, forward_step, dp_group = make_train_iterator(0), make_forward_step(device), get_data_parallel_group()
    pending = PendingLosses(run.fp16)
    engine.train()

    def step(i):  # the body of megaphi.training.train_loop.train's iteration, without its logging
        logs = forward_backward_no_pipelining(forward_step, batches, engine, run.gradient_accumulation_steps,
                                              count_tokens_func=count_loss_tokens, dp_group=dp_group)
        pending.add(i, reduce_loss_tensors(logs, dp_group)["lm loss"])

    def sync():
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync()
    warmup_seconds = time.perf_counter() - started
    loss_first = pending.flush()
    memory = StepMemory(engine, device)
    reads = ValueReadCounter(device_tensors_only=cuda)
    cuda_syncs = CudaSyncCounter() if cuda else contextlib.nullcontext()
    times, cpu_times = [], []
    for i in range(args.warmup, args.warmup + args.steps):
        memory.before_step()
        t0, c0 = time.perf_counter(), time.process_time()
        with reads, cuda_syncs:
            step(i)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        memory.after_step()
    loss_last = pending.flush()  # reading the losses is the log's work, not the step's
    peak, step_memory, forward_backward_memory = memory.summary()

    seq, precision = run.seq_length, metrics.training_precision(run.fp16, run.bf16)
    peak_tflops = args.peak_tflops or metrics.device_peak_tflops(precision=precision)
    flops_token = metrics.flops_per_token(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                          config.vocab_size, seq)
    tokens = cfg["micro_batch"] * run.gradient_accumulation_steps * seq
    by_origin = reads.by_origin()
    return {"status": "ok", "step_seconds": times, "step_cpu_seconds": cpu_times, "warmup_seconds": warmup_seconds,
            "loss_first": loss_first, "loss_last": loss_last,
            "peak_memory_bytes": peak, "step_memory_bytes": step_memory,
            "forward_backward_memory_bytes": forward_backward_memory,
            "value_reads_per_step": {k: v / args.steps for k, v in by_origin.items()},
            "value_read_sites": reads.counts,
            "cuda_syncs_per_step": cuda_syncs.count / args.steps if cuda else None,
            "cuda_sync_sites": cuda_syncs.sites if cuda else None,
            "setup": {"device": torch.cuda.get_device_name(device) if cuda else cpu_description(),
                      "precision": precision, "peak_tflops": peak_tflops,
                      "flops_per_token": flops_token, "tokens_per_step": tokens, "parameters": params,
                      "layers": config.num_hidden_layers, "hidden": config.hidden_size,
                      "ffn": config.intermediate_size, "heads": config.num_attention_heads,
                      "vocab": config.vocab_size, "seq_length": seq, "zero_stage": run.zero_stage,
                      "accumulation": run.gradient_accumulation_steps}}


def cpu_description():
    import torch
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


def compare_plain(args, cfg):
    """The engine's step alternating with a plain PyTorch loop on the same weights and batches, so load
    on a shared machine hits both alike: {"status", "seconds": {loop: [wall]}, "cpu_seconds": ...}."""
    import torch
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import initialize_model_parallel
    from megaphi.pretrain import build_mock_data, init_distributed
    from megaphi.training.schedules import forward_backward_no_pipelining
    from megaphi.training.train_loop import count_loss_tokens, make_forward_step

    init_distributed()
    initialize_model_parallel(1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    engine, run, config, _ = build_engine(args, cfg, device)
    make_train_iterator, _ = build_mock_data(run, config.vocab_size, 0, 1)
    source = make_train_iterator(0)
    gas = run.gradient_accumulation_steps
    data = [next(source) for _ in range(gas * 4)]
    plain = PhiForCausalLM(config, initialize=False, device=device)
    plain.load_state_dict(engine.module.state_dict())
    decay = [p for p in plain.parameters() if p.ndim >= 2]
    no_decay = [p for p in plain.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=run.lr)
    forward_step = make_forward_step(device)

    def engine_step(i):
        micro = iter(data[(i * gas) % len(data):] + data)
        forward_backward_no_pipelining(forward_step, micro, engine, gas, count_tokens_func=count_loss_tokens)

    def plain_step(i):
        for a in range(gas):
            b = data[(i * gas + a) % len(data)]
            token_losses, _ = plain(b["tokens"].to(device), labels=b["labels"].to(device), reduction="none")
            (token_losses.float().mean() / gas).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), run.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    loops = {"megaphi engine": engine_step, "plain PyTorch": plain_step}
    wall, cpu = {name: [] for name in loops}, {name: [] for name in loops}
    for i in range(args.warmup + args.steps):
        for name, step in loops.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)  # steadier than wall time on a shared machine
    return {"status": "ok", "seconds": wall, "cpu_seconds": cpu}


def child_main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    args, cfg = argparse.Namespace(**spec["args"]), spec["config"]
    try:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        result = compare_plain(args, cfg) if args.compare_plain else measure(args, cfg)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row of the table
        oom = type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(e)
        first_line = (str(e).strip().splitlines() or [""])[0]
        result = {"status": "oom" if oom else "error", "reason": f"{type(e).__name__}: {first_line}"[:300]}
        if not oom:
            import traceback
            traceback.print_exc()
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    name = f"{index:02d}_compile-{cfg['compile']}_recompute-{cfg['recompute']}_chunk-{cfg['loss_chunk']}" \
           f"_mb-{cfg['micro_batch']}"
    spec_path, result_path = os.path.join(workdir, name + ".spec.json"), os.path.join(workdir, name + ".result.json")
    log_path = os.path.join(args.logs or workdir, name + ".log")
    child_args = {k: v for k, v in vars(args).items() if k not in ("grid", "json", "logs", "child")}
    with open(spec_path, "w") as f:
        json.dump({"args": child_args, "config": cfg, "result": result_path}, f)
    # each child makes its own one-rank process group (pretrain.init_distributed), even under a launcher
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    started = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec_path], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  timeout=args.config_timeout)
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


def same_combination(a, b):
    return all(a[k] == b[k] for k in AXES if k != "micro_batch")


def host_syncs_on_cpu(reads_by_origin):
    """Value reads that would synchronize on a GPU: megaphi's, DeepSpeed's, the benchmark's. torch's own
    (the optimizer reading its step counters) read state that stays on the host on a GPU too."""
    return sum(n for origin, n in reads_by_origin.items() if origin != "torch")


def summarize(cfg, results, clock="wall"):
    """A table row from a configuration's per-round results; ms/step and what follows from it by `clock`."""
    from megaphi.training import metrics

    row = dict(cfg)
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        last = results[-1] if results else {"status": "error", "reason": "not run"}
        row.update(status=last["status"], reason=last.get("reason"))
        return row
    setup = ok[0]["setup"]
    wall = [statistics.median(r["step_seconds"]) for r in ok]
    cpu = [statistics.median(r["step_cpu_seconds"]) for r in ok]
    medians = cpu if clock == "cpu" else wall
    seconds = statistics.median(medians)
    tokens_per_sec, tflops, mfu = metrics.throughput(setup["tokens_per_step"], seconds, setup["flops_per_token"], 1,
                                                     setup["peak_tflops"])
    cuda = ok[0]["cuda_syncs_per_step"] is not None
    syncs = [r["cuda_syncs_per_step"] if cuda else host_syncs_on_cpu(r["value_reads_per_step"]) for r in ok]
    row.update(status="ok", clock=clock, ms_per_step=1000 * seconds, ms_per_step_rounds=[1000 * m for m in medians],
               wall_ms_per_step=1000 * statistics.median(wall), cpu_ms_per_step=1000 * statistics.median(cpu),
               step_ms={"wall": [[round(1000 * t, 2) for t in r["step_seconds"]] for r in ok],
                        "cpu": [[round(1000 * t, 2) for t in r["step_cpu_seconds"]] for r in ok]},
               tokens_per_sec=tokens_per_sec, tflops=tflops, mfu=mfu,
               **{key + "_gib": statistics.median(r[key + "_bytes"] for r in ok) / 2 ** 30
                  for key in ("peak_memory", "step_memory", "forward_backward_memory")},
               host_syncs_per_step=statistics.median(syncs), value_reads_per_step=ok[-1]["value_reads_per_step"],
               value_read_sites=ok[-1]["value_read_sites"], cuda_sync_sites=ok[-1]["cuda_sync_sites"],
               loss_first=ok[-1]["loss_first"], loss_last=ok[-1]["loss_last"],
               compile_and_warmup_seconds=statistics.median(r["warmup_seconds"] for r in ok))
    return row


def add_ratios(rows):
    """Time and forward + backward memory ratios against the baseline combination (the first row's)
    at the same micro batch."""
    base_combo = rows[0]
    for row in rows:
        base = next((r for r in rows if same_combination(r, base_combo) and r["micro_batch"] == row["micro_batch"]
                     and r["status"] == "ok"), None)
        if row["status"] == "ok" and base is not None:
            row["time_vs_baseline"] = row["ms_per_step"] / base["ms_per_step"]
            base_memory = base["forward_backward_memory_gib"]
            row["forward_backward_memory_vs_baseline"] = (row["forward_backward_memory_gib"] / base_memory
                                                          if base_memory > 0 else None)
    return rows


def powers_of_two(limit=256):
    return [2 ** i for i in range(limit.bit_length()) if 2 ** i <= limit]


class GridRun:
    """The configurations, their results per round, and the report (written again after each run)."""

    def __init__(self, args, configs, workdir):
        self.args, self.configs, self.workdir = args, list(configs), workdir
        self.results = {}  # index into configs -> [result per round]
        self.best_micro_batch = None

    def run(self, index):
        cfg = self.configs[index]
        smaller_oom = next((c["micro_batch"] for i, c in enumerate(self.configs) if i != index
                            and same_combination(c, cfg) and c["micro_batch"] <= cfg["micro_batch"]
                            and any(r["status"] == "oom" for r in self.results.get(i, []))), None)
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
        ran = [dict(self.configs[i], speed=summarize(self.configs[i], self.results[i], clock)["tokens_per_sec"])
               for i in tried if self.results[i][-1]["status"] == "ok"]
        self.configs = self.configs[:len(tried)]
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
        return {"benchmark": "megaphi training step (benchmarks/train.py)",
                "command": " ".join(shlex.quote(a) for a in sys.argv), "model": self.args.model,
                "setup": ok[0]["setup"] if ok else None, "warmup": self.args.warmup, "steps": self.args.steps,
                "rounds": self.args.rounds, "clock": self.args.clock, "data": "megaphi.data.mock_dataset (--mock-data)",
                "baseline": describe(self.configs[0], micro_batch=False) + ", at the same micro batch",
                "best_micro_batch": self.best_micro_batch, "rows": self.rows()}

    def write_json(self):
        if self.args.json:
            tmp = self.args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.report(), f, indent=1)
            os.replace(tmp, self.args.json)


def describe(cfg, micro_batch=True):
    text = f"compile {cfg['compile']}, recompute {cfg['recompute']}, loss chunk {cfg['loss_chunk'] or 'off'}"
    return text + (f", micro batch {cfg['micro_batch']}" if micro_batch else "")


def _num(value, spec):
    return "–" if value is None else format(value, spec)


def _gib(value):
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"  # tiny models: their few KiB still show


def markdown_table(report):
    s = report["setup"] or {}
    cuda = not str(s.get("device", "CPU")).startswith("CPU")
    lines = [f"model {report['model']}: {s.get('layers')} layers, hidden {s.get('hidden')}, ffn {s.get('ffn')}, "
             f"heads {s.get('heads')}, vocab {s.get('vocab')}, seq {s.get('seq_length')}, "
             f"{s.get('parameters', 0):,} parameters; {s.get('precision')}, ZeRO {s.get('zero_stage')}, "
             f"accumulation {s.get('accumulation')}; {s.get('device')}; "
             f"{(s.get('flops_per_token') or 0) / 1e9:.3f} GFLOP/token; data: {report['data']}; median of "
             f"{report['steps']} steps after {report['warmup']} warm-up"
             + (f", median of {report['rounds']} rounds" if report["rounds"] > 1 else "")
             + ("; ms/step: the process's CPU time (--clock cpu)" if report.get("clock") == "cpu" else ""), "",
             "| compile | recompute | loss chunk | micro batch | ms/step | tokens/s | TFLOP/s | MFU | peak mem GiB | "
             "fwd+bwd mem GiB | host syncs/step | time vs base | fwd+bwd mem vs base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in report["rows"]:
        head = f"| {r['compile']} | {r['recompute']} | {r['loss_chunk'] or 'off'} | {r['micro_batch']} |"
        if r["status"] != "ok":
            lines.append(head + f" {r['status'].upper()} |" + " |" * 8)
            notes.append(f"- {describe(r)}: {r['status']}: {r.get('reason')}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(head + f" {r['ms_per_step']:.1f} | {r['tokens_per_sec']:,.0f} | {r['tflops']:.3g} | {mfu} | "
                     f"{_gib(r['peak_memory_gib'])} | {_gib(r['forward_backward_memory_gib'])} | "
                     f"{r['host_syncs_per_step']:g} | {_num(r.get('time_vs_baseline'), '.2f')} | "
                     f"{_num(r.get('forward_backward_memory_vs_baseline'), '.2f')} |")
    memory = ("max_memory_allocated" if cuda else "the process's resident set (VmHWM)")
    syncs = ("synchronizing CUDA calls (set_sync_debug_mode)" if cuda
             else "tensor value reads by megaphi's and DeepSpeed's code")
    lines += ["", f"Ratios against {report['baseline']}. Peak mem: {memory} during a step; fwd+bwd mem: its "
                  f"forward + backward peak above what is held between steps. Host syncs: {syncs}."]
    if report.get("best_micro_batch"):
        lines.append(f"Fastest micro batch that fit (--find-max-micro-batch): {report['best_micro_batch']}")
    return "\n".join(lines + notes) + "\n"


def print_compare_plain(result):
    if result["status"] != "ok":
        print(f"compare-plain: {result['status']}: {result.get('reason')}")
        return 1
    med = {name: statistics.median(v) for name, v in result["seconds"].items()}
    cpu = {name: statistics.median(v) for name, v in result["cpu_seconds"].items()}
    print("| loop | ms/step | CPU ms/step |\n|---|---|---|")
    for name in med:
        print(f"| {name} | {1000 * med[name]:.1f} | {1000 * cpu[name]:.1f} |")
    eng, plain = med["megaphi engine"], med["plain PyTorch"]
    print(f"\nengine overhead vs plain PyTorch: wall {100 * (eng / plain - 1):+.1f}%, CPU time "
          f"{100 * (cpu['megaphi engine'] / cpu['plain PyTorch'] - 1):+.1f}% (target: within 10%)")
    return 0


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
