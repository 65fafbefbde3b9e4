"""Train/valid/test splits of a token file by contiguous document ranges (Megatron's `--split`).

"969,30,1" is normalised to fractions, turned into cumulative bookends
[(0, .969), (.969, .999), (.999, 1.0)], and split k covers documents
[round(lo * S), round(hi * S)) of the S documents (Python's round, as Megatron-LM). A split with
weight 0 has no range (None).
"""

import re
from typing import List, Optional, Tuple

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}


def split_index(split_name: str) -> int:
    """0, 1, 2 for "train", "valid" ("validation", "val"), "test"."""
    name = _SPLIT_ALIASES.get(str(split_name).lower())
    if name is None:
        raise ValueError(f"unknown split_name {split_name!r}; expected one of {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES.index(name)


def parse_split(split: str) -> List[float]:
    """ "969,30,1" -> normalised fractions [0.969, 0.03, 0.001] (missing trailing weights are 0)."""
    text = str(split).strip()
    parts = [p for p in re.split(r"[,/\s]+", text) if p]
    if not parts:
        raise ValueError(f"--split {split!r} is empty; expected up to 3 weights such as 969,30,1")
    if len(parts) > len(SPLIT_NAMES):
        raise ValueError(f"--split {split!r} has {len(parts)} weights; at most 3 (train, valid, test)")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split {split!r}: every weight must be a number") from None
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"--split {split!r}: weights must be finite and >= 0")
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    total = float(np.sum(np.array(weights, dtype=np.float64)))
    if total <= 0:
        raise ValueError(f"--split {split!r}: the weights sum to 0, so every split is empty")
    return (np.array(weights, dtype=np.float64) / total).tolist()


def split_bookends(fractions: List[float]) -> List[Optional[Tuple[float, float]]]:
    """Cumulative (lo, hi) per split; None where the split has no weight."""
    edges = [0.0]
    for fraction in fractions:
        edges.append(edges[-1] + fraction)  # sequential float sums, as Megatron-LM does
    return [(lo, hi) if hi > lo else None for lo, hi in zip(edges[:-1], edges[1:])]


def split_document_range(split: str, split_name: str, num_documents: int) -> Optional[Tuple[int, int]]:
    """[begin, end) document ids of `split_name`, or None when its weight is 0."""
    bookend = split_bookends(parse_split(split))[split_index(split_name)]
    if bookend is None:
        return None
    begin = int(round(bookend[0] * float(num_documents)))
    end = int(round(bookend[1] * float(num_documents)))
    return begin, end
