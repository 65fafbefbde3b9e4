"""Names on disk and the pointer files: one definition each.

A --save folder:
    DIR/latest                  text: the newest complete tag (written last, atomically)
    DIR/best                    text: the best tag so far, then the metric that chose it
    DIR/.megaphi.lock           the save lock of the run writing DIR (lock.py)
    DIR/<tag>/                  iter_NNNNNNN: DeepSpeed's files, megaphi_meta.json, rng_state_rank<R>.pt,
                                model/ (a model folder)
A model folder: config.json + generation_config.json + model.safetensors (Hugging Face names).
"""

import os
import re

META_NAME = "megaphi_meta.json"
LATEST_NAME = "latest"
BEST_NAME = "best"
LOCK_NAME = ".megaphi.lock"
MODEL_SUBDIR = "model"
RNG_STATE_NAME = "rng_state_rank{rank}.pt"
MODEL_STATES_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"

TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
ITERATION_TAG_RE = re.compile(r"iter_(\d{7,})")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def tag_for(iteration):
    return f"iter_{iteration:07d}"


def rng_state_path(tag_dir, rank):
    return os.path.join(tag_dir, RNG_STATE_NAME.format(rank=rank))


def iteration_tags(directory):
    """Sorted iter_NNNNNNN folder names in a save folder."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        (
            n
            for n in os.listdir(directory)
            if ITERATION_TAG_RE.fullmatch(n) and os.path.isdir(os.path.join(directory, n))
        ),
        key=lambda n: int(n[5:]),
    )


def is_complete(tag_dir):
    """A save wrote its metadata (after all its data): anything less is an interrupted save."""
    return os.path.isfile(os.path.join(tag_dir, META_NAME))


def complete_tags(directory):
    return [t for t in iteration_tags(directory) if is_complete(os.path.join(directory, t))]


def read_pointer(directory, name=LATEST_NAME, must_exist=True):
    """The tag a pointer file names, or None when there is no such file. Garbage, an empty file or a
    tag whose folder is gone is a CheckpointError naming the file."""
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        complete = complete_tags(directory)
        newest = (
            f"the newest complete checkpoint here is {complete[-1]}"
            if complete
            else "there is no complete checkpoint here"
        )
        kind = "a directory" if os.path.isdir(path) else "not a regular file"
        raise CheckpointError(
            f"{path} is {kind}; it should be a file holding one tag like iter_0000100 ({newest}): "
            f"move the {'directory' if os.path.isdir(path) else 'entry'} away"
        )
    with open(path, "rb") as f:
        raw = f.read(4096)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path}: not a checkpoint tag (binary content; it should hold one line like iter_0000100)"
        ) from None
    lines = text.strip().splitlines()
    if not lines:
        raise CheckpointError(f"{path} is empty (it should hold one line like iter_0000100)")
    tag = lines[0].strip()
    if not TAG_RE.fullmatch(tag):
        raise CheckpointError(f"{path}: not a checkpoint tag ({tag[:60]!r}; it should hold one line like iter_0000100)")
    if must_exist and not os.path.isdir(os.path.join(directory, tag)):
        raise CheckpointError(f"{path} points to {tag}, but {os.path.join(directory, tag)} does not exist")
    return tag


def pointer_or_none(directory, name):
    """The tag a pointer names, None when it is absent or unreadable (never raises)."""
    try:
        return read_pointer(directory, name, must_exist=False)
    except CheckpointError:
        return None


def protected_tags(directory):
    """Tags that `latest` or `best` name: never removed by pruning or a failed save."""
    return {pointer_or_none(directory, LATEST_NAME), pointer_or_none(directory, BEST_NAME)}


def pointer_text(tag, note=None):
    """The content of a pointer file: the tag, then an optional note (the metric `best` was chosen by)."""
    return tag + "\n" + (f"{note}\n" if note else "")


def resolve_tag_dir(path):
    """DIR (with a `latest` pointer) or DIR/<tag> -> the tag folder."""
    path = os.path.abspath(str(path))
    tag = pointer_or_none(path, LATEST_NAME)
    return os.path.join(path, tag) if tag else path
