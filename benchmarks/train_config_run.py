"""benchmarks/train.py's child process: one configuration in a fresh process (its own memory peak,
allocator and compile caches). Builds a megaphi Trainer as python -m megaphi.pretrain does, times the warm-up and
the timed steps, counts memory and host syncs, and writes a result dict as JSON for the parent.
Run through `python benchmarks/train.py --child SPEC`, not on its own (train.py puts megaphi on sys.path)."""

import argparse
import contextlib
import json
import os
import sys
import time


def pretrain_argv(args, cfg):
    """The python -m megaphi.pretrain flags of this configuration (so the engine is built as training does)."""
    argv = [
        "--model",
        args.model,
        "--mock-data",
        "--lr",
        "1e-4",
        "--lr-warmup-iters",
        "0",
        "--eval-iters",
        "0",
        "--micro-batch-size",
        str(cfg["micro_batch"]),
        "--global-batch-size",
        str(cfg["micro_batch"] * args.accumulation),
        "--train-iters",
        str(max(args.warmup + args.steps + 1, 4)),
        "--loss-chunk-tokens",
        str(cfg["loss_chunk"]),
        "--attention-backend",
        args.attention_backend,
        "--recompute-num-layers",
        str(args.recompute_num_layers),
    ]
    for name in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "rotary_dim",
        "vocab_size",
        "seq_length",
        "zero_stage",
    ):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if cfg["recompute"] != "none":
        argv += ["--recompute-granularity", cfg["recompute"]]
    argv += ["--torch-compile", cfg["compile"]]
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
        return (
            max(self.peak),
            max(p - h for p, h in zip(self.peak, self.held)),
            max(f - h for f, h in zip(self.forward_backward, self.held)),
        )


def build_trainer(args, cfg, device):
    """A megaphi Trainer of this configuration, built as python -m megaphi.pretrain builds it, with the
    model's weights drawn directly on `device` (see init_on_device)."""
    from megaphi.model import PhiForCausalLM
    from megaphi.training.config import RunConfig
    from megaphi.training.trainer import Trainer

    config = RunConfig.from_flags(pretrain_argv(args, cfg), world_size=1)

    def build_model(model_config):
        model = PhiForCausalLM(model_config, initialize=False, device=device)
        init_on_device(model, model_config, config.training.seed)
        return model

    return Trainer(config, build_model=build_model)


def measure(args, cfg):
    """One configuration: warm-up, then the timed steps; a dict for the JSON row."""
    import torch
    from megaphi.training import metrics
    from megaphi.training.host_sync_count import CudaSyncCounter, ValueReadCounter
    from megaphi.training.train_loop import PendingLosses

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    trainer = build_trainer(args, cfg, device)
    engine, run, config, params = trainer.engine, trainer.config, trainer.model_config, trainer.num_params
    batches = trainer.make_train_iterator(0)
    pending = PendingLosses(run.optimizer.fp16)
    engine.train()

    def step(i):  # Trainer.train's iteration, without its logging
        pending.add(i, trainer.train_step(batches).loss)

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

    seq, precision = run.training.seq_length, run.optimizer.precision
    peak_tflops = args.peak_tflops or metrics.device_peak_tflops(precision=precision)
    flops_token = metrics.flops_per_token(
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size, seq
    )
    tokens = cfg["micro_batch"] * run.training.gradient_accumulation_steps * seq
    by_origin = reads.by_origin()
    return {
        "status": "ok",
        "step_seconds": times,
        "step_cpu_seconds": cpu_times,
        "warmup_seconds": warmup_seconds,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "peak_memory_bytes": peak,
        "step_memory_bytes": step_memory,
        "forward_backward_memory_bytes": forward_backward_memory,
        "value_reads_per_step": {k: v / args.steps for k, v in by_origin.items()},
        "value_read_sites": reads.counts,
        "cuda_syncs_per_step": cuda_syncs.count / args.steps if cuda else None,
        "cuda_sync_sites": cuda_syncs.sites if cuda else None,
        "setup": {
            "device": torch.cuda.get_device_name(device) if cuda else cpu_description(),
            "precision": precision,
            "peak_tflops": peak_tflops,
            "flops_per_token": flops_token,
            "tokens_per_step": tokens,
            "parameters": params,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "ffn": config.intermediate_size,
            "heads": config.num_attention_heads,
            "vocab": config.vocab_size,
            "seq_length": seq,
            "zero_stage": run.parallel.zero_stage,
            "accumulation": run.training.gradient_accumulation_steps,
        },
    }


def cpu_description():
    import torch

    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


def compare_plain(args, cfg):
    """The engine's step alternating with a plain PyTorch loop on the same weights and batches, so load
    on a shared machine hits both alike: {"status", "seconds": {loop: [wall]}, "cpu_seconds": ...}."""
    import dataclasses

    import torch
    from megaphi.model import PhiForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    trainer = build_trainer(args, cfg, device)
    engine, config = trainer.engine, trainer.model_config
    source = trainer.make_train_iterator(0)
    gas = trainer.config.training.gradient_accumulation_steps
    data = [next(source) for _ in range(gas * 4)]
    plain = PhiForCausalLM(
        config,
        initialize=False,
        device=device,  # the engine's switches, eager
        runtime=dataclasses.replace(engine.module.runtime, compile=False),
    )
    plain.load_state_dict(engine.module.state_dict())
    decay = [p for p in plain.parameters() if p.ndim >= 2]
    no_decay = [p for p in plain.parameters() if p.ndim < 2]
    optimizer = trainer.config.optimizer
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optimizer.lr,
    )

    def engine_step(i):
        trainer.train_step(iter(data[(i * gas) % len(data) :] + data))

    def plain_step(i):
        for a in range(gas):
            b = data[(i * gas + a) % len(data)]
            token_losses, _ = plain(b["tokens"].to(device), labels=b["labels"].to(device), reduction="none")
            (token_losses.float().mean() / gas).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), optimizer.clip_grad)
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
