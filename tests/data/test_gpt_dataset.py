"""GPTDataset and the C++ sample index against the independent numpy reference."""

import os

import numpy as np
import pytest

from megaphi import _C
from megaphi.data import GPTDataset, IndexedDataset
from megaphi.data import gpt_dataset as gpt_module
from megaphi.data.splits import split_document_range
from numpy_reference_indices import reference_indices, reference_samples, split_range, write_token_files


def random_documents(seed, count, low=1, high=60, zero_fraction=0.0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high, size=count)
    lengths[rng.random(count) < zero_fraction] = 0
    return [rng.integers(0, 50000, size=n).astype(np.uint16) for n in lengths]


@pytest.fixture
def corpus(tmp_path):
    docs = random_documents(0, 300, zero_fraction=0.05)
    prefix = str(tmp_path / "corpus_text_document")
    write_token_files(prefix, docs)
    return prefix, docs


def samples_for(lengths, split, split_name, seq_length, epochs_wanted, from_final):
    """A num_samples that needs `epochs_wanted` epochs and takes from_final(samples per epoch)
    samples from the final one."""
    begin, end = split_range(split, split_name, len(lengths))
    tokens = int(np.sum(lengths[begin:end]))
    before_final = ((epochs_wanted - 1) * tokens - 1) // seq_length
    per_epoch = (tokens - 1) // seq_length
    return before_final + from_final(per_epoch)


CASES = {
    # name: (split, split_name, seq_length, epochs, samples from the final epoch, expect separate)
    "single_epoch": ("969,30,1", "train", 16, 1, lambda n: n // 2, False),
    "multi_epoch_not_separated": ("969,30,1", "train", 16, 3, lambda n: int(0.9 * n), False),
    "separate_final_epoch": ("969,30,1", "train", 16, 3, lambda n: int(0.3 * n), True),
    "at_threshold_not_separated": ("969,30,1", "train", 16, 2, lambda n: int(0.8 * n), False),
    "below_threshold_separated": ("969,30,1", "train", 16, 2, lambda n: int(0.8 * n) - 1, True),
    "separate_two_epochs_valid": ("80,20", "valid", 7, 2, lambda n: 1, True),
    "test_split_long_samples": ("60,20,20", "test", 50, 4, lambda n: n // 2, True),
    "seq_length_one": ("1", "train", 1, 2, lambda n: n, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_indices_match_reference(corpus, tmp_path, case):
    prefix, docs = corpus
    split, split_name, seq_length, epochs, fraction, separate = CASES[case]
    lengths = np.array([len(d) for d in docs])
    num_samples = samples_for(lengths, split, split_name, seq_length, epochs, fraction)
    doc_ref, sample_ref, shuffle_ref, info = reference_indices(
        lengths, split, split_name, seq_length, num_samples, 1234
    )
    assert (info["num_epochs"], info["separate"]) == (epochs, separate), "the case does not test what it claims"

    ds = GPTDataset(
        prefix, seq_length, num_samples, 1234, split=split, split_name=split_name, cache_dir=str(tmp_path / "cache")
    )
    assert ds.document_index.dtype == np.int32
    assert ds.sample_index.dtype == np.int32
    assert ds.shuffle_index.dtype == np.uint32
    np.testing.assert_array_equal(ds.document_index, doc_ref)
    np.testing.assert_array_equal(ds.sample_index, sample_ref)
    np.testing.assert_array_equal(ds.shuffle_index, shuffle_ref)
    assert len(ds) == len(shuffle_ref) >= num_samples
    assert ds.num_epochs == epochs

    expected = reference_samples(docs, doc_ref, shuffle_ref, seq_length)
    for i in list(range(min(len(ds), 40))) + [len(ds) - 1, -1]:
        sample = ds[i]
        assert sample["tokens"].dtype == np.int64 and sample["labels"].dtype == np.int64
        assert sample["tokens"].shape == (seq_length,) == sample["labels"].shape
        np.testing.assert_array_equal(sample["tokens"], expected[i][:-1])
        np.testing.assert_array_equal(sample["labels"], expected[i][1:])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_one_epoch_when_num_samples_is_none(corpus):
    prefix, docs = corpus
    lengths = np.array([len(d) for d in docs])
    ds = GPTDataset(prefix, 32, None, 5, cache=False)
    doc_ref, sample_ref, shuffle_ref, info = reference_indices(lengths, "969,30,1", "train", 32, None, 5)
    assert info["num_epochs"] == 1
    np.testing.assert_array_equal(ds.sample_index, sample_ref)
    np.testing.assert_array_equal(ds.shuffle_index, shuffle_ref)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_cpp_sample_index_both_widths(index_dtype):
    docs = random_documents(3, 500, high=200, zero_fraction=0.1)
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    seq_length, num_samples = 64, 2000
    doc_ref, sample_ref, _, info = reference_indices(lengths, "1", "train", seq_length, num_samples, 9)
    out = _C.build_sample_index(
        lengths, doc_ref, seq_length, info["num_epochs"], info["tokens_per_epoch"], index_dtype=index_dtype
    )
    assert out.dtype == index_dtype
    np.testing.assert_array_equal(out, sample_ref)


def test_cpp_sample_index_rejects_bad_inputs():
    lengths = np.array([5, 6], dtype=np.int32)
    with pytest.raises(ValueError, match="seq_length"):
        _C.build_sample_index(lengths, np.array([0, 1], np.int32), 0, 1, 11)
    with pytest.raises(IndexError, match="outside"):
        _C.build_sample_index(lengths, np.array([0, 7], np.int32), 4, 1, 11)
    with pytest.raises(RuntimeError, match="fewer tokens"):
        _C.build_sample_index(lengths, np.array([0, 1], np.int32), 4, 2, 11)


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "1,1,1", "100", "0,1", "7, 2, 1", "0.5,0.25,0.25"])
def test_split_ranges_match_reference(split):
    for num_docs in (1, 7, 100, 999, 12345):
        for name in ("train", "valid", "test"):
            assert split_document_range(split, name, num_docs) == split_range(split.replace(" ", ""), name, num_docs)


def test_splits_partition_the_documents(corpus):
    prefix, _ = corpus
    ranges = [split_document_range("969,30,1", n, 300) for n in ("train", "valid", "test")]
    assert ranges == [(0, 291), (291, 300), (300, 300)]  # round(.969*300)=291, round(.999*300)=300


def test_cache_reused_and_keyed_by_parameters(corpus, tmp_path, monkeypatch):
    prefix, _ = corpus
    cache_dir = str(tmp_path / "idx_cache")
    first = GPTDataset(prefix, 16, 100, 1, cache_dir=cache_dir)
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 4 and not any(f.startswith(".tmp") for f in files)
    assert all(f.startswith(first.description_hash) for f in files)

    def fail(*args, **kwargs):
        raise AssertionError("indices rebuilt despite a complete cache entry")

    monkeypatch.setattr(gpt_module, "build_gpt_indices", fail)
    again = GPTDataset(prefix, 16, 100, 1, cache_dir=cache_dir)
    assert again.description_hash == first.description_hash
    assert isinstance(again.shuffle_index, np.memmap)
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    monkeypatch.undo()

    hashes = {first.description_hash}
    for kwargs in (
        dict(seed=2),
        dict(num_samples=101),
        dict(seq_length=17),
        dict(split="90,10,0"),
        dict(split_name="valid"),
    ):
        params = dict(seq_length=16, num_samples=100, seed=1)
        params.update({k: v for k, v in kwargs.items() if k in params})
        extra = {k: v for k, v in kwargs.items() if k not in params}
        ds = GPTDataset(
            prefix, params["seq_length"], params["num_samples"], params["seed"], cache_dir=cache_dir, **extra
        )
        hashes.add(ds.description_hash)
    assert len(hashes) == 6
    assert len(os.listdir(cache_dir)) == 24


def test_default_cache_next_to_data(corpus):
    prefix, _ = corpus
    ds = GPTDataset(prefix, 16, 10, 0)
    expected_dir = os.path.join(os.path.dirname(prefix), "cache", "GPTDataset_indices")
    assert os.path.dirname(ds.cache_paths["shuffle_index"]) == expected_dir
    assert os.path.isfile(ds.cache_paths["description"])


def test_shared_indexed_dataset_and_repr(corpus):
    prefix, _ = corpus
    reader = IndexedDataset(prefix)
    ds = GPTDataset(prefix, 16, 10, 0, indexed_dataset=reader, cache=False)
    assert ds.indexed_dataset is reader and "GPTDataset" in repr(ds)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(seq_length=0), "seq_length"),
        (dict(seq_length=-3), "seq_length"),
        (dict(num_samples=-1), "num_samples"),
        (dict(seed=-1), "seed"),
        (dict(split=""), "empty"),
        (dict(split="0,0,0"), "sum to 0"),
        (dict(split="a,b"), "number"),
        (dict(split="1,2,3,4"), "at most 3"),
        (dict(split="100,0,0", split_name="valid"), "weight 0"),
        (dict(split="969,30,1", split_name="test"), "no documents"),
        (dict(split_name="dev"), "unknown split_name"),
    ],
)
def test_bad_inputs_raise_clear_errors(corpus, kwargs, message):
    prefix, _ = corpus
    params = dict(seq_length=16, num_samples=10, seed=0)
    params.update({k: kwargs.pop(k) for k in list(kwargs) if k in params})
    with pytest.raises(ValueError, match=message):
        GPTDataset(prefix, params["seq_length"], params["num_samples"], params["seed"], cache=False, **kwargs)


def test_missing_files_raise(tmp_path):
    with pytest.raises(Exception, match="missing"):
        GPTDataset(str(tmp_path / "nothing"), 16, 10, 0)


def _distributed_build(rank, world_size, prefix, cache_dir, out_dir):
    calls = []
    original = gpt_module.build_gpt_indices

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    gpt_module.build_gpt_indices = counting
    ds = GPTDataset(prefix, 16, 500, 3, cache_dir=cache_dir)
    np.save(os.path.join(out_dir, f"shuffle_{rank}.npy"), np.asarray(ds.shuffle_index))
    with open(os.path.join(out_dir, f"calls_{rank}"), "w") as f:
        f.write(str(len(calls)))


@pytest.mark.distributed
def test_rank0_builds_others_wait_and_map(corpus, tmp_path):
    from dist_utils import run_distributed

    prefix, _ = corpus
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run_distributed(_distributed_build, 2, prefix, str(tmp_path / "dist_cache"), str(out_dir))
    assert (out_dir / "calls_0").read_text() == "1"
    assert (out_dir / "calls_1").read_text() == "0"
    np.testing.assert_array_equal(np.load(out_dir / "shuffle_0.npy"), np.load(out_dir / "shuffle_1.npy"))
