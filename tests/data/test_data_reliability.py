"""Token files that changed, do not fit the model, or are smaller than a sample (issue 12, Data)."""

import logging
import os

import numpy as np
import pytest

from megaphi.data import GPTDataset, build_gpt_datasets
from megaphi.data import token_check
from numpy_reference_indices import write_token_files


def _documents(seed, count=200, high=50000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=n).astype(np.uint16) for n in rng.integers(1, 60, size=count)]


def _rewrite(prefix, documents):
    """Like preprocess_data.py --overwrite: new files renamed over the old ones."""
    tmp = prefix + ".new"
    write_token_files(tmp, documents)
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")


def _all_samples(ds):
    return np.stack([ds[i]["tokens"] for i in range(len(ds))])


def test_rewritten_prefix_with_same_counts_gets_new_indices(tmp_path):
    prefix, cache = str(tmp_path / "code_text_document"), str(tmp_path / "cache")
    docs = _documents(0)
    write_token_files(prefix, docs)
    old = GPTDataset(prefix, 16, 300, 1, split="1,0,0", cache_dir=cache)
    old_hash, old_len = old.description_hash, len(old)
    del old
    # same document count and token total, another order: only the contents tell them apart
    reordered = [docs[i] for i in np.random.default_rng(1).permutation(len(docs))]
    assert sum(map(len, reordered)) == sum(map(len, docs))
    _rewrite(prefix, reordered)

    new = GPTDataset(prefix, 16, 300, 1, split="1,0,0", cache_dir=cache)
    assert new.description_hash != old_hash
    assert len([f for f in os.listdir(cache) if f.endswith("description.txt")]) == 2
    fresh = GPTDataset(prefix, 16, 300, 1, split="1,0,0", cache=False)
    assert len(new) == len(fresh) == old_len
    np.testing.assert_array_equal(_all_samples(new), _all_samples(fresh))
    # and the same files again reuse the entry
    assert GPTDataset(prefix, 16, 300, 1, split="1,0,0", cache_dir=cache).description_hash == new.description_hash


def test_token_ids_outside_the_vocabulary_name_the_dataset(tmp_path):
    prefix, cache = str(tmp_path / "code_text_document"), str(tmp_path / "cache")
    docs = _documents(2, high=1000)
    docs[150][3] = 51234
    write_token_files(prefix, docs)
    with pytest.raises(token_check.VocabularyError) as err:
        build_gpt_datasets(
            [prefix],
            "90,10,0",
            16,
            0,
            num_samples=(10, None, None),
            cache_dir=cache,
            splits=("train",),
            vocab_size=51200,
        )
    assert str(err.value).startswith(
        f"dataset {prefix} holds token id 51234, outside the model's vocabulary of 51200 (ids 0..51199)"
    )
    train, _, _ = build_gpt_datasets(
        [prefix], "90,10,0", 16, 0, num_samples=(10, None, None), cache_dir=cache, splits=("train",), vocab_size=51235
    )
    assert len(train) >= 10


def test_max_token_scan_is_cached_until_the_bin_changes(tmp_path, monkeypatch):
    from megaphi.data import IndexedDataset

    prefix, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    docs = _documents(3, high=100)
    write_token_files(prefix, docs)
    monkeypatch.setattr(token_check, "_CHUNK_BYTES", 64)  # many chunks
    expected = max(int(d.max()) for d in docs)
    assert token_check.check_vocabulary(IndexedDataset(prefix), 100, cache) == expected

    def no_scan(dataset):
        raise AssertionError("scanned again")

    monkeypatch.setattr(token_check, "max_token_id", no_scan)
    assert token_check.check_vocabulary(IndexedDataset(prefix), 100, cache) == expected
    monkeypatch.undo()

    docs[0][0] = 4000
    _rewrite(prefix, docs)
    with pytest.raises(token_check.VocabularyError, match="holds token id 4000"):
        token_check.check_vocabulary(IndexedDataset(prefix), 100, cache)


def test_fewer_tokens_than_one_sample_warns(tmp_path, caplog):
    prefix = str(tmp_path / "tiny_text_document")
    write_token_files(prefix, [np.arange(7, dtype=np.uint16), np.arange(5, dtype=np.uint16)])
    with caplog.at_level(logging.WARNING, logger="megaphi.data.gpt_dataset"):
        ds = GPTDataset(prefix, 32, 100, 0, split="1,0,0", cache=False)
    assert len(ds) >= 100
    assert [r.getMessage() for r in caplog.records] == [
        f"WARNING: dataset {prefix}, split train (documents [0, 2)) holds 12 tokens, fewer than one sample of 33 "
        f"(seq_length 32 + 1): every sample repeats the same data ({ds.num_epochs} epochs)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megaphi.data.gpt_dataset"):
        GPTDataset(prefix, 11, 10, 0, split="1,0,0", cache=False)  # 12 tokens = one sample: no warning
    assert caplog.records == []


def test_pretrain_refuses_out_of_vocabulary_tokens(tmp_path):
    from test_resume import make_token_file, run_pretrain, tiny_flags

    prefix = make_token_file(str(tmp_path / "toy"), vocab=300)  # the tiny model has 256 rows
    proc = run_pretrain(tiny_flags(prefix, 2) + ["--eval-iters", "0"], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megaphi.pretrain: error:")]
    assert len(errors) == 1 and f"dataset {prefix} holds token id 29" in errors[0], proc.stderr[-2000:]
    assert "outside the model's vocabulary of 256" in errors[0]
    assert "iteration" not in proc.stdout
