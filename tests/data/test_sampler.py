"""MegatronPretrainingSampler order, DP partition and exact resume; the data loader's batches."""

import numpy as np
import pytest
import torch

from megaphi.data import GPTDataset, MegatronPretrainingSampler, build_pretraining_data_loader
from numpy_reference_indices import reference_indices, reference_samples, write_token_files


def reference_batches(total, consumed, micro, rank, dp):
    """Sample ids of every micro-batch of `rank`, by hand: full global batches of micro*dp ids."""
    out = []
    global_batch = micro * dp
    start = consumed
    while start + global_batch <= total:
        out.append(list(range(start + rank * micro, start + (rank + 1) * micro)))
        start += global_batch
    return out


@pytest.mark.parametrize("total,micro,dp", [(100, 4, 1), (100, 3, 2), (37, 2, 4), (64, 1, 8)])
def test_sampler_matches_reference_and_partitions_global_batches(total, micro, dp):
    per_rank = [list(MegatronPretrainingSampler(total, 0, micro, r, dp)) for r in range(dp)]
    for r in range(dp):
        assert per_rank[r] == reference_batches(total, 0, micro, r, dp)
        assert len(MegatronPretrainingSampler(total, 0, micro, r, dp)) == len(per_rank[r])
    for step in range(len(per_rank[0])):
        joined = sum((per_rank[r][step] for r in range(dp)), [])
        assert joined == list(range(step * micro * dp, (step + 1) * micro * dp))


@pytest.mark.parametrize("micro,dp", [(2, 1), (2, 3)])
def test_resume_gives_exactly_the_tail(micro, dp):
    total = 61
    for rank in range(dp):
        full = list(MegatronPretrainingSampler(total, 0, micro, rank, dp))
        for k in range(len(full) + 1):
            consumed = k * micro * dp
            resumed = list(MegatronPretrainingSampler(total, consumed, micro, rank, dp))
            assert resumed == full[k:]


def test_sampler_keeps_partial_batch_when_asked():
    batches = list(MegatronPretrainingSampler(10, 0, 2, 1, 2, drop_last=False))
    assert batches == [[2, 3], [6, 7]]  # the last group [8, 9] has nothing for rank 1
    assert list(MegatronPretrainingSampler(10, 0, 2, 0, 2, drop_last=False))[-1] == [8, 9]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(data_parallel_size=0), "data_parallel_size"),
        (dict(data_parallel_rank=2), "data_parallel_rank"),
        (dict(consumed_samples=-1), "consumed_samples"),
        (dict(consumed_samples=101), "exceeds"),
    ],
)
def test_sampler_bad_inputs(kwargs, message):
    params = dict(total_samples=100, consumed_samples=0, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2)
    params.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MegatronPretrainingSampler(**params)


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 50000, size=n).astype(np.uint16) for n in rng.integers(1, 50, size=200)]
    prefix = str(tmp_path / "corpus_text_document")
    write_token_files(prefix, docs)
    lengths = np.array([len(d) for d in docs])
    doc_ref, _, shuffle_ref, _ = reference_indices(lengths, "1", "train", 8, 300, 11)
    expected = reference_samples(docs, doc_ref, shuffle_ref, 8)
    return GPTDataset(prefix, 8, 300, 11, split="1", cache_dir=str(tmp_path / "cache")), expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_yields_int64_batches_and_resumes(dataset, num_workers):
    ds, expected = dataset
    micro, dp = 3, 2
    for rank in range(dp):
        loader = build_pretraining_data_loader(ds, 0, micro, rank, dp, num_workers=num_workers)
        batches = list(loader)
        ids = reference_batches(len(ds), 0, micro, rank, dp)
        assert len(batches) == len(ids) == len(loader)
        for batch, sample_ids in list(zip(batches, ids))[:5] + [(batches[-1], ids[-1])]:
            assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (micro, 8)
            want = np.stack([expected[i] for i in sample_ids])
            np.testing.assert_array_equal(batch["tokens"].numpy(), want[:, :-1])
            np.testing.assert_array_equal(batch["labels"].numpy(), want[:, 1:])
        if num_workers:
            break
        consumed = 10 * micro * dp
        resumed = list(build_pretraining_data_loader(ds, consumed, micro, rank, dp))
        assert len(resumed) == len(batches) - 10
        for a, b in zip(resumed, batches[10:]):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])


def test_loader_none_for_missing_dataset():
    assert build_pretraining_data_loader(None, 0, 1, 0, 1) is None
