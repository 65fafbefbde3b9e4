"""Forward+backward throughput of megaphi's PhiForCausalLM vs transformers' PhiForCausalLM.

Same config, dtype, batch and dropout for both; prints tokens/s, the ratio (megaphi / HF) and, on
CUDA, the peak memory of a step. Defaults are small enough for a CPU; --full runs the real
phi-1-small and phi-1 shapes (use with --device cuda --dtype bfloat16).

  python benchmarks/model.py                                   # CPU, scaled-down shapes
  python benchmarks/model.py --full --device cuda --dtype bfloat16 --batch 4 --seq 2048
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaphi.config import get_preset  # noqa: E402
from megaphi.model import ModelRuntime, PhiForCausalLM  # noqa: E402
from megaphi.checkpoint.hf_config import hf_phi_config  # noqa: E402

SMALL = {  # name -> (preset, overrides)
    "phi-1-small-shape, 4 layers": ("phi-1-small", dict(num_hidden_layers=4)),
    "h512, 4 layers": (
        "phi-1-small",
        dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=4),
    ),
    "h256, 2 layers, vocab 8192": (
        "phi-1-small",
        dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=2, vocab_size=8192),
    ),
}
FULL = {"phi-1-small": ("phi-1-small", {}), "phi-1": ("phi-1", {})}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_hf(config, dtype, device):
    import transformers

    hf_config = hf_phi_config(config)
    hf_config._attn_implementation = "sdpa"
    return transformers.PhiForCausalLM(hf_config).to(device=device, dtype=dtype)


def time_steps(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return elapsed, peak


def bench(config, args, device, dtype, runtime):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    results = {}
    for impl in ("megaphi", "transformers"):
        torch.manual_seed(0)
        if impl == "megaphi":
            model = PhiForCausalLM(config, device=device, dtype=dtype, runtime=runtime).train()

            def step(model=model):
                loss, _ = model(tokens, labels=labels)
                loss.backward()
        else:
            model = build_hf(config, dtype, device).train()

            def step(model=model):
                model(ids[:, :-1], labels=ids[:, :-1]).loss.backward()  # HF shifts labels itself

        seconds, peak = time_steps(step, args.steps, args.warmup, device)
        results[impl] = (args.batch * args.seq / seconds, peak)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="real phi-1-small and phi-1 shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1, help="attention and residual dropout (both models)")
    p.add_argument("--recompute", action="store_true", help="megaphi activation checkpointing")
    p.add_argument("--only", help="run only configs whose name contains this")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    table = FULL if args.full else SMALL
    print(
        f"device={device} dtype={args.dtype} batch={args.batch} seq={args.seq} steps={args.steps} "
        f"threads={torch.get_num_threads()} dropout={args.dropout}"
    )
    header = f"| {'config':28} | megaphi tok/s | HF tok/s | ratio | megaphi peak MiB | HF peak MiB |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, (preset, overrides) in table.items():
        if args.only and args.only not in name:
            continue
        config = get_preset(preset, **overrides, attention_dropout=args.dropout, resid_dropout=args.dropout)
        r = bench(config, args, device, dtype, ModelRuntime(recompute="full" if args.recompute else "none"))
        (ours, ours_mem), (hf, hf_mem) = r["megaphi"], r["transformers"]
        print(
            f"| {name:28} | {ours:13.1f} | {hf:8.1f} | {ours / hf:5.2f} | {ours_mem:16.0f} | {hf_mem:11.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
