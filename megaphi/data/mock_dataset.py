"""Synthetic training samples for `--mock-data` (Megatron's flag): benchmarks and checks without a
dataset or a tokenizer.

Each sample is a stream of phrases: a phrase of 4-32 tokens, each drawn from a Zipf-like
(log-uniform) distribution over [0, vocab_size), written twice in a row. A model lowers its loss first
by learning the token frequencies (from ln V towards about 7.6 nats at V = 51200), then by copying the
second copy of each phrase, so a short run shows a falling loss. Sample i of a split depends only on
(seed, split, i): any order, any number of workers or ranks, and resumes give the same tokens.
"""

from typing import Dict

import numpy as np

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
MIN_PHRASE, MAX_PHRASE = 4, 32


def mock_tokens(seed: int, split: str, index: int, length: int, vocab_size: int) -> np.ndarray:
    """The `length` int64 tokens of sample `index` of `split`."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    most = length // (2 * MIN_PHRASE) + 1  # phrases enough for any draw of lengths
    lengths = MIN_PHRASE + (rng.random(most) * (MAX_PHRASE - MIN_PHRASE + 1)).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(2 * lengths), length) + 1]  # the phrases the sample uses
    # log-uniform over 1..V, shifted to 0..V-1: P(k) ~ 1/(k+1), like word frequencies
    values = np.exp(rng.random(int(lengths.sum())) * np.log(vocab_size)).astype(np.int64) - 1
    values = np.minimum(values, vocab_size - 1)
    starts = np.cumsum(lengths) - lengths  # each phrase's first value
    phrase = np.repeat(np.arange(len(lengths)), 2 * lengths)  # the phrase each output token belongs to
    written = np.cumsum(2 * lengths) - 2 * lengths  # each phrase's first output position
    offset = (np.arange(len(phrase)) - written[phrase]) % lengths[phrase]
    return values[starts[phrase] + offset][:length]


class MockGPTDataset:
    """`num_samples` samples of seq_length tokens (+1 for the shifted labels), like GPTDataset's items."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, split: str = "train"):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
        for name, value in (("num_samples", num_samples), ("seq_length", seq_length), ("vocab_size", vocab_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_samples, self.seq_length, self.vocab_size = int(num_samples), int(seq_length), int(vocab_size)
        self.seed, self.split = int(seed), split

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx) -> Dict[str, np.ndarray]:
        i = int(idx)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {idx} out of range for a MockGPTDataset of {self.num_samples} samples")
        tokens = mock_tokens(self.seed, self.split, i, self.seq_length + 1, self.vocab_size)
        return {"tokens": tokens[:-1], "labels": tokens[1:]}

    def __repr__(self) -> str:
        return (
            f"MockGPTDataset(split={self.split}, samples={self.num_samples}, seq_length={self.seq_length}, "
            f"vocab_size={self.vocab_size}, seed={self.seed})"
        )
