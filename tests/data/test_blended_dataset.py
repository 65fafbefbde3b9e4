"""Blending indices vs a Python loop; build_gpt_datasets' per-dataset sizes and splits."""

import math

import numpy as np
import pytest

from megaphi import _C
from megaphi.data import BlendedDataset, GPTDataset, build_gpt_datasets, parse_data_path
from numpy_reference_indices import blend_sizes, reference_blending, write_token_files


@pytest.mark.parametrize(
    "weights,size",
    [
        ([0.7, 0.3], 1000),
        ([1.0], 17),
        ([1, 1, 1], 301),  # exact ties go to the lowest dataset
        ([5.0, 0.001, 2.5, 1.0], 2000),
        ([0.2, 0.8], 0),
        ([3, 1], 1),
    ],
)
def test_blending_indices_match_python_loop(weights, size):
    dataset_index, sample_index = _C.build_blending_indices(np.array(weights, float) / np.sum(weights), size)
    ref_dataset, ref_sample = reference_blending(weights, size)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    np.testing.assert_array_equal(dataset_index, ref_dataset.astype(np.int16))
    np.testing.assert_array_equal(sample_index, ref_sample)


def test_exhaustive_blending_draws_every_sample_once():
    sizes = np.array([7, 0, 3, 11])
    dataset_index, sample_index = _C.build_exhaustive_blending_indices(sizes)
    assert len(dataset_index) == sizes.sum()
    for d, n in enumerate(sizes):
        np.testing.assert_array_equal(sample_index[dataset_index == d], np.arange(n))


class ListDataset:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return (self.name, i)


def test_blended_dataset_routes_samples():
    a, b = ListDataset("a", 800), ListDataset("b", 400)
    ds = BlendedDataset([a, b], [2.0, 1.0], 900)
    ref_dataset, ref_sample = reference_blending([2.0, 1.0], 900)
    assert len(ds) == 900
    assert [ds[i] for i in range(900)] == [("ab"[d], int(s)) for d, s in zip(ref_dataset, ref_sample)]
    assert ds[-1] == ds[899]
    with pytest.raises(IndexError):
        ds[900]


@pytest.mark.parametrize(
    "datasets,weights,size,message",
    [
        (2, [1.0], 10, "2 datasets but 1 weights"),
        (2, [1.0, 2.0, 3.0], 10, "2 datasets but 3 weights"),
        (2, [1.0, 0.0], 10, "> 0"),
        (2, [1.0, -1.0], 10, "> 0"),
        (0, [], 10, "at least one"),
        (2, [1.0, 1.0], -1, "size"),
        (2, [1.0, 1.0], 1000, "only 10"),
    ],
)
def test_blended_dataset_bad_inputs(datasets, weights, size, message):
    parts = [ListDataset(str(i), 10) for i in range(datasets)]
    with pytest.raises(ValueError, match=message):
        BlendedDataset(parts, weights, size)


def test_parse_data_path():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_data_path("1 a") == (["a"], [1.0])
    with pytest.raises(ValueError, match="weight without a prefix"):
        parse_data_path(["0.7", "a", "0.3"])
    with pytest.raises(ValueError, match="empty"):
        parse_data_path([])


@pytest.fixture
def two_corpora(tmp_path):
    rng = np.random.default_rng(1)
    prefixes = []
    for name, count in (("code", 400), ("textbook", 150)):
        docs = [rng.integers(0, 50000, size=n).astype(np.uint16) for n in rng.integers(1, 80, size=count)]
        prefix = str(tmp_path / f"{name}_text_document")
        write_token_files(prefix, docs)
        prefixes.append(prefix)
    return prefixes


def test_build_gpt_datasets_weighted_blend(two_corpora, tmp_path):
    code, textbook = two_corpora
    num_samples = (500, 40, 10)
    cache = str(tmp_path / "cache")
    train, valid, test = build_gpt_datasets(
        ["0.7", code, "0.3", textbook], "90,8,2", 16, 7, num_samples, cache_dir=cache
    )
    for ds, n, name in ((train, 500, "train"), (valid, 40, "valid"), (test, 10, "test")):
        assert isinstance(ds, BlendedDataset)
        targets, requested = blend_sizes([0.7, 0.3], n)
        assert len(ds) == sum(targets)  # Megatron: sum of ceil(N * w_d), at least N
        for part, asked in zip(ds.datasets, requested):
            assert part.num_samples == asked and part.split_name == name and len(part) >= asked
        ref_dataset, ref_sample = reference_blending([0.7, 0.3], sum(targets))
        np.testing.assert_array_equal(ds.dataset_index, ref_dataset)
        np.testing.assert_array_equal(ds.dataset_sample_index, ref_sample)
    # A blended sample is the referenced sample of the referenced dataset.
    for i in (0, 1, 2, 250, len(train) - 1):
        d, s = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        np.testing.assert_array_equal(train[i]["tokens"], train.datasets[d][s]["tokens"])
    # Same parameters directly: identical indices (and a cache hit).
    direct = GPTDataset(code, 16, math.ceil(math.ceil(500 * 0.7) * 1.005), 7, split="90,8,2", cache_dir=cache)
    np.testing.assert_array_equal(direct.shuffle_index, train.datasets[0].shuffle_index)


def test_build_gpt_datasets_single_prefix_and_empty_split(two_corpora):
    code, _ = two_corpora
    train, valid, test = build_gpt_datasets([code], "95,5,0", 32, 1, (100, 10, 5))
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and test is None
    assert train.num_samples == 100 and len(train) >= 100 and valid.split_name == "valid"


def test_build_gpt_datasets_unweighted_blend_uses_sizes(two_corpora):
    code, textbook = two_corpora
    train, _, _ = build_gpt_datasets([code, textbook], "1", 16, 1, (200, None, None))
    sizes = [len(d) for d in train.datasets]
    assert len(train) == min(200, sum(sizes))
    ref_dataset, _ = reference_blending(sizes, len(train))
    np.testing.assert_array_equal(train.dataset_index, ref_dataset)


def test_build_gpt_datasets_weighted_without_a_count_blends_one_epoch(two_corpora):
    code, textbook = two_corpora
    train, valid, test = build_gpt_datasets(["1", code, "3", textbook], "98,2,0", 16, 1, (None, None, 0))
    assert test is None  # 0 samples: not built, as the trainer does with evaluation off
    for blend in (train, valid):
        sizes = [len(d) for d in blend.datasets]  # each dataset built for one epoch (num_samples None)
        assert all(d.num_samples is None for d in blend.datasets)

        def fits(n):  # the independent greedy reference draws no dataset past its epoch
            counts = np.bincount(reference_blending([0.25, 0.75], n)[0], minlength=2)
            return bool(np.all(counts <= sizes))

        assert fits(len(blend)) and not fits(len(blend) + 1)
        np.testing.assert_array_equal(blend.dataset_index, reference_blending([0.25, 0.75], len(blend))[0])


def test_build_gpt_datasets_bad_inputs(two_corpora):
    code, textbook = two_corpora
    with pytest.raises(ValueError, match="train, valid, test"):
        build_gpt_datasets([code], "1", 16, 1, (10, 10))
    with pytest.raises(ValueError, match="seq_length"):
        build_gpt_datasets([code], "1", 0, 1, (10, None, None))
