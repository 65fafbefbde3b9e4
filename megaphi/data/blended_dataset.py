"""BlendedDataset and build_gpt_datasets: `--data-path [w1] p1 [w2 p2 ...]` as Megatron-LM reads it.

Blending is deterministic (no RNG): with weights w normalised to sum 1, blended sample i comes from
dataset argmax_d(w_d * max(i, 1) - count_d) (ties to the lowest d) and is that dataset's
count_d-th sample. For a blend of N samples of a split, dataset d is built with
ceil(ceil(N * w_d) * 1.005) samples (a 0.5% surplus) and the blend holds sum_d ceil(N * w_d) samples.
The blending indices are cheap (C++, O(size * datasets)) and are rebuilt on every rank, not cached.
"""

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .gpt_dataset import GPTDataset
from .splits import SPLIT_NAMES, split_bookends, parse_split

MID_LEVEL_SURPLUS = 0.005


def normalize_weights(weights: Sequence[float]) -> List[float]:
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


class BlendedDataset:
    """Mixes `datasets` by `weights` into `size` samples.

    `size` None draws every sample of every dataset exactly once (weights must then be the integer
    sample counts), as Megatron does for unweighted blends without a requested size.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: Optional[int]):
        from megaphi import _C

        datasets = list(datasets)
        weights = [float(w) for w in weights]
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset")
        if len(datasets) != len(weights):
            raise ValueError(f"BlendedDataset got {len(datasets)} datasets but {len(weights)} weights")
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"blending weights must be finite and > 0, got {weights}")
        self.datasets = datasets
        self.size = size
        if size is None:
            if any(w != int(w) for w in weights):
                raise ValueError("BlendedDataset with size=None takes integer sample counts as weights")
            self.weights = weights
            self.dataset_index, self.dataset_sample_index = _C.build_exhaustive_blending_indices(
                np.array(weights, dtype=np.int64)
            )
        else:
            if isinstance(size, bool) or int(size) != size or size < 0:
                raise ValueError(f"BlendedDataset size must be an integer >= 0, got {size!r}")
            self.weights = normalize_weights(weights)
            self.dataset_index, self.dataset_sample_index = _C.build_blending_indices(
                np.array(self.weights, dtype=np.float64), int(size)
            )
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (count, dataset) in enumerate(zip(counts, datasets)):
            if count > len(dataset):
                raise ValueError(
                    f"the blend draws {count} samples from dataset {d} ({dataset!r}), which has "
                    f"only {len(dataset)}; build it with more samples"
                )

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, idx):
        n = len(self)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {idx} out of range for a BlendedDataset of {n} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def __repr__(self) -> str:
        return f"BlendedDataset({len(self.datasets)} datasets, weights={self.weights}, samples={len(self)})"


def parse_data_path(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """["p"] / ["p1", "p2"] -> (prefixes, None); ["w1", "p1", "w2", "p2"] -> (prefixes, weights)."""
    if isinstance(data_path, (str, bytes)):
        data_path = str(data_path).split()
    items = [str(x).strip() for x in data_path]
    if not items:
        raise ValueError("--data-path is empty")
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            weights = None
        if weights is not None:
            return items[1::2], weights
    for item in items:
        try:
            float(item)
        except ValueError:
            continue
        raise ValueError(
            f"--data-path {' '.join(items)}: expected prefixes or weight/prefix pairs; "
            f"{item!r} looks like a weight without a prefix"
        )
    return items, None


def build_gpt_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Sequence[Optional[int]] = (None, None, None),
    cache_dir: Optional[str] = None,
    splits: Sequence[str] = SPLIT_NAMES,
    vocab_size: Optional[int] = None,
):
    """(train, valid, test): each a GPTDataset, a BlendedDataset or None (weight-0 split, or a split
    not named in `splits`, which is then not built at all: a caller that never reads it need not
    have documents for it).

    num_samples gives the samples wanted per split, as the trainer asks: a count, 0 (the split is
    not built: None, as for evaluation off) or None (one epoch; a split that covers no documents is
    then None, so a small file's empty test split is no error). One unweighted prefix gives
    GPTDatasets; weights (even a single one) give BlendedDatasets over per-prefix GPTDatasets (with
    None: one epoch of each, drawn at the weights until the first runs out); several unweighted
    prefixes are blended by their sizes (one epoch each). A count > 0 for a split without documents
    is a ValueError naming the split and the file.

    vocab_size: every token file is checked to hold ids < vocab_size (token_check.VocabularyError,
    a ValueError naming the dataset), before any index is built.
    """
    from .indexed_dataset import IndexedDataset

    prefixes, weights = parse_data_path(data_path)
    num_samples = list(num_samples)
    if len(num_samples) != len(SPLIT_NAMES):
        raise ValueError(f"num_samples must give (train, valid, test), got {num_samples}")
    bookends = split_bookends(parse_split(split))
    readers = {p: IndexedDataset(p) for p in dict.fromkeys(prefixes)}
    if vocab_size is not None:
        from .token_check import check_vocabulary

        for reader in readers.values():
            check_vocabulary(reader, vocab_size, cache_dir)

    def gpt(prefix, samples, split_name):
        return GPTDataset(
            prefix,
            seq_length,
            samples,
            seed,
            split=split,
            split_name=split_name,
            cache_dir=cache_dir,
            indexed_dataset=readers[prefix],
        )

    results: List[Optional[object]] = []  # per split: a GPTDataset, a BlendedDataset or None
    for k, name in enumerate(SPLIT_NAMES):
        wanted = num_samples[k]
        if wanted is not None and (isinstance(wanted, bool) or int(wanted) != wanted or wanted < 0):
            raise ValueError(f"num_samples for the {name} split must be an integer >= 0 or None, got {wanted!r}")
        if wanted is None:  # one epoch of what the split holds: prefixes without documents in it give nothing
            keep = [i for i, p in enumerate(prefixes) if _has_documents(readers[p], split, name)]
            part_prefixes = [prefixes[i] for i in keep]
            part_weights = None if weights is None else [weights[i] for i in keep]
        else:
            part_prefixes, part_weights = prefixes, weights
        if bookends[k] is None or name not in splits or wanted == 0 or not part_prefixes:
            results.append(None)
        elif len(part_prefixes) == 1 and part_weights is None:
            results.append(gpt(part_prefixes[0], wanted, name))
        elif part_weights is not None and wanted is None:
            parts = [gpt(p, None, name) for p in part_prefixes]
            norm = normalize_weights(part_weights)
            results.append(BlendedDataset(parts, norm, one_epoch_blend_size([len(d) for d in parts], norm)))
        elif part_weights is not None:
            assert wanted is not None  # the branch above took the blend without a sample count
            norm = normalize_weights(part_weights)
            targets = [int(math.ceil(wanted * w)) for w in norm]
            parts = [gpt(p, int(math.ceil(t * (1 + MID_LEVEL_SURPLUS))), name) for p, t in zip(part_prefixes, targets)]
            results.append(BlendedDataset(parts, norm, sum(targets)))
        else:
            parts = [gpt(p, None, name) for p in part_prefixes]
            lengths = [len(d) for d in parts]
            if wanted is None:
                results.append(BlendedDataset(parts, lengths, None))
            else:
                results.append(BlendedDataset(parts, lengths, min(wanted, sum(lengths))))
    return tuple(results)


def one_epoch_blend_size(lengths: Sequence[int], weights: Sequence[float]) -> int:
    """The largest blend at `weights` (normalised) that draws no dataset past its `lengths`."""
    from megaphi import _C

    size = int(min(n / w for n, w in zip(lengths, weights))) + 1  # the greedy blend is within 1 of w * size
    while size > 0:
        index, _ = _C.build_blending_indices(np.array(weights, dtype=np.float64), size)
        if np.all(np.bincount(index, minlength=len(lengths)) <= np.array(lengths)):
            return size
        size -= 1
    return 0


def _has_documents(reader, split: str, split_name: str) -> bool:
    from .splits import split_document_range

    doc_range = split_document_range(split, split_name, len(reader.sequence_lengths))
    return doc_range is not None and doc_range[1] > doc_range[0]
