#!/usr/bin/env python
"""Throughput of the evaluation pieces: sandboxed programs per second, and generation tokens/s with
and without the KV cache.

    python benchmarks/eval.py                                  # small defaults, CPU, a minute or two
    python benchmarks/eval.py --preset phi-1 --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 256
"""
import argparse
import os
import time

import torch

from megaphi.config import get_preset
from megaphi.evaluation.problems import Problem
from megaphi.evaluation.sandbox import Sandbox, SandboxLimits
from megaphi.generation import GenerationConfig, generate_tokens, resolve_device_and_dtype
from megaphi.model import PhiForCausalLM

PROBLEM = Problem(task_id="bench/0", prompt="def add(a, b):\n", entry_point="add",
                  test="def check(candidate):\n    assert candidate(2, 3) == 5\n")


def bench_sandbox(num_programs, worker_counts):
    rows = []
    programs = [PROBLEM.program("    return a + b\n")] * num_programs
    for workers in worker_counts:
        sandbox = Sandbox(SandboxLimits(timeout_seconds=10.0), workers=workers)
        sandbox.run_many(programs[:2])  # probe + warm caches
        start = time.perf_counter()
        results = sandbox.run_many(programs)
        elapsed = time.perf_counter() - start
        assert all(r.passed for r in results), [r.detail for r in results if not r.passed][:3]
        rows.append((workers, num_programs, elapsed, num_programs / elapsed))
    return rows, sandbox.capabilities


def bench_generation(args):
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    overrides = dict(attention_dropout=0.0, resid_dropout=0.0)
    if args.preset == "tiny":
        overrides.update(vocab_size=51200, max_position_embeddings=2048)
    config = get_preset(args.preset, **overrides)
    model = PhiForCausalLM(config, init_seed=0, device=device, dtype=dtype).eval()
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, 50000, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
        for use_cache in (True, False):
            gen = GenerationConfig(max_new_tokens=args.new_tokens, greedy=True, use_kv_cache=use_cache,
                                   batch_size=batch, stop_at_eod=False)
            generate_tokens(model, prompts, GenerationConfig(max_new_tokens=2, batch_size=batch, use_kv_cache=use_cache))
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = generate_tokens(model, prompts, gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            tokens = sum(len(o) for o in out)
            rows.append((batch, "on" if use_cache else "off", tokens, elapsed, tokens / elapsed))
    return rows, device, dtype


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, default=48)
    p.add_argument("--workers", default=f"1,{min(8, os.cpu_count() or 1)}")
    p.add_argument("--preset", default="tiny", help="tiny (2 layers, hidden 128, vocab 51200), phi-1-small, phi-1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-sandbox", action="store_true")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.skip_sandbox:
        rows, caps = bench_sandbox(args.programs, sorted({int(w) for w in args.workers.split(",")}))
        print(f"## Sandbox ({os.cpu_count()} CPUs; runs as {caps['runs_as']}, net isolated {caps['network_isolated']}, "
              f"pid namespace {caps['pid_namespace']}, private /tmp {caps['private_tmp']})\n")
        print("| workers | programs | seconds | programs/s |\n|---|---|---|---|")
        for workers, n, seconds, rate in rows:
            print(f"| {workers} | {n} | {seconds:.2f} | {rate:.1f} |")
        print()
    rows, device, dtype = bench_generation(args)
    print(f"## Generation ({args.preset}, {device}, {str(dtype).replace('torch.', '')}, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads)\n")
    print("| batch | KV cache | tokens | seconds | tokens/s |\n|---|---|---|---|---|")
    for batch, cache, tokens, seconds, rate in rows:
        print(f"| {batch} | {cache} | {tokens} | {seconds:.2f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
