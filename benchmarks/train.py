"""Training step throughput: tokens/s, TFLOP/s and MFU of the megaphi engine (DeepSpeed + schedule),
and on CPU its overhead against a plain PyTorch loop on the same model (torch AdamW, no DeepSpeed).

    python benchmarks/train.py                                  # CPU, small config, engine vs plain loop
    python benchmarks/train.py --model phi-1 --bf16 --seq-length 2048 --micro-batch-size 8 --zero-stage 1
    python benchmarks/train.py --model phi-1 --bf16 --find-max-micro-batch   # largest that fits (GPU)

Engine and plain steps alternate, so load on a shared machine hits both alike; medians are reported.
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=("tiny", "phi-1-small", "phi-1"))
    p.add_argument("--num-layers", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--ffn-hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--recompute-granularity", choices=("full", "selective"))
    p.add_argument("--loss-chunk-tokens", type=int, default=0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch loop")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--find-max-micro-batch", action="store_true",
                   help="GPU: double the micro batch until out of memory, report the largest that ran")
    args = p.parse_args()
    small = args.model == "tiny"
    defaults = dict(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4, vocab_size=4096,
                    seq_length=128) if small else dict(seq_length=2048)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def model_config(args):
    from megaphi.config import get_preset
    over = {k2: getattr(args, k1) for k1, k2 in (("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
            ("ffn_hidden_size", "intermediate_size"), ("num_attention_heads", "num_attention_heads"),
            ("vocab_size", "vocab_size")) if getattr(args, k1) is not None}
    over.update(max_position_embeddings=max(args.seq_length, 256), attention_dropout=0.0, resid_dropout=0.0,
                embd_dropout=0.0, recompute=bool(args.recompute or args.recompute_granularity),
                recompute_granularity=args.recompute_granularity or "full", loss_chunk_tokens=args.loss_chunk_tokens)
    return get_preset(args.model, **over)


def batches(config, args, device, n):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (n, args.micro_batch_size, args.seq_length + 1), generator=g)
    return [{"tokens": d[:, :-1].to(device), "labels": d[:, 1:].to(device)} for d in data]


def build_engine(args, config, device):
    import deepspeed
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import mpu
    from megaphi.training.lr_schedule import WarmupDecayLR
    from megaphi.training.optimizer import build_optimizer

    torch.manual_seed(0)
    model = PhiForCausalLM(config).to(device)
    opt = build_optimizer(model, 1e-4, 0.1, device_type=device.type)
    sched = WarmupDecayLR(opt, 1e-4, 0.0, 10, 1000)
    ds = {"train_batch_size": args.micro_batch_size * args.accumulation,
          "train_micro_batch_size_per_gpu": args.micro_batch_size, "gradient_accumulation_steps": args.accumulation,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": args.zero_stage}, "steps_per_print": 10 ** 9}
    if args.bf16:
        ds["bf16"] = {"enabled": True}
        # as megaphi.pretrain configures bf16: fp32 gradient accumulation and reduction
        from megaphi.training.deepspeed_config import accumulate_bf16_gradients_in_fp32
        accumulate_bf16_gradients_in_fp32(ds, args.zero_stage)
    if args.fp16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, mpu=mpu, config=ds,
                                      dist_init_required=False)
    from megaphi.pretrain import finish_engine_setup
    finish_engine_setup(engine)  # exactly what `python -m megaphi.pretrain` does
    return engine


def engine_step_fn(engine, data, args, device):
    from megaphi.training.schedules import forward_backward_no_pipelining
    from megaphi.training.train_loop import make_forward_step

    forward_step = make_forward_step(device)

    def step(i):
        it = iter(data[(i * args.accumulation) % len(data):] + data)
        forward_backward_no_pipelining(forward_step, it, engine, args.accumulation)
    return step


def plain_step_fn(config, data, args, device):
    from megaphi.model import PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(config).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4)

    def step(i):
        for a in range(args.accumulation):
            b = data[(i * args.accumulation + a) % len(data)]
            token_losses, _ = model(b["tokens"], labels=b["labels"], reduction="none")
            (token_losses.float().mean() / args.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, i, device):
    """(wall seconds, CPU seconds of this process); CPU time is steadier on a shared machine."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main():
    args = parse()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    from megaphi.parallel import initialize_model_parallel
    from megaphi.training import metrics

    initialize_model_parallel(1)
    config = model_config(args)
    peak = args.peak_tflops or metrics.device_peak_tflops(precision=metrics.training_precision(args.fp16, args.bf16))
    flops_tok = metrics.flops_per_token(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                        config.vocab_size, args.seq_length)
    tokens = args.micro_batch_size * args.accumulation * args.seq_length

    if args.find_max_micro_batch and cuda:
        args.micro_batch_size = find_max_micro_batch(args, config, device)
        tokens = args.micro_batch_size * args.accumulation * args.seq_length

    engine = build_engine(args, config, device)
    data = batches(config, args, device, 4 * args.accumulation)
    runners = {"megaphi engine": engine_step_fn(engine, data, args, device)}
    if not args.no_plain and not (args.bf16 or args.fp16):
        runners["plain PyTorch"] = plain_step_fn(config, data, args, device)
    times = {name: [] for name in runners}
    cpu_times = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        for name, step in runners.items():
            wall, cpu = timed(step, i, device)
            if i >= args.warmup:
                times[name].append(wall)
                cpu_times[name].append(cpu)

    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    dev_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel {args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, ffn "
          f"{config.intermediate_size}, vocab {config.vocab_size}, seq {args.seq_length}, micro batch "
          f"{args.micro_batch_size} x accumulation {args.accumulation}, {precision}, ZeRO {args.zero_stage}, "
          f"{dev_name}; {flops_tok / 1e9:.3f} GFLOP/token; median of {args.steps} steps\n")
    print("| loop | ms/step | CPU ms/step | tokens/s | TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        tok_s, tflops, mfu = metrics.throughput(tokens, med, flops_tok, 1, peak)
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
        mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        print(f"| {name} | {1000 * med:.1f} | {1000 * statistics.median(cpu_times[name]):.1f} | {tok_s:,.0f} | "
              f"{tflops:.3f} | {mfu_s} | {mem:.1f} |")
    if len(times) == 2:
        eng, plain = (statistics.median(v) for v in times.values())
        eng_cpu, plain_cpu = (statistics.median(v) for v in cpu_times.values())
        print(f"\nengine overhead vs plain PyTorch: wall {100 * (eng / plain - 1):+.1f}%, "
              f"CPU time {100 * (eng_cpu / plain_cpu - 1):+.1f}% (target: within 10%)")
    torch.distributed.destroy_process_group()


def find_max_micro_batch(args, config, device):
    best, mb = 0, 1
    while mb <= 256:
        try:
            args.micro_batch_size = mb
            engine = build_engine(args, config, device)
            data = batches(config, args, device, args.accumulation)
            engine_step_fn(engine, data, args, device)(0)
            best = mb
            mb *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            engine = None
            torch.cuda.empty_cache()
    print(f"largest micro batch that fits: {best}")
    return max(best, 1)


if __name__ == "__main__":
    main()
