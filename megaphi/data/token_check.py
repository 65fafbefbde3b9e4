"""Checks of a token file against the model it trains, before the first step.

A token id >= the model's vocabulary size would index past the embedding: on a GPU a device-side
assert deep in the forward, hours into a run. `check_vocabulary` finds the largest id of the whole
.bin at dataset open (numpy max over the memory map, in chunks: one sequential read of the file)
and names the dataset and the vocabulary. The result is cached next to the sample indices, keyed by
the .idx hash and the .bin's size and mtime_ns (megaphi.data.fingerprint), so a restart does not
read a multi-GB .bin again; rank 0 scans while the other ranks wait (index_cache.build_or_load).
"""

import os
from typing import Optional

import numpy as np

from . import index_cache
from .fingerprint import data_fingerprint

_CHUNK_BYTES = 64 << 20


class VocabularyError(ValueError):
    """The token file holds ids the model cannot embed."""


def max_token_id(dataset) -> int:
    """Largest token id in the dataset's .bin (-1 when it holds no token)."""
    tokens = np.frombuffer(dataset._bin, dtype=dataset.dtype) if dataset.bin_size else np.empty(0, dataset.dtype)
    step = max(1, _CHUNK_BYTES // dataset.itemsize)
    best = -1
    for start in range(0, tokens.shape[0], step):
        best = max(best, int(tokens[start : start + step].max()))
    return best


def cached_max_token_id(dataset, cache_dir: Optional[str]) -> int:
    """max_token_id, cached in cache_dir (None: computed, not cached)."""
    if cache_dir is None:
        return max_token_id(dataset)
    identifiers = dict(
        format="megaphi-max-token-v1",
        dataset_path=os.path.abspath(dataset.path_prefix),
        dtype=dataset.dtype.name,
        **data_fingerprint(dataset),
    )
    description, digest = index_cache.describe(identifiers)
    base = os.path.join(os.fspath(cache_dir), f"{digest}-IndexedDataset-")
    paths = {"max_token_id": base + "max_token_id.npy", "description": base + "max_token_id-description.txt"}
    arrays = index_cache.build_or_load(
        paths, ("max_token_id",), description, lambda: {"max_token_id": np.array([max_token_id(dataset)], np.int64)}
    )
    return int(arrays["max_token_id"][0])


def default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")


def check_vocabulary(dataset, vocab_size: int, cache_dir: Optional[str] = None, cache: bool = True) -> int:
    """Raise VocabularyError when a token id of `dataset` is >= vocab_size; returns the max id.

    Collective when torch.distributed is initialised and cache is on (every rank must call it)."""
    directory = (cache_dir if cache_dir is not None else default_cache_dir(dataset.path_prefix)) if cache else None
    largest = cached_max_token_id(dataset, directory)
    if largest >= vocab_size:
        raise VocabularyError(
            f"dataset {dataset.path_prefix} holds token id {largest}, outside the model's "
            f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1}); it was tokenized with "
            f"another tokenizer, or --vocab-size/--tokenizer is wrong"
        )
    return largest
