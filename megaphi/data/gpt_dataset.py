"""GPTDataset: fixed-length samples cut from the document stream, with Megatron-LM's semantics.

Given a token file, a split and (seq_length L, num_samples N, seed), the same samples come out in
the same order as Megatron-LM's GPTDataset:

* the split's documents [begin, end) hold T tokens per epoch; E = the smallest E >= 1 with
  E * T >= N * L + 1 (N None: one epoch);
* document_index (int32) = the split's ids tiled E times and shuffled by
  numpy.random.RandomState(seed); when E > 1 and the final epoch contributes fewer than
  int(0.8 * samples_per_epoch) samples, the first E - 1 epochs and the last are shuffled separately;
* sample_index [n + 1, 2] = (position in document_index, token offset) of every sample start, built
  in C++: sample j is tokens [j * L, j * L + L + 1) of the stream, crossing document boundaries, and
  n = (E * T - 1) // L, i.e. every full sample of the E epochs (n >= N);
* shuffle_index = a permutation of the n samples from the same RandomState (uint32, or int64 for
  huge n); in the separate-final-epoch case [0, n_first) and [n_first, n) are shuffled separately.

len(ds) is n (Megatron's len), which may exceed N; ds[i] is sample shuffle_index[i].
"""

import logging
import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np

from . import index_cache
from .fingerprint import index_fingerprint
from .splits import SPLIT_NAMES, split_document_range, split_index

logger = logging.getLogger(__name__)

ADD_EXTRA_TOKEN = 1  # samples carry L + 1 tokens: tokens = sample[:-1], labels = sample[1:]
FINAL_EPOCH_THRESHOLD = 0.80
INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


def num_epochs_needed(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int) -> int:
    """Smallest E >= 1 with E * tokens_per_epoch >= num_samples * seq_length + 1."""
    if num_samples is None:
        return 1
    required = num_samples * seq_length + ADD_EXTRA_TOKEN
    return max(1, -(-required // tokens_per_epoch))


def separate_final_epoch(tokens_per_epoch: int, num_epochs: int, num_samples: Optional[int], seq_length: int) -> bool:
    """Whether the final epoch is shuffled on its own (it is needed for < 80% of its samples)."""
    if num_epochs == 1 or num_samples is None:
        return False
    samples_before_final = ((num_epochs - 1) * tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length
    samples_from_final = num_samples - samples_before_final
    samples_per_epoch = (tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length
    assert 0 <= samples_from_final <= samples_per_epoch + 1, (samples_from_final, samples_per_epoch)
    return samples_from_final < int(FINAL_EPOCH_THRESHOLD * samples_per_epoch)


def _document_index(documents: np.ndarray, num_epochs: int, separate: bool, rng: np.random.RandomState) -> np.ndarray:
    if separate and num_epochs > 1:
        head = _document_index(documents, num_epochs - 1, False, rng)
        tail = _document_index(documents, 1, False, rng)
        return np.concatenate((head, tail))
    index = np.tile(documents.astype(np.int32, copy=False), num_epochs)
    rng.shuffle(index)
    return index


def _shuffle_index(first_range: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first_range, dtype=dtype)
    rng.shuffle(head)
    if first_range == total:
        return head
    tail = np.arange(first_range, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate((head, tail))


def build_gpt_indices(
    sequence_lengths: np.ndarray,
    begin: int,
    end: int,
    seq_length: int,
    num_samples: Optional[int],
    seed: int,
    timings: Optional[dict] = None,
) -> Dict[str, np.ndarray]:
    """document_index, sample_index, shuffle_index for documents [begin, end) (pure function).

    `timings`, when given, receives the seconds spent on each index.
    """
    import time

    from megaphi import _C

    _check_params(seq_length, num_samples, seed)
    if not 0 <= begin < end <= len(sequence_lengths):
        raise ValueError(f"document range [{begin}, {end}) is empty or outside [0, {len(sequence_lengths)})")
    tokens_per_epoch = int(np.sum(sequence_lengths[begin:end], dtype=np.int64))
    if tokens_per_epoch <= ADD_EXTRA_TOKEN:
        raise ValueError(f"documents [{begin}, {end}) hold {tokens_per_epoch} tokens; a sample needs at least 2")
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
    separate = separate_final_epoch(tokens_per_epoch, num_epochs, num_samples, seq_length)
    rng = np.random.RandomState(seed)
    timings = {} if timings is None else timings

    t0 = time.perf_counter()
    documents = np.arange(begin, end, dtype=np.int32)
    document_index = _document_index(documents, num_epochs, separate, rng)
    t1 = time.perf_counter()
    lengths = np.asarray(sequence_lengths)
    if lengths.dtype != np.int32:
        lengths = lengths.astype(np.int32)
    elif len(document_index) * 2 > len(lengths):
        lengths = np.array(lengths)  # dense access: read the mmap'd lengths once, sequentially
    sample_index = _C.build_sample_index(lengths, document_index, seq_length, num_epochs, tokens_per_epoch)
    t2 = time.perf_counter()
    total = sample_index.shape[0] - 1
    first = ((num_epochs - 1) * tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length if separate else total
    shuffle_index = _shuffle_index(first, total, rng)
    t3 = time.perf_counter()
    timings.update(
        document_index=t1 - t0,
        sample_index=t2 - t1,
        shuffle_index=t3 - t2,
        num_epochs=num_epochs,
        separate_final_epoch=separate,
        tokens_per_epoch=tokens_per_epoch,
    )
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def _check_params(seq_length, num_samples, seed):
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length <= 0:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0
    ):
        raise ValueError(f"num_samples must be None or an integer >= 0, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def _warn_if_smaller_than_a_sample(ds) -> None:
    """A split with fewer tokens than one sample still trains, by repeating its data every sample
    (E epochs of a few tokens each): legal, but almost always a mistake (a wrong prefix or split)."""
    sample = ds.seq_length + ADD_EXTRA_TOKEN
    if ds.tokens_per_epoch >= sample:
        return
    rank, _ = index_cache._distributed_rank()
    if rank in (None, 0):
        epochs = num_epochs_needed(ds.tokens_per_epoch, ds.num_samples, ds.seq_length) if ds.tokens_per_epoch > 1 else 0
        logger.warning(
            "WARNING: dataset %s, split %s (documents [%d, %d)) holds %d tokens, fewer than one sample "
            "of %d (seq_length %d + 1): every sample repeats the same data (%d epochs)",
            ds.prefix,
            ds.split_name,
            ds.begin,
            ds.end,
            ds.tokens_per_epoch,
            sample,
            ds.seq_length,
            epochs,
        )


class GPTDataset:
    """Samples of seq_length + 1 tokens from one split of PREFIX.{bin,idx} (see module docstring).

    Indices are cached as .npy files in `cache_dir` (default: `<dir of prefix>/cache/GPTDataset_indices`)
    under the md5 of a description of every parameter that changes them; cache=False builds them
    in memory only. `indexed_dataset` reuses an open IndexedDataset of `prefix`.
    """

    def __init__(
        self,
        prefix: str,
        seq_length: int,
        num_samples: Optional[int],
        seed: int,
        split: str = "969,30,1",
        split_name: str = "train",
        cache_dir: Optional[str] = None,
        *,
        indexed_dataset=None,
        cache: bool = True,
    ):
        from .indexed_dataset import IndexedDataset

        _check_params(seq_length, num_samples, seed)
        self.prefix = os.fspath(prefix)
        self.seq_length = int(seq_length)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seed = int(seed)
        self.split = str(split)
        self.split_name = SPLIT_NAMES[split_index(split_name)]
        self.indexed_dataset = indexed_dataset if indexed_dataset is not None else IndexedDataset(self.prefix)
        lengths = self.indexed_dataset.sequence_lengths
        doc_range = split_document_range(self.split, self.split_name, len(lengths))
        if doc_range is None or doc_range[1] <= doc_range[0]:
            where = "has weight 0" if doc_range is None else f"covers no documents ([{doc_range[0]}, {doc_range[1]}))"
            raise ValueError(
                f"split {self.split_name!r} of --split {self.split} {where} in {self.prefix} ({len(lengths)} documents)"
            )
        self.begin, self.end = doc_range
        self.tokens_per_epoch = int(np.sum(lengths[self.begin : self.end], dtype=np.int64))
        _warn_if_smaller_than_a_sample(self)

        identifiers = OrderedDict(
            format="megaphi-gpt-indices-v1",
            cls=type(self).__name__,
            dataset_path=os.path.abspath(self.prefix),
            num_sequences=len(lengths),
            tokens_per_epoch=self.tokens_per_epoch,
            num_samples=self.num_samples,
            # the files' contents, not just their counts: a prefix re-preprocessed with the same
            # document count and token total but another order must not reuse the old indices
            data_fingerprint=index_fingerprint(self.indexed_dataset),
            index_split=self.split_name,
            random_seed=self.seed,
            sequence_length=self.seq_length,
            split=self.split,
            document_range=[self.begin, self.end],
            add_extra_token_to_sequence=True,
            drop_last_partial_sequence=True,
        )
        self.description, self.description_hash = index_cache.describe(identifiers)

        def build():
            return build_gpt_indices(lengths, self.begin, self.end, self.seq_length, self.num_samples, self.seed)

        self.cache_paths: Optional[Dict[str, str]]
        if cache:
            directory = (
                cache_dir
                if cache_dir is not None
                else os.path.join(os.path.dirname(os.path.abspath(self.prefix)), "cache", "GPTDataset_indices")
            )
            base = os.path.join(os.fspath(directory), f"{self.description_hash}-GPTDataset-{self.split_name}-")
            self.cache_paths = {name: base + name + ".npy" for name in INDEX_NAMES}
            self.cache_paths["description"] = base + "description.txt"
            arrays = index_cache.build_or_load(self.cache_paths, INDEX_NAMES, self.description, build)
        else:
            self.cache_paths = None
            arrays = build()
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self.num_epochs = num_epochs_needed(self.tokens_per_epoch, self.num_samples, self.seq_length)

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, sample: int) -> np.ndarray:
        """The seq_length + 1 tokens of unshuffled sample `sample` (int64)."""
        doc_first, offset_first = (int(v) for v in self.sample_index[sample])
        doc_last, offset_last = (int(v) for v in self.sample_index[sample + 1])
        get = self.indexed_dataset.get
        if doc_first == doc_last:
            parts = [get(self.document_index[doc_first], offset_first, offset_last - offset_first + ADD_EXTRA_TOKEN)]
        else:
            parts = [get(self.document_index[doc_first], offset_first)]
            parts += [get(self.document_index[p]) for p in range(doc_first + 1, doc_last)]
            parts.append(get(self.document_index[doc_last], 0, offset_last + ADD_EXTRA_TOKEN))
        tokens = np.concatenate(parts).astype(np.int64)
        assert tokens.shape[0] == self.seq_length + ADD_EXTRA_TOKEN, tokens.shape
        return tokens

    def __getitem__(self, idx) -> Dict[str, np.ndarray]:
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {idx} out of range for a GPTDataset of {n} samples")
        tokens = self.sample_tokens(int(self.shuffle_index[i]))
        return {"tokens": tokens[:-1], "labels": tokens[1:]}

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.prefix!r}, split={self.split_name} docs [{self.begin}, {self.end}), "
            f"seq_length={self.seq_length}, samples={len(self)}, epochs={self.num_epochs})"
        )
